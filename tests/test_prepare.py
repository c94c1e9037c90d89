"""`python -m mmfsar.prepare`: videos, pose and split import on small real files.

The source videos are written here with PyAV: H.264 mp4 at 48x64 / 25 fps, an odd-sized 37x50
at 30 fps (H.264 4:4:4, which allows odd sizes), a variable-frame-rate H.264 mp4 whose frames
are solid grey levels (so the resampled frame order can be read back), and an MPEG-4 Part 2 avi.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from mmfsar.errors import DataError
from mmfsar.data.meta import ClassInfo, ClipRecord, DatasetFolder, DatasetMeta, read_annotations, write_annotations
from mmfsar.data.readers import FrameReader, VideoFileReader
from mmfsar.prepare.cli import main
from mmfsar.prepare.common import CATALOG_FILE, StageState
from mmfsar.prepare.pose import LAYOUTS, create_format, import_pose, resolve_layout, to_stored
from mmfsar.prepare.splits import import_splits, read_split_file
from mmfsar.prepare.videos import VideoSettings, is_variable_rate, output_size, prepare_videos, resample_times

VFR_PTS_MS = [0, 40, 80, 200, 240, 400, 440, 480, 520, 700, 740, 780]
VFR_LEVELS = [20 + 18 * i for i in range(len(VFR_PTS_MS))]


# ------------------------------------------------------------------------------------ test inputs
def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3)).astype(np.uint8), (0, 0), 2)


def moving(h: int, w: int, n: int, seed: int = 0) -> np.ndarray:
    tex = _texture(h + 2 * n, w + 2 * n, seed)
    return np.stack([tex[t : t + h, t : t + w] for t in range(n)])


def write_video(path: Path, frames: np.ndarray, fps: float = 25, *, pts_ms=None, codec="libx264",
                pix_fmt="yuv420p", fmt=None) -> Path:  # fmt: skip
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = pix_fmt
        if pts_ms is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            if pts_ms is not None:
                vf.pts, vf.time_base = int(pts_ms[i]), Fraction(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def vfr_frames() -> np.ndarray:
    return np.stack([np.full((48, 64, 3), v, np.uint8) for v in VFR_LEVELS])


@pytest.fixture(scope="module")
def ucf_tree(tmp_path_factory) -> Path:
    """A UCF101-style class-per-folder tree of real video files."""
    src = tmp_path_factory.mktemp("ucf") / "UCF-101"
    write_video(src / "Jump" / "v_Jump_g01_c01.mp4", moving(48, 64, 30), 25)
    write_video(src / "Jump" / "v_Jump_g02_c01.mp4", moving(37, 50, 36, seed=1), 30, pix_fmt="yuv444p")
    write_video(src / "Wave" / "v_Wave_g01_c01.mp4", vfr_frames(), 25, pts_ms=VFR_PTS_MS)
    write_video(src / "Wave" / "v_Wave_g02_c01.avi", moving(48, 64, 25, seed=2), 25, codec="mpeg4", fmt="avi")
    (src / "Wave" / "notes.txt").write_text("not a video")
    return src


def nearest_later(times_ms, t):
    """Index of the source frame nearest to t (ties: the later one)."""
    d = [abs(x - t) for x in times_ms]
    best = min(d)
    return max(i for i, x in enumerate(d) if x == best)


# ----------------------------------------------------------------------------------------- videos
def test_resample_times_is_nearest_in_time():
    assert resample_times([0.0, 0.04, 0.08, 0.12], 25) == [0, 1, 2, 3]  # same rate: identity
    assert resample_times([i / 25 for i in range(30)], 15) == [round(k * 25 / 15 + 1e-9) for k in range(18)]
    vfr = [t / 1000 for t in VFR_PTS_MS]
    expected = [nearest_later(VFR_PTS_MS, 40 * k) for k in range(21)]  # ends 1 median interval after 780 ms
    assert resample_times(vfr, 25) == expected
    assert is_variable_rate(vfr) and not is_variable_rate([i / 30 for i in range(20)])


def test_output_size_keeps_aspect_and_padding_makes_it_even():
    assert output_size(240, 320, short_side=128) == (128, 171)
    assert output_size(320, 240, short_side=128) == (171, 128)
    assert output_size(37, 50) == (37, 50)
    assert output_size(37, 50, size=(64, 64)) == (64, 64)


def test_videos_from_ucf_tree_validate_and_load(ucf_tree, tmp_path, capsys):
    out = tmp_path / "ucf"
    rc = main(["videos", str(ucf_tree), str(out), "--fps", "15", "--short-side", "32", "--frames",
               "--workers", "2", "--quiet"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "OK: no problems found" in printed  # the validator's report ends every command

    meta = DatasetMeta.load(out)
    assert meta.fps == 15.0
    assert [(c.name, c.split) for c in meta.classes] == [("Jump", "base"), ("Wave", "base")]
    assert meta.modalities["rgb"] == {"format": "video", "dir": "rgb", "reader": {"ext": ".mp4"}}
    assert meta.modalities["rgb_frames"]["format"] == "frames"
    # 48x64 -> 32x43 and 37x50 -> 32x43, padded to even 32x44 for H.264 yuv420p
    assert meta.frame_size == (32, 44)

    recs = {r.video: r for r in read_annotations(out / "annotations.csv")}
    assert sorted(recs) == ["Jump/v_Jump_g01_c01", "Jump/v_Jump_g02_c01", "Wave/v_Wave_g01_c01", "Wave/v_Wave_g02_c01"]
    # constant 15 fps: 1.2 s, 1.2 s, 0.82 s (VFR), 1.0 s
    expected_frames = {"Jump/v_Jump_g01_c01": 18, "Jump/v_Jump_g02_c01": 18, "Wave/v_Wave_g01_c01": 13,
                       "Wave/v_Wave_g02_c01": 15}  # fmt: skip
    assert {v: (r.start_frame, r.end_frame) for v, r in recs.items()} == {v: (0, n) for v, n in expected_frames.items()}
    assert (out / CATALOG_FILE).read_text() == (out / "annotations.csv").read_text()

    frames_reader = FrameReader.create("frames", out / "rgb_frames")
    for backend in ("decord", "pyav"):
        video_reader = VideoFileReader(out / "rgb", backend=backend)
        for v, n in expected_frames.items():
            assert video_reader.length(v) == n == frames_reader.length(v)
            assert video_reader.read(v, np.array([0, n - 1])).shape == (2, 32, 44, 3)
    with __import__("av").open(str(out / "rgb" / "Jump" / "v_Jump_g02_c01.mp4")) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.format.name, s.average_rate) == ("h264", "yuv420p", 15)

    # flow straight from the stored videos (decord), in parallel
    assert main(["flow", str(out), "--workers", "2", "--quiet"]) == 0
    assert "OK: no problems found" in capsys.readouterr().out
    flow = np.load(out / "flow" / "Jump" / "v_Jump_g01_c01.npy").astype(np.float64)
    assert flow.shape == (18, 32, 44, 2)
    # the texture moves 1 px up-left per source frame: ~1.67 source frames per stored frame, scaled by 2/3
    assert flow[:-1, 4:-4, 4:-4].reshape(-1, 2).mean(0) == pytest.approx(
        [-25 / 15 * 43 / 64, -25 / 15 * 32 / 48], abs=0.2
    )

    # a clip loads through the data module with the documented shapes
    from mmfsar.data.datamodules import FewShotDataModule
    from mmfsar.data.modalities import RGB, Flow

    (tmp_path / "train.txt").write_text("Jump/v_Jump_g01_c01\nJump/v_Jump_g02_c01\n")
    (tmp_path / "test.txt").write_text("Wave/v_Wave_g01_c01.avi\nWave/v_Wave_g02_c01.avi\n")
    assert main(["splits", str(out), "--train", str(tmp_path / "train.txt"), "--test", str(tmp_path / "test.txt"),
                 "--check", "files", "--quiet"]) == 0  # fmt: skip
    modalities = {"rgb": RGB(name="rgb", size=32), "flow": Flow(name="flow", size=32)}
    dm = FewShotDataModule(root=out, modalities=modalities, split="novel", domain="source",
                           episodes={"n_way": 1, "k_shot": 1, "n_query": 1, "episodes": 2}, num_workers=0)  # fmt: skip
    dm.setup("test")
    item = dm.clips[0]
    assert tuple(item["rgb"].shape) == (3, 8, 32, 32) and tuple(item["flow"].shape) == (2, 8, 32, 32)
    assert item["label"] == 0 and item["clip_id"].startswith("Wave/")


def test_variable_frame_rate_is_resampled_by_timestamps(ucf_tree, tmp_path):
    src = tmp_path / "src"
    (src / "Wave").mkdir(parents=True)
    (src / "Wave" / "vfr.mp4").write_bytes((ucf_tree / "Wave" / "v_Wave_g01_c01.mp4").read_bytes())
    out = tmp_path / "out"
    result = prepare_videos(out, src=src, settings=VideoSettings(fps=25, frames=True), workers=1, progress=False)
    assert result.ok, result.summary()
    expected = [nearest_later(VFR_PTS_MS, 40 * k) for k in range(21)]
    marker = StageState(out, "videos").load("Wave/vfr")
    assert marker["frame_map"] == expected and marker["source_frames"] == 12
    frames = VideoFileReader(out / "rgb").read("Wave/vfr", np.arange(21))
    levels = frames.reshape(21, -1).mean(1)
    np.testing.assert_allclose(levels, [VFR_LEVELS[i] for i in expected], atol=6)
    jpgs = FrameReader.create("frames", out / "rgb_frames").read("Wave/vfr", np.arange(21))
    np.testing.assert_allclose(jpgs.reshape(21, -1).mean(1), levels, atol=4)


def test_odd_size_is_padded_without_resizing(ucf_tree, tmp_path):
    src = tmp_path / "src" / "Jump"
    src.mkdir(parents=True)
    (src / "odd.mp4").write_bytes((ucf_tree / "Jump" / "v_Jump_g02_c01.mp4").read_bytes())
    out = tmp_path / "out"
    result = prepare_videos(out, src=src.parent, settings=VideoSettings(frames=True), workers=1, progress=False)
    assert result.ok, result.summary()
    meta = DatasetMeta.load(out)
    assert meta.fps == 30.0 and meta.frame_size == (38, 50)  # one replicated row at the bottom
    stored = VideoFileReader(out / "rgb").read("Jump/odd", np.array([0]))[0].astype(int)
    original = moving(37, 50, 36, seed=1)[0].astype(int)
    assert np.abs(stored[:37] - original).mean() < 4  # content untouched, not rescaled
    assert np.abs(stored[37] - stored[36]).mean() < 4
    assert StageState(out, "videos").load("Jump/odd")["pad"] == [1, 0]


def test_display_rotation_is_applied_and_reencoding_resumes(tmp_path):
    import av

    img = np.zeros((64, 96, 3), np.uint8)
    img[:10, :20] = 255  # a white block at the top left of the coded frame
    path = tmp_path / "src" / "Phone" / "portrait.mp4"
    path.parent.mkdir(parents=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        s.set_display_rotation(90)  # shown rotated 90 degrees counter-clockwise, as phones record
        for _ in range(10):
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    out = tmp_path / "out"
    result = prepare_videos(out, src=tmp_path / "src", workers=1, progress=False)
    assert result.ok and result.done == ["Phone/portrait"]
    assert DatasetMeta.load(out).frame_size == (96, 64)  # upright: portrait
    frame = VideoFileReader(out / "rgb").read("Phone/portrait", np.array([0]))[0].mean(-1)
    assert frame[78:94, 1:9].mean() > 200 and frame[:20, :10].mean() < 50  # the block is now bottom left
    mtime = (out / "rgb" / "Phone" / "portrait.mp4").stat().st_mtime_ns

    again = prepare_videos(out, src=tmp_path / "src", workers=1, progress=False)
    assert again.done == [] and again.skipped == ["Phone/portrait"]
    assert (out / "rgb" / "Phone" / "portrait.mp4").stat().st_mtime_ns == mtime
    other = prepare_videos(out, src=tmp_path / "src", settings=VideoSettings(fps=10), workers=1, progress=False)
    assert other.done == ["Phone/portrait"]  # other settings: redone
    assert read_annotations(out / "annotations.csv")[0].end_frame == 4


def test_keep_mode_links_files_and_refuses_variable_frame_rate(ucf_tree, tmp_path):
    src = tmp_path / "src"
    for name in ("v_Jump_g01_c01.mp4", "v_Jump_g02_c01.mp4"):
        (src / "Jump").mkdir(parents=True, exist_ok=True)
        (src / "Jump" / name).write_bytes((ucf_tree / "Jump" / name).read_bytes())
    out = tmp_path / "out"
    result = prepare_videos(out, src=src, settings=VideoSettings(mode="keep"), workers=1, progress=False)
    assert result.ok, result.summary()
    assert (out / "rgb" / "Jump" / "v_Jump_g01_c01.mp4").read_bytes() == (
        src / "Jump" / "v_Jump_g01_c01.mp4"
    ).read_bytes()
    assert {r.video: r.end_frame for r in read_annotations(out / "annotations.csv")} == {
        "Jump/v_Jump_g01_c01": 30, "Jump/v_Jump_g02_c01": 36}  # fmt: skip
    assert any("different frame rates" in n for n in result.notes)  # 25 and 30 fps kept as they are

    (src / "Wave").mkdir()
    (src / "Wave" / "vfr.mp4").write_bytes((ucf_tree / "Wave" / "v_Wave_g01_c01.mp4").read_bytes())
    result = prepare_videos(out, src=src, settings=VideoSettings(mode="keep"), workers=1, progress=False)
    assert result.skipped == ["Jump/v_Jump_g01_c01", "Jump/v_Jump_g02_c01"]  # resumed
    assert len(result.problems) == 1 and "vfr.mp4" in result.problems[0] and "variable frame rate" in result.problems[0]
    with pytest.raises(DataError, match="--video keep stores the videos unchanged"):
        VideoSettings(mode="keep", fps=15).check()


def test_different_source_rates_need_fps(ucf_tree, tmp_path):
    with pytest.raises(DataError, match=r"different frame rates \(14.63 fps: 1.*25 fps: 2.*30 fps: 1.*pass --fps"):
        prepare_videos(tmp_path / "out", src=ucf_tree, workers=1, progress=False)


def test_videos_from_csv_with_several_clips_per_video(ucf_tree, tmp_path):
    table = tmp_path / "clips.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "class", "split", "start_time", "end_time", "domain"])
        w.writerow(["Jump/v_Jump_g01_c01.mp4", "jump", "base", "0.0", "0.6", "target"])
        w.writerow(["Jump/v_Jump_g01_c01.mp4", "run", "novel", "0.6", "1.2", "target"])
    out = tmp_path / "out"
    result = prepare_videos(
        out, src=ucf_tree, csv_file=table, settings=VideoSettings(fps=10), workers=1, progress=False
    )
    assert result.ok, result.summary()
    recs = read_annotations(out / "annotations.csv")
    assert [(r.clip_id, r.label_name, r.split, r.domain, r.start_frame, r.end_frame) for r in recs] == [
        ("Jump/v_Jump_g01_c01#0000", "jump", "base", "target", 0, 6),
        ("Jump/v_Jump_g01_c01#0001", "run", "novel", "target", 6, 12),
    ]
    assert [(c.name, c.split) for c in DatasetMeta.load(out).classes] == [("jump", "base"), ("run", "novel")]

    bad = tmp_path / "bad.csv"
    bad.write_text("path,class,split\nJump/v_Jump_g01_c01.mp4,jump,train\n")
    with pytest.raises(DataError, match=r"bad.csv:2: split 'train'"):
        prepare_videos(tmp_path / "out2", src=ucf_tree, csv_file=bad, workers=1, progress=False)


def test_unreadable_video_is_reported_by_name_and_left_out(ucf_tree, tmp_path):
    src = tmp_path / "src"
    (src / "Jump").mkdir(parents=True)
    (src / "Jump" / "good.mp4").write_bytes((ucf_tree / "Jump" / "v_Jump_g01_c01.mp4").read_bytes())
    (src / "Jump" / "broken.mp4").write_bytes(b"\x00" * 2000)
    out = tmp_path / "out"
    result = prepare_videos(out, src=src, workers=1, progress=False)
    assert len(result.problems) == 1 and "broken.mp4" in result.problems[0]
    assert [r.video for r in read_annotations(out / "annotations.csv")] == ["Jump/good"]


# ------------------------------------------------------------------------------------------- pose
@pytest.fixture
def small_dataset(ucf_tree, tmp_path) -> Path:
    """One 48x64 25 fps video stored at 15 fps, short side 32 (-> 32x43, padded to 32x44)."""
    src = tmp_path / "src" / "Jump"
    src.mkdir(parents=True)
    (src / "v1.mp4").write_bytes((ucf_tree / "Jump" / "v_Jump_g01_c01.mp4").read_bytes())
    out = tmp_path / "ds"
    prepare_videos(out, src=src.parent, settings=VideoSettings(fps=15, short_side=32), workers=1, progress=False)
    return out


def _coco_person(rng, score, joints=17):
    kp = np.stack([rng.uniform(0, 64, joints), rng.uniform(0, 48, joints), rng.uniform(0.5, 1, joints)], 1)
    return {"keypoints": kp.ravel().round(3).tolist(), "score": score, "category_id": 1}


def test_pose_from_coco_json_maps_frames_and_coordinates(small_dataset, tmp_path, capsys):
    rng = np.random.default_rng(0)
    kp_dir = tmp_path / "kp" / "Jump" / "v1"
    kp_dir.mkdir(parents=True)
    best = {}
    for i in range(30):  # keypoints of the 30 source frames (25 fps, 48x64 pixels)
        people = [_coco_person(rng, 0.4), _coco_person(rng, 0.9), _coco_person(rng, 0.2)]
        best[i] = np.asarray(people[1]["keypoints"], np.float32).reshape(17, 3)
        (kp_dir / f"{i:06d}.json").write_text(json.dumps(people))
    rc = main(["pose", str(small_dataset), str(tmp_path / "kp"), "--from", "coco", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "OK: no problems found" in printed

    meta = DatasetMeta.load(small_dataset)
    assert meta.joints == list(LAYOUTS["coco17"].joints) and meta.edges == list(LAYOUTS["coco17"].edges)
    assert meta.modalities["pose"]["frame_size"] == [32, 44]
    pose = np.load(small_dataset / "pose" / "Jump" / "v1.npy")
    assert pose.shape == (18, 17, 3) and pose.dtype == np.float32
    # stored frame k (15 fps) shows source frame round(k * 25 / 15); coordinates scaled 48x64 -> 32x43
    for k in (0, 1, 7, 17):
        src = best[round(k * 25 / 15 + 1e-9)]
        np.testing.assert_allclose(pose[k, :, 0], (src[:, 0] + 0.5) * 43 / 64 - 0.5, atol=1e-3)
        np.testing.assert_allclose(pose[k, :, 1], (src[:, 1] + 0.5) * 32 / 48 - 0.5, atol=1e-3)
        np.testing.assert_allclose(pose[k, :, 2], src[:, 2], atol=1e-6)

    from mmfsar.data.modalities import Pose, PoseKeypoints
    from mmfsar.data.transforms import ClipParams

    folder = DatasetFolder.open(small_dataset)
    rec = folder.records[0]
    idx = np.arange(0, 16, 2)
    assert tuple(Pose(name="pose", size=32).bind(folder)(rec, idx, ClipParams()).shape) == (17, 8, 32, 32)
    assert tuple(PoseKeypoints(name="k", stream="pose").bind(folder)(rec, idx, ClipParams()).shape) == (3, 8, 17)


def test_pose_from_openpose_and_npy(small_dataset, tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "op" / "Jump" / "v1"
    d.mkdir(parents=True)
    arrays = {}
    for i in range(18):  # computed on the stored frames
        kp = np.stack([rng.uniform(0, 44, 25), rng.uniform(0, 32, 25), rng.uniform(0, 1, 25)], 1).round(3)
        arrays[i] = kp
        people = [{"person_id": [-1], "pose_keypoints_2d": kp.ravel().tolist(), "face_keypoints_2d": []}]
        if i == 4:
            people = []  # nobody detected in this frame
        (d / f"v1_{i:012d}_keypoints.json").write_text(json.dumps({"version": 1.3, "people": people}))
    result = import_pose(
        small_dataset, tmp_path / "op", fmt="openpose", frames="stored", coords="stored", progress=False
    )
    assert result.ok, result.summary()
    pose = np.load(small_dataset / "pose" / "Jump" / "v1.npy")
    assert pose.shape == (18, 25, 3)
    np.testing.assert_allclose(pose[3], arrays[3], atol=1e-4)
    assert not pose[4].any()  # no detection: confidence 0
    assert DatasetMeta.load(small_dataset).modalities["pose"]["layout"] == "openpose_body25"

    (tmp_path / "np" / "Jump").mkdir(parents=True)
    np.save(tmp_path / "np" / "Jump" / "v1.npy", rng.uniform(0, 30, (18, 17, 2)).astype(np.float32))
    result = import_pose(small_dataset, tmp_path / "np", fmt="npy", frames="stored", coords="stored", progress=False)
    assert result.ok
    pose = np.load(small_dataset / "pose" / "Jump" / "v1.npy")
    assert pose.shape == (18, 17, 3) and (pose[..., 2] == 1).all()  # (T, J, 2): confidence 1
    assert DatasetMeta.load(small_dataset).modalities["pose"]["layout"] == "coco17"


def test_pose_with_a_custom_layout_file(small_dataset, tmp_path):
    layout = tmp_path / "hand.json"
    layout.write_text(json.dumps({"name": "three", "joints": ["left_a", "right_a", "b"], "edges": [[0, 2], [1, 2]]}))
    (tmp_path / "np" / "Jump").mkdir(parents=True)
    np.save(tmp_path / "np" / "Jump" / "v1.npy", np.ones((18, 3, 3), np.float32))
    with pytest.raises(DataError, match=r"v1.npy: 3 keypoints per person match no known npy layout.*--layout"):
        import_pose(small_dataset, tmp_path / "np", fmt="npy", progress=False)
    result = import_pose(small_dataset, tmp_path / "np", fmt="npy", layout=str(layout), progress=False)
    assert result.ok
    meta = DatasetMeta.load(small_dataset)
    assert meta.joints == ["left_a", "right_a", "b"] and meta.edges == [(0, 2), (1, 2)]
    assert meta.flip_permutation() == [1, 0, 2]


def test_pose_import_reports_bad_videos_and_keeps_the_good_ones(tmp_path, capsys):
    root = catalog_dataset(tmp_path / "ds", {"Jump/a": "Jump", "Jump/b": "Jump", "Jump/c": "Jump"})
    kp = tmp_path / "kp" / "Jump"
    kp.mkdir(parents=True)
    for v in "abc":
        np.save(kp / f"{v}.npy", np.full((4, 17, 3), 2.0, np.float32))
    assert main(["pose", str(root), str(tmp_path / "kp"), "--from", "npy", "--quiet"]) == 0
    capsys.readouterr()
    np.save(kp / "a.npy", np.zeros((4, 17), np.float32))  # now malformed
    np.save(kp / "c.npy", np.full((4, 18, 3), 2.0, np.float32))  # other joint count than the rest
    rc = main(["pose", str(root), str(tmp_path / "kp"), "--from", "npy", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 1
    assert f"{kp / 'a.npy'}: expected keypoints (T, J, 3)" in printed
    assert f"{kp / 'c.npy'}: 18 keypoints per person, but other videos have 17" in printed
    assert (root / "pose" / "Jump" / "b.npy").is_file()
    assert not (root / "pose" / "Jump" / "a.npy").exists()  # no stale keypoints of the earlier import
    assert "npy: file for video 'Jump/a' not found" in printed  # and the validator says so


@pytest.mark.parametrize(
    "fmt,name,content,message",
    [
        ("coco", "000003.json", '[{"keypoints": [1, 2, 0.5,', "000003.json: not valid JSON"),
        ("coco", "000003.json", '{"people": []}', "000003.json: expected a list of COCO detections"),
        ("coco", "000003.json", '[{"bbox": [0, 0, 1, 1]}]', "000003.json: detection 0 has no 'keypoints'"),
        ("coco", "000003.json", '[{"keypoints": [1, 2, 0.5, 4]}]', "000003.json: detection 0: keypoints has 4 values"),
        (
            "coco",
            "000003.json",
            '[{"keypoints": [1, "x", 0.5]}]',
            "000003.json: detection 0: keypoints must be numbers",
        ),
        (
            "openpose",
            "v_000000000003_keypoints.json",
            '{"version": 1.3}',
            "keypoints.json: not an OpenPose keypoint file",
        ),
        (
            "openpose",
            "v_000000000003_keypoints.json",
            '{"people": [{"face": []}]}',
            r"people\[0\] has no 'pose_keypoints_2d'",
        ),
    ],
)
def test_malformed_keypoint_files_are_rejected_naming_the_file(tmp_path, fmt, name, content, message):
    d = tmp_path / "video"
    d.mkdir()
    good = {"coco": json.dumps([{"keypoints": [1.0, 2.0, 0.9] * 17}]),
            "openpose": json.dumps({"people": [{"pose_keypoints_2d": [1.0, 2.0, 0.9] * 25}]})}[fmt]  # fmt: skip
    for i in range(3):
        (d / (f"{i:06d}.json" if fmt == "coco" else f"v_{i:012d}_keypoints.json")).write_text(good)
    (d / name).write_text(content)
    with pytest.raises(DataError, match=message) as err:
        create_format(fmt).load(d)
    assert str(d / name) in str(err.value)


@pytest.mark.parametrize(
    "array,message",
    [
        (np.zeros((10, 17)), r"expected keypoints \(T, J, 3\).*got shape \(10, 17\)"),
        (np.zeros((10, 2, 17, 3)), r"multi-person arrays \(T, M, J, C\) are not supported"),
        (np.zeros((10, 17, 4)), r"got shape \(10, 17, 4\)"),
        (np.array([["a", "b"]]), "expected a numeric keypoint array"),
    ],
)
def test_wrong_keypoint_arrays_are_rejected_naming_the_file(tmp_path, array, message):
    path = tmp_path / "v.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=message) as err:
        create_format("npy").load(path)
    assert str(path) in str(err.value)


def test_unknown_layout_and_joint_count_mismatch(tmp_path):
    fmt = create_format("coco")
    with pytest.raises(DataError, match=r"f.json: 19 keypoints per person match no known coco layout"):
        resolve_layout("auto", 19, fmt, tmp_path / "f.json")
    with pytest.raises(DataError, match="unknown keypoint layout 'halpe'"):
        resolve_layout("halpe", 26, fmt, tmp_path / "f.json")
    with pytest.raises(DataError, match="17 keypoints per person, but layout 'openpose_body25' has 25"):
        resolve_layout("openpose_body25", 17, fmt, tmp_path / "f.json")


def test_coco_results_file_and_visibility_flags(tmp_path):
    dets = [{"image_id": f"img_{i + 1:05d}.jpg", "keypoints": [10.0 + i, 20.0, 2] * 16 + [0, 0, 0], "score": 1.0}
            for i in range(4) if i != 2]  # fmt: skip
    path = tmp_path / "v.json"
    path.write_text(json.dumps(dets))
    kp = create_format("coco", start_index=1).load(path)
    assert kp.shape == (4, 17, 3)
    assert kp[0, 0].tolist() == [10.0, 20.0, 1.0]  # ground-truth visibility 2 -> confidence 1
    assert kp[0, 16, 2] == 0 and not kp[2].any()  # unlabelled joint, frame without detection
    out, uncovered = to_stored(kp, 6, None, (48, 64), frames="stored", coords="stored")
    assert out.shape == (6, 17, 3) and uncovered == 2 and not out[4:].any()


# ----------------------------------------------------------------------------------------- splits
def catalog_dataset(root: Path, videos: dict[str, str], missing_files: tuple[str, ...] = ()) -> Path:
    """A dataset of tiny npy RGB videos; ``videos`` maps video id -> class."""
    root.mkdir(parents=True)
    records = []
    for v, c in videos.items():
        if v not in missing_files:
            (root / "rgb" / v).parent.mkdir(parents=True, exist_ok=True)
            np.save(root / "rgb" / f"{v}.npy", np.zeros((4, 8, 8, 3), np.uint8))
        records.append(ClipRecord(v, c, "source", "base", v, 0, 4))
    write_annotations(root / "annotations.csv", records)
    DatasetMeta(
        name="cat", fps=25, classes=[ClassInfo(c, "base") for c in sorted(set(videos.values()))],
        modalities={"rgb": {"format": "npy", "dir": "rgb"}}, frame_size=(8, 8),
    ).save(root)  # fmt: skip
    return root


def test_arn_split_import_counts_classes_and_flags_missing_videos(tmp_path, capsys):
    classes = ["ApplyEyeMakeup", "Biking", "CricketShot", "HandstandPushups", "JumpRope", "Knitting"]
    videos = {f"{c}/v_{c.replace('Handstand', 'HandStand')}_g0{g}_c01": c for c in classes for g in (1, 2, 3)}
    root = catalog_dataset(tmp_path / "ucf", videos, missing_files=("Knitting/v_Knitting_g03_c01",))
    lists = tmp_path / "splits"
    lists.mkdir()
    (lists / "train.txt").write_text(
        "".join(f"{v}\n" for v, c in videos.items() if c in classes[:3]) + "Biking/v_Biking_g09_c01\n"
    )
    (lists / "val.txt").write_text("".join(f"{v}.avi 4\n" for v, c in videos.items() if c == "HandstandPushups"))
    (lists / "test.txt").write_text("".join(f"{v}\n" for v, c in videos.items() if c in classes[4:]))
    rc = main(["splits", str(root), "--train", str(lists / "train.txt"), "--val", str(lists / "val.txt"),
               "--test", str(lists / "test.txt"), "--quiet"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "OK: no problems found" in printed
    assert "Biking/v_Biking_g09_c01" in printed and "Knitting/v_Knitting_g03_c01" in printed

    meta = DatasetMeta.load(root)
    assert meta.classes_of("base") == classes[:3]
    assert meta.classes_of("val") == ["HandstandPushups"]
    assert meta.classes_of("novel") == classes[4:]
    recs = read_annotations(root / "annotations.csv")
    assert {s: sum(r.split == s for r in recs) for s in ("base", "val", "novel")} == {"base": 9, "val": 3, "novel": 5}
    missing = (root / ".prepare" / "splits" / "missing.txt").read_text().splitlines()
    assert [m.split("\t")[:2] for m in missing] == [
        ["base", "Biking/v_Biking_g09_c01"],
        ["novel", "Knitting/v_Knitting_g03_c01"],
    ]

    result = import_splits(root, train=lists / "train.txt", val=lists / "val.txt", test=lists / "test.txt")
    assert result.counts == {
        "base": {"classes": 3, "listed": 10, "found": 9, "missing": 1},
        "val": {"classes": 1, "listed": 3, "found": 3, "missing": 0},
        "novel": {"classes": 2, "listed": 6, "found": 5, "missing": 1},
    }
    # the full catalogue is kept: importing another split starts from every video again
    assert len(read_annotations(root / CATALOG_FILE)) == 18
    (lists / "train2.txt").write_text("".join(f"{v}\n" for v, c in videos.items() if c in classes[3:5]))
    result = import_splits(root, train=lists / "train2.txt", test=lists / "train.txt")
    assert result.counts["base"]["classes"] == 2 and result.counts["novel"]["classes"] == 3


def test_cmn_split_names_classes_by_the_list_and_matches_by_video_id(tmp_path):
    ids = ["blasting_sand/-kYzxMKp514_000086_000096", "blasting_sand/1663fIopl7c_000035_000045",
           "busking/-YGUR0HXgyE_000085_000095", "busking/09ZMT8HT0DA_000030_000040"]  # fmt: skip
    videos = {v: v.split("/")[0] for v in ids}
    root = catalog_dataset(tmp_path / "k100", videos)
    train = tmp_path / "train.txt"
    train.write_text("blasting sand/-kYzxMKp514_000086_000096\nblasting sand/1663fIopl7c_000035_000045\n")
    test = tmp_path / "test.txt"
    test.write_text("busking/-YGUR0HXgyE_000085_000095\nbusking/09ZMT8HT0DA_000030_000040\n")
    result = import_splits(root, train=train, test=test, style="cmn")
    assert result.ok and not result.missing
    meta = DatasetMeta.load(root)
    assert meta.classes_of("base") == ["blasting sand"] and meta.classes_of("novel") == ["busking"]


def test_otam_split_uses_dataset_class_names_when_groups_map_one_to_one(tmp_path):
    videos = {"12": "Pushing something", "13": "Pushing something", "20": "Tearing something",
              "21": "Tearing something", "30": "Folding something"}  # fmt: skip
    root = catalog_dataset(tmp_path / "ssv2", videos)
    train = tmp_path / "trainlist01.txt"
    train.write_text("train0/12\ntrain0/13\ntrain1/20\ntrain1/21\n")
    test = tmp_path / "testlist01.txt"
    test.write_text("test0/30\ntest0/99\n")
    result = import_splits(root, train=train, test=test)  # style detected
    assert result.counts["base"] == {"classes": 2, "listed": 4, "found": 4, "missing": 0}
    assert result.counts["novel"] == {"classes": 1, "listed": 2, "found": 1, "missing": 1}
    assert [(e.group, e.video) for e in result.missing] == [("test0", "99")]
    assert DatasetMeta.load(root).classes_of("base") == ["Pushing something", "Tearing something"]

    flat = catalog_dataset(tmp_path / "flat", {v: "unlabelled" for v in videos})
    import_splits(flat, train=train, test=test)
    assert DatasetMeta.load(flat).classes_of("base") == ["train0", "train1"]


def test_split_lines_that_do_not_parse_and_shared_classes_are_errors(tmp_path):
    bad = tmp_path / "trainlist.txt"
    bad.write_text("# comment\nJump/v1\n\nJump v2\n/v3\n")
    with pytest.raises(DataError, match=r"2 line\(s\) of .*trainlist.txt do not parse") as err:
        read_split_file(bad, "base")
    assert f"{bad}:4: cannot parse 'Jump v2'" in str(err.value) and f"{bad}:5:" in str(err.value)
    with pytest.raises(DataError, match=r"otam.txt:1: .*expected '<train\|val\|test><n>/video_id'"):
        (tmp_path / "otam.txt").write_text("Jump/v1\n")
        read_split_file(tmp_path / "otam.txt", "base", style="otam")

    root = catalog_dataset(tmp_path / "ds", {"Jump/v1": "Jump", "Jump/v2": "Jump"})
    (tmp_path / "a.txt").write_text("Jump/v1\n")
    (tmp_path / "b.txt").write_text("Jump/v2\n")
    with pytest.raises(DataError, match=r"more than one split.*'Jump': \['base', 'novel'\]"):
        import_splits(root, train=tmp_path / "a.txt", test=tmp_path / "b.txt")


# -------------------------------------------------------------------------------------------- cli
def test_cli_entry_point_and_validate_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mmfsar.prepare", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("videos", "flow", "pose", "splits", "validate"):
        assert name in out.stdout
    root = catalog_dataset(tmp_path / "ds", {"Jump/v1": "Jump", "Jump/v2": "Jump"})
    assert main(["validate", str(root), "--quiet"]) == 0
    (root / "rgb" / "Jump" / "v2.npy").unlink()
    assert main(["validate", str(root), "--quiet"]) == 1
    assert main(["flow", str(tmp_path / "nowhere"), "--quiet"]) == 1  # clear error, no traceback

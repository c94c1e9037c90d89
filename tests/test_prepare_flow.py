"""`python -m mmfsar.prepare flow`: accuracy on a known motion, storage formats, resume.

The datasets here store RGB as lossless PNG frames of a smooth random texture that translates by
a known amount per frame, so the true flow is known everywhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfsar.errors import DataError
from mmfsar.data.meta import ClassInfo, ClipRecord, DatasetFolder, DatasetMeta, write_annotations
from mmfsar.data.readers import FrameReader
from mmfsar.prepare import flow as flow_mod
from mmfsar.prepare.cli import main
from mmfsar.prepare.common import STATE_DIR
from mmfsar.prepare.flow import FLOW_METHODS, create_method, flow_frames, prepare_flow

DX, DY = 3, -2  # content moves 3 px right and 2 px up per frame


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3)).astype(np.uint8), (0, 0), 2)


def translating(n: int, h: int = 96, w: int = 128, dx: int = DX, dy: int = DY, seed: int = 0) -> np.ndarray:
    """Frames where the texture moves by (dx, dy) pixels per frame: frame t = crop at -t*(dx, dy)."""
    m = 4 + abs(dx) * n, 4 + abs(dy) * n
    tex = _texture(h + 2 * m[1], w + 2 * m[0], seed)
    y0, x0 = m[1], m[0]
    return np.stack([tex[y0 - dy * t : y0 - dy * t + h, x0 - dx * t : x0 - dx * t + w] for t in range(n)])


def png_dataset(root: Path, videos: dict[str, np.ndarray]) -> Path:
    """A dataset whose rgb stream is PNG frames (lossless), one clip per video."""
    root.mkdir(parents=True)
    records = []
    for i, (video, frames) in enumerate(videos.items()):
        d = root / "rgb" / video
        d.mkdir(parents=True)
        for k, f in enumerate(frames):
            Image.fromarray(f).save(d / f"{k:06d}.png")
        records.append(ClipRecord(video, f"c{i % 2}", "source", "base", video, 0, len(frames)))
    write_annotations(root / "annotations.csv", records)
    h, w = next(iter(videos.values())).shape[1:3]
    DatasetMeta(
        name=root.name,
        fps=25.0,
        classes=[ClassInfo("c0", "base"), ClassInfo("c1", "base")],
        modalities={"rgb": {"format": "frames", "dir": "rgb", "reader": {"template": "{:06d}.png"}}},
        frame_size=(h, w),
    ).save(root)
    return root


def interior_mean(flow: np.ndarray, border: int = 10) -> np.ndarray:
    return flow[:, border:-border, border:-border].reshape(-1, 2).astype(np.float64).mean(0)


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_flow_of_translating_texture_has_right_direction_and_magnitude(method):
    frames = translating(8)
    flow = np.stack(list(flow_frames(frames, create_method(method))))
    assert flow.shape == (8, 96, 128, 2)
    mean = interior_mean(flow)
    assert mean == pytest.approx([DX, DY], abs=0.15)  # x right-positive, y down-positive
    err = np.abs(flow[:, 10:-10, 10:-10] - np.array([DX, DY])).mean()
    assert err < 0.2
    # the last frame repeats the motion into the final frame
    np.testing.assert_array_equal(flow[-1], flow[-2])


def test_flow_is_aligned_with_frame_indices():
    # motion only between frames 2 and 3: flow frame 2 (= 2 -> 3) moves, the others are still
    still, moved = translating(2, dx=4, dy=0)
    frames = np.stack([still, still, still, moved, moved])
    flow = np.stack(list(flow_frames(frames, create_method("dis"))))
    means = [interior_mean(flow[i : i + 1])[0] for i in range(5)]
    assert means[2] == pytest.approx(4, abs=0.3)
    assert all(abs(means[i]) < 0.3 for i in (0, 1, 3, 4))


def test_single_frame_gives_zero_flow():
    flow = list(flow_frames(translating(1), create_method("dis")))
    assert len(flow) == 1 and not flow[0].any()


def test_unknown_method_and_option_are_clear_errors():
    with pytest.raises(DataError, match="unknown flow method 'raft'"):
        create_method("raft")
    with pytest.raises(DataError, match="unknown option"):
        create_method("farneback", window=3)
    with pytest.raises(DataError, match="preset"):
        create_method("dis", preset="slow")


def test_tvl1_needs_opencv_contrib():
    if FLOW_METHODS["tvl1"].unavailable() is None:
        pytest.skip("opencv-contrib is installed: tvl1 runs")
    with pytest.raises(DataError, match="opencv-contrib"):
        create_method("tvl1")


@pytest.mark.parametrize("fmt,tol", [("npy", 0.15), ("flow_xy", 0.2)])
def test_cli_flow_dataset_formats_validate_and_load(tmp_path, capsys, fmt, tol):
    root = png_dataset(tmp_path / "ds", {"a/v1": translating(6, seed=1), "b/v2": translating(5, seed=2)})
    rc = main(["flow", str(root), "--format", fmt, "--bound", "8", "--workers", "2", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "OK: no problems found" in out
    meta = DatasetMeta.load(root)
    entry = meta.modalities["flow"]
    assert entry["format"] == fmt and entry["method"] == "dis"
    if fmt == "flow_xy":
        assert entry["reader"]["bound"] == 8.0
    reader = FrameReader.create(entry["format"], root / "flow", **entry.get("reader", {}))
    for video, n in (("a/v1", 6), ("b/v2", 5)):
        assert reader.length(video) == n  # one flow frame per RGB frame
        flow = reader.read(video, np.arange(n))
        assert interior_mean(flow) == pytest.approx([DX, DY], abs=tol)

    # the flow modality loads a clip with the documented shape
    from mmfsar.data.modalities import Flow
    from mmfsar.data.transforms import ClipParams, UniformSegments

    folder = DatasetFolder.open(root)
    modality = Flow(name="flow", size=32).bind(folder)
    rec = folder.records[0]
    x = modality(rec, UniformSegments(4)(rec.start_frame, rec.end_frame, jitter=False), ClipParams())
    assert tuple(x.shape) == (2, 4, 32, 32)


def test_flow_at_reduced_resolution_is_in_pixels_of_the_flow_frame(tmp_path):
    root = png_dataset(tmp_path / "ds", {"v": translating(5, dx=4, dy=-2)})
    prepare_flow(root, short_side=48, workers=1, progress=False)
    flow = np.load(root / "flow" / "v.npy")
    assert flow.shape == (5, 48, 64, 2) and flow.dtype == np.float16
    assert interior_mean(flow, 6) == pytest.approx([2, -1], abs=0.15)  # half-size frames: half the pixels


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _videos(n: int, frames: int = 12) -> dict[str, np.ndarray]:
    return {f"c/v{i}": translating(frames, seed=10 + i) for i in range(n)}


def test_resume_skips_finished_videos_and_redoes_an_interrupted_one(tmp_path, monkeypatch):
    videos = _videos(4)
    ref = png_dataset(tmp_path / "ref", videos)
    prepare_flow(ref, method="farneback", workers=1, progress=False)

    root = png_dataset(tmp_path / "run", videos)
    real = flow_mod.flow_frames
    calls = {"n": 0}

    def crash_in_third_video(*args, **kwargs):
        calls["n"] += 1
        for i, f in enumerate(real(*args, **kwargs)):
            if calls["n"] == 3 and i == 5:
                raise KeyboardInterrupt  # killed while writing the third video
            yield f

    monkeypatch.setattr(flow_mod, "flow_frames", crash_in_third_video)
    with pytest.raises(KeyboardInterrupt):
        prepare_flow(root, method="farneback", workers=1, progress=False)
    monkeypatch.setattr(flow_mod, "flow_frames", real)
    # nothing half-written where a reader would look: no output and no marker for v2
    assert (root / "flow" / "c" / "v1.npy").is_file()
    assert not (root / "flow" / "c" / "v2.npy").exists()
    assert not (root / STATE_DIR / "flow" / "c" / "v2.json").exists()
    before = {v: (root / "flow" / f"{v}.npy").stat().st_mtime_ns for v in ("c/v0", "c/v1")}

    result = prepare_flow(root, method="farneback", workers=1, progress=False)
    assert sorted(result.skipped) == ["c/v0", "c/v1"]
    assert sorted(result.done) == ["c/v2", "c/v3"]
    assert {v: (root / "flow" / f"{v}.npy").stat().st_mtime_ns for v in before} == before
    assert _tree_bytes(root / "flow") == _tree_bytes(ref / "flow")
    assert not any((root / STATE_DIR / "tmp").iterdir())

    # a third run has nothing to do; other settings redo everything
    assert prepare_flow(root, method="farneback", workers=1, progress=False).done == []
    assert len(prepare_flow(root, method="dis", workers=1, progress=False).done) == 4


def test_resume_redoes_a_video_whose_output_was_damaged_or_input_changed(tmp_path):
    root = png_dataset(tmp_path / "ds", _videos(3, frames=6))
    prepare_flow(root, workers=1, progress=False)
    ref = _tree_bytes(root / "flow")
    (root / "flow" / "c" / "v0.npy").unlink()  # output lost: redone
    Image.fromarray(translating(1, seed=99)[0]).save(root / "rgb" / "c" / "v1" / "000005.png")
    os.utime(root / "rgb" / "c" / "v1", ns=(1, 1))  # input changed: redone
    result = prepare_flow(root, workers=1, progress=False)
    assert sorted(result.done) == ["c/v0", "c/v1"] and result.skipped == ["c/v2"]
    now = _tree_bytes(root / "flow")
    assert now["c/v0.npy"] == ref["c/v0.npy"] and now["c/v2.npy"] == ref["c/v2.npy"]
    assert now["c/v1.npy"] != ref["c/v1.npy"]


def test_killed_process_resumes_to_identical_files(tmp_path):
    videos = _videos(6, frames=40)
    ref = png_dataset(tmp_path / "ref", videos)
    prepare_flow(ref, method="farneback", workers=1, progress=False)
    root = png_dataset(tmp_path / "run", videos)
    cmd = [sys.executable, "-m", "mmfsar.prepare", "flow", str(root), "--method", "farneback",
           "--workers", "1", "--check", "none", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    markers = root / STATE_DIR / "flow"
    deadline = time.monotonic() + 60
    try:
        while not (markers.is_dir() and any(markers.rglob("*.json"))):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "flow run made no progress"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group of the run started above
        proc.wait()
    done_at_kill = len(list(markers.rglob("*.json")))
    assert 1 <= done_at_kill < 6

    result = prepare_flow(root, method="farneback", workers=2, progress=False)
    assert len(result.skipped) == done_at_kill and len(result.done) == 6 - done_at_kill
    assert _tree_bytes(root / "flow") == _tree_bytes(ref / "flow")
    assert not any((root / STATE_DIR / "tmp").iterdir())  # the killed run's temporaries are gone
    shutil.rmtree(ref)


def test_flow_without_dataset_or_stream_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no meta.json"):
        prepare_flow(tmp_path, progress=False)
    root = png_dataset(tmp_path / "ds", {"v": translating(3)})
    with pytest.raises(DataError, match="no 'video' stream"):
        prepare_flow(root, stream="video", progress=False)

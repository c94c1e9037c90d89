"""Format readers on files written by the synthetic generator, and their failure modes.

``tiny_dataset`` (rgb mp4, flow / pose / depth npy) and ``tiny_dataset_alt_formats`` (rgb JPEG
frames, flow x/y JPEG pairs, depth 16-bit PNG) hold the same clips rendered from the same seed,
so the readers of one stream must agree with each other up to the storage's loss.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfsar.errors import DataError
from mmfsar.data.meta import DatasetFolder
from mmfsar.data.readers import FrameReader, dequantize_flow, quantize_flow

FLOW_BOUND = 8.0  # the synthetic flow_xy export (generate.STORAGE)


def reader(root: Path, stream: str, **override) -> FrameReader:
    """The reader ``meta.json`` asks for, as a modality would build it."""
    info = DatasetFolder.open(root).meta.modalities[stream]
    return FrameReader.create(info["format"], root / info.get("dir", stream), **{**info.get("reader", {}), **override})


def videos(root: Path) -> list:
    return DatasetFolder.open(root).records


# ------------------------------------------------------------------------------------------------
# shapes, types and lengths
# ------------------------------------------------------------------------------------------------

EXPECTED = {
    # (dataset fixture, stream, reader override): (type name, frame shape, dtype)
    ("tiny_dataset", "rgb", "decord"): ("VideoFileReader", (64, 64, 3), np.uint8),
    ("tiny_dataset", "rgb", "pyav"): ("VideoFileReader", (64, 64, 3), np.uint8),
    ("tiny_dataset", "flow", None): ("NpyReader", (32, 32, 2), np.float16),
    ("tiny_dataset", "pose", None): ("NpyReader", (15, 3), np.float32),
    ("tiny_dataset", "depth", None): ("NpyReader", (32, 32), np.uint16),
    ("tiny_dataset_alt_formats", "rgb", None): ("ImageFramesReader", (64, 64, 3), np.uint8),
    ("tiny_dataset_alt_formats", "flow", None): ("FlowXYReader", (32, 32, 2), np.float32),
    ("tiny_dataset_alt_formats", "depth", None): ("ImageFramesReader", (32, 32), np.uint16),
}


@pytest.mark.parametrize("key", list(EXPECTED), ids=["-".join(str(k) for k in key) for key in EXPECTED])
def test_reader_shapes_types_and_lengths(key, request):
    dataset, stream, backend = key
    root = request.getfixturevalue(dataset)
    cls_name, frame_shape, dtype = EXPECTED[key]
    r = reader(root, stream, **({"backend": backend} if backend else {}))
    assert type(r).__name__ == cls_name
    recs = videos(root)
    assert len(recs) == 42
    for rec in recs[::5]:
        n = r.length(rec.video)
        # the video holds the annotated range plus 0..3 still frames on each side
        assert rec.start_frame <= 3 and rec.end_frame <= n <= rec.end_frame + 3
        assert 16 <= rec.num_frames <= 24
        idx = np.array([0, rec.start_frame, rec.end_frame - 1, n - 1])
        out = r.read(rec.video, idx)
        assert out.shape == (4, *frame_shape)
        assert out.dtype == dtype


def test_every_stream_of_a_video_has_the_same_number_of_frames(tiny_dataset, tiny_dataset_alt_formats):
    readers = [reader(tiny_dataset, s) for s in ("rgb", "flow", "pose", "depth")]
    readers += [reader(tiny_dataset, "rgb", backend="pyav")]
    readers += [reader(tiny_dataset_alt_formats, s) for s in ("rgb", "flow", "depth")]
    for rec in videos(tiny_dataset):
        lengths = {type(r).__name__ + str(r.root): r.length(rec.video) for r in readers}
        assert len(set(lengths.values())) == 1, (rec.video, lengths)


def test_auto_backend_is_decord_when_installed(tiny_dataset):
    pytest.importorskip("decord")
    assert reader(tiny_dataset, "rgb").backend == "decord"
    assert reader(tiny_dataset, "rgb", backend="pyav").backend == "pyav"
    with pytest.raises(DataError, match="backend"):
        reader(tiny_dataset, "rgb", backend="ffmpeg")


# ------------------------------------------------------------------------------------------------
# agreement between readers of the same stream
# ------------------------------------------------------------------------------------------------


def test_decord_and_pyav_decode_identical_frames(tiny_dataset):
    """Not approximately: PyAV decodes in order without seeking, so the pixels are identical."""
    pytest.importorskip("decord")
    dec = reader(tiny_dataset, "rgb", backend="decord")
    pav = reader(tiny_dataset, "rgb", backend="pyav")
    for rec in videos(tiny_dataset)[::3]:  # 14 videos of every class and both domains
        n = dec.length(rec.video)
        assert pav.length(rec.video) == n
        a, b = dec.read(rec.video, np.arange(n)), pav.read(rec.video, np.arange(n))
        np.testing.assert_array_equal(a, b)
        # consecutive frames differ (noise, motion): equal arrays are not trivially equal
        assert (a[1:] != a[:-1]).any(axis=(1, 2, 3)).all()
    # unordered and repeated indices come back in the requested order
    rec = videos(tiny_dataset)[7]
    idx = np.array([9, 0, 9, 3, 15, 1])
    full = dec.read(rec.video, np.arange(16))
    np.testing.assert_array_equal(dec.read(rec.video, idx), full[idx])
    np.testing.assert_array_equal(pav.read(rec.video, idx), full[idx])


def test_jpeg_frames_match_decoded_mp4_frames(tiny_dataset, tiny_dataset_alt_formats):
    """Both are lossy copies of the same rendered frames: close on average, and the JPEG frames
    are closer to the mp4 frames of the same numbers than to their neighbours (no off-by-one;
    compared over the clip, since the still frames around the action differ only by noise)."""
    mp4 = reader(tiny_dataset, "rgb")
    jpg = reader(tiny_dataset_alt_formats, "rgb")
    for rec in videos(tiny_dataset)[::3]:
        n = mp4.length(rec.video)
        a = mp4.read(rec.video, np.arange(n)).astype(np.float32)
        b = jpg.read(rec.video, np.arange(n)).astype(np.float32)
        err = np.abs(a - b).mean(axis=(1, 2, 3))  # per frame
        assert err.max() < 8.0, (rec.video, err.max())
        for shifted in (np.abs(a[1:] - b[:-1]).mean(), np.abs(a[:-1] - b[1:]).mean()):
            assert err.mean() < 0.9 * shifted, rec.video


def test_flow_xy_dequantises_the_documented_formula(tiny_dataset_alt_formats):
    """A pixel value v is (v / 255 * 2 - 1) * bound pixels, read straight from the JPEG pair."""
    r = reader(tiny_dataset_alt_formats, "flow")
    assert r.bound == FLOW_BOUND
    rec = videos(tiny_dataset_alt_formats)[4]
    folder = tiny_dataset_alt_formats / "flow" / rec.video
    x = np.asarray(Image.open(folder / "x_00005.jpg"))
    y = np.asarray(Image.open(folder / "y_00005.jpg"))
    assert x.dtype == np.uint8 and x.shape == (32, 32)
    out = r.read(rec.video, np.array([5]))[0]
    np.testing.assert_array_equal(out[..., 0], (x.astype(np.float32) / 255 * 2 - 1) * FLOW_BOUND)
    np.testing.assert_array_equal(out[..., 1], (y.astype(np.float32) / 255 * 2 - 1) * FLOW_BOUND)


def test_quantize_dequantize_round_trip_and_clipping():
    bound = 20.0
    step = 2 * bound / 255
    flow = np.linspace(-bound, bound, 1001, dtype=np.float32)
    back = dequantize_flow(quantize_flow(flow, bound), bound)
    assert np.abs(back - flow).max() <= step / 2 + 1e-5
    np.testing.assert_array_equal(quantize_flow(np.array([-bound, 0.0, bound, -1e3, 1e3]), bound), [0, 128, 255, 0, 255])
    # outside [-bound, bound] the displacement is clipped to the bound
    np.testing.assert_allclose(dequantize_flow(quantize_flow(np.array([-50.0, 50.0]), bound), bound), [-bound, bound])


def test_flow_xy_matches_npy_flow_within_quantisation_and_jpeg_error(tiny_dataset, tiny_dataset_alt_formats):
    npy = reader(tiny_dataset, "flow")
    jpg = reader(tiny_dataset_alt_formats, "flow")
    step = 2 * FLOW_BOUND / 255
    mean_errs = []
    for rec in videos(tiny_dataset):
        n = npy.length(rec.video)
        a = npy.read(rec.video, np.arange(n)).astype(np.float32)
        b = jpg.read(rec.video, np.arange(n))
        assert np.abs(a).max() < FLOW_BOUND  # nothing clipped in this data: the comparison is fair
        err = np.abs(a - b)
        assert err.max() < 1.0, rec.video  # JPEG ringing at motion edges, well under a pixel
        mean_errs.append(err.mean())
    assert np.mean(mean_errs) < 1.5 * step  # on average about one quantisation step


def test_png16_depth_equals_npy_depth_exactly(tiny_dataset, tiny_dataset_alt_formats):
    npy = reader(tiny_dataset, "depth")
    png = reader(tiny_dataset_alt_formats, "depth")
    assert png.template == "{:06d}.png"
    for rec in videos(tiny_dataset):
        n = npy.length(rec.video)
        a, b = npy.read(rec.video, np.arange(n)), png.read(rec.video, np.arange(n))
        assert a.dtype == b.dtype == np.uint16
        np.testing.assert_array_equal(a, b)
    # millimetres: the back wall of the synthetic scene is 4.8 figure heights x 1.7 m away
    assert 7000 < np.median(a) < 9300


def test_pose_is_identical_in_both_datasets(tiny_dataset, tiny_dataset_alt_formats):
    """Same seed, same settings, other formats: the rendered content does not change."""
    a, b = reader(tiny_dataset, "pose"), reader(tiny_dataset_alt_formats, "pose")
    for rec in videos(tiny_dataset):
        n = a.length(rec.video)
        np.testing.assert_array_equal(a.read(rec.video, np.arange(n)), b.read(rec.video, np.arange(n)))


def test_frames_reader_template_and_start_index(tmp_path):
    """EPIC-Kitchens style folders: ``frame_0000000001.jpg`` is frame 0 (here lossless PNG)."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    (tmp_path / "P01" / "P01_01").mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / "P01" / "P01_01" / f"frame_{i + 1:010d}.png")
    r = FrameReader.create("frames", tmp_path, template="frame_{:010d}.png", start_index=1)
    assert r.length("P01/P01_01") == 5
    np.testing.assert_array_equal(r.read("P01/P01_01", np.array([4, 0, 2])), frames[[4, 0, 2]])
    # the count stops at the first gap
    (tmp_path / "P01" / "P01_01" / "frame_0000000004.png").unlink()
    assert r.length("P01/P01_01") == 3


# ------------------------------------------------------------------------------------------------
# bad input: every case is a DataError naming the file
# ------------------------------------------------------------------------------------------------


def test_unknown_format_and_bad_options():
    with pytest.raises(DataError, match=r"unknown storage format 'webm'.*'flow_xy'.*'npy'"):
        FrameReader.create("webm", "/nowhere")
    with pytest.raises(DataError, match=r"format 'npy': bad reader options \{'ext': '.mp4'\}"):
        FrameReader.create("npy", "/nowhere", ext=".mp4")


READER_CASES = [
    ("tiny_dataset", "rgb", {"backend": "decord"}),
    ("tiny_dataset", "rgb", {"backend": "pyav"}),
    ("tiny_dataset", "flow", {}),
    ("tiny_dataset_alt_formats", "rgb", {}),
    ("tiny_dataset_alt_formats", "flow", {}),
    ("tiny_dataset_alt_formats", "depth", {}),
]
CASE_IDS = ["mp4-decord", "mp4-pyav", "npy", "jpg-frames", "flow_xy", "png16"]


@pytest.mark.parametrize("case", READER_CASES, ids=CASE_IDS)
def test_missing_video_names_the_file(case, request):
    dataset, stream, opts = case
    if opts.get("backend") == "decord":
        pytest.importorskip("decord")
    r = reader(request.getfixturevalue(dataset), stream, **opts)
    for call in (lambda: r.length("no_such_video"), lambda: r.read("no_such_video", np.array([0]))):
        with pytest.raises(DataError, match=r"no_such_video"):
            call()


@pytest.mark.parametrize("case", READER_CASES, ids=CASE_IDS)
def test_frames_beyond_the_stored_video_are_an_error(case, request):
    dataset, stream, opts = case
    if opts.get("backend") == "decord":
        pytest.importorskip("decord")
    root = request.getfixturevalue(dataset)
    r = reader(root, stream, **opts)
    rec = videos(root)[0]
    n = r.length(rec.video)
    assert r.read(rec.video, np.array([n - 1])).shape[0] == 1
    with pytest.raises(DataError, match=rf"{rec.video}.*(\b{n}\b|{n:05d}|{n:06d})"):
        r.read(rec.video, np.array([n - 2, n]))


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_unreadable_video_files(tiny_dataset, tmp_path, backend):
    if backend == "decord":
        pytest.importorskip("decord")
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    src = tiny_dataset / "rgb" / "source_arm_swing_000.mp4"
    data = src.read_bytes()
    (rgb / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (rgb / "garbage.mp4").write_bytes(b"this is not a video" * 50)
    (rgb / "empty.mp4").write_bytes(b"")
    r = FrameReader.create("video", rgb, backend=backend)
    for name in ("truncated", "garbage", "empty"):
        with pytest.raises(DataError, match=rf"cannot decode .*{name}\.mp4"):
            r.length(name)
        with pytest.raises(DataError, match=rf"cannot decode frames \[0, 1\] of video .*{name}\.mp4"):
            r.read(name, np.array([0, 1]))


def test_unreadable_npy_and_image_files(tiny_dataset_alt_formats, tmp_path):
    (tmp_path / "v.npy").write_bytes(b"\x93NUMPY garbage")
    r = FrameReader.create("npy", tmp_path)
    with pytest.raises(DataError, match=r"cannot read array .*v\.npy"):
        r.length("v")
    np.save(tmp_path / "s.npy", np.float32(3.0))
    with pytest.raises(DataError, match=r"s\.npy: expected frames on axis 0"):
        r.length("s")
    # a corrupt JPEG inside a frame folder
    folder = tmp_path / "frames" / "clip"
    shutil.copytree(tiny_dataset_alt_formats / "rgb" / "source_arm_swing_000", folder)
    (folder / "000002.jpg").write_bytes(b"not a jpeg")
    fr = FrameReader.create("frames", tmp_path / "frames")
    assert fr.read("clip", np.array([0, 1])).shape == (2, 64, 64, 3)
    with pytest.raises(DataError, match=r"cannot read image .*clip/000002\.jpg"):
        fr.read("clip", np.array([1, 2]))

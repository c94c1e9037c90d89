"""The 3D skeleton stream as a modality (mmfsar.data.modalities.Skeleton), the skeleton
augmentations (temporal crop-and-resize, shear), and the ``skeleton`` / ``text`` prepare commands.

The modality is exercised on a tiny synthetic dataset generated *with* the opt-in skeleton stream
(camera-space joints (T, 2, 15, 3) in metres); expected values are computed here by plain loops
over the stored arrays.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mmfsar.data.dataset import ClipDataset, ClipViews
from mmfsar.data.meta import DatasetFolder
from mmfsar.data.modalities import PoseKeypoints, Skeleton, SkeletonFrames, build_modalities
from mmfsar.data.skeleton import DERIVED_MODALITIES, SYNTHETIC15, derive
from mmfsar.data.synthetic import SyntheticConfig, generate
from mmfsar.data.synthetic.actions import JOINTS
from mmfsar.data.transforms import ClipAugmentation, ClipParams, UniformSegments, shear_points
from mmfsar.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
SKELETON_CONFIGS = ["skeleton", *(f"skeleton_{n}" for n in DERIVED_MODALITIES if n != "joint")]
SHEAR = ((1.0, 0.2, -0.1), (0.3, 1.0, 0.05), (-0.2, 0.1, 1.0))
INDICES = np.array([1, 3, 4, 6, 8, 9, 11, 12])
# the flip pairs of the synthetic figure, written out by name
MIRROR = {"left_shoulder": "right_shoulder", "left_elbow": "right_elbow", "left_wrist": "right_wrist",
          "left_hip": "right_hip", "left_knee": "right_knee", "left_ankle": "right_ankle"}  # fmt: skip
MIRROR |= {b: a for a, b in MIRROR.items()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """16 clips (2/1/1 classes x 2 domains x 2) with the pose and the skeleton streams. Read-only."""
    cfg = SyntheticConfig(seed=0, clips_per_class=2, classes_per_split={"base": 2, "val": 1, "novel": 1},
                          formats={"pose": "npy", "skeleton": "npy"})  # fmt: skip
    return generate(cfg, tmp_path_factory.mktemp("skeleton") / "tiny", workers=1, progress=False)


@pytest.fixture(scope="module")
def folder(dataset) -> DatasetFolder:
    return DatasetFolder.open(dataset)


def bound(folder: DatasetFolder, **kwargs) -> Skeleton:
    return Skeleton(name=kwargs.pop("name", "skeleton"), **kwargs).bind(folder)


def stored(dataset: Path, video: str) -> np.ndarray:
    return np.load(dataset / "skeleton" / f"{video}.npy")


def graph_to_joints(x: torch.Tensor) -> torch.Tensor:
    """(3, T, V, M) -> (T, M, V, 3)."""
    return x.permute(1, 3, 2, 0)


# ------------------------------------------------------------------------------ the modality
def test_output_is_the_stored_joints_as_a_graph_signal(dataset, folder):
    rec = folder.records[0]
    raw = stored(dataset, rec.video)
    out = bound(folder, centre=False)(rec, INDICES, ClipParams())
    assert out.shape == (3, len(INDICES), 15, 2) and out.dtype == torch.float32
    for t, i in enumerate(INDICES):
        for v in range(15):
            for m in range(2):
                for c in range(3):
                    assert out[c, t, v, m].item() == raw[i, m, v, c]


def test_centring_moves_the_first_tracked_root_to_the_origin_and_keeps_lost_joints(dataset, folder):
    rec = folder.records[0]
    raw = stored(dataset, rec.video)[INDICES].astype(np.float64)
    raw[0, 0, SYNTHETIC15.root] = 0.0  # the root is lost in the first sampled frame: the next one counts
    raw[2, 0, 5] = 0.0  # a lost joint
    out = bound(folder, centre=True).to_tensor(raw.astype(np.float32), ClipParams(), source_frames=rec.num_frames)
    origin = raw[1, 0, SYNTHETIC15.root]
    for t in range(len(INDICES)):
        for v in range(15):
            for m in range(2):
                lost = not raw[t, m, v].any()
                want = [0.0, 0.0, 0.0] if lost else [raw[t, m, v, c] - origin[c] for c in range(3)]
                np.testing.assert_allclose(out[:, t, v, m].numpy(), want, atol=1e-5)
    assert not out[:, :, :, 1].any(), "the absent second body stays zeros"
    assert torch.equal(out[:, 1, SYNTHETIC15.root, 0], torch.zeros(3))


def test_flip_negates_x_and_swaps_left_and_right_joints(dataset, folder):
    rec = folder.records[3]
    skel = bound(folder, centre=False)
    plain = skel(rec, INDICES, ClipParams())
    flipped = skel(rec, INDICES, ClipParams(flip=True))
    for v, name in enumerate(JOINTS):
        w = JOINTS.index(MIRROR.get(name, name))
        torch.testing.assert_close(flipped[0, :, v], -plain[0, :, w])
        torch.testing.assert_close(flipped[1:, :, v], plain[1:, :, w])
    # the crop box does not apply to camera-space joints
    assert torch.equal(skel(rec, INDICES, ClipParams(top=0.2, left=0.1, height=0.5, width=0.5)), plain)


def test_shear_by_hand(dataset, folder):
    rec = folder.records[5]
    raw = stored(dataset, rec.video)
    out = bound(folder, centre=False)(rec, INDICES, ClipParams(shear=SHEAR))
    (a, b, c), (d, e, f), (g, h, k) = SHEAR
    for t, i in enumerate(INDICES):
        for v in (0, 5, 11):
            x, y, z = (float(u) for u in raw[i, 0, v])
            want = [a * x + b * y + c * z, d * x + e * y + f * z, g * x + h * y + k * z]
            np.testing.assert_allclose(out[:, t, v, 0].numpy(), want, rtol=1e-5, atol=1e-6)
    # the shear acts after the flip: flip, then S
    both = bound(folder, centre=False)(rec, INDICES, ClipParams(flip=True, shear=SHEAR))
    flipped = graph_to_joints(bound(folder, centre=False)(rec, INDICES, ClipParams(flip=True)))
    torch.testing.assert_close(graph_to_joints(both), shear_points(flipped, SHEAR))


def test_shear_points_by_hand_and_zeros_stay_zeros():
    p = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    # row 0: 1 + 0.2*2 - 0.1*3 = 1.1; 0.3*1 + 2 + 0.05*3 = 2.45; -0.2*1 + 0.1*2 + 3 = 3.0
    torch.testing.assert_close(shear_points(p, SHEAR), torch.tensor([[1.1, 2.45, 3.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="3x3 shear"):
        shear_points(p, ((1.0, 0.0), (0.0, 1.0)))


@pytest.mark.parametrize("name", sorted(DERIVED_MODALITIES))
def test_each_derived_modality_is_derive_of_the_augmented_joints(dataset, folder, name):
    rec = folder.records[6]
    params = ClipParams(flip=True, shear=SHEAR)
    joints = graph_to_joints(bound(folder)(rec, INDICES, params))  # (T, M, V, 3), centred, flipped, sheared
    out = bound(folder, name=f"skeleton_{name}", derived=name)(rec, INDICES, params)
    want = derive(name, joints, layout=SYNTHETIC15, source_frames=rec.num_frames)
    torch.testing.assert_close(graph_to_joints(out), want)


def test_motion_uses_the_time_factor_of_the_clip_length(dataset, folder):
    rec = folder.records[2]
    joints = graph_to_joints(bound(folder)(rec, INDICES, ClipParams()))
    motion = graph_to_joints(bound(folder, derived="motion")(rec, INDICES, ClipParams()))
    s = len(INDICES) / rec.num_frames  # IKEM's s = 50 / F, here T / F
    for t in range(len(INDICES) - 1):
        for c in range(3):
            want = s * (joints[t + 1, 0, 4, c].item() - joints[t, 0, 4, c].item())
            assert motion[t, 0, 4, c].item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert not motion[-1].any()


def test_the_clip_length_travels_with_the_frames_into_every_view(folder):
    mods = {"skeleton_motion": bound(folder, name="skeleton_motion", derived="motion")}
    clips = ClipDataset(folder.records, mods, UniformSegments(8, crop=0.6), train=True, labels=None,
                        augmentation=ClipAugmentation(shear=0.5), views=3)  # fmt: skip
    rec = folder.records[4]
    raw = mods["skeleton_motion"].load(rec, np.arange(rec.start_frame, rec.end_frame))
    assert isinstance(raw, SkeletonFrames) and raw.source_frames == rec.num_frames
    assert raw[[0, 2]].source_frames == rec.num_frames
    item = ClipViews(clips)[4]
    for view in range(3):
        frames, params = clips.draw(rec, view)
        torch.testing.assert_close(item["skeleton_motion"][view], mods["skeleton_motion"](rec, frames, params))
    with pytest.raises(ValueError, match="source_frames"):
        mods["skeleton_motion"].to_tensor(np.asarray(raw), ClipParams())


def test_persons_are_padded_or_truncated(dataset, folder):
    rec = folder.records[0]
    one = bound(folder, persons=1, centre=False)(rec, INDICES, ClipParams())
    three = bound(folder, persons=3, centre=False)(rec, INDICES, ClipParams())
    assert one.shape == (3, 8, 15, 1) and three.shape == (3, 8, 15, 3)
    assert torch.equal(three[..., :1], one) and not three[..., 1:].any()


def test_configs_select_the_derived_modalities_of_one_stream(folder):
    cfgs = {n: OmegaConf.load(REPO / "configs" / "modality" / f"{n}.yaml") for n in SKELETON_CONFIGS}
    mods = build_modalities(OmegaConf.to_container(OmegaConf.create(cfgs), resolve=True))
    assert {n: (type(m), m.stream, m.derived) for n, m in mods.items()} == {
        n: (Skeleton, "skeleton", "joint" if n == "skeleton" else n.removeprefix("skeleton_")) for n in SKELETON_CONFIGS
    }
    rec = folder.records[1]
    outs = {n: m.bind(folder)(rec, INDICES, ClipParams()) for n, m in mods.items()}
    assert all(o.shape == (3, 8, 15, 2) for o in outs.values())
    assert len({o.flatten()[:200].sum().item() for o in outs.values()}) == len(outs), "six different signals"


def test_encoder_inputs_feed_an_stgcn(folder):
    from mmfsar.models.encoders.stgcn import STGCN

    skel = bound(folder, derived="bone")
    inputs = skel.encoder_inputs()
    assert inputs["in_channels"] == 3 and inputs["num_joints"] == 15
    named = {frozenset((JOINTS[a], JOINTS[b])) for a, b in inputs["edges"]}
    assert frozenset(("left_elbow", "left_wrist")) in named and frozenset(("neck", "pelvis")) in named
    assert len(named) == 14
    batch = torch.stack([skel(rec, INDICES, ClipParams()) for rec in folder.records[:3]])  # (B, C, T, V, M)
    encoder = STGCN(num_frames=8, channels=(8, 16), temporal_strides=(1, 2), **inputs)
    out = encoder.encode(batch)
    assert out.pooled.shape == (3, 16) and out.frames.shape == (3, 4, 16) and torch.isfinite(out.pooled).all()


def test_other_modalities_ignore_the_shear(folder):
    pose = PoseKeypoints(name="pose_keypoints", stream="pose", size=64).bind(folder)
    rec = folder.records[0]
    assert torch.equal(pose(rec, INDICES, ClipParams()), pose(rec, INDICES, ClipParams(shear=SHEAR)))


# ---------------------------------------------------------------------------------- bad input
@pytest.fixture
def writable(dataset, tmp_path) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "copy"))


def corrupt(root: Path, video: str, array: np.ndarray) -> Path:
    path = root / "skeleton" / f"{video}.npy"
    np.save(path, array)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a[:, 0], r"expected joints \(T, M, 15, 3\) \(layout 'synthetic15'\), got float32 \(8, 15, 3\)"),
        (lambda a: a[:, :, :14], r"expected joints \(T, M, 15, 3\) .* got float32 \(8, 2, 14, 3\)"),
        (lambda a: (a * 100).astype(np.int32), r"expected float joint coordinates, got int32"),
        (lambda a: np.where(np.arange(len(a))[:, None, None, None] == 3, np.nan, a), r".*npy holds NaN or inf values"),
        (lambda a: np.zeros_like(a), r"every joint coordinate is zero in frames \[\d+, \d+\) \(no tracked body\)"),
    ],
    ids=["rank", "joints", "integers", "nan", "all_zero"],
)
def test_bad_files_are_errors_naming_clip_and_file(writable, change, message):
    folder = DatasetFolder.open(writable)
    rec = folder.records[2]
    path = corrupt(writable, rec.video, change(stored(writable, rec.video)))
    skel = bound(folder)
    with pytest.raises(DataError, match=rf"clip '{rec.clip_id}', skeleton of video .*\({path}\): {message}"):
        skel(rec, INDICES, ClipParams())


def test_zeros_in_the_sampled_frames_of_a_tracked_clip_are_a_lost_body_not_an_error(writable):
    folder = DatasetFolder.open(writable)
    rec = folder.records[2]
    raw = stored(writable, rec.video)
    raw[INDICES] = 0.0
    corrupt(writable, rec.video, raw)
    out = bound(folder)(rec, INDICES, ClipParams())
    assert not out.any()


def test_missing_layout_and_bad_settings(writable, folder):
    meta = json.loads((writable / "meta.json").read_text())
    del meta["skeleton"]
    (writable / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"{writable}/meta.json: modality 'skeleton' needs the skeleton layout: "
                                        r"meta.json has no 'skeleton' layout"):  # fmt: skip
        bound(DatasetFolder.open(writable))
    with pytest.raises(ConfigError, match="unknown derived skeleton modality 'velocity'"):
        Skeleton(name="skeleton", derived="velocity")
    with pytest.raises(ConfigError, match="persons must be >= 1"):
        Skeleton(name="skeleton", persons=0)
    with pytest.raises(RuntimeError, match="after bind"):
        Skeleton(name="skeleton").encoder_inputs()


# ------------------------------------------------------------------ skeleton augmentations
def test_temporal_crop_and_resize_by_hand():
    sampler = UniformSegments(4, crop=0.5)
    idx = sampler(10, 30, jitter=True, generator=torch.Generator().manual_seed(7))
    # the same draws, by hand: the window (fraction, position), then one frame in each segment
    g = torch.Generator().manual_seed(7)
    u0, u1 = torch.rand(2, dtype=torch.float64, generator=g).tolist()
    jitter = torch.rand(4, dtype=torch.float64, generator=g).tolist()
    length = 20
    window = length * (0.5 + 0.5 * u0)
    offset = (length - window) * u1
    want = []
    for k in range(4):
        left = offset + k * window / 4
        want.append(10 + min(math.floor(left + jitter[k] * window / 4), length - 1))
    assert idx.tolist() == want
    assert 10 + math.floor(offset) <= idx.min() and idx.max() < 10 + math.ceil(offset + window)


def test_temporal_crop_keeps_at_least_the_smallest_fraction_and_is_off_in_evaluation():
    g = torch.Generator().manual_seed(0)
    sampler = UniformSegments(8, crop=0.4)
    spans = []
    for _ in range(300):
        idx = sampler(0, 100, jitter=True, generator=g)
        assert (np.diff(idx) >= 0).all() and 0 <= idx.min() and idx.max() < 100
        spans.append(idx.max() - idx.min())
    # the 8 frames span (7/8 .. 1) of a window of 40..100 frames (less a frame of jitter)
    assert 0.4 * 100 * 6 / 8 <= min(spans) < 0.5 * 100 and max(spans) > 0.9 * 100
    np.testing.assert_array_equal(sampler(5, 15, jitter=False), UniformSegments(8)(5, 15, jitter=False))


def test_temporal_crop_off_draws_exactly_as_before():
    a = UniformSegments(8, crop=1.0)(0, 40, jitter=True, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    u = torch.rand(8, dtype=torch.float64, generator=g).numpy()
    want = np.floor(np.arange(8) * 5 + u * 5).astype(np.int64)  # segments of 5 frames, no window draws
    np.testing.assert_array_equal(a, want)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match="data.frames.crop must be in"):
            UniformSegments(8, crop=bad)


def test_shear_is_drawn_last_and_only_when_asked():
    plain = ClipAugmentation(hue=0.1).sample(1.0, train=True, generator=torch.Generator().manual_seed(5))
    sheared = ClipAugmentation(hue=0.1, shear=0.5).sample(1.0, train=True, generator=torch.Generator().manual_seed(5))
    assert plain.shear is None and sheared.shear is not None
    assert (plain.top, plain.left, plain.height, plain.flip, plain.colour) == (
        sheared.top, sheared.left, sheared.height, sheared.flip, sheared.colour
    ), "the crop, flip and colour draws do not change"  # fmt: skip
    g = torch.Generator().manual_seed(5)
    torch.rand(4, generator=g), torch.rand(5, generator=g)  # crop / flip, colour
    e = [(2 * u - 1) * 0.5 for u in torch.rand(6, generator=g, dtype=torch.float64).tolist()]
    assert sheared.shear == ((1.0, e[0], e[1]), (e[2], 1.0, e[3]), (e[4], e[5], 1.0))
    assert ClipAugmentation(shear=0.5).sample(1.0, train=False).shear is None
    with pytest.raises(ConfigError, match="shear must be >= 0"):
        ClipAugmentation(shear=-0.1)


# ------------------------------------------------------------------------- prepare commands
def ntu_like(tmp_path: Path) -> Path:
    """Three NTU-named joint arrays (T, M, 25, 3): two classes, one two-body clip."""
    src = tmp_path / "npy"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name, bodies in (("S001C001P001R001A001", 1), ("S001C002P001R001A001", 2), ("S001C001P002R001A004", 1)):
        arr = rng.normal(size=(12, bodies, 25, 3)).astype(np.float32) * 0.1 + np.array([0, 0, 3.0], np.float32)
        np.save(src / f"{name}.npy", arr)
    return src


def test_prepare_skeleton_command_imports_and_validates_the_joints(tmp_path, capsys):
    from mmfsar.prepare.cli import main

    out = tmp_path / "ntu"
    rc = main(["skeleton", str(out), str(ntu_like(tmp_path)), "--from", "npy", "--workers", "1", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "3 clips checked" in printed and "OK: no problems found" in printed
    folder = DatasetFolder.open(out)
    skel = bound(folder, derived="angular_velocity")
    assert skel.encoder_inputs()["num_joints"] == 25
    assert skel(folder.records[0], np.arange(8), ClipParams()).shape == (3, 8, 25, 2)
    # the final validation reads the skeleton stream: a broken file makes the command fail
    np.save(out / "skeleton" / "S001C001P002R001A004.npy", np.zeros((12, 2, 25, 3), np.float32))
    assert main(["validate", str(out), "--quiet"]) == 1
    assert "S001C001P002R001A004.npy): every joint coordinate is zero" in capsys.readouterr().out


def test_prepare_text_command_writes_the_class_text(tmp_path, capsys):
    from mmfsar.data.text import read_class_text
    from mmfsar.prepare.cli import main

    out = tmp_path / "ntu"
    assert main(["skeleton", str(out), str(ntu_like(tmp_path)), "--from", "npy", "--workers", "1", "--quiet"]) == 0
    csv_file = tmp_path / "desc.csv"
    csv_file.write_text("class,description\nA001,drink water\nA004,brushing hair\n")
    assert main(["text", str(out), str(csv_file), "--from", "csv", "--dim", "16", "--quiet"]) == 0
    text = read_class_text(out, ["A004", "A001"], need="both")
    assert text.descriptions == {"A004": "brushing hair", "A001": "drink water"} and text.features.shape == (2, 16)
    csv_file.write_text("class,description\nA001,drink water\n")
    assert main(["text", str(out), str(csv_file), "--from", "csv", "--quiet"]) == 1
    assert "no description for class(es) ['A004']" in capsys.readouterr().err

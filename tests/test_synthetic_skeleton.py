"""The opt-in 3D skeleton stream of the synthetic generator: camera-space joints in metres as a
depth-sensor body tracker reports them (jitter, lost joints), in both domains, deterministic, and
without changing a single byte of the other streams."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmfsar.data.meta import DatasetFolder
from mmfsar.data.skeleton import SYNTHETIC15, layout_of
from mmfsar.data.synthetic import SyntheticConfig, generate
from mmfsar.data.synthetic.actions import J
from mmfsar.data.synthetic.render import CAMERA_DIST, CENTER_Y, FOCAL, FRAME, METERS_PER_UNIT, _project, camera_space

SETTINGS = dict(seed=0, clips_per_class=2, classes_per_split={"base": 2, "val": 1, "novel": 1})


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic_skeleton")


@pytest.fixture(scope="module")
def with_skeleton(out_dir) -> Path:
    """The default streams (the skeleton among them): 16 clips. Read-only."""
    return generate(SyntheticConfig(**SETTINGS), out_dir / "with", workers=1, progress=False)


@pytest.fixture(scope="module")
def without_skeleton(out_dir) -> Path:
    """The default streams less the skeleton (``formats: {skeleton: null}``)."""
    cfg = SyntheticConfig.from_mapping({**SETTINGS, "formats": {"skeleton": None}})
    return generate(cfg, out_dir / "without", workers=1, progress=False)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def skeletons(root: Path) -> dict[str, tuple[str, np.ndarray]]:
    """video -> (domain, stored skeleton)."""
    records = DatasetFolder.open(root).records
    return {r.video: (r.domain, np.load(root / "skeleton" / f"{r.video}.npy")) for r in records}


def tracked(arr: np.ndarray) -> np.ndarray:
    return arr.any(-1)


# ------------------------------------------------------------------------------ what is written
def test_the_other_streams_are_byte_identical_with_the_skeleton_on(with_skeleton, without_skeleton):
    a, b = files(with_skeleton), files(without_skeleton)
    assert sorted(k for k in a if k not in b) == sorted(f"skeleton/{r.video}.npy" for r in DatasetFolder.open(
        with_skeleton).records)  # fmt: skip
    assert set(b) <= set(a)
    changed = [k for k in b if a[k] != b[k]]
    assert changed == ["meta.json"]
    meta_a, meta_b = json.loads(a["meta.json"]), json.loads(b["meta.json"])
    assert meta_a["modalities"].pop("skeleton") == {"dir": "skeleton", "format": "npy", "units_per_meter": 1.0}
    assert meta_a.pop("skeleton") == SYNTHETIC15.to_meta()
    assert meta_a["generator"]["formats"].pop("skeleton") == "npy"
    assert meta_a == meta_b
    assert "skeleton" not in meta_b and SyntheticConfig().formats["skeleton"] == "npy"  # on by default


def test_every_clip_of_both_domains_has_a_skeleton_aligned_with_its_frames(with_skeleton):
    folder = DatasetFolder.open(with_skeleton)
    assert layout_of(folder.meta) == SYNTHETIC15
    assert {r.domain for r in folder.records} == {"source", "target"}
    for rec in folder.records:
        arr = np.load(with_skeleton / "skeleton" / f"{rec.video}.npy")
        pose = np.load(with_skeleton / "pose" / f"{rec.video}.npy")
        assert arr.dtype == np.float32 and arr.shape == (len(pose), 2, 15, 3)
        assert np.isfinite(arr).all()
        assert not arr[:, 1].any(), "one figure: the second body is all zeros"
        assert tracked(arr[:, 0]).mean() > 0.5, rec.clip_id


def test_generation_is_deterministic_and_independent_of_workers(with_skeleton, out_dir):
    cfg = SyntheticConfig(**SETTINGS, formats={"pose": "npy", "skeleton": "npy"})
    again = generate(cfg, out_dir / "again", workers=2, progress=False)
    a, b = files(with_skeleton), files(again)
    skel = [k for k in a if k.startswith("skeleton/")]
    assert len(skel) == 16 and all(a[k] == b[k] for k in skel)


# ------------------------------------------------------------------------- camera space, metres
def test_camera_space_is_the_inverse_of_the_rendering_camera():
    rng = np.random.default_rng(1)
    joints = rng.uniform(-0.5, 1.0, size=(5, 15, 3))
    shift = rng.uniform(-2, 2, size=(5, 2))
    cam = camera_space(joints, shift)
    # by hand for one joint: Kinect axes (x to the sensor's left, y up, z away), metres
    depth = CAMERA_DIST - joints[2, 4, 2]
    want = [-(joints[2, 4, 0] + shift[2, 0] * depth / FOCAL), joints[2, 4, 1] - CENTER_Y - shift[2, 1] * depth / FOCAL,
            depth]  # fmt: skip
    np.testing.assert_allclose(cam[2, 4], np.array(want) * METERS_PER_UNIT)
    # the pinhole projection of the camera-space joints is where the renderer draws them
    u = (FRAME - 1) / 2 - FOCAL * cam[..., 0] / cam[..., 2]
    v = (FRAME - 1) / 2 - FOCAL * cam[..., 1] / cam[..., 2]
    xy, _ = _project(joints, shift[:, None, :], FRAME)
    np.testing.assert_allclose(np.stack([u, v], -1), xy, atol=1e-9)


def test_joints_are_in_metres_and_project_onto_the_pose_keypoints(with_skeleton):
    arm, depth, proj, kp = [], [], [], []
    for video, (_, arr) in skeletons(with_skeleton).items():
        body = arr[:, 0].astype(np.float64)
        ok = tracked(body)
        both = ok[:, J["left_shoulder"]] & ok[:, J["left_elbow"]]
        arm += np.linalg.norm(body[both, J["left_elbow"]] - body[both, J["left_shoulder"]], axis=-1).tolist()
        depth += body[ok][:, 2].tolist()
        pose = np.load(with_skeleton / "pose" / f"{video}.npy")
        seen = ok & (pose[..., 2] > 0.5)  # keypoints the detector did not miss
        uv = (FRAME - 1) / 2 - FOCAL * body[..., :2] / body[..., 2:3].clip(1e-6)
        proj.append(uv[seen])
        kp.append(pose[..., :2][seen])
    # upper arm: 0.17 figure heights x (0.9..1.1) x 1.7 m; the figure stands 6.8 m +- 0.7 m from the camera
    assert 0.25 < np.median(arm) < 0.33
    assert 5.5 < min(depth) and max(depth) < 8.0
    proj, kp = np.concatenate(proj), np.concatenate(kp)
    # the figure spans ~6 px (sd) across and ~12 px up and down, the detector's noise is 3-3.5 px per axis;
    # x mirrored (the wrong sign of the Kinect's x axis) would be anti-correlated, ~11 px off
    assert np.corrcoef(proj[:, 0], kp[:, 0])[0, 1] > 0.8 and np.corrcoef(proj[:, 1], kp[:, 1])[0, 1] > 0.9
    assert np.linalg.norm(proj - kp, axis=-1).mean() < 6.0


def test_sensor_noise_and_lost_joints_in_both_domains(with_skeleton):
    lost = {"source": [], "target": []}
    wobble = {"source": [], "target": []}
    for domain, arr in skeletons(with_skeleton).values():
        body = arr[:, 0].astype(np.float64)
        ok = tracked(body)
        lost[domain].append(1 - ok.mean())
        # a rigid bone's length changes from frame to frame only by the sensor's jitter
        both = ok[:, J["neck"]] & ok[:, J["pelvis"]]
        length = np.linalg.norm(body[both, J["neck"]] - body[both, J["pelvis"]], axis=-1)
        wobble[domain].append(length.std())
    for domain in ("source", "target"):
        assert 0.003 < np.mean(lost[domain]) < 0.1, (domain, lost[domain])
        assert 0.005 < np.median(wobble[domain]) < 0.05, (domain, wobble[domain])
    assert np.median(wobble["target"]) > np.median(wobble["source"])
    assert np.mean(lost["target"]) > np.mean(lost["source"])

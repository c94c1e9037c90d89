"""Skeleton layouts and IKEM's six derived modalities (mmfsar.data.skeleton).

The modalities are checked on a 3-joint chain (root, middle, tip) over 3 frames against values
worked out by hand below, and on the NTU layout against a plain-Python transcription of IKEM's
bone and axis tables (1-based, as in IKEM's ``net/crossclr_6views.py``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmfsar.data.skeleton import (
    DERIVED_MODALITIES,
    NTU25,
    SKELETON_LAYOUTS,
    SYNTHETIC15,
    SkeletonLayout,
    derive,
    layout_of,
    time_scale,
    to_graph_layout,
)
from mmfsar.errors import DataError

PI = math.pi

# root(0) <- middle(1) <- tip(2); the torso vectors are J_middle - J_root and J_tip - J_root.
CHAIN = SkeletonLayout(joints=["root", "middle", "tip"], parents=[-1, 0, 1], torso=((1, 0), (2, 0)), name="chain")

# (T=3, M=1, V=3, 3)
# t0: the tip bends a right angle up from the middle bone; t1: the chain is a straight line along x
# (so the two torso vectors are parallel: zero normal); t2: the chain is lifted by 1 in z and the
# tip bone points along z with length 2.
CHAIN_J = torch.tensor(
    [
        [[[0, 0, 0], [1, 0, 0], [1, 1, 0]]],
        [[[0, 0, 0], [1, 0, 0], [2, 0, 0]]],
        [[[0, 0, 1], [1, 0, 1], [1, 0, 3]]],
    ],
    dtype=torch.float64,
)
SOURCE_FRAMES = 6  # s = T / F = 3 / 6 = 0.5


def chain(name: str, frames=SOURCE_FRAMES) -> torch.Tensor:
    out = DERIVED_MODALITIES[name](CHAIN_J, layout=CHAIN, source_frames=frames)
    assert out.shape == CHAIN_J.shape
    return out[:, 0]  # (T, V, 3)


def expect(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------- chain, by hand
def test_joint_motion_and_acceleration_with_time_scale():
    assert torch.equal(chain("joint"), CHAIN_J[:, 0])
    # M_0 = 0.5 * (J(t1) - J(t0)): root 0, middle 0, tip 0.5 * ((2,0,0) - (1,1,0)) = (0.5, -0.5, 0)
    # M_1 = 0.5 * (J(t2) - J(t1)): root and middle 0.5 * (0,0,1), tip 0.5 * ((1,0,3) - (2,0,0)) = (-0.5, 0, 1.5)
    # M_2 = 0 (last frame)
    motion = expect([
        [[0, 0, 0], [0, 0, 0], [0.5, -0.5, 0]],
        [[0, 0, 0.5], [0, 0, 0.5], [-0.5, 0, 1.5]],
        [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
    ])  # fmt: skip
    torch.testing.assert_close(chain("motion"), motion)
    # A_0 = 0.5 * (M_1 - M_0): root / middle 0.5 * (0,0,0.5) = (0,0,0.25),
    # tip 0.5 * ((-0.5,0,1.5) - (0.5,-0.5,0)) = (-0.5, 0.25, 0.75); A_1 = A_2 = 0 (last two frames)
    accel = expect([
        [[0, 0, 0.25], [0, 0, 0.25], [-0.5, 0.25, 0.75]],
        [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
        [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
    ])  # fmt: skip
    torch.testing.assert_close(chain("acceleration"), accel)
    # s = 1 when the sequence is not resampled (F = T): motion doubles
    torch.testing.assert_close(chain("motion", frames=None), 2 * motion)
    torch.testing.assert_close(chain("motion", frames=3), 2 * motion)
    torch.testing.assert_close(chain("acceleration", frames=None), 4 * accel)


def test_bone_with_torso_normal_at_the_root():
    # root entry: normalise((J1 - J0) x (J2 - J0))
    #   t0: (1,0,0) x (1,1,0) = (0,0,1); t1: (1,0,0) x (2,0,0) = 0 -> stays 0 (no NaN);
    #   t2: (1,0,0) x (1,0,2) = (0,-2,0) -> (0,-1,0)
    # other joints: J_v - J_parent(v)
    bones = expect([
        [[0, 0, 1], [1, 0, 0], [0, 1, 0]],
        [[0, 0, 0], [1, 0, 0], [1, 0, 0]],
        [[0, -1, 0], [1, 0, 0], [0, 0, 2]],
    ])  # fmt: skip
    torch.testing.assert_close(chain("bone"), bones)


def test_rotation_axis_of_adjacent_bones():
    # R_v = B_v x B_parent(v); root: B_root x B_root = 0
    #   t0: middle (1,0,0) x (0,0,1) = (0,-1,0); tip (0,1,0) x (1,0,0) = (0,0,-1)
    #   t1: middle (1,0,0) x 0 = 0; tip (1,0,0) x (1,0,0) = 0
    #   t2: middle (1,0,0) x (0,-1,0) = (0,0,-1); tip (0,0,2) x (1,0,0) = (0,2,0)
    axes = expect([
        [[0, 0, 0], [0, -1, 0], [0, 0, -1]],
        [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
        [[0, 0, 0], [0, 0, -1], [0, 2, 0]],
    ])  # fmt: skip
    torch.testing.assert_close(chain("rotation_axis"), axes)


def test_angular_velocity_right_angle_to_straight_line():
    # theta (angle between a bone and its parent's bone), per frame [root, middle, tip]:
    #   t0: [0, pi/2, pi/2]; t1: [0, 0 (zero torso normal: atan2(0, 0) = 0), 0 (straight line)];
    #   t2: [0, pi/2, pi/2]
    # Omega_t = 0.5 * (theta_{t+1} - theta_t) * R_hat_t
    #   t0: middle 0.5 * (0 - pi/2) * (0,-1,0) = (0, pi/4, 0); tip 0.5 * (0 - pi/2) * (0,0,-1) = (0,0,pi/4)
    #   t1: the axes are 0 (parallel / lost bones), so 0 although theta changes; t2: last frame, 0
    omega = expect([
        [[0, 0, 0], [0, PI / 4, 0], [0, 0, PI / 4]],
        [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
        [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
    ])  # fmt: skip
    torch.testing.assert_close(chain("angular_velocity"), omega)
    torch.testing.assert_close(chain("angular_velocity", frames=None), 2 * omega)


def test_angle_is_atan2_of_cross_and_dot():
    # the tip bone at 60 degrees from the middle bone, then at 150 degrees: Omega = s * 90deg * axis
    c, s = math.cos(PI / 3), math.sin(PI / 3)
    c2, s2 = math.cos(5 * PI / 6), math.sin(5 * PI / 6)
    j = torch.tensor([[[[0, 0, 0], [1, 0, 0], [1 + c, s, 0]]], [[[0, 0, 0], [1, 0, 0], [1 + 2 * c2, 2 * s2, 0]]]],
                     dtype=torch.float64)  # fmt: skip
    omega = DERIVED_MODALITIES["angular_velocity"](j, layout=CHAIN, source_frames=4)  # s = 2 / 4
    # axis at t0: (1,0,0) x (c, s, 0) points along +z, so the tip bone x middle bone is along -z
    torch.testing.assert_close(omega[0, 0, 2], torch.tensor([0, 0, -0.5 * (PI / 2)], dtype=torch.float64))


# ------------------------------------------------------------------------ batches, lost joints
def test_per_clip_time_scale_in_a_batch():
    batch = torch.stack([CHAIN_J, 3 * CHAIN_J])  # (2, T, M, V, 3)
    frames = torch.tensor([6.0, 3.0])  # s = 0.5 and 1
    out = DERIVED_MODALITIES["motion"](batch, layout=CHAIN, source_frames=frames)
    torch.testing.assert_close(out[0, :, 0], chain("motion"))
    torch.testing.assert_close(out[1, :, 0], 3 * 2 * chain("motion"))
    assert float(time_scale(frames, batch)[1].flatten()[0]) == 1.0
    with pytest.raises(DataError, match="source_frames of shape"):
        DERIVED_MODALITIES["motion"](batch, layout=CHAIN, source_frames=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(DataError, match="positive"):
        DERIVED_MODALITIES["motion"](batch, layout=CHAIN, source_frames=0)


def test_lost_bodies_and_joints_give_zeros_not_nan():
    j = torch.zeros(3, 2, 3, 3, dtype=torch.float64)  # second body absent in every frame
    j[:, 0] = CHAIN_J[:, 0]
    j[1, 0, 2] = 0.0  # the tip lost in frame 1
    for name, fn in DERIVED_MODALITIES.items():
        out = fn(j, layout=CHAIN, source_frames=SOURCE_FRAMES)
        assert torch.isfinite(out).all(), name
        assert not out[:, 1].any(), f"{name}: an absent body must stay all zero"
    # the lost tip: bone J_tip - J_middle = -(1,0,0) (finite), and no NaN in its angle
    torch.testing.assert_close(DERIVED_MODALITIES["bone"](j, layout=CHAIN)[1, 0, 2], expect([-1, 0, 0]))
    # a zero bone has angle atan2(0, 0) = 0 with anything; its unit axis is 0
    z = torch.zeros(2, 1, 3, 3)
    assert not DERIVED_MODALITIES["angular_velocity"](z, layout=CHAIN).any()


def test_numpy_input_and_graph_layout():
    out = DERIVED_MODALITIES["bone"](CHAIN_J.numpy().astype(np.float32), layout=CHAIN)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    x = torch.arange(2 * 4 * 2 * 3 * 3).reshape(2, 4, 2, 3, 3)  # (B, T, M, V, C)
    g = to_graph_layout(x)
    assert g.shape == (2, 3, 4, 3, 2)  # (B, C, T, V, M)
    assert g[1, 2, 3, 1, 0] == x[1, 3, 0, 1, 2]


def test_registry_and_bad_input():
    assert set(DERIVED_MODALITIES) == {"joint", "motion", "bone", "acceleration", "rotation_axis", "angular_velocity"}
    torch.testing.assert_close(derive("bone", CHAIN_J, layout=CHAIN), DERIVED_MODALITIES["bone"](CHAIN_J, layout=CHAIN))
    with pytest.raises(DataError, match="unknown skeleton modality 'velocity'"):
        derive("velocity", CHAIN_J, layout=CHAIN)
    with pytest.raises(DataError, match="needs the skeleton layout"):
        DERIVED_MODALITIES["bone"](CHAIN_J)
    with pytest.raises(DataError, match="3 joints .* layout 'ntu25' has 25"):
        DERIVED_MODALITIES["motion"](CHAIN_J, layout=NTU25)
    with pytest.raises(DataError, match=r"\(\.\.\., T, M, V, 3\)"):
        DERIVED_MODALITIES["motion"](torch.zeros(3, 1, 3, 2))


# ------------------------------------------------------------------------------- NTU, by loops
# IKEM's tables, 1-based: bone (child, parent) and rotation-axis (joint, partner) pairs
IKEM_BONE = [(1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9), (11, 10), (12, 11),
             (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18), (20, 19), (21, 21), (22, 8), (23, 8),
             (24, 12), (25, 12)]  # fmt: skip
IKEM_AXIS = dict(IKEM_BONE) | {23: 22, 25: 24}


def _sub(a, b):
    return [a[i] - b[i] for i in range(3)]


def _cross(a, b):
    return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]


def _unit(a):
    n = math.sqrt(sum(v * v for v in a))
    return [v / n for v in a] if n > 1e-12 else [0.0, 0.0, 0.0]


def test_ntu_layout_matches_ikem_tables_by_plain_loops():
    rng = np.random.default_rng(0)
    j = rng.normal(size=(3, 2, 25, 3))
    frames, s = 12, 3 / 12
    bones = [[[None] * 25 for _ in range(2)] for _ in range(3)]
    for t in range(3):
        for m in range(2):
            for child, parent in IKEM_BONE:
                bones[t][m][child - 1] = _sub(j[t, m, child - 1], j[t, m, parent - 1])
            # IKEM: normalize((B_2 - B_9) x (B_5 - B_9)), written here with joints
            bones[t][m][20] = _unit(_cross(_sub(j[t, m, 1], j[t, m, 8]), _sub(j[t, m, 4], j[t, m, 8])))
    axis = np.zeros((3, 2, 25, 3))
    theta = np.zeros((3, 2, 25))
    for t in range(3):
        for m in range(2):
            for v, w in IKEM_AXIS.items():
                b, b2 = bones[t][m][v - 1], bones[t][m][w - 1]
                axis[t, m, v - 1] = _cross(b, b2)
                u, u2 = _unit(b), _unit(b2)
                theta[t, m, v - 1] = math.atan2(
                    math.sqrt(sum(c * c for c in _cross(u, u2))), sum(u[i] * u2[i] for i in range(3))
                )
    omega = np.zeros((3, 2, 25, 3))
    for t in range(2):
        for m in range(2):
            for v in range(25):
                omega[t, m, v] = [s * (theta[t + 1, m, v] - theta[t, m, v]) * c for c in _unit(list(axis[t, m, v]))]
    jt = torch.from_numpy(j)
    torch.testing.assert_close(derive("bone", jt, layout=NTU25), torch.tensor(bones, dtype=torch.float64))
    torch.testing.assert_close(derive("rotation_axis", jt, layout=NTU25), torch.from_numpy(axis))
    torch.testing.assert_close(
        derive("angular_velocity", jt, layout=NTU25, source_frames=frames), torch.from_numpy(omega)
    )


# ------------------------------------------------------------------------------------- layouts
def test_ntu25_layout():
    assert NTU25.num_joints == 25 and NTU25.joints[NTU25.root] == "spine_shoulder"
    assert NTU25.joints[0] == "spine_base" and NTU25.parents[0] == 1  # spine_base hangs from spine_mid
    assert NTU25.joints[21:] == ("left_hand_tip", "left_thumb", "right_hand_tip", "right_thumb")
    assert len(NTU25.edges) == 24 and (3, 2) in NTU25.edges  # head -> neck
    perm = NTU25.flip_permutation()
    assert perm[4] == 8 and perm[21] == 23 and perm[22] == 24 and perm[0] == 0
    assert [perm[p] for p in perm] == list(range(25))
    assert NTU25.adjacent_bones()[22] == 21 and NTU25.adjacent_bones()[20] == 20 and NTU25.adjacent_bones()[5] == 4
    assert SKELETON_LAYOUTS["ntu25"] is NTU25


def test_synthetic_layout_follows_the_generator_edges():
    from mmfsar.data.synthetic.actions import EDGES, JOINTS

    assert list(SYNTHETIC15.joints) == JOINTS
    assert SYNTHETIC15.joints[SYNTHETIC15.root] == "pelvis"
    assert {frozenset(e) for e in SYNTHETIC15.edges} == {frozenset(e) for e in EDGES}
    assert SYNTHETIC15.joints[SYNTHETIC15.parents[JOINTS.index("left_wrist")]] == "left_elbow"


def test_meta_round_trip():
    raw = json.loads(json.dumps({"skeleton": NTU25.to_meta()}))
    assert SkeletonLayout.from_meta(raw["skeleton"]) == NTU25
    assert layout_of(raw) == NTU25
    with pytest.raises(DataError, match="no 'skeleton' layout"):
        layout_of({"name": "x"})
    with pytest.raises(DataError, match=r"lacks \['torso'\]"):
        SkeletonLayout.from_meta({"joints": ["a"], "parents": [-1]})


@pytest.mark.parametrize(
    "joints, parents, torso, message",
    [
        (["a", "b", "c"], [-1, -1, 1], ((1, 0), (2, 0)), "exactly one joint"),
        (["a", "b", "c"], [-1, 2, 1], ((1, 0), (2, 0)), "cycle"),
        (["a", "b"], [-1, 0, 1], ((1, 0), (1, 0)), "3 parents for 2 joints"),
        (["a", "b", "c"], [-1, 0, 5], ((1, 0), (2, 0)), "outside"),
        (["a", "b", "c"], [-1, 0, 1], ((1, 0), (2, 7)), "torso pair"),
        (["a", "a", "c"], [-1, 0, 1], ((1, 0), (2, 0)), "unique"),
    ],
)
def test_bad_layouts(joints, parents, torso, message):
    with pytest.raises(DataError, match=message):
        SkeletonLayout(joints=joints, parents=parents, torso=torso)

"""3D skeletons: the joint layout of a dataset and IKEM's six skeleton modalities.

A skeleton stream stores joints ``J`` as float arrays ``(T, M, V, 3)``: T frames, M bodies, V
joints, x/y/z (metres for NTU RGB+D). The layout (joint names, the parent of every joint, the two
torso vectors whose normal stands in for the root's bone) lives in the dataset's ``meta.json``
under ``"skeleton"`` (:meth:`SkeletonLayout.to_meta`).

The six modalities of IKEM (METHODS.md section 3, Wei et al. 2023, "Elevating Skeleton-Based
Action Recognition with Efficient Multi-Modality Self-Supervision") are computed from ``J`` on
the fly, so a stored joint stream serves all six:

=================== =========================================================================
``joint``           ``J``
``motion``          ``M_t = s (J_{t+1} - J_t)``, last frame 0
``bone``            ``B_v = J_v - J_parent(v)``; root: unit normal of the two torso vectors
``acceleration``    ``A_t = s (M_{t+1} - M_t)``, last two frames 0
``rotation_axis``   ``R_v = B_v x B_adj(v)``; root: 0
``angular_velocity`` ``Omega_t = s (theta_{t+1} - theta_t) R_hat_t``,
                    ``theta = atan2(|B_hat_v x B_hat_adj(v)|, B_hat_v . B_hat_adj(v))``, last frame 0
=================== =========================================================================

They are written in **torch**, batched over any leading dimensions ``(..., T, M, V, 3)``: the
same code runs per clip in a data-loader worker and per batch on the GPU, and no Python loop
runs over frames, bodies or joints.

**Time scale** ``s``. IKEM's feeder resamples every clip to 50 frames and hands the network the
clip's original length F; ``s = 50 / F`` turns a difference between consecutive *resampled*
frames (which lie F / 50 source frames apart) into a change per *source* frame, so motion does
not depend on how long the clip was. We write ``s = T / F`` with T the number of frames of the
array given (T = 50 in IKEM, so the two agree) and F = ``source_frames``, the length of the
sequence the array was resampled from; ``source_frames=None`` means "not resampled" (s = 1).
``source_frames`` may be a tensor holding one F per clip of a batch. Acceleration applies s to
the already scaled motion (``s^2`` overall), as IKEM does.

**Ends of the sequence** (as IKEM's reference code): motion and angular velocity of the last
frame are 0; acceleration of the last two frames is 0 (``M_{T-1}`` is that padding, not a
motion, so ``A_{T-2}`` would be meaningless).

**Adjacent bone.** The rotation axis and angle of joint v pair v's bone with the bone of v's
parent; for the root, whose bone is the torso normal, the pair is the root with itself, giving
0 (IKEM's ``(21, 21)`` entry). A layout may override the partner of some joints
(``adjacent``): IKEM pairs each thumb with the hand-tip bone rather than the hand's.

**Lost joints** (stored as zeros, e.g. the absent second body) never produce NaN: a zero
vector normalises to the zero vector, the angle between a zero vector and anything is
``atan2(0, 0) = 0``, and everything else is sums and products of finite numbers. This is IKEM's
behaviour too (``F.normalize`` and ``torch.atan2``); a body appearing or vanishing therefore
shows as a jump in the velocity modalities, as in every NTU pipeline that zero-pads bodies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmfsar.errors import DataError

__all__ = [
    "DERIVED_MODALITIES",
    "NTU25",
    "SKELETON_LAYOUTS",
    "SYNTHETIC15",
    "SkeletonLayout",
    "acceleration",
    "angular_velocity",
    "bone",
    "derive",
    "joint",
    "layout_of",
    "motion",
    "rotation_axis",
    "time_scale",
    "to_graph_layout",
]


# ---------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class SkeletonLayout:
    """Joint names, the tree of parents, and the torso that orients the root.

    Args:
        joints: unique joint names; ``left_*`` / ``right_*`` are swapped by a horizontal flip.
        parents: the parent index of every joint, -1 for the (single) root.
        torso: two joint pairs ``(a, b)``, each standing for the vector ``J_a - J_b``; the unit
            normal of the two (their normalised cross product) replaces the root's bone.
        name: a short name stored in ``meta.json``.
        adjacent: ``(v, w)`` pairs that pair joint v's bone with joint w's bone (instead of its
            parent's) in the rotation axis and the angle.

    Lists are stored as tuples, so a layout is immutable and hashable.
    """

    joints: Sequence[str]
    parents: Sequence[int]
    torso: tuple[tuple[int, int], tuple[int, int]]
    name: str = "custom"
    adjacent: Sequence[tuple[int, int]] = field(default=())

    def __post_init__(self) -> None:
        joints = tuple(str(j) for j in self.joints)
        where = f"skeleton layout {self.name!r}"
        try:
            parents = tuple(int(p) for p in self.parents)
            torso = tuple((int(a), int(b)) for a, b in self.torso)
            adjacent = tuple((int(v), int(w)) for v, w in self.adjacent)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: parents, torso and adjacent must hold joint indices ({exc})") from None
        n = len(joints)
        if n == 0 or len(set(joints)) != n:
            raise DataError(f"{where}: joint names must be unique and non-empty, got {list(joints)}")
        if len(parents) != n:
            raise DataError(f"{where}: {len(parents)} parents for {n} joints")
        roots = [v for v, p in enumerate(parents) if p == -1]
        if len(roots) != 1:
            raise DataError(f"{where}: exactly one joint must have parent -1, got {len(roots)} ({roots})")
        bad = [(v, p) for v, p in enumerate(parents) if p != -1 and not (0 <= p < n and p != v)]
        if bad:
            raise DataError(f"{where}: parents outside 0..{n - 1} or a joint its own parent: (joint, parent) {bad}")
        for v in range(n):  # every chain of parents must reach the root
            u, steps = v, 0
            while parents[u] != -1:
                u, steps = parents[u], steps + 1
                if steps > n:
                    raise DataError(f"{where}: the parents of joint {v} ({joints[v]!r}) form a cycle")
        if len(torso) != 2:
            raise DataError(f"{where}: torso must be two joint pairs (a, b), got {list(torso)}")
        for pairs, what in ((torso, "torso"), (adjacent, "adjacent")):
            for a, b in pairs:
                if not (0 <= a < n and 0 <= b < n) or a == b:
                    raise DataError(f"{where}: {what} pair ({a}, {b}) must be two different joints of 0..{n - 1}")
        object.__setattr__(self, "joints", joints)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "torso", torso)
        object.__setattr__(self, "adjacent", adjacent)

    @property
    def num_joints(self) -> int:
        return len(self.joints)

    @property
    def root(self) -> int:
        return self.parents.index(-1)

    @property
    def edges(self) -> list[tuple[int, int]]:
        """The bones as ``(child, parent)`` pairs (the skeleton graph of a GCN)."""
        return [(v, p) for v, p in enumerate(self.parents) if p != -1]

    def bone_parents(self) -> list[int]:
        """Parent of every joint with the root mapped to itself (its bone is replaced anyway)."""
        return [v if p == -1 else p for v, p in enumerate(self.parents)]

    def adjacent_bones(self) -> list[int]:
        """The joint whose bone pairs with each joint's bone: the parent, the root itself, overrides."""
        partner = self.bone_parents()
        for v, w in self.adjacent:
            partner[v] = w
        return partner

    def flip_permutation(self) -> list[int]:
        """Joint permutation of a horizontal flip: ``left_x`` <-> ``right_x``."""
        index = {n: i for i, n in enumerate(self.joints)}
        perm = list(range(self.num_joints))
        for i, n in enumerate(self.joints):
            for a, b in (("left_", "right_"), ("right_", "left_")):
                if n.startswith(a) and b + n[len(a) :] in index:
                    perm[i] = index[b + n[len(a) :]]
        return perm

    def to_meta(self) -> dict[str, Any]:
        """The JSON object stored under ``"skeleton"`` in ``meta.json``."""
        return {
            "name": self.name,
            "joints": list(self.joints),
            "parents": list(self.parents),
            "torso": [list(p) for p in self.torso],
            "adjacent": [list(p) for p in self.adjacent],
        }

    @classmethod
    def from_meta(cls, raw: Mapping[str, Any]) -> SkeletonLayout:
        """Inverse of :meth:`to_meta`; a missing or malformed key is a :class:`DataError`."""
        if not isinstance(raw, Mapping):
            raise DataError(f"meta.json 'skeleton' must be an object, got {type(raw).__name__}")
        missing = [k for k in ("joints", "parents", "torso") if k not in raw]
        if missing:
            raise DataError(f"meta.json 'skeleton' lacks {missing} (expected joints, parents, torso[, adjacent])")
        try:
            torso = tuple(tuple(p) for p in raw["torso"])
            adjacent = tuple(tuple(p) for p in raw.get("adjacent", ()))
        except TypeError as exc:
            raise DataError(f"meta.json 'skeleton': torso / adjacent must be lists of pairs ({exc})") from None
        return cls(
            joints=list(raw["joints"]),
            parents=list(raw["parents"]),
            torso=torso,  # type: ignore[arg-type]
            name=str(raw.get("name", "custom")),
            adjacent=adjacent,  # type: ignore[arg-type]
        )


def _tree(joints: Sequence[str], edges: Sequence[tuple[int, int]], root: int) -> list[int]:
    """Parents of an undirected tree given by ``edges``, hung from ``root``."""
    neighbours: dict[int, list[int]] = {v: [] for v in range(len(joints))}
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    parents = [-2] * len(joints)
    parents[root] = -1
    queue = deque([root])
    while queue:
        u = queue.popleft()
        for w in neighbours[u]:
            if parents[w] == -2:
                parents[w] = u
                queue.append(w)
    return parents


# Kinect v2 joints in NTU RGB+D's order (1-based in the dataset's README: 1 base of the spine,
# ..., 21 spine at the shoulder, 22 tip of the left hand, 23 left thumb, ...). Parents follow
# IKEM's bone table (the ST-GCN / CTR-GCN tree rooted at the spine-shoulder joint, except that
# hand tip and thumb both hang from the hand, as in the Kinect SDK's bone map, where ST-GCN chains
# tip -> thumb -> hand); IKEM pairs each thumb with the hand-tip bone for the rotation axis, and
# orients the root by the plane through spine-mid and the two shoulders.
# fmt: off
NTU25 = SkeletonLayout(
    name="ntu25",
    joints=[
        "spine_base", "spine_mid", "neck", "head",
        "left_shoulder", "left_elbow", "left_wrist", "left_hand",
        "right_shoulder", "right_elbow", "right_wrist", "right_hand",
        "left_hip", "left_knee", "left_ankle", "left_foot",
        "right_hip", "right_knee", "right_ankle", "right_foot",
        "spine_shoulder", "left_hand_tip", "left_thumb", "right_hand_tip", "right_thumb",
    ],
    parents=[1, 20, 20, 2, 20, 4, 5, 6, 20, 8, 9, 10, 0, 12, 13, 14, 0, 16, 17, 18, -1, 7, 7, 11, 11],
    torso=((1, 8), (4, 8)),  # (spine_mid - right_shoulder) x (left_shoulder - right_shoulder)
    adjacent=((22, 21), (24, 23)),  # thumb bone x hand-tip bone
)
# fmt: on


def _synthetic15() -> SkeletonLayout:
    from mmfsar.data.synthetic.actions import EDGES, JOINTS

    index = {n: i for i, n in enumerate(JOINTS)}
    return SkeletonLayout(
        name="synthetic15",
        joints=list(JOINTS),
        parents=_tree(JOINTS, EDGES, index["pelvis"]),
        # no spine-mid joint: the plane through the pelvis and both shoulders, oriented as NTU25's
        torso=(
            (index["pelvis"], index["right_shoulder"]),
            (index["left_shoulder"], index["right_shoulder"]),
        ),
    )


# The 15-joint figure of the embedded synthetic dataset (mmfsar.data.synthetic.actions), root = pelvis.
SYNTHETIC15 = _synthetic15()

SKELETON_LAYOUTS: dict[str, SkeletonLayout] = {layout.name: layout for layout in (NTU25, SYNTHETIC15)}


def layout_of(meta: Any) -> SkeletonLayout:
    """The skeleton layout of a dataset (a :class:`~mmfsar.data.meta.DatasetMeta` or its dict)."""
    extra = meta if isinstance(meta, Mapping) else {**getattr(meta, "extra", {})}
    raw = extra.get("skeleton")
    if raw is None:
        raise DataError("meta.json has no 'skeleton' layout (joints, parents, torso); see mmfsar.data.skeleton")
    return SkeletonLayout.from_meta(raw)


# ------------------------------------------------------------------------------------ modalities
def _joints(joints: torch.Tensor | np.ndarray, layout: SkeletonLayout | None) -> torch.Tensor:
    x = torch.as_tensor(joints)
    if not x.is_floating_point():
        x = x.float()
    if x.ndim < 4 or x.shape[-1] != 3 or x.shape[-4] < 1:
        raise DataError(f"skeleton joints must have shape (..., T, M, V, 3) with T >= 1, got {tuple(x.shape)}")
    if layout is not None and x.shape[-2] != layout.num_joints:
        raise DataError(
            f"skeleton joints have {x.shape[-2]} joints (shape {tuple(x.shape)}), "
            f"layout {layout.name!r} has {layout.num_joints}"
        )
    return x


def _need_layout(layout: SkeletonLayout | None, what: str) -> SkeletonLayout:
    if layout is None:
        raise DataError(f"the {what} modality needs the skeleton layout (layout=...)")
    return layout


def time_scale(source_frames: float | torch.Tensor | None, joints: torch.Tensor | np.ndarray) -> torch.Tensor | float:
    """IKEM's ``s = T / F`` for ``joints`` (``..., T, M, V, 3``), broadcastable against them.

    ``source_frames`` (F) is a number or a tensor of the leading (batch) shape of ``joints``;
    None means the array is not resampled (s = 1).
    """
    if source_frames is None:
        return 1.0
    x = torch.as_tensor(joints)
    length = x.shape[-4]
    frames = torch.as_tensor(source_frames, dtype=x.dtype if x.is_floating_point() else torch.float32,
                             device=x.device)  # fmt: skip
    if frames.ndim and tuple(frames.shape) != tuple(x.shape[:-4]):
        raise DataError(
            f"source_frames of shape {tuple(frames.shape)} must be a number or match the leading "
            f"dimensions {tuple(x.shape[:-4])} of the joints {tuple(x.shape)}"
        )
    if not bool(torch.all(frames > 0)):
        raise DataError(f"source_frames must be positive, got {source_frames}")
    return (length / frames).reshape(*frames.shape, 1, 1, 1, 1)


def _next_minus_current(x: torch.Tensor, valid: int = 1) -> torch.Tensor:
    """``x_{t+1} - x_t`` along the time axis (-4); the last ``valid`` frames are 0."""
    out = torch.zeros_like(x)
    length = x.shape[-4]
    if length > valid:
        out[..., : length - valid, :, :, :] = (
            x[..., 1 : length - valid + 1, :, :, :] - x[..., : length - valid, :, :, :]
        )
    return out


def joint(joints: torch.Tensor | np.ndarray, *, layout: SkeletonLayout | None = None,
          source_frames: float | torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The joint positions themselves (as a float tensor)."""
    return _joints(joints, layout)


def motion(joints: torch.Tensor | np.ndarray, *, layout: SkeletonLayout | None = None,
           source_frames: float | torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``M_t = s (J_{t+1} - J_t)``; the last frame is 0 (IKEM)."""
    x = _joints(joints, layout)
    return time_scale(source_frames, x) * _next_minus_current(x)


def acceleration(joints: torch.Tensor | np.ndarray, *, layout: SkeletonLayout | None = None,
                 source_frames: float | torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``A_t = s (M_{t+1} - M_t)`` for ``t <= T - 3``; the last two frames are 0 (IKEM)."""
    x = _joints(joints, layout)
    s = time_scale(source_frames, x)
    return s * _next_minus_current(s * _next_minus_current(x), valid=2)


def bone(joints: torch.Tensor | np.ndarray, *, layout: SkeletonLayout | None = None,
         source_frames: float | torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``B_v = J_v - J_parent(v)``; the root's entry is the unit normal of the two torso vectors.

    A degenerate torso (the two vectors parallel, or lost joints) gives a zero normal.
    """
    lay = _need_layout(layout, "bone")
    x = _joints(joints, lay)
    parents = torch.as_tensor(lay.bone_parents(), device=x.device)
    out = x - x.index_select(-2, parents)
    (a0, a1), (b0, b1) = lay.torso
    normal = torch.linalg.cross(x[..., a0, :] - x[..., a1, :], x[..., b0, :] - x[..., b1, :], dim=-1)
    out[..., lay.root, :] = F.normalize(normal, dim=-1)
    return out


def _bone_pairs(joints: torch.Tensor | np.ndarray, layout: SkeletonLayout | None, what: str):
    lay = _need_layout(layout, what)
    bones = bone(joints, layout=lay)
    partner = torch.as_tensor(lay.adjacent_bones(), device=bones.device)
    return bones, bones.index_select(-2, partner)


def rotation_axis(joints: torch.Tensor | np.ndarray, *, layout: SkeletonLayout | None = None,
                  source_frames: float | torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``R_v = B_v x B_adj(v)`` (unnormalised, as IKEM); 0 at the root."""
    bones, partners = _bone_pairs(joints, layout, "rotation_axis")
    return torch.linalg.cross(bones, partners, dim=-1)


def angular_velocity(joints: torch.Tensor | np.ndarray, *, layout: SkeletonLayout | None = None,
                     source_frames: float | torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``Omega_t = s (theta_{t+1} - theta_t) R_hat_t`` with ``theta`` the angle between adjacent bones.

    ``theta = atan2(|B_hat x B_hat'|, B_hat . B_hat')`` lies in [0, pi] and is 0 when either
    bone has zero length; ``R_hat`` is the unit rotation axis at frame t (0 where the bones are
    parallel or lost). The last frame is 0.
    """
    bones, partners = _bone_pairs(joints, layout, "angular_velocity")
    unit, unit_partner = F.normalize(bones, dim=-1), F.normalize(partners, dim=-1)
    cross = torch.linalg.cross(unit, unit_partner, dim=-1)
    theta = torch.atan2(torch.linalg.vector_norm(cross, dim=-1), (unit * unit_partner).sum(-1))
    axis = F.normalize(torch.linalg.cross(bones, partners, dim=-1), dim=-1)
    change = _next_minus_current(theta[..., None])
    return time_scale(source_frames, bones) * change * axis


# A modality plug-in selects its function by name: DERIVED_MODALITIES[name](J, layout=..., source_frames=F).
DERIVED_MODALITIES: dict[str, Callable[..., torch.Tensor]] = {
    "joint": joint,
    "motion": motion,
    "bone": bone,
    "acceleration": acceleration,
    "rotation_axis": rotation_axis,
    "angular_velocity": angular_velocity,
}


def derive(
    name: str,
    joints: torch.Tensor | np.ndarray,
    *,
    layout: SkeletonLayout,
    source_frames: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The derived modality ``name`` of ``joints`` (..., T, M, V, 3)."""
    fn = DERIVED_MODALITIES.get(name)
    if fn is None:
        raise DataError(f"unknown skeleton modality {name!r}; known: {sorted(DERIVED_MODALITIES)}")
    return fn(joints, layout=layout, source_frames=source_frames)


def to_graph_layout(x: torch.Tensor) -> torch.Tensor:
    """``(..., T, M, V, C)`` -> ``(..., C, T, V, M)``, the input layout of ST-GCN-style encoders."""
    if x.ndim < 4:
        raise DataError(f"expected (..., T, M, V, C), got shape {tuple(x.shape)}")
    return x.movedim(-1, -4).transpose(-1, -2).contiguous()

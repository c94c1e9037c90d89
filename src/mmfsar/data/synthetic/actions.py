"""Articulated figure and parametric action catalogue of the synthetic dataset.

A figure is a 15-joint skeleton in 3D (x right, y up, z towards the camera; height ~1). An
action is a function of time that drives joint angles and root position; classes share motion
primitives (swing, circle, raise, push, wave, kick, bend, translate) on different body parts, so
features learnt on base classes transfer to novel ones. Each clip draws its own side (left or
right limb), tempo, amplitude, phase, position and body proportions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

JOINTS = [
    "head", "neck", "pelvis",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_hip", "left_knee", "left_ankle",
    "right_hip", "right_knee", "right_ankle",
]  # fmt: skip
EDGES = [(0, 1), (1, 2), (1, 3), (3, 4), (4, 5), (1, 6), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14)]  # fmt: skip
J = {name: i for i, name in enumerate(JOINTS)}
SIDES = {"left": 1.0, "right": -1.0}  # the figure faces the camera: its left is image right


@dataclass(frozen=True)
class Body:
    """Limb lengths in figure heights."""

    torso: float = 0.33
    neck: float = 0.09
    shoulder: float = 0.12
    hip: float = 0.07
    upper_arm: float = 0.17
    forearm: float = 0.16
    thigh: float = 0.22
    shin: float = 0.22

    @staticmethod
    def sample(rng: np.random.Generator) -> "Body":
        g = rng.uniform(0.9, 1.1, size=8)
        b = Body()
        return Body(*(v * k for v, k in zip(vars(b).values(), g)))


class Tracks(dict):
    """Per-frame driving parameters, each an array of shape (T,).

    root_x/root_y/root_z (figure heights), bend_side/bend_fwd (torso tilt, radians), and per side
    s in {left, right}: {s}_arm (in-plane shoulder angle, 0 = hanging, pi = overhead), {s}_arm_fwd
    (elevation towards the camera), {s}_elbow (flexion), {s}_leg, {s}_leg_fwd, {s}_knee.
    """

    @classmethod
    def rest(cls, t: np.ndarray) -> "Tracks":
        z = np.zeros_like(t)
        tr = cls(root_x=z.copy(), root_y=z.copy(), root_z=z.copy(), bend_side=z.copy(), bend_fwd=z.copy())
        for s in SIDES:
            tr[f"{s}_arm"] = z + 0.15
            tr[f"{s}_arm_fwd"] = z.copy()
            tr[f"{s}_elbow"] = z + 0.1
            tr[f"{s}_leg"] = z + 0.05
            tr[f"{s}_leg_fwd"] = z.copy()
            tr[f"{s}_knee"] = z.copy()
        return tr


def _direction(theta: np.ndarray, fwd: np.ndarray, side: float) -> np.ndarray:
    """Unit vector: in-plane angle ``theta`` from straight down (outwards for ``side``), tilted
    towards the camera by ``fwd``."""
    return np.stack([side * np.sin(theta) * np.cos(fwd), -np.cos(theta) * np.cos(fwd), np.sin(fwd)], -1)


def _rotate(v: np.ndarray, side_angle: np.ndarray, fwd_angle: np.ndarray) -> np.ndarray:
    """Rotate vectors (T, 3) in the image plane by ``side_angle``, then towards the camera."""
    c, s = np.cos(side_angle)[:, None], np.sin(side_angle)[:, None]
    x, y, z = v[:, 0:1], v[:, 1:2], v[:, 2:3]
    x, y = c * x - s * y, s * x + c * y
    c, s = np.cos(fwd_angle)[:, None], np.sin(fwd_angle)[:, None]
    y, z = c * y - s * z, s * y + c * z
    return np.concatenate([x, y, z], -1)


def forward_kinematics(body: Body, tr: Tracks) -> np.ndarray:
    """Joint positions (T, 15, 3) in figure heights; the pelvis rests at height ``thigh + shin``."""
    T = tr["root_x"].shape[0]
    out = np.zeros((T, len(JOINTS), 3))
    pelvis = np.stack([tr["root_x"], tr["root_y"] + body.thigh + body.shin, tr["root_z"]], -1)
    up = lambda v: _rotate(np.broadcast_to(np.asarray(v, float), (T, 3)).copy(), tr["bend_side"], tr["bend_fwd"])  # noqa: E731
    neck = pelvis + up([0, body.torso, 0])
    out[:, J["pelvis"]] = pelvis
    out[:, J["neck"]] = neck
    out[:, J["head"]] = neck + up([0, body.neck, 0])
    for s, sign in SIDES.items():
        sh = neck + up([sign * body.shoulder, -0.02, 0])
        d_upper = _rotate(_direction(tr[f"{s}_arm"], tr[f"{s}_arm_fwd"], sign), tr["bend_side"], tr["bend_fwd"])
        d_fore = _rotate(
            _direction(tr[f"{s}_arm"] + tr[f"{s}_elbow"], tr[f"{s}_arm_fwd"], sign), tr["bend_side"], tr["bend_fwd"]
        )
        el = sh + body.upper_arm * d_upper
        out[:, J[f"{s}_shoulder"]], out[:, J[f"{s}_elbow"]] = sh, el
        out[:, J[f"{s}_wrist"]] = el + body.forearm * d_fore
        hp = pelvis + np.array([sign * body.hip, 0, 0])
        kn = hp + body.thigh * _direction(tr[f"{s}_leg"], tr[f"{s}_leg_fwd"], sign)
        an = kn + body.shin * _direction(tr[f"{s}_leg"], tr[f"{s}_leg_fwd"] - tr[f"{s}_knee"], sign)
        out[:, J[f"{s}_hip"]], out[:, J[f"{s}_knee"]], out[:, J[f"{s}_ankle"]] = hp, kn, an
    return out


@dataclass(frozen=True)
class Motion:
    """Random per-clip motion parameters an action reads."""

    t: np.ndarray  # seconds, (T,)
    omega: float  # angular tempo, rad/s
    amp: float  # amplitude gain ~1
    phase: float
    side: str  # the limb used by one-sided actions
    other: str
    onset: float  # for one-shot actions: time of the movement's middle, in [0.3, 0.7] of the clip

    @property
    def wave(self) -> np.ndarray:
        return np.sin(self.omega * self.t + self.phase)

    def ramp(self) -> np.ndarray:
        """Smooth 0 -> 1 transition around ``onset``."""
        dur = self.t[-1] + 1e-6
        x = (self.t / dur - self.onset) * 4.0 + 0.5
        x = np.clip(x, 0, 1)
        return x * x * (3 - 2 * x)


Action = Callable[[Tracks, Motion], None]
ACTIONS: dict[str, Action] = {}


def action(name: str) -> Callable[[Action], Action]:
    def register(fn: Action) -> Action:
        ACTIONS[name] = fn
        return fn

    return register


# --- one arm ---------------------------------------------------------------------------------
@action("arm_swing")
def _(tr: Tracks, m: Motion) -> None:
    tr[f"{m.side}_arm"] = 0.9 + 0.7 * m.amp * m.wave


@action("arm_circle_out")
def _(tr: Tracks, m: Motion) -> None:
    tr[f"{m.side}_arm"] = m.omega * m.t + m.phase
    tr[f"{m.side}_elbow"] = 0 * m.t


@action("arm_circle_in")
def _(tr: Tracks, m: Motion) -> None:
    tr[f"{m.side}_arm"] = -m.omega * m.t + m.phase
    tr[f"{m.side}_elbow"] = 0 * m.t


@action("arm_raise")
def _(tr: Tracks, m: Motion) -> None:
    tr[f"{m.side}_arm"] = 0.15 + 2.6 * m.amp * m.ramp()


@action("arm_lower")
def _(tr: Tracks, m: Motion) -> None:
    tr[f"{m.side}_arm"] = 0.15 + 2.6 * m.amp * (1 - m.ramp())


@action("arm_push")
def _(tr: Tracks, m: Motion) -> None:
    p = 0.5 + 0.5 * m.wave
    tr[f"{m.side}_arm"] = 0.3 + 0 * m.t
    tr[f"{m.side}_arm_fwd"] = 0.2 + 1.2 * m.amp * p
    tr[f"{m.side}_elbow"] = 1.6 * (1 - p)


@action("arm_wave")
def _(tr: Tracks, m: Motion) -> None:
    tr[f"{m.side}_arm"] = 2.4 + 0 * m.t
    tr[f"{m.side}_elbow"] = 0.5 + 0.5 * m.amp * np.sin(2 * m.omega * m.t + m.phase)


@action("arm_shake")
def _(tr: Tracks, m: Motion) -> None:
    tr[f"{m.side}_arm"] = 1.3 + 0.25 * m.amp * np.sin(3 * m.omega * m.t + m.phase)
    tr[f"{m.side}_elbow"] = 0.2 + 0 * m.t


# --- both arms, in phase (mirror-symmetric) ---------------------------------------------------
def _both(tr: Tracks, key: str, values: np.ndarray) -> None:
    for s in SIDES:
        tr[f"{s}_{key}"] = values


@action("both_swing")
def _(tr: Tracks, m: Motion) -> None:
    _both(tr, "arm", 0.9 + 0.7 * m.amp * m.wave)


@action("both_circle_out")
def _(tr: Tracks, m: Motion) -> None:
    _both(tr, "arm", m.omega * m.t + m.phase)
    _both(tr, "elbow", 0 * m.t)


@action("both_raise")
def _(tr: Tracks, m: Motion) -> None:
    _both(tr, "arm", 0.15 + 2.6 * m.amp * m.ramp())


@action("both_push")
def _(tr: Tracks, m: Motion) -> None:
    p = 0.5 + 0.5 * m.wave
    _both(tr, "arm", 0.3 + 0 * m.t)
    _both(tr, "arm_fwd", 0.2 + 1.2 * m.amp * p)
    _both(tr, "elbow", 1.6 * (1 - p))


@action("both_wave")
def _(tr: Tracks, m: Motion) -> None:
    _both(tr, "arm", 2.4 + 0 * m.t)
    _both(tr, "elbow", 0.5 + 0.5 * m.amp * np.sin(2 * m.omega * m.t + m.phase))


@action("both_flap")
def _(tr: Tracks, m: Motion) -> None:
    _both(tr, "arm", 1.4 + 0.35 * m.amp * np.sin(2.5 * m.omega * m.t + m.phase))
    _both(tr, "elbow", 0 * m.t)


# --- both arms, alternating ------------------------------------------------------------------
@action("alt_swing")
def _(tr: Tracks, m: Motion) -> None:
    tr[f"{m.side}_arm"] = 0.9 + 0.7 * m.amp * m.wave
    tr[f"{m.other}_arm"] = 0.9 - 0.7 * m.amp * m.wave


@action("alt_push")
def _(tr: Tracks, m: Motion) -> None:
    for s, sign in ((m.side, 1), (m.other, -1)):
        p = 0.5 + 0.5 * sign * m.wave
        tr[f"{s}_arm"] = 0.3 + 0 * m.t
        tr[f"{s}_arm_fwd"] = 0.2 + 1.2 * m.amp * p
        tr[f"{s}_elbow"] = 1.6 * (1 - p)


@action("alt_circle")
def _(tr: Tracks, m: Motion) -> None:
    tr[f"{m.side}_arm"] = m.omega * m.t + m.phase
    tr[f"{m.other}_arm"] = m.omega * m.t + m.phase + np.pi
    _both(tr, "elbow", 0 * m.t)


# --- legs --------------------------------------------------------------------------------------
@action("leg_kick")
def _(tr: Tracks, m: Motion) -> None:
    p = np.maximum(m.wave, 0)
    tr[f"{m.side}_leg_fwd"] = 1.2 * m.amp * p
    tr[f"{m.side}_knee"] = 0.6 * (1 - p) * (p > 0.05)


@action("leg_side_raise")
def _(tr: Tracks, m: Motion) -> None:
    tr[f"{m.side}_leg"] = 0.05 + 0.5 * m.amp * (0.5 + 0.5 * m.wave)


@action("march")
def _(tr: Tracks, m: Motion) -> None:
    for s, sign in ((m.side, 1), (m.other, -1)):
        p = np.maximum(sign * m.wave, 0)
        tr[f"{s}_leg_fwd"] = 1.1 * m.amp * p
        tr[f"{s}_knee"] = 1.8 * p


@action("squat")
def _(tr: Tracks, m: Motion) -> None:
    p = 0.5 + 0.5 * m.wave
    _both(tr, "leg_fwd", 0.9 * m.amp * p)
    _both(tr, "knee", 1.8 * m.amp * p)
    tr["root_y"] = -0.2 * m.amp * p
    _both(tr, "arm_fwd", 1.2 * p)


@action("jump")
def _(tr: Tracks, m: Motion) -> None:
    tr["root_y"] = 0.15 * m.amp * np.abs(m.wave)
    _both(tr, "arm", 0.4 + 0.6 * np.abs(m.wave))


@action("jumping_jack")
def _(tr: Tracks, m: Motion) -> None:
    p = 0.5 + 0.5 * m.wave
    _both(tr, "arm", 0.15 + 2.5 * m.amp * p)
    _both(tr, "leg", 0.05 + 0.35 * p)
    tr["root_y"] = 0.06 * np.abs(np.sin(2 * (m.omega * m.t + m.phase)))


# --- whole body --------------------------------------------------------------------------------
@action("bend_side")
def _(tr: Tracks, m: Motion) -> None:
    tr["bend_side"] = 0.5 * m.amp * m.wave


@action("bend_forward")
def _(tr: Tracks, m: Motion) -> None:
    tr["bend_fwd"] = 0.5 + 0.5 * m.amp * m.wave
    _both(tr, "arm_fwd", 0.6 + 0 * m.t)


@action("approach")
def _(tr: Tracks, m: Motion) -> None:
    tr["root_z"] = -0.6 + 1.2 * m.amp * m.ramp()
    ACTIONS["march"](tr, Motion(m.t, m.omega, 0.5, m.phase, m.side, m.other, m.onset))


@action("recede")
def _(tr: Tracks, m: Motion) -> None:
    tr["root_z"] = 0.6 - 1.2 * m.amp * m.ramp()
    ACTIONS["march"](tr, Motion(m.t, m.omega, 0.5, m.phase, m.side, m.other, m.onset))


@action("walk_across")
def _(tr: Tracks, m: Motion) -> None:
    sign = SIDES[m.side]
    tr["root_x"] = sign * (-0.35 + 0.7 * m.amp * m.t / (m.t[-1] + 1e-6))
    ACTIONS["alt_swing"](tr, Motion(m.t, 2 * m.omega, 0.4, m.phase, m.side, m.other, m.onset))
    ACTIONS["march"](tr, Motion(m.t, 2 * m.omega, 0.5, m.phase, m.side, m.other, m.onset))


@action("twist")
def _(tr: Tracks, m: Motion) -> None:
    _both(tr, "arm", 1.5 + 0 * m.t)
    tr[f"{m.side}_arm_fwd"] = 0.8 * m.amp * m.wave
    tr[f"{m.other}_arm_fwd"] = -0.8 * m.amp * m.wave


@action("punch_kick")
def _(tr: Tracks, m: Motion) -> None:
    ACTIONS["arm_push"](tr, m)
    p = np.maximum(-m.wave, 0)
    tr[f"{m.other}_leg_fwd"] = 1.0 * m.amp * p


# --- the same motions with a handheld object: invisible to pose, visible to rgb / flow / depth ---
PROP_OF_ACTION: dict[str, str] = {}


def with_prop(name: str, motion: str, prop: str) -> None:
    ACTIONS[name] = ACTIONS[motion]
    PROP_OF_ACTION[name] = prop


with_prop("swing_bat", "arm_swing", "stick")
with_prop("throw_ball", "arm_push", "ball")
with_prop("lift_box", "both_raise", "box")
with_prop("wave_flag", "arm_wave", "stick")
with_prop("push_box", "both_push", "box")


# Class-disjoint splits, fixed so that every novel class reuses primitives seen in base classes
# on other body parts (documented in DATA_STRUCTURE.md).
SPLIT_OF_ACTION = {
    **dict.fromkeys(
        [
            "arm_swing", "arm_circle_out", "arm_raise", "arm_push", "arm_shake", "both_swing",
            "both_circle_out", "both_flap", "alt_swing", "alt_push", "leg_kick", "march", "squat",
            "jump", "bend_side", "approach", "swing_bat", "throw_ball",
        ],
        "base",
    ),
    **dict.fromkeys(
        ["arm_circle_in", "both_raise", "both_wave", "walk_across", "twist", "leg_side_raise", "lift_box"], "val"
    ),
    **dict.fromkeys(
        [
            "arm_lower", "arm_wave", "both_push", "alt_circle", "jumping_jack", "bend_forward", "recede",
            "punch_kick", "wave_flag", "push_box",
        ],
        "novel",
    ),
}  # fmt: skip
TEMPO_HZ = {"arm_shake": 0.8, "both_flap": 0.8}  # base tempo, Hz (default 0.7)
assert set(SPLIT_OF_ACTION) == set(ACTIONS), set(SPLIT_OF_ACTION) ^ set(ACTIONS)


def sample_motion(rng: np.random.Generator, num_frames: int, fps: float, action_name: str) -> Motion:
    side = "left" if rng.random() < 0.5 else "right"
    hz = TEMPO_HZ.get(action_name, 0.7) * rng.uniform(0.75, 1.35)
    return Motion(
        t=np.arange(num_frames) / fps,
        omega=2 * np.pi * hz,
        amp=rng.uniform(0.8, 1.15),
        phase=rng.uniform(0, 2 * np.pi),
        side=side,
        other="right" if side == "left" else "left",
        onset=rng.uniform(0.3, 0.7),
    )


@dataclass(frozen=True)
class Prop:
    """A handheld object: a capsule (T, 2, 3) in world coordinates, of ``radius`` figure heights."""

    kind: str
    ends: np.ndarray
    radius: float


def props_of(action_name: str, joints: np.ndarray, side: str) -> list[Prop]:
    """The object the figure holds during ``action_name`` (none for most classes)."""
    kind = PROP_OF_ACTION.get(action_name)
    if kind is None:
        return []
    wrist, elbow = joints[:, J[f"{side}_wrist"]], joints[:, J[f"{side}_elbow"]]
    forearm = (wrist - elbow) / np.maximum(np.linalg.norm(wrist - elbow, axis=-1, keepdims=True), 1e-6)
    if kind == "stick":
        return [Prop(kind, np.stack([wrist, wrist + 0.3 * forearm], 1), 0.02)]
    if kind == "ball":
        centre = wrist + 0.05 * forearm
        return [Prop(kind, np.stack([centre, centre], 1), 0.06)]
    if kind == "box":
        left, right = joints[:, J["left_wrist"]], joints[:, J["right_wrist"]]
        return [Prop(kind, np.stack([left, right], 1), 0.07)]
    raise ValueError(f"unknown prop {kind!r}")


def animate(rng: np.random.Generator, action_name: str, num_frames: int, fps: float) -> tuple[np.ndarray, list[Prop]]:
    """World joint positions (T, 15, 3) of one random performance of ``action_name``, and the
    objects held."""
    m = sample_motion(rng, num_frames, fps, action_name)
    tr = Tracks.rest(m.t)
    ACTIONS[action_name](tr, m)
    tr["root_x"] = tr["root_x"] + rng.uniform(-0.12, 0.12)
    tr["root_z"] = tr["root_z"] + rng.uniform(-0.25, 0.25)
    joints = forward_kinematics(Body.sample(rng), tr)
    return joints, props_of(action_name, joints, m.side)

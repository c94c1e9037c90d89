"""Rendering one animated figure into every modality, in one of two visual domains.

The scene is a list of capsules (limb segments, torso, head, plus distractor sticks and blobs
on the back wall) seen by a pinhole camera. One z-buffered rasterisation gives, from the same
geometry: RGB frames, optical flow (the true motion of the surface under each pixel, including
camera motion), depth in millimetres, and 2D keypoints as a pose detector would report them.

Why RGB is the hard modality: the RGB frames carry background texture, clutter, moving
distractors, lighting flicker and sensor noise; the target domain changes all of these
(palette, texture frequency, contrast of the figure, camera shake). Flow sees only motion (the
distractors' too), depth only geometry, pose only the figure (with detector noise that grows
with joint speed, as motion blur does to real detectors).

The 3D skeleton stream (opt-in, :func:`render_skeleton`) is what a depth-sensor body tracker
(Kinect, as in NTU RGB+D) reports from the same animation: camera-space joints in metres, with
jitter and occasional lost joints (zeros). It draws from its own random generator, so the other
streams are the same with and without it.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from mmfsar.data.synthetic.actions import EDGES, J, Prop

FRAME = 64  # RGB and keypoint resolution
AUX = 32  # flow and depth resolution (stored at half resolution, as flow usually is)
CAMERA_DIST = 4.0  # figure heights
METERS_PER_UNIT = 1.7
FOCAL = 46.0 * CAMERA_DIST  # a figure at z=0 is ~46 px tall
CENTER_Y = 0.55  # figure height mapped to the image centre
WALL_DIST = CAMERA_DIST + 0.8
LIMBS = [[J[f"{s}_{a}"] for a in parts] for s in ("left", "right") for parts in (("elbow", "wrist"), ("knee", "ankle"))]


@dataclass(frozen=True)
class DomainStyle:
    """Appearance and nuisance settings of one visual domain."""

    bg_hue: tuple[float, float]
    bg_sat: tuple[float, float]
    bg_val: tuple[float, float]
    bg_texture_cells: tuple[int, ...]  # noise grid sizes (higher = finer texture)
    bg_texture_amp: float
    fig_sat: tuple[float, float]
    fig_contrast: tuple[float, float]  # |figure value - background value|
    distractors: tuple[int, int]  # number of moving sticks/blobs
    camera_shake_px: tuple[float, float]
    flicker: float
    rgb_noise: float  # std of pixel noise, 0-255
    pose_noise_px: float
    flow_noise_px: float
    pose_occlusion: float  # probability that a limb is occluded for part of the clip
    skeleton_jitter_m: float  # std of the 3D skeleton's per-frame joint noise, metres (x, y)
    skeleton_lost_joint: float  # probability that a joint is lost (zeros) in a frame
    skeleton_lost_limb: float  # probability that a forearm or shin is lost for a stretch of the clip
    skeleton_lost_frame: float  # probability that the whole body is lost in a frame


DOMAINS: dict[str, DomainStyle] = {
    "source": DomainStyle(
        bg_hue=(0.0, 0.15), bg_sat=(0.15, 0.35), bg_val=(0.45, 0.7), bg_texture_cells=(3, 6),
        bg_texture_amp=0.12, fig_sat=(0.55, 0.95), fig_contrast=(0.3, 0.5), distractors=(0, 1),
        camera_shake_px=(0.0, 0.4), flicker=0.03, rgb_noise=3.0, pose_noise_px=3.0, flow_noise_px=0.05,
        pose_occlusion=0.5, skeleton_jitter_m=0.01, skeleton_lost_joint=0.01, skeleton_lost_limb=0.3,
        skeleton_lost_frame=0.01,
    ),
    "target": DomainStyle(
        bg_hue=(0.45, 0.75), bg_sat=(0.1, 0.4), bg_val=(0.35, 0.7), bg_texture_cells=(6, 12),
        bg_texture_amp=0.18, fig_sat=(0.1, 0.5), fig_contrast=(0.2, 0.4), distractors=(1, 2),
        camera_shake_px=(0.3, 1.0), flicker=0.08, rgb_noise=5.0, pose_noise_px=3.5, flow_noise_px=0.12,
        pose_occlusion=0.6, skeleton_jitter_m=0.015, skeleton_lost_joint=0.02, skeleton_lost_limb=0.4,
        skeleton_lost_frame=0.02,
    ),
}  # fmt: skip


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))))


def _upsampled_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Smooth random field in [-1, 1], (size, size), bilinear from a ``cells`` grid."""
    g = rng.uniform(-1, 1, size=(cells + 1, cells + 1))
    u = np.linspace(0, cells, size)
    i = np.minimum(u.astype(int), cells - 1)
    f = u - i
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _bilinear_shift(img: np.ndarray, dx: float, dy: float, size: int) -> np.ndarray:
    """Crop ``size x size`` from the padded ``img`` (H, W, C) centre, shifted by (dx, dy) px."""
    pad = (img.shape[0] - size) / 2
    y0, x0 = pad - dy, pad - dx
    iy, ix = int(np.floor(y0)), int(np.floor(x0))
    fy, fx = y0 - iy, x0 - ix
    a = img[iy : iy + size + 1, ix : ix + size + 1]
    top = a[:-1, :-1] * (1 - fx) + a[:-1, 1:] * fx
    bot = a[1:, :-1] * (1 - fx) + a[1:, 1:] * fx
    return top * (1 - fy) + bot * fy


@dataclass
class Scene:
    """Capsules over time, in camera space: endpoints (T, K, 2, 3) world, radii (K,), colours (K, 3)."""

    ends: np.ndarray
    radius: np.ndarray
    colour: np.ndarray
    is_figure: np.ndarray  # (K,) bool


def _project(p: np.ndarray, shift: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray]:
    """World points (..., 3) -> pixel coords (..., 2) at resolution ``res`` and camera distance."""
    k = res / FRAME
    dist = CAMERA_DIST - p[..., 2]
    x = (FRAME - 1) / 2 + FOCAL * p[..., 0] / dist
    y = (FRAME - 1) / 2 - FOCAL * (p[..., 1] - CENTER_Y) / dist
    xy = np.stack([x, y], -1) + shift
    return (xy + 0.5) * k - 0.5, dist


def _rasterize(scene: Scene, shift: np.ndarray, res: int):
    """Z-buffered capsules. Returns front capsule id (T, H, W) (-1 = wall), its axial position s,
    camera distance, and edge coverage. Each capsule is evaluated inside its bounding box only."""
    T, K = scene.ends.shape[:2]
    ends_px, ends_dist = _project(scene.ends, shift[:, None, None, :], res)  # (T,K,2,2), (T,K,2)
    rad_px = FOCAL * (res / FRAME) * scene.radius[None, :] / ends_dist.mean(-1)  # (T, K)
    best = np.full((T, res, res), np.inf)
    front = np.full((T, res, res), -1, dtype=np.int64)
    s_front = np.zeros((T, res, res))
    cover = np.zeros((T, res, res))
    for c in range(K):
        a, b = ends_px[:, c, 0], ends_px[:, c, 1]  # (T, 2)
        reach = rad_px[:, c].max() + 1
        lo = np.floor(np.minimum(a, b).min(0) - reach).astype(int).clip(0, res)
        hi = np.ceil(np.maximum(a, b).max(0) + reach + 1).astype(int).clip(0, res)
        if (hi <= lo).any():
            continue
        ys, xs = np.mgrid[lo[1] : hi[1], lo[0] : hi[0]].astype(np.float64)
        px = np.stack([xs, ys], -1)[None]  # (1, h, w, 2)
        ab = (b - a)[:, None, None, :]
        denom = np.maximum((ab**2).sum(-1), 1e-9)
        s = np.clip(((px - a[:, None, None, :]) * ab).sum(-1) / denom, 0, 1)  # (T, h, w)
        d = np.sqrt(((px - a[:, None, None, :] - s[..., None] * ab) ** 2).sum(-1))
        r = rad_px[:, c, None, None]
        z = ends_dist[:, c, 0, None, None] * (1 - s) + ends_dist[:, c, 1, None, None] * s
        win = (slice(None), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        hit = (d < r + 0.5) & (z < best[win])
        best[win] = np.where(hit, z, best[win])
        front[win] = np.where(hit, c, front[win])
        s_front[win] = np.where(hit, s, s_front[win])
        cover[win] = np.where(hit, np.clip(r - d + 0.5, 0, 1), cover[win])
    return front, s_front, best, cover


def build_scene(
    rng: np.random.Generator, joints: np.ndarray, props: list[Prop], style: DomainStyle, bg_value: float
) -> Scene:
    """Capsules of the figure (joints (T, 15, 3)), the objects it holds, and the domain's
    distractors on the wall."""
    T = joints.shape[0]
    limb_r, torso_r, head_r = 0.035, 0.06, 0.075
    segs, radius, colour, fig = [], [], [], []
    hue = rng.uniform(0, 1)
    sign = 1 if rng.random() < 0.5 else -1
    contrast = sign * rng.uniform(*style.fig_contrast)
    torso_c = _hsv(hue, rng.uniform(*style.fig_sat), bg_value + contrast)
    limb_c = _hsv(hue + rng.uniform(0.05, 0.3), rng.uniform(*style.fig_sat), bg_value + contrast * rng.uniform(0.8, 1.2))
    skin_c = _hsv(rng.uniform(0.02, 0.1), rng.uniform(0.2, 0.6), bg_value + contrast * rng.uniform(0.8, 1.2))
    for a, b in EDGES:
        segs.append(np.stack([joints[:, a], joints[:, b]], 1))
        is_torso = (a, b) == (J["neck"], J["pelvis"])
        radius.append(torso_r if is_torso else limb_r)
        colour.append(torso_c if is_torso else limb_c)
        fig.append(True)
    segs.append(np.stack([joints[:, J["head"]], joints[:, J["head"]]], 1))
    radius.append(head_r)
    colour.append(skin_c)
    fig.append(True)
    for prop in props:
        segs.append(prop.ends)
        radius.append(prop.radius)
        colour.append(_hsv(rng.uniform(0, 1), rng.uniform(0.5, 1.0), bg_value + sign * rng.uniform(0.3, 0.5)))
        fig.append(True)
    # distractors live on the wall, behind the figure; sticks swing like limbs, blobs drift
    n = rng.integers(style.distractors[0], style.distractors[1] + 1)
    t = np.arange(T)[:, None]
    wall_z = CAMERA_DIST - WALL_DIST + 0.05
    for _ in range(n):
        centre = np.array([rng.uniform(-0.9, 0.9), rng.uniform(-0.1, 1.2)])
        vel = rng.normal(0, 0.012, size=2)
        pos = centre + vel * t
        col = _hsv(rng.uniform(0, 1), rng.uniform(0.2, 0.9), bg_value + rng.choice([-1, 1]) * rng.uniform(0.1, 0.4))
        if rng.random() < 0.6:
            length = rng.uniform(0.15, 0.3)
            ang = rng.uniform(0, np.pi) + rng.uniform(0.3, 1.0) * np.sin(rng.uniform(0.2, 0.6) * t + rng.uniform(0, 6))
            half = 0.5 * length * np.concatenate([np.cos(ang), np.sin(ang)], -1)
            a, b = pos - half, pos + half
            r = rng.uniform(0.025, 0.045)
        else:
            a = b = pos
            r = rng.uniform(0.05, 0.1)
        z = np.full((T, 1), wall_z)
        segs.append(np.stack([np.concatenate([a, z], -1), np.concatenate([b, z], -1)], 1))
        radius.append(r)
        colour.append(col)
        fig.append(False)
    return Scene(np.stack(segs, 1), np.array(radius), np.stack(colour), np.array(fig))


def camera_path(rng: np.random.Generator, T: int, style: DomainStyle) -> np.ndarray:
    """Camera shake + slow pan, as an image shift (T, 2) in FRAME pixels."""
    amp = rng.uniform(*style.camera_shake_px)
    t = np.arange(T)
    w1, w2 = rng.uniform(0.3, 0.9, size=2)
    shake = amp * np.stack([np.sin(w1 * t + rng.uniform(0, 6)), np.sin(w2 * t + rng.uniform(0, 6))], -1)
    pan = rng.normal(0, amp * 0.08, size=2) * t[:, None]
    return np.clip(shake + pan, -12, 12)


def _next(x: np.ndarray) -> np.ndarray:
    """Values at t+1, linearly extrapolated for the last frame (so flow[T-1] = x[T-1] - x[T-2])."""
    return np.concatenate([x[1:], 2 * x[-1:] - x[-2:-1]], 0)


def camera_space(joints: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """World joints (T, V, 3) in figure heights -> camera-space joints (T, V, 3) in metres, in the
    Kinect's axes (right-handed: x to the sensor's left, y up, z away from the sensor along its
    optical axis), seen through the camera of the image shift ``shift`` (T, 2) (FRAME pixels).

    The exact inverse of the rendering's pinhole: the image shift is the camera turning, which
    moves every point by ``shift * depth / FOCAL`` sideways, so a joint projects to pixel
    ``((FRAME - 1) / 2 - FOCAL x / z, (FRAME - 1) / 2 - FOCAL y / z)``, where the keypoints of
    the ``pose`` stream are (before their noise).
    """
    depth = CAMERA_DIST - joints[..., 2]
    x = joints[..., 0] + shift[:, None, 0] * depth / FOCAL
    y = joints[..., 1] - CENTER_Y - shift[:, None, 1] * depth / FOCAL
    return np.stack([-x, y, depth], -1) * METERS_PER_UNIT


# jitter gain of the joints a body tracker finds hardest (hands and feet move fastest and are small)
EXTREMITIES = [J[n] for n in ("head", "left_wrist", "right_wrist", "left_ankle", "right_ankle")]


def render_skeleton(rng: np.random.Generator, joints: np.ndarray, shift: np.ndarray, style: DomainStyle) -> np.ndarray:
    """The 3D skeleton a depth-sensor body tracker reports: float32 (T, 2, 15, 3), metres.

    Camera-space joints (:func:`camera_space`) of the one figure plus Gaussian jitter: std
    ``skeleton_jitter_m`` across the view, 1.5x that along the depth axis (depth sensors are least
    precise in depth), doubled for the head, wrists and ankles. Lost joints are zeros (the NTU
    arrays' convention for an absent body): each joint in each frame with probability
    ``skeleton_lost_joint``, the whole body in a frame with probability ``skeleton_lost_frame``,
    and with probability ``skeleton_lost_limb`` one forearm or shin (elbow and wrist, knee and
    ankle) for 10-40% of the clip (at least one frame keeps the body). The second body slot is all
    zeros (one figure), so the layout is the NTU importer's (T, M=2, V, 3).
    """
    T, V = joints.shape[:2]
    cam = camera_space(joints, shift)
    gain = np.ones((V, 1))
    gain[EXTREMITIES] = 2.0
    sigma = style.skeleton_jitter_m * gain * np.array([1.0, 1.0, 1.5])
    cam = cam + rng.normal(0.0, 1.0, cam.shape) * sigma
    lost = rng.random((T, V)) < style.skeleton_lost_joint
    lost |= (rng.random(T) < style.skeleton_lost_frame)[:, None]
    if rng.random() < style.skeleton_lost_limb:
        limb = LIMBS[rng.integers(len(LIMBS))]
        span = max(1, int(round(T * rng.uniform(0.1, 0.4))))
        start = int(rng.integers(0, T - span + 1))
        lost[start : start + span, limb] = True
    if lost.all(axis=1).all():
        lost[0] = False
    cam[lost] = 0.0
    out = np.zeros((T, 2, V, 3), np.float32)
    out[:, 0] = cam
    return out


def render_clip(
    rng: np.random.Generator,
    joints: np.ndarray,
    domain: str,
    props: list[Prop] = (),
    *,
    skeleton_rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """All modalities of one clip: rgb (T,64,64,3) uint8, flow (T,32,32,2) float16 px, depth
    (T,32,32) uint16 mm, pose (T,15,3) float32 (x, y in 64-px frame, confidence); with
    ``skeleton_rng``, also skeleton (T,2,15,3) float32 metres (:func:`render_skeleton`), drawn
    from that generator only, so ``rng``'s draws and the other streams do not change."""
    style = DOMAINS[domain]
    T = joints.shape[0]
    bg_hue, bg_sat, bg_val = (rng.uniform(*r) for r in (style.bg_hue, style.bg_sat, style.bg_val))
    scene = build_scene(rng, joints, list(props), style, bg_val)
    shift = camera_path(rng, T, style)

    # --- RGB ------------------------------------------------------------------------------------
    pad = 14
    size = FRAME + 2 * pad
    tex = sum(_upsampled_noise(rng, c, size) for c in style.bg_texture_cells) / len(style.bg_texture_cells)
    stripes = np.sin(np.arange(size) * rng.uniform(0.2, 1.2) + rng.uniform(0, 6))[None, :] * (rng.random() < 0.5)
    value = np.clip(bg_val + style.bg_texture_amp * (tex + 0.5 * stripes), 0, 1)
    base = _hsv(bg_hue, bg_sat, 1.0)
    wall = value[..., None] * base[None, None] / max(base.max(), 1e-6)
    front, s, _, cover = _rasterize(scene, shift, FRAME)
    cols = np.concatenate([scene.colour, np.zeros((1, 3))])[front]  # -1 -> zeros row
    shade = 0.85 + 0.15 * cover[..., None]
    frames = np.empty((T, FRAME, FRAME, 3))
    light = 1 + style.flicker * np.sin(rng.uniform(0.5, 1.5) * np.arange(T) + rng.uniform(0, 6))
    for t in range(T):
        bg = _bilinear_shift(wall, shift[t, 0], shift[t, 1], FRAME)
        alpha = np.where(front[t] >= 0, cover[t], 0.0)[..., None]
        frames[t] = (alpha * cols[t] * shade[t] + (1 - alpha) * bg) * light[t]
    frames = frames * 255 + rng.normal(0, style.rgb_noise, frames.shape)
    rgb = np.clip(frames, 0, 255).astype(np.uint8)

    # --- flow and depth at AUX resolution ---------------------------------------------------------
    k = AUX / FRAME
    front, s, dist, _ = _rasterize(scene, shift, AUX)
    ends_px, _ = _project(scene.ends, shift[:, None, None, :], AUX)
    ends_next, _ = _project(_next(scene.ends), _next(shift)[:, None, None, :], AUX)
    motion = ends_next - ends_px  # (T, K, 2 ends, 2)
    cam = (_next(shift) - shift) * k  # (T, 2)
    idx = np.maximum(front, 0)
    t_idx = np.arange(T)[:, None, None]
    m_a, m_b = motion[t_idx, idx, 0], motion[t_idx, idx, 1]  # (T, H, W, 2)
    flow = m_a * (1 - s[..., None]) + m_b * s[..., None]
    flow = np.where((front >= 0)[..., None], flow, cam[:, None, None, :])
    flow = flow + rng.normal(0, style.flow_noise_px, flow.shape)
    wall_mm = WALL_DIST * METERS_PER_UNIT * 1000
    depth_mm = np.where(front >= 0, dist * METERS_PER_UNIT * 1000, wall_mm)
    depth_mm = depth_mm + rng.normal(0, 15.0, depth_mm.shape)
    depth_mm[rng.random(depth_mm.shape) < 0.01] = 0  # sensor holes
    depth = np.clip(depth_mm, 0, 65535).astype(np.uint16)

    # --- pose, as a detector would report it --------------------------------------------------------
    xy, _ = _project(joints, shift[:, None, :], FRAME)  # (T, 15, 2)
    speed = np.linalg.norm(_next(xy) - xy, axis=-1)
    noisy = xy + rng.normal(0, style.pose_noise_px, xy.shape)
    conf = rng.uniform(0.6, 1.0, size=speed.shape)
    missed = rng.random(speed.shape) < np.minimum(0.8, 0.1 + 0.15 * speed)
    if rng.random() < style.pose_occlusion:  # a limb hidden for a stretch of the clip
        limb = LIMBS[rng.integers(len(LIMBS))]
        span = int(round(T * rng.uniform(0.3, 0.7)))
        start = int(rng.integers(0, T - span + 1))
        missed[start : start + span, limb] = True
    noisy[missed] += rng.normal(0, 4.0, (int(missed.sum()), 2))
    conf[missed] = rng.uniform(0.0, 0.2, int(missed.sum()))
    pose = np.concatenate([noisy, conf[..., None]], -1).astype(np.float32)
    out = {"rgb": rgb, "flow": flow.astype(np.float16), "depth": depth, "pose": pose}
    if skeleton_rng is not None:
        out["skeleton"] = render_skeleton(skeleton_rng, joints, shift, style)
    return out

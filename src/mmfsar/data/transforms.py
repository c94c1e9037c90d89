"""Temporal sampling and clip-consistent spatial transforms.

Every modality of one clip is sampled at the same frame indices and cropped / flipped with the
same :class:`ClipParams`; each modality applies them with its own semantics (a flip negates
flow-x and swaps left/right pose joints, and mirrors a 3D skeleton), so the streams of a clip
always stay aligned. The two skeleton augmentations of the contrastive skeleton literature
(CrosSCLR, AimCLR, IKEM: METHODS.md section 3) are transforms like the others: the temporal
crop-and-resize is :class:`UniformSegments`' ``crop``, the shear is :class:`ClipAugmentation`'s
``shear``; both draw their random numbers only when they are on, so turning them on or off never
changes the other draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mmfsar.errors import ConfigError, DataError


@dataclass(frozen=True)
class UniformSegments:
    """TSN-style sampling: split ``[start, end)`` into ``num_frames`` equal segments, one frame each.

    Training (``jitter=True``) takes a uniformly random frame inside each segment; evaluation takes
    each segment's centre frame. **Short clips** (fewer frames than ``num_frames``) are handled by
    the same rule without jitter: segment centres then fall on every frame in turn, so each frame
    is repeated ``num_frames / length`` times in temporal order (nearest-neighbour temporal
    up-sampling). ``min_frames`` turns clips shorter than that into an error instead.

    **Temporal crop-and-resize** (``crop`` < 1, training only): the segments cover a random
    window of the clip instead of all of it, a fraction drawn uniformly from ``[crop, 1]`` of the
    clip's length at a uniformly random position, and the ``num_frames`` frames are sampled from
    that window by the rule above (which *resizes* it to ``num_frames``). This is the temporal
    augmentation of the skeleton contrastive methods (the "valid crop-resize" of CTR-GCN's feeder
    that AimCLR / CMD / IKEM-style pipelines use: a random sub-sequence resampled to the input
    length), written for any stream. Why: the window changes the action's apparent speed and
    start, which the encoder should be invariant to. ``crop=1`` (the default) draws nothing extra,
    so the frames drawn without the crop are unchanged.
    """

    num_frames: int = 8
    min_frames: int = 1
    crop: float = 1.0

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ConfigError(f"data.frames.num_frames must be >= 1, got {self.num_frames}")
        if not 0.0 < self.crop <= 1.0:
            raise ConfigError(f"data.frames.crop must be in (0, 1] (the smallest kept fraction), got {self.crop}")

    def __call__(
        self, start: int, end: int, *, jitter: bool, clip_id: str = "?", generator: torch.Generator | None = None
    ) -> np.ndarray:
        length = end - start
        if length < max(1, self.min_frames):
            raise DataError(
                f"clip {clip_id!r} has {length} frames, fewer than data.frames.min_frames={self.min_frames}"
            )
        offset, window = 0.0, float(length)
        if jitter and self.crop < 1.0:
            u = torch.rand(2, dtype=torch.float64, generator=generator).tolist()
            window = length * (self.crop + (1.0 - self.crop) * u[0])
            offset = (length - window) * u[1]
        edges = offset + np.linspace(0.0, window, self.num_frames + 1)
        if jitter and window >= self.num_frames:
            u = torch.rand(self.num_frames, dtype=torch.float64, generator=generator).numpy()
            pos = edges[:-1] + u * (edges[1:] - edges[:-1])
        else:
            pos = (edges[:-1] + edges[1:]) / 2.0
        return start + np.minimum(np.floor(pos).astype(np.int64), length - 1)


@dataclass(frozen=True)
class ColourParams:
    """Photometric jitter of one clip (colour streams only): hue rotated by ``hue`` turns, then
    saturation, brightness and contrast scaled by their factors, or the clip made grey."""

    hue: float = 0.0
    saturation: float = 1.0
    brightness: float = 1.0
    contrast: float = 1.0
    grayscale: bool = False


@dataclass(frozen=True)
class ClipParams:
    """One clip's augmentation, shared by all its streams: a crop box as fractions of the frame (so
    it fits modalities stored at any resolution), a horizontal flip, the photometric jitter that
    colour streams apply (``colour``; None: none), and the shear that 3D skeleton streams apply
    (``shear``: the 3x3 matrix ``S`` of :func:`shear_points`, row by row; None: none)."""

    top: float = 0.0
    left: float = 0.0
    height: float = 1.0
    width: float = 1.0
    flip: bool = False
    colour: ColourParams | None = None
    shear: tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]] | None = None

    def extent(self, frame_h: int, frame_w: int) -> tuple[float, float, float, float]:
        """Exact (top, left, height, width) of the box in pixels of a ``frame_h x frame_w`` grid."""
        return self.top * frame_h, self.left * frame_w, self.height * frame_h, self.width * frame_w

    def box(self, frame_h: int, frame_w: int) -> tuple[int, int, int, int]:
        """Integer (top, left, height, width) of the box in a ``frame_h x frame_w`` grid."""
        t = int(round(self.top * frame_h))
        left = int(round(self.left * frame_w))
        h = max(1, min(frame_h - t, int(round(self.height * frame_h))))
        w = max(1, min(frame_w - left, int(round(self.width * frame_w))))
        return t, left, h, w


@dataclass(frozen=True)
class ClipAugmentation:
    """Samples one :class:`ClipParams` per clip.

    Training: a random square crop whose area is ``[min_scale, 1]`` of the largest centred
    square, anywhere in the frame, flipped horizontally with probability ``flip_prob``; and, when
    any is set, a photometric jitter for colour streams: a hue rotation of up to ``hue`` turns
    either way, saturation / brightness / contrast factors drawn log-uniformly from
    ``[1/(1+x), 1+x]`` for x = ``saturation`` / ``brightness`` / ``contrast``, and grey with
    probability ``grayscale_prob``. Why: the appearance of a scene (palette, lighting, contrast) is
    what changes between visual domains, the motion is not, so a colour stream trained invariant
    to it transfers across domains. Evaluation: the largest centred square, no jitter, no shear.

    ``shear`` > 0 (training): a random shear of 3D skeletons, the matrix ``S`` with ones on the
    diagonal and its six other entries drawn uniformly from ``[-shear, shear]`` (the shear of
    CrosSCLR / AimCLR / IKEM, amplitude 0.5 there), applied to every joint ``p -> S p``. Why: it
    changes the viewpoint and body shape, not the action. Only 3D skeleton streams apply it:
    image-aligned streams (RGB, flow, depth, 2D keypoints) ignore it, since shearing 2D keypoints
    alone would misalign them with the pixels of the clip's other streams. Its random numbers are
    drawn after all others, so the crop, flip and colour draws are the same with and without it.
    """

    min_scale: float = 0.6
    flip_prob: float = 0.5
    hue: float = 0.0
    saturation: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    grayscale_prob: float = 0.0
    shear: float = 0.0

    def __post_init__(self) -> None:
        if self.shear < 0:
            raise ConfigError(f"data.augmentation.shear must be >= 0 (the largest off-diagonal entry), got "
                              f"{self.shear}")  # fmt: skip

    def sample(self, aspect: float, *, train: bool, generator: torch.Generator | None = None) -> ClipParams:
        """``aspect`` = frame width / height; ``generator``: draw from it instead of torch's global RNG."""
        side_h, side_w = (1.0, 1.0 / aspect) if aspect >= 1 else (aspect, 1.0)
        if not train:
            return ClipParams((1 - side_h) / 2, (1 - side_w) / 2, side_h, side_w, False)
        r = torch.rand(4, generator=generator).tolist()
        s = math.sqrt(self.min_scale + (1 - self.min_scale) * r[0])
        h, w = side_h * s, side_w * s
        colour = None
        if self.hue or self.saturation or self.brightness or self.contrast or self.grayscale_prob:
            c = torch.rand(5, generator=generator).tolist()
            factor = lambda x, u: math.exp((2 * u - 1) * math.log1p(x))  # noqa: E731
            colour = ColourParams(
                hue=(2 * c[0] - 1) * self.hue,
                saturation=factor(self.saturation, c[1]),
                brightness=factor(self.brightness, c[2]),
                contrast=factor(self.contrast, c[3]),
                grayscale=c[4] < self.grayscale_prob,
            )
        shear = None
        if self.shear:
            e = [(2 * u - 1) * self.shear for u in torch.rand(6, generator=generator, dtype=torch.float64).tolist()]
            shear = ((1.0, e[0], e[1]), (e[2], 1.0, e[3]), (e[4], e[5], 1.0))
        return ClipParams(r[1] * (1 - h), r[2] * (1 - w), h, w, r[3] < self.flip_prob, colour, shear)


def shear_points(points: torch.Tensor, shear: Sequence[Sequence[float]]) -> torch.Tensor:
    """``(..., 3)`` points -> ``S p`` for the 3x3 ``shear`` matrix ``S`` (:attr:`ClipParams.shear`).

    Linear (no translation), so lost joints stored as zeros stay zeros.
    """
    matrix = torch.as_tensor(shear, dtype=points.dtype, device=points.device)
    if matrix.shape != (3, 3) or points.shape[-1] != 3:
        raise ValueError(f"shear_points: need points (..., 3) and a 3x3 shear, got {tuple(points.shape)} and "
                         f"{tuple(matrix.shape)}")  # fmt: skip
    return points @ matrix.T


def colour_jitter(frames: torch.Tensor, colour: ColourParams) -> torch.Tensor:
    """(T, 3, H, W) RGB in [0, 1] -> jittered, clamped to [0, 1]. The hue is rotated about the
    grey axis in YIQ (a linear map), saturation blends with the luma, contrast scales about the
    clip's mean luma."""
    luma_weights = frames.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    if colour.hue:
        angle = 2 * math.pi * colour.hue
        cos, sin = math.cos(angle), math.sin(angle)
        to_yiq = frames.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        rotation = frames.new_tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
        frames = torch.einsum("ij,tjhw->tihw", torch.linalg.inv(to_yiq) @ rotation @ to_yiq, frames)
    luma = (frames * luma_weights).sum(1, keepdim=True)
    if colour.grayscale:
        frames = luma.expand_as(frames)
    else:
        frames = luma + colour.saturation * (frames - luma)
    frames = frames * colour.brightness
    mean = (frames * luma_weights).sum(1, keepdim=True).mean()
    return (mean + colour.contrast * (frames - mean)).clamp(0.0, 1.0)


def crop_resize(frames: torch.Tensor, params: ClipParams, size: int, mode: str = "bilinear") -> torch.Tensor:
    """(T, C, H, W) -> (T, C, size, size): resample the box, flip.

    The box is taken at its exact, fractional position in this stream's pixels (not rounded to
    whole pixels), so streams stored at different resolutions map every output pixel to the same
    point of the scene: rounding the box of a half-resolution stream would misalign it by up to
    ~2 output pixels. Output pixel ``u`` samples the stored frame at ``x = left + (u + 0.5) *
    width / size - 0.5`` (pixel centres, the convention of ``F.interpolate(align_corners=False)``);
    a box on whole pixels with side ``size`` is a plain slice.
    """
    H, W = frames.shape[-2], frames.shape[-1]
    t, left, h, w = params.extent(H, W)
    if all(abs(v - round(v)) < 1e-6 for v in (t, left, h, w)) and round(h) == round(w) == size:
        x = frames[..., round(t) : round(t) + size, round(left) : round(left) + size]
    else:
        u = (torch.arange(size, dtype=torch.float64) + 0.5) / size  # output pixel centres, box fractions
        gx = (left + u * w) / W * 2 - 1  # normalised grid coordinates (align_corners=False)
        gy = (t + u * h) / H * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1).to(frames.dtype)
        grid = grid.expand(frames.shape[0], size, size, 2)
        x = F.grid_sample(frames, grid, mode=mode, padding_mode="border", align_corners=False)
    if params.flip:
        x = x.flip(-1)
    return x


def transform_keypoints(
    xy: torch.Tensor, params: ClipParams, frame_hw: tuple[int, int], size: int
) -> torch.Tensor:
    """Pixel coordinates (..., 2) in the stored frame -> pixel coordinates in the output grid.

    Uses the same exact box and pixel-centre convention as :func:`crop_resize`, so a keypoint on
    a pixel of the image lands on the same pixel of the cropped, resized, flipped image.
    """
    t, left, h, w = params.extent(*frame_hw)
    x = (xy[..., 0] - left + 0.5) * (size / w) - 0.5
    y = (xy[..., 1] - t + 0.5) * (size / h) - 0.5
    if params.flip:
        x = size - 1 - x
    return torch.stack([x, y], dim=-1)


def gaussian_heatmaps(xy: torch.Tensor, weight: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """(T, J, 2) pixel coordinates and (T, J) weights -> (J, T, size, size) Gaussian heatmaps."""
    grid = torch.arange(size, dtype=xy.dtype)
    gx = torch.exp(-((grid - xy[..., 0:1]) ** 2) / (2 * sigma**2))  # (T, J, S)
    gy = torch.exp(-((grid - xy[..., 1:2]) ** 2) / (2 * sigma**2))
    maps = gy[..., :, None] * gx[..., None, :] * weight[..., None, None]  # (T, J, S, S)
    return maps.permute(1, 0, 2, 3).contiguous()

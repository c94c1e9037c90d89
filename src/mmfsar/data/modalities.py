"""Modalities: plug-ins that turn stored frames of one stream into a model input tensor.

A modality is a reader (chosen by the dataset's ``meta.json``), a way to check raw frames, the
spatial transform with the stream's own semantics, and a normalisation. Every modality returns
a float tensor ``(C, T, size, size)`` (keypoints: ``(C, T, J)``; 3D skeletons: ``(C, T, V, M)``).
Adding a modality is a subclass here (or anywhere importable) plus a file in ``configs/modality/``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mmfsar.errors import ConfigError, DataError
from mmfsar.data.meta import META_FILE, ClipRecord, DatasetFolder, DatasetMeta
from mmfsar.data.readers import FrameReader
from mmfsar.data.skeleton import DERIVED_MODALITIES, SkeletonLayout, layout_of, to_graph_layout
from mmfsar.data.transforms import (
    ClipParams,
    colour_jitter,
    crop_resize,
    gaussian_heatmaps,
    shear_points,
    transform_keypoints,
)


class Modality(ABC):
    """One input stream of a clip.

    Args:
        name: key of the stream in a clip dict (and an encoder's input name).
        stream: the entry of the dataset's ``meta.json`` to read (default: ``name``), so two
            representations of one stored stream can coexist (pose heatmaps and keypoints).
        size: output height and width in pixels.
        reader_options: overrides of the storage options found in ``meta.json``.
        encoder_args: extra arguments for the encoder of this stream (e.g. ``patch_size: 4`` for
            56-px pose heatmaps under a ViT, so every stream gives the same token grid).
    """

    def __init__(
        self,
        *,
        name: str,
        stream: str | None = None,
        size: int = 64,
        reader_options: Mapping[str, Any] | None = None,
        encoder_args: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.encoder_args = dict(encoder_args or {})
        self.stream = stream or name
        self.size = int(size)
        self.reader_options = dict(reader_options or {})
        self.reader: FrameReader | None = None
        self.meta: DatasetMeta | None = None

    def bind(self, dataset: DatasetFolder) -> "Modality":
        """Attach the reader for this dataset's storage format of the stream.

        ``meta.json`` describes the stream as ``{"format": ..., "dir": ..., "reader": {options}}``
        plus facts about its values (``units_per_meter``, ``frame_size``) read by the modality.
        """
        info = dataset.meta.modalities.get(self.stream) or {}
        directory = dataset.modality_dir(self.stream)  # raises, naming the modality, if absent
        fmt = info.get("format")
        if fmt is None:
            raise DataError(f"{dataset.root}/meta.json: modalities.{self.stream} has no 'format'")
        options = {**info.get("reader", {}), **self.reader_options}
        self.reader = FrameReader.create(fmt, directory, **options)
        self.meta = dataset.meta
        self._check_meta(dataset.meta)
        return self

    def _check_meta(self, meta: DatasetMeta) -> None:
        """Hook: fail early if the dataset lacks something this modality needs."""

    @property
    @abstractmethod
    def channels(self) -> int:
        """Channels of the output tensor (an encoder's input channels)."""

    def encoder_inputs(self) -> dict[str, Any]:
        """Keyword arguments an encoder of this stream is built with (plus ``num_frames``)."""
        return {"in_channels": self.channels, "img_size": self.size, **self.encoder_args}

    def load(self, record: ClipRecord, indices: np.ndarray) -> np.ndarray:
        if self.reader is None:
            raise RuntimeError(f"modality {self.name!r} used before bind(dataset)")
        try:
            raw = self.reader.read(record.video, indices)
        except DataError as exc:  # name the clip, not only the file
            raise DataError(f"clip {record.clip_id!r}, {self.name}: {exc}") from exc
        problem = self.check_frames(raw)
        if problem is None and np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
            problem = f"{self.reader.locate(record.video)} holds NaN or inf values"
        if problem:
            raise DataError(f"{self._where(record)}: {problem}")
        return raw

    def _where(self, record: ClipRecord) -> str:
        """How errors about ``record``'s frames name it."""
        return f"clip {record.clip_id!r}, {self.name} of video {record.video!r}"

    @abstractmethod
    def check_frames(self, raw: np.ndarray) -> str | None:
        """A description of what is wrong with the raw array's shape or type, or None."""

    @abstractmethod
    def to_tensor(self, raw: np.ndarray, params: ClipParams) -> torch.Tensor:
        """Raw frames -> transformed, normalised tensor."""

    def __call__(self, record: ClipRecord, indices: np.ndarray, params: ClipParams) -> torch.Tensor:
        return self.to_tensor(self.load(record, indices), params)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, size={self.size})"


def build_modalities(configs: Mapping[str, Any]) -> dict[str, Modality]:
    """Instantiate the ``modalities`` config node: ``{name: {_target_: ..., ...}}``."""
    from hydra.utils import instantiate

    if not configs:
        raise ConfigError("no modality selected (config group `modality`, e.g. modality=rgb)")
    return {name: instantiate(cfg, name=name) for name, cfg in configs.items()}


def _images(raw: np.ndarray) -> torch.Tensor:
    """(T, H, W[, C]) array -> (T, C, H, W) float tensor."""
    x = torch.from_numpy(np.ascontiguousarray(raw))
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    return x.permute(0, 3, 1, 2).float()


class RGB(Modality):
    """Colour frames (uint8), scaled to [0, 1] and normalised by ``mean`` / ``std``."""

    def __init__(
        self,
        *,
        mean: Sequence[float] = (0.45, 0.45, 0.45),
        std: Sequence[float] = (0.225, 0.225, 0.225),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)

    @property
    def channels(self) -> int:
        return 3

    def check_frames(self, raw: np.ndarray) -> str | None:
        if raw.ndim != 4 or raw.shape[-1] != 3 or raw.dtype != np.uint8:
            return f"expected uint8 frames (T, H, W, 3), got {raw.dtype} {raw.shape}"
        return None

    def to_tensor(self, raw: np.ndarray, params: ClipParams) -> torch.Tensor:
        x = crop_resize(_images(raw) / 255.0, params, self.size)  # (T, 3, S, S)
        if params.colour is not None:
            x = colour_jitter(x, params.colour)
        return (x.permute(1, 0, 2, 3) - self.mean) / self.std


class Flow(Modality):
    """Optical flow (T, H, W, 2) in pixels of the stored frame.

    Resizing scales the displacements with the image, a horizontal flip negates the x
    component; the result is divided by ``scale`` (pixels of the output grid).
    """

    def __init__(self, *, scale: float = 4.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)

    @property
    def channels(self) -> int:
        return 2

    def check_frames(self, raw: np.ndarray) -> str | None:
        if raw.ndim != 4 or raw.shape[-1] != 2 or not np.issubdtype(raw.dtype, np.floating):
            return f"expected float flow (T, H, W, 2), got {raw.dtype} {raw.shape}"
        return None

    def to_tensor(self, raw: np.ndarray, params: ClipParams) -> torch.Tensor:
        x = _images(raw)  # (T, 2, H, W)
        _, _, h, w = params.extent(x.shape[-2], x.shape[-1])
        x = crop_resize(x, params, self.size)
        gain = torch.tensor([self.size / w, self.size / h]).view(1, 2, 1, 1)
        if params.flip:
            gain[0, 0] *= -1
        return (x * gain / self.scale).permute(1, 0, 2, 3)


class Depth(Modality):
    """Depth maps (T, H, W) in ``units_per_meter`` units (meta.json), divided by ``max_depth`` metres."""

    def __init__(self, *, max_depth: float = 10.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_depth = float(max_depth)
        self.units_per_meter = 1.0

    def _check_meta(self, meta: DatasetMeta) -> None:
        self.units_per_meter = float(meta.modalities[self.stream].get("units_per_meter", 1.0))

    @property
    def channels(self) -> int:
        return 1

    def check_frames(self, raw: np.ndarray) -> str | None:
        if raw.ndim == 4 and raw.shape[-1] == 1:
            return None
        if raw.ndim != 3:
            return f"expected depth maps (T, H, W), got {raw.dtype} {raw.shape}"
        return None

    def to_tensor(self, raw: np.ndarray, params: ClipParams) -> torch.Tensor:
        x = _images(raw.astype(np.float32)) / (self.units_per_meter * self.max_depth)
        return crop_resize(x, params, self.size).permute(1, 0, 2, 3)


class _Keypoints(Modality):
    """Shared by the pose representations: (T, J, 2|3) keypoints in stored-frame pixels."""

    def _check_meta(self, meta: DatasetMeta) -> None:
        if not meta.joints:
            raise DataError(f"modality {self.name!r} needs 'joints' (and 'edges') in meta.json")
        size = meta.modalities[self.stream].get("frame_size") or meta.frame_size
        if not size:
            raise DataError(f"modality {self.name!r} needs 'frame_size' [H, W] in meta.json")
        self.frame_hw = (int(size[0]), int(size[1]))
        self.flip_perm = torch.tensor(meta.flip_permutation())

    @property
    def num_joints(self) -> int:
        if self.meta is None:
            raise RuntimeError(f"modality {self.name!r}: the number of joints is known after bind(dataset)")
        return len(self.meta.joints)

    def check_frames(self, raw: np.ndarray) -> str | None:
        if raw.ndim != 3 or raw.shape[-1] not in (2, 3) or raw.shape[1] != self.num_joints:
            return f"expected keypoints (T, {self.num_joints}, 2|3), got {raw.dtype} {raw.shape}"
        return None

    def _keypoints(self, raw: np.ndarray, params: ClipParams, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        kp = torch.from_numpy(np.asarray(raw, dtype=np.float32))
        conf = kp[..., 2] if kp.shape[-1] == 3 else torch.ones(kp.shape[:-1])
        xy = transform_keypoints(kp[..., :2], params, self.frame_hw, size)
        if params.flip:
            xy, conf = xy[:, self.flip_perm], conf[:, self.flip_perm]
        return xy, conf


class Pose(_Keypoints):
    """Keypoints rendered as one Gaussian heatmap per joint (``sigma`` in output pixels),
    weighted by the keypoint confidence: a (J, T, size, size) tensor."""

    def __init__(self, *, sigma: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sigma = float(sigma)

    @property
    def channels(self) -> int:
        return self.num_joints

    def to_tensor(self, raw: np.ndarray, params: ClipParams) -> torch.Tensor:
        xy, conf = self._keypoints(raw, params, self.size)
        return gaussian_heatmaps(xy, conf, self.size, self.sigma)


class PoseKeypoints(_Keypoints):
    """Keypoints as a graph signal (3, T, J): x, y in [-1, 1] of the output grid, confidence.

    The input of skeleton encoders (ST-GCN), following the (C, T, V) layout.
    """

    @property
    def channels(self) -> int:
        return 3

    def encoder_inputs(self) -> dict[str, Any]:
        edges = [list(e) for e in self.meta.edges]
        return {"in_channels": 3, "num_joints": self.num_joints, "edges": edges, **self.encoder_args}

    def to_tensor(self, raw: np.ndarray, params: ClipParams) -> torch.Tensor:
        xy, conf = self._keypoints(raw, params, self.size)
        xy = (xy + 0.5) / self.size * 2 - 1
        return torch.cat([xy, conf[..., None]], dim=-1).permute(2, 0, 1).contiguous()


class SkeletonFrames(np.ndarray):
    """Joints ``(T, M, V, 3)`` of the sampled frames of one clip that carry ``source_frames``, the
    clip's length F before sampling (IKEM's time factor ``s = T / F`` needs it).

    A plain ``ndarray`` subclass, so F travels with the frames through indexing (:class:`ClipViews`
    loads the frames of all views once and hands each view a subset to :meth:`Skeleton.to_tensor`).
    """

    source_frames: int | None

    def __array_finalize__(self, obj: Any) -> None:
        self.source_frames = getattr(obj, "source_frames", None)


class Skeleton(Modality):
    """3D skeletons ``(T, M, V, 3)`` (metres, M bodies, zeros where a joint or body is lost) as a
    graph signal ``(3, T, V, M)`` for ST-GCN-style encoders, in one of IKEM's six modalities.

    Args:
        derived: the modality computed from the joints after the augmentation, a name of
            :data:`~mmfsar.data.skeleton.DERIVED_MODALITIES` (``joint``, ``motion``, ``bone``,
            ``acceleration``, ``rotation_axis``, ``angular_velocity``): one stored stream serves
            all six (METHODS.md section 3, IKEM), each selected as its own modality config.
        persons: bodies in the output (M): extra bodies are dropped (the NTU importer stores the
            most moving body first), missing ones are zeros.
        centre: move the origin to the layout's root joint of the first body in the first sampled
            frame where it is tracked (or, if never, to the mean of the tracked joints): NTU
            streams are stored as the sensor gave them, in camera space, and the place of the
            camera says nothing about the action, while the shear should act about the body.
            Lost joints stay zeros.

    The layout (joint names, parents, torso) comes from ``meta.json``'s ``"skeleton"``
    (:func:`~mmfsar.data.skeleton.layout_of`); stored values are divided by the stream's
    ``units_per_meter`` (default 1). Per clip, in this order: centring, the horizontal flip
    (x negated and left / right joints swapped by the layout's flip permutation), the shear
    ``p -> S p`` of :class:`~mmfsar.data.transforms.ClipAugmentation`, then the derived modality,
    so every derived modality sees the same augmented joints. The crop box and the colour jitter
    are image transforms and do not apply; the temporal crop-and-resize is the frame sampler's.

    **Time factor.** The motion modalities need F, the clip's frame count before sampling, for
    IKEM's ``s = T / F`` (T = the sampled frames; ``s = 50 / F`` in IKEM): :meth:`load` takes it
    from the clip record (``record.num_frames``, the annotated range, whatever the temporal crop
    takes: a shorter window then also looks faster to the motion modalities, as IKEM's F is fixed
    per clip too) and returns the frames as :class:`SkeletonFrames`, which carry it to
    :meth:`to_tensor`.

    Bad files are a :class:`DataError` naming the clip and the file: a wrong rank or joint count,
    NaN / inf (the base class's check), or a clip whose every joint is zero (no tracked body in
    any frame of its range; sampled frames that are all zero in a clip with tracked frames
    elsewhere are a lost body, not an error).
    """

    def __init__(self, *, derived: str = "joint", persons: int = 2, centre: bool = True, **kwargs: Any) -> None:
        kwargs["stream"] = kwargs.get("stream") or "skeleton"
        super().__init__(**kwargs)
        if derived not in DERIVED_MODALITIES:
            raise ConfigError(
                f"modality {self.name!r}: unknown derived skeleton modality {derived!r}; "
                f"known: {sorted(DERIVED_MODALITIES)}"
            )
        if int(persons) < 1:
            raise ConfigError(f"modality {self.name!r}: persons must be >= 1, got {persons}")
        self.derived = derived
        self.persons = int(persons)
        self.centre = bool(centre)
        self.layout: SkeletonLayout | None = None
        self.units_per_meter = 1.0
        self._meta_file: Path | str = META_FILE  # named in errors; the dataset's file once bound

    def bind(self, dataset: DatasetFolder) -> "Skeleton":
        self._meta_file = dataset.root / META_FILE
        return super().bind(dataset)  # type: ignore[return-value]

    def _check_meta(self, meta: DatasetMeta) -> None:
        try:
            self.layout = layout_of(meta)
        except DataError as exc:
            raise DataError(f"{self._meta_file}: modality {self.name!r} needs the skeleton layout: {exc}") from exc
        self.flip_perm = torch.tensor(self.layout.flip_permutation())
        self.units_per_meter = float(meta.modalities[self.stream].get("units_per_meter", 1.0))
        if not self.units_per_meter > 0:
            raise DataError(f"{self._meta_file}: modalities.{self.stream}.units_per_meter must be positive, "
                            f"got {self.units_per_meter}")  # fmt: skip

    def _bound_layout(self) -> SkeletonLayout:
        if self.layout is None:
            raise RuntimeError(f"modality {self.name!r}: the skeleton layout is known after bind(dataset)")
        return self.layout

    @property
    def channels(self) -> int:
        return 3

    @property
    def num_joints(self) -> int:
        return self._bound_layout().num_joints

    def encoder_inputs(self) -> dict[str, Any]:
        edges = [list(e) for e in self._bound_layout().edges]
        return {"in_channels": self.channels, "num_joints": self.num_joints, "edges": edges, **self.encoder_args}

    def _where(self, record: ClipRecord) -> str:
        return f"clip {record.clip_id!r}, {self.name} of video {record.video!r} ({self.reader.locate(record.video)})"

    def check_frames(self, raw: np.ndarray) -> str | None:
        v = self.num_joints
        if raw.ndim != 4 or raw.shape[2] != v or raw.shape[3] != 3 or raw.shape[1] < 1:
            return f"expected joints (T, M, {v}, 3) (layout {self._bound_layout().name!r}), got {raw.dtype} {raw.shape}"
        if not np.issubdtype(raw.dtype, np.floating):
            return f"expected float joint coordinates, got {raw.dtype} {raw.shape}"
        return None

    def load(self, record: ClipRecord, indices: np.ndarray) -> SkeletonFrames:
        raw = super().load(record, indices)
        if not raw.any() and not self.reader.read(record.video, np.arange(record.start_frame, record.end_frame)).any():
            raise DataError(
                f"{self._where(record)}: every joint coordinate is zero in frames "
                f"[{record.start_frame}, {record.end_frame}) (no tracked body)"
            )
        out = raw.view(SkeletonFrames)
        out.source_frames = record.num_frames
        return out

    def to_tensor(self, raw: np.ndarray, params: ClipParams, *, source_frames: int | None = None) -> torch.Tensor:
        """Joints ``(T, M, V, 3)`` -> ``(3, T, V, persons)``; ``source_frames`` (F) defaults to the
        one ``raw`` carries (:class:`SkeletonFrames`, as :meth:`load` returns)."""
        frames = source_frames if source_frames is not None else getattr(raw, "source_frames", None)
        if frames is None:
            raise ValueError(
                f"modality {self.name!r}: the clip's frame count before sampling (source_frames) is unknown; "
                "pass the frames load() returns or source_frames="
            )
        layout = self._bound_layout()
        x = torch.from_numpy(np.asarray(raw, dtype=np.float32)) / self.units_per_meter
        x = self._fit_persons(x)
        tracked = (x != 0).any(-1, keepdim=True)  # (T, M, V, 1)
        if self.centre:
            x = (x - self._origin(x, tracked, layout.root)) * tracked
        if params.flip:
            x = x[:, :, self.flip_perm] * x.new_tensor([-1.0, 1.0, 1.0])
        if params.shear is not None:
            x = shear_points(x, params.shear)
        return to_graph_layout(DERIVED_MODALITIES[self.derived](x, layout=layout, source_frames=frames))

    def _fit_persons(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] >= self.persons:
            return x[:, : self.persons]
        return torch.cat([x, x.new_zeros(x.shape[0], self.persons - x.shape[1], *x.shape[2:])], dim=1)

    @staticmethod
    def _origin(x: torch.Tensor, tracked: torch.Tensor, root: int) -> torch.Tensor:
        """The root of body 0 in its first tracked frame, else the mean tracked joint, else 0: (3,)."""
        root_seen = tracked[:, 0, root, 0]
        if root_seen.any():
            return x[int(root_seen.nonzero()[0]), 0, root]
        count = tracked.sum()
        return (x * tracked).sum((0, 1, 2)) / count.clamp(min=1)

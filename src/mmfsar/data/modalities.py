"""Modalities: plug-ins that turn stored frames of one stream into a model input tensor.

A modality is a reader (chosen by the dataset's ``meta.json``), a way to check raw frames, the
spatial transform with the stream's own semantics, and a normalisation. Every modality returns
a float tensor ``(C, T, size, size)`` (keypoints: ``(C, T, J)``). Adding a modality is a subclass
here (or anywhere importable) plus a file in ``configs/modality/``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mmfsar.errors import ConfigError, DataError
from mmfsar.data.meta import ClipRecord, DatasetFolder, DatasetMeta
from mmfsar.data.readers import FrameReader
from mmfsar.data.transforms import ClipParams, colour_jitter, crop_resize, gaussian_heatmaps, transform_keypoints


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
            raise DataError(f"clip {record.clip_id!r}, {self.name} of video {record.video!r}: {problem}")
        return raw

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

"""Encode once, then solve episodes.

A clip's features do not depend on the episode, so evaluation (and validation during training)
encodes every clip of the split once, into a :class:`FeatureBank`, and solves all episodes on
the bank. Under DDP each rank encodes its share of the clips; the banks are gathered, each rank
solves its share of the episodes (e = rank, rank + W, ...), and the accuracies are gathered, so
the numbers are the same for any number of processes.

Masked views (MM-CDFSL's ensemble masked inference) draw each clip's tube masks from
``(seed, clip position, view)`` alone (:func:`view_masks`), so features do not depend on the
batch size or the number of processes. :class:`FeatureCache` keeps a split's features on disk,
keyed by everything they depend on (:func:`feature_cache_key`), so a second evaluation of the
same encoder on the same data (another classifier, shots or episode file) skips the encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from mmfsar.data.episodes import EpisodeSet
from mmfsar.models.base import plain_config


class FeatureBank:
    """Features ``(num_clips, views, dim)`` of every clip of a split, filled batch by batch."""

    def __init__(self, num_clips: int, views: int = 1) -> None:
        self.num_clips = num_clips
        self.views = views
        self.features: torch.Tensor | None = None
        self.filled = torch.zeros(num_clips, dtype=torch.bool)

    def add(self, index: torch.Tensor, features: torch.Tensor) -> None:
        """``features``: (B, views, D) of the clips at dataset positions ``index`` (B,)."""
        if features.ndim != 3 or features.shape[1] != self.views:
            raise ValueError(f"expected features (B, {self.views}, D), got {tuple(features.shape)}")
        if self.features is None:
            self.features = torch.zeros(self.num_clips, self.views, features.shape[-1], device=features.device)
            self.filled = self.filled.to(features.device)
        self.features[index] = features.detach().float()
        self.filled[index] = True

    @property
    def complete(self) -> bool:
        return self.features is not None and bool(self.filled.all())

    def gather(self, all_gather: Callable[[torch.Tensor], torch.Tensor], world_size: int) -> torch.Tensor:
        """All clips' features on every rank (``all_gather`` = ``LightningModule.all_gather``).

        Clips encoded by several ranks (a distributed sampler pads the last batch with repeats)
        are averaged. Raises if some clip was encoded by no rank.
        """
        if self.features is None:
            raise RuntimeError("no features were added to the bank")
        if world_size > 1:
            feats = all_gather(self.features)  # (W, N, V, D)
            filled = all_gather(self.filled.to(feats.dtype))  # (W, N)
            count = filled.sum(0)
            merged = (feats * filled[..., None, None]).sum(0) / count.clamp(min=1)[:, None, None]
            missing = int((count == 0).sum())
        else:
            merged, missing = self.features, int((~self.filled).sum())
        if missing:
            raise RuntimeError(f"{missing} of {self.num_clips} clips were never encoded")
        return merged


def episode_positions(episodes: EpisodeSet, clip_ids: list[str]) -> torch.Tensor:
    """The episode tensor (E, N, K+Q) re-expressed as positions in ``clip_ids`` (a dataset's order)."""
    return episodes.check_clips(clip_ids)[episodes.tensor]


def view_masks(
    index: torch.Tensor, grid: tuple[int, int, int], ratio: float, view: int, seed: int, device: torch.device
) -> torch.Tensor:
    """Tube masks (B, N) that depend only on (seed, clip position, view), never on the batch,
    so masked views are identical whatever the batch size or number of processes."""
    from mmfsar.models.encoders.vit import tube_mask

    masks = []
    for i in index.tolist():
        digest = hashlib.blake2b(f"{seed}/{i}/{view}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        masks.append(tube_mask(1, grid, ratio, generator=g))
    return torch.cat(masks).to(device)


def masking_grid(encoder: nn.Module) -> tuple[int, int, int]:
    """The token grid of a clip encoder whose backbone can drop tokens (ViT), else a clear error."""
    backbone = getattr(encoder, "backbone", None)
    if backbone is None or not getattr(backbone, "supports_masking", False):
        raise ValueError(
            "masked views (fewshot.mask_ratio > 0) need a single-modality token encoder (VideoViT); "
            f"{type(encoder).__name__} cannot drop tokens"
        )
    return tuple(backbone.grid)


@torch.no_grad()
def encode_views(
    encoder: nn.Module,
    inputs: dict[str, torch.Tensor],
    index: torch.Tensor,
    *,
    views: int = 1,
    mask_ratio: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """(B, views, D) pooled features: one unmasked view, or ``views`` masked views (MM-CDFSL's
    ensemble masked inference; support clips then use view 0, queries average over views)."""
    if mask_ratio <= 0:
        if views != 1:
            raise ValueError("fewshot.views > 1 needs fewshot.mask_ratio > 0 (unmasked views are identical)")
        return encoder(inputs).pooled[:, None]
    grid = masking_grid(encoder)
    device = next(iter(inputs.values())).device
    out = [encoder(inputs, mask=view_masks(index, grid, mask_ratio, v, seed, device)).pooled for v in range(views)]
    return torch.stack(out, 1)


# --------------------------------------------------------------------------- on-disk feature cache

CACHE_FORMAT = 1


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def feature_cache_key(
    *,
    encoder_file: str | Path,
    dataset_root: str | Path,
    clip_ids: Sequence[str],
    modalities: Mapping[str, Any],
    frames: Mapping[str, Any],
    views: int,
    mask_ratio: float,
    mask_seed: int,
    precision: str = "32-true",
    annotation_file: str = "annotations.csv",
    encoder_sha256: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """(key, description) of the features of ``clip_ids`` under an encoder and input settings.

    The key hashes everything the features depend on: the encoder file's content (weights and
    the configs that rebuild it), the dataset (its resolved path and the content of its
    ``meta.json`` and annotation file, so a regenerated dataset misses), the encoded clips in
    order, the modality and frame-sampling configs, the views / mask ratio / mask seed of masked
    ensemble inference, and the numeric precision of the encoder pass. The frames of the clips
    themselves are not hashed: edit them in place and the cache must be deleted by hand.
    """
    root = Path(dataset_root).resolve()
    info = {
        "format": CACHE_FORMAT,
        "encoder_sha256": encoder_sha256 or file_sha256(encoder_file),
        "dataset": str(root),
        "dataset_meta_sha256": file_sha256(root / "meta.json") if (root / "meta.json").is_file() else None,
        "annotations_sha256": file_sha256(root / annotation_file) if (root / annotation_file).is_file() else None,
        "clips": len(clip_ids),
        "clips_sha256": hashlib.sha256("\n".join(clip_ids).encode()).hexdigest(),
        "modalities": plain_config(modalities),
        "frames": plain_config(frames),
        "views": int(views),
        "mask_ratio": float(mask_ratio),
        "mask_seed": int(mask_seed),
        "precision": str(precision),
    }
    blob = json.dumps(info, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32], info


class FeatureCache:
    """Encoded features on disk, one file per :func:`feature_cache_key`: ``features_<key>.pt``.

    A file holds the features (num_clips, views, D) float32, the clip ids and the key's
    description, and is read with ``torch.load(weights_only=True)``; a file whose description or
    shape does not match is ignored (and overwritten by the next save). Writes are atomic.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"features_{key}.pt"

    def load(self, key: str, info: Mapping[str, Any]) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file is a miss, not an error
            return None
        features = payload.get("features") if isinstance(payload, dict) else None
        if (
            payload.get("info") != dict(info)
            or not isinstance(features, torch.Tensor)
            or features.ndim != 3
            or features.shape[:2] != (info["clips"], info["views"])
        ):
            return None
        return features.float()

    def save(self, key: str, info: Mapping[str, Any], features: torch.Tensor, clip_ids: Sequence[str]) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"info": dict(info), "clip_ids": list(clip_ids), "features": features.detach().float().cpu()}, tmp)
        tmp.replace(path)
        return path

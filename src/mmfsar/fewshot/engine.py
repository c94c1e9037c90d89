"""Encode once, then solve episodes.

A clip's features do not depend on the episode, so evaluation (and validation during training)
encodes every clip of the split once, into a :class:`FeatureBank`, and solves all episodes on
the bank. Under DDP each rank encodes its share of the clips; the banks are gathered, each rank
solves its share of the episodes (e = rank, rank + W, ...), and the accuracies are gathered, so
the numbers are the same for any number of processes.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import nn

from mmfsar.data.episodes import EpisodeSet


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

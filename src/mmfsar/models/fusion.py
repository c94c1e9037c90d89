"""Fusion of per-modality frame features, and the fusion teacher built on it.

A *fusion* maps ``{modality: (B, T, d_m)}`` to ``(B, T, dim)`` and has ``out_dim``. Fusions are
plug-ins selected by ``model/fusion=mfm|concat``; their configs hold only hyper-parameters, and
the training code adds what depends on the encoders: ``instantiate(cfg, dims=..., num_frames=...)``
(see :func:`encoder_dims`). :class:`FusionTeacher` is a clip encoder: per-modality clip encoders
(frozen by default) → fusion → pooled feature (+ optional classifier head).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from mmfsar.models.base import EncoderOutput

__all__ = ["MFM", "ConcatFusion", "FusionTeacher", "encoder_dims"]


def encoder_dims(encoders: Mapping[str, nn.Module]) -> dict[str, int]:
    """``{name: feature_dim}`` of clip encoders: the ``dims`` argument of a fusion."""
    return {name: int(encoder.feature_dim) for name, encoder in encoders.items()}


def _check_frames(
    features: Mapping[str, Tensor], dims: Mapping[str, int], num_frames: int, who: str
) -> None:
    """Every expected modality present, shaped (B, T, d_m), with one T shared by all."""
    missing = [name for name in dims if name not in features]
    if missing:
        raise KeyError(f"{who} needs modalities {missing}; got {sorted(features)}")
    shapes = {name: tuple(features[name].shape) for name in dims}
    for name, shape in shapes.items():
        if len(shape) != 3 or shape[2] != dims[name]:
            raise ValueError(f"{who}: {name!r} features must be (B, T, {dims[name]}), got {shape}")
    if len({shape[:2] for shape in shapes.values()}) != 1:
        raise ValueError(f"{who}: modalities disagree on (batch, frames): {shapes}")
    frames = next(iter(shapes.values()))[1]
    if frames != num_frames:
        raise ValueError(f"{who} was built for {num_frames} frames, got {frames}: {shapes}")


class _ChannelConcatEncoder(nn.Module):
    """One MFM branch: learnable position embedding + LayerNorm per input slot, concatenation
    along channels (k·dim), a TransformerEncoder over time, and a Linear k·dim → dim."""

    def __init__(
        self,
        *,
        num_inputs: int,
        dim: int,
        num_frames: int,
        layers: int,
        heads: int,
        dropout: float,
        ff_mult: float,
    ) -> None:
        super().__init__()
        width = num_inputs * dim
        self.pos = nn.Parameter(torch.zeros(num_inputs, num_frames, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_inputs))
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=int(ff_mult * width), dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, dim)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        slots = [norm(x + pos) for x, pos, norm in zip(inputs, self.pos, self.norms, strict=True)]
        return self.out(self.encoder(torch.cat(slots, dim=-1)))


class MFM(nn.Module):
    """Lite-MKD's hierarchical multimodal fusion module, for any number (≥ 2) of modalities.

    ``fused = T_all(all modalities) + Σ_aux T_2(primary, shift(aux))``: the all-modality branch
    sees every stream at once; ONE two-modality encoder, shared by all auxiliary modalities,
    pairs the primary stream with each auxiliary one whose frames are cyclically shifted by one
    (``torch.roll(x, 1, dims=1)``: primary frame t meets auxiliary frame t−1), so the pair
    branch models short-range cross-modal dynamics rather than repeating the aligned view.

    Modalities are ordered primary first, then auxiliaries by name, so the channel layout does
    not depend on dict order. Each modality is linearly projected to ``dim`` when its size
    differs.

    Args:
        dims: ``{modality: feature size}`` of the inputs.
        num_frames: T, the length of the learnable position embeddings.
        dim: output size (default: the primary modality's size).
        primary: the modality paired with every other one (Lite-MKD: RGB).
        layers, heads, dropout: of each branch's TransformerEncoder; ``heads`` must divide ``dim``.
        ff_mult: feed-forward width of the encoder layers, as a multiple of their width.
    """

    def __init__(
        self,
        *,
        dims: Mapping[str, int],
        num_frames: int,
        dim: int | None = None,
        primary: str = "rgb",
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
        ff_mult: float = 2.0,
    ) -> None:
        super().__init__()
        dims = {str(name): int(size) for name, size in dims.items()}
        if primary not in dims:
            raise ValueError(
                f"MFM primary modality {primary!r} is not among the fused modalities {sorted(dims)}"
            )
        if len(dims) < 2:
            raise ValueError(f"MFM fuses at least two modalities, got {sorted(dims)}")
        dim = int(dim or dims[primary])
        if dim % heads:
            raise ValueError(f"MFM: heads ({heads}) must divide dim ({dim})")
        self.dims = dims
        self.num_frames = int(num_frames)
        self.primary = primary
        self.auxiliary = sorted(name for name in dims if name != primary)
        self.out_dim = dim
        self.project = nn.ModuleDict(
            {
                name: nn.Identity() if size == dim else nn.Linear(size, dim)
                for name, size in dims.items()
            }
        )
        branch = dict(
            dim=dim,
            num_frames=self.num_frames,
            layers=layers,
            heads=heads,
            dropout=dropout,
            ff_mult=ff_mult,
        )
        self.all = _ChannelConcatEncoder(num_inputs=len(dims), **branch)
        self.pair = _ChannelConcatEncoder(num_inputs=2, **branch)

    @property
    def modalities(self) -> list[str]:
        return [self.primary, *self.auxiliary]

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        if self.primary not in features:
            raise KeyError(
                f"MFM needs its primary modality {self.primary!r}; got {sorted(features)}"
            )
        _check_frames(features, self.dims, self.num_frames, "MFM")
        x = {name: self.project[name](features[name]) for name in self.modalities}
        fused = self.all([x[name] for name in self.modalities])
        for name in self.auxiliary:
            fused = fused + self.pair([x[self.primary], torch.roll(x[name], shifts=1, dims=1)])
        return fused


class ConcatFusion(nn.Module):
    """Baseline fusion: per-frame LayerNorm per modality, channel concatenation, MLP → ``dim``.
    No temporal modelling; the reference MFM is measured against.

    Args:
        dims, num_frames: as for :class:`MFM` (``num_frames`` is checked, not used).
        dim: output size (default: the largest input size).
        hidden: MLP hidden width (default: ``dim``).
    """

    def __init__(
        self,
        *,
        dims: Mapping[str, int],
        num_frames: int,
        dim: int | None = None,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        dims = {str(name): int(size) for name, size in dims.items()}
        if not dims:
            raise ValueError("ConcatFusion needs at least one modality")
        self.dims = dims
        self.num_frames = int(num_frames)
        self.modalities = sorted(dims)
        self.out_dim = int(dim or max(dims.values()))
        hidden = int(hidden or self.out_dim)
        self.norms = nn.ModuleDict({name: nn.LayerNorm(size) for name, size in dims.items()})
        self.mlp = nn.Sequential(
            nn.Linear(sum(dims.values()), hidden), nn.GELU(), nn.Linear(hidden, self.out_dim)
        )

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        _check_frames(features, self.dims, self.num_frames, "ConcatFusion")
        return self.mlp(
            torch.cat([self.norms[name](features[name]) for name in self.modalities], dim=-1)
        )


class FusionTeacher(nn.Module):
    """A clip encoder that fuses the per-frame features of several clip encoders.

    ``pooled`` is the time-mean of the fused frames; ``logits`` come from a head (``nn.Linear``,
    or ``head(in_features, num_classes)``) when ``num_classes`` > 0 (what pretraining trains with cross-entropy and distillation uses as
    teacher logits). With ``freeze_encoders`` (default) the encoders are the stage-1 exports and
    stay as they are: ``requires_grad_(False)``, always in ``eval()`` (no BatchNorm statistics
    drift, no dropout, whatever mode the teacher is in) and run under ``torch.no_grad()`` so no
    activations are kept for them. ``no_grad`` rather than ``inference_mode``: the fusion,
    which is trained, consumes their outputs.

    Args:
        encoders: clip encoders, keyed by the name the fusion knows them by (their modality).
        fusion: a fusion module (``MFM``, ``ConcatFusion``) built for these names and sizes.
        num_classes: size of the classifier head (0: none).
        head: builds the head from ``(in_features, num_classes)`` (default ``nn.Linear``).
        freeze_encoders: ``False`` fine-tunes the encoders with the fusion.
    """

    def __init__(
        self,
        *,
        encoders: Mapping[str, nn.Module],
        fusion: nn.Module,
        num_classes: int = 0,
        head: Callable[[int, int], nn.Module] | None = None,
        freeze_encoders: bool = True,
    ) -> None:
        super().__init__()
        if not encoders:
            raise ValueError("FusionTeacher needs at least one encoder")
        fusion_dims = getattr(fusion, "dims", None)
        if fusion_dims is not None and dict(fusion_dims) != encoder_dims(encoders):
            raise ValueError(
                f"the fusion was built for {dict(fusion_dims)}, "
                f"the encoders give {encoder_dims(encoders)}; "
                "build it with dims=encoder_dims(encoders)"
            )
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fusion = fusion
        self.freeze_encoders = bool(freeze_encoders)
        self.head = (head or nn.Linear)(fusion.out_dim, num_classes) if num_classes else None
        if self.freeze_encoders:
            self.encoders.requires_grad_(False)
            self.encoders.eval()

    @property
    def modalities(self) -> list[str]:
        return sorted({m for encoder in self.encoders.values() for m in encoder.modalities})

    @property
    def feature_dim(self) -> int:
        return int(self.fusion.out_dim)

    def train(self, mode: bool = True) -> "FusionTeacher":
        super().train(mode)
        if self.freeze_encoders:
            self.encoders.eval()
        return self

    def forward(self, inputs: Mapping[str, Tensor], **kwargs: Any) -> EncoderOutput:
        with torch.no_grad() if self.freeze_encoders else nullcontext():
            frames = {
                name: encoder(inputs, **kwargs).frames for name, encoder in self.encoders.items()
            }
        return self.fuse(frames)

    def fuse(self, frames: Mapping[str, Tensor]) -> EncoderOutput:
        """The fusion and head on the encoders' per-frame features (e.g. cached ones)."""
        fused = self.fusion(frames)
        pooled = fused.mean(dim=1)
        logits = self.head(pooled) if self.head is not None else None
        return EncoderOutput(pooled=pooled, frames=fused, logits=logits)

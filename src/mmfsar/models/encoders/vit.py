"""VideoMAE-style video ViT with tube masking (the MM-CDFSL encoder).

Clips are cut into tubelets (``tubelet_size`` frames x ``patch_size``² pixels) by one Conv3d,
given a fixed sinusoidal position, and only the *visible* tokens go through the transformer:
a tube mask of ratio 0.75 makes inference about 2x cheaper, which is MM-CDFSL's efficiency
claim, and the same mask can be shared by a student and its teachers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from timm.layers import LayerNorm, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from mmfsar.models.base import EncoderOutput
from mmfsar.models.encoders.pretrained import (
    LoadReport,
    load_matching_weights,
    read_checkpoint,
    strip_prefix,
    unwrap_state_dict,
)

Grid = tuple[int, int, int]


def sinusoid_position_table(num_positions: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed 1-D sine/cosine table over the flattened token grid: ``(1, N, dim)``.

    Column ``2i`` holds ``sin(pos / 10000^(2i/dim))`` and column ``2i+1`` the cosine of the same
    angle, exactly as ``get_sinusoid_encoding_table`` of the official code, so official weights
    see the positions they were trained with.
    """
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim) // 2).to(torch.float64) / dim
    angles = position / torch.pow(10000.0, exponent)[None, :]
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.float().unsqueeze(0)


def tube_mask(
    batch: int,
    grid: Grid,
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A ``(batch, T'*h*w)`` bool mask, True = dropped, the same spatial cells in every time slot.

    Exactly ``round(ratio * h * w)`` cells are dropped per sample, so every sample keeps the
    same number of tokens and the visible ones stack into one dense batch. Masking whole tubes
    stops the model from copying a patch from its neighbour in time.
    """
    slots, height, width = grid
    cells = height * width
    num_masked = round(ratio * cells)
    if not 0.0 <= ratio < 1.0 or num_masked >= cells:
        raise ValueError(f"mask ratio {ratio} must keep at least one of the {cells} spatial cells")
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, cells, generator=generator, device=noise_device)
    dropped = noise.argsort(dim=1)[:, :num_masked]
    spatial = torch.zeros(batch, cells, dtype=torch.bool, device=noise.device)
    spatial.scatter_(1, dropped, True)
    mask = spatial[:, None, :].expand(batch, slots, cells).reshape(batch, slots * cells)
    return mask.to(device) if device is not None else mask


class TubeletEmbed(nn.Module):
    """Non-overlapping tubelets -> tokens ``(B, T'*h*w, D)``, time-major then rows then columns."""

    def __init__(
        self, in_channels: int, embed_dim: int, *, tubelet_size: int, patch_size: int
    ) -> None:
        super().__init__()
        extent = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=extent, stride=extent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VideoViT(nn.Module):
    """Video ViT over tubelets, built from timm's ``Block``.

    Args:
        in_channels, num_frames, img_size: input clip ``(B, in_channels, num_frames, img, img)``.
        patch_size, tubelet_size: tubelet extent in pixels and frames.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        drop_path_rate: stochastic depth, increasing linearly to this value over the blocks.
        pretrained: a local file: a ``VideoViT`` state dict (bare, or as saved by
            :class:`~mmfsar.models.base.ModalityEncoder` / an ``encoder.pt`` export) or an
            official VideoMAE checkpoint (pretraining or fine-tuning); see
            :func:`videomae_state_dict`.
    """

    supports_masking = True

    def __init__(
        self,
        *,
        in_channels: int,
        num_frames: int,
        img_size: int,
        patch_size: int = 16,
        tubelet_size: int = 2,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if num_frames % tubelet_size:
            raise ValueError(
                f"num_frames={num_frames} is not a multiple of tubelet_size={tubelet_size}"
            )
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.in_channels = in_channels
        self.num_frames = num_frames
        self.img_size = img_size
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.feature_dim = embed_dim
        self._grid: Grid = (
            num_frames // tubelet_size,
            img_size // patch_size,
            img_size // patch_size,
        )

        self.patch_embed = TubeletEmbed(
            in_channels, embed_dim, tubelet_size=tubelet_size, patch_size=patch_size
        )
        self.register_buffer(
            "pos_embed", sinusoid_position_table(self.num_tokens, embed_dim), persistent=False
        )
        drop_path = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(
            *(
                Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate)
                for rate in drop_path
            )
        )
        self.fc_norm = LayerNorm(embed_dim)
        self.apply(_init_weights)
        if pretrained:
            load_videomae_weights(self, pretrained)

    @property
    def grid(self) -> Grid:
        """Token grid ``(T', h, w)``: tubelets in time, patches in height and width."""
        return self._grid

    @property
    def num_tokens(self) -> int:
        return math.prod(self._grid)

    @property
    def patch_dim(self) -> int:
        """Pixels per token, ``tubelet * patch² * channels`` (a reconstruction target's width)."""
        return self.tubelet_size * self.patch_size**2 * self.in_channels

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        mask_ratio: float = 0.0,
        return_tokens: bool = False,
    ) -> EncoderOutput:
        """Encode ``(B, C, T, H, W)`` clips.

        ``mask`` (``(B, N)`` bool, True = dropped, the same count per sample) wins over
        ``mask_ratio``; with only ``mask_ratio > 0`` a tube mask is drawn. ``tokens`` are the
        visible tokens after ``fc_norm`` (what VideoMAE's decoder receives).
        """
        expected = (self.in_channels, self.num_frames, self.img_size, self.img_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"VideoViT expects clips (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        tokens = self.patch_embed(x) + self.pos_embed
        if mask is None and mask_ratio > 0:
            mask = tube_mask(batch, self.grid, mask_ratio, device=x.device)
        if mask is not None:
            mask = self._checked_mask(mask, batch)
            tokens = tokens[~mask].reshape(batch, -1, self.feature_dim)
        tokens = self.blocks(tokens)
        return EncoderOutput(
            pooled=self.fc_norm(tokens.mean(dim=1)),
            frames=self.fc_norm(self._slot_means(tokens, mask)),
            tokens=self.fc_norm(tokens) if return_tokens else None,
            mask=mask,
        )

    def _checked_mask(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        if mask.shape != (batch, self.num_tokens):
            raise ValueError(
                f"mask must be ({batch}, {self.num_tokens}) for grid {self.grid}, "
                f"got {tuple(mask.shape)}"
            )
        mask = mask.to(torch.bool)
        kept = (~mask).sum(dim=1)
        if (kept != kept[0]).any() or kept[0] == 0:
            raise ValueError(
                f"every sample must keep the same, nonzero number of tokens; kept {kept.tolist()}"
            )
        return mask

    def _slot_means(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Mean of the visible tokens of each temporal slot: ``(B, T', D)``."""
        batch, _, dim = tokens.shape
        slots, height, width = self.grid
        if mask is None:
            return tokens.reshape(batch, slots, height * width, dim).mean(dim=2)
        slot_of_token = (~mask).nonzero(as_tuple=True)[1].reshape(batch, -1) // (height * width)
        sums = tokens.new_zeros(batch, slots, dim).scatter_add_(
            1, slot_of_token[..., None].expand_as(tokens), tokens
        )
        counts = (~mask).reshape(batch, slots, height * width).sum(dim=2).clamp(min=1)
        return sums / counts[..., None].to(tokens.dtype)


def _init_weights(module: nn.Module) -> None:
    """VideoMAE's initialisation: truncated-normal linear layers, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# Official VideoMAE names -> ours, applied to the end of each key.
_VIDEOMAE_RENAMES = {".gamma_1": ".ls1.gamma", ".gamma_2": ".ls2.gamma"}
# Parts of an official checkpoint that are not the encoder: decoder, classifier, MAE mask token.
_VIDEOMAE_IGNORED_PREFIXES = ("decoder.", "encoder_to_decoder.", "mask_token", "head.")


def videomae_state_dict(checkpoint: object) -> dict[str, torch.Tensor]:
    """Translate a checkpoint to :class:`VideoViT` names; our own names pass unchanged.

    Handles the official VideoMAE files: weights under ``"model"`` or ``"module"``;
    pretraining files prefix the encoder with ``encoder.`` (decoder, ``encoder_to_decoder``,
    ``mask_token`` and classifier ``head`` are dropped); ``attn.q_bias`` / ``attn.v_bias``
    become timm's ``attn.qkv.bias = cat(q_bias, 0, v_bias)`` (VideoMAE has no key bias); the
    final ``norm`` becomes ``fc_norm`` when the file has no ``fc_norm`` (pretraining models
    normalise the tokens, fine-tuned ones their mean). A learnable ``pos_embed`` is left in, so
    it is reported: this model always uses the fixed sinusoidal table.
    """
    state = unwrap_state_dict(checkpoint)
    state = strip_prefix(state, "module.")
    state = strip_prefix(state, "backbone.")  # ModalityEncoder / encoder.pt
    state = strip_prefix(state, "encoder.")
    state = {k: v for k, v in state.items() if not k.startswith(_VIDEOMAE_IGNORED_PREFIXES)}
    has_fc_norm = any(k.startswith("fc_norm.") for k in state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".attn.q_bias"):
            stem = key[: -len("q_bias")]
            v_bias = state[stem + "v_bias"]
            out[stem + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])
            continue
        if key.endswith(".attn.v_bias"):
            continue
        if key.startswith("norm.") and not has_fc_norm:
            key = "fc_norm." + key[len("norm.") :]
        for old, new in _VIDEOMAE_RENAMES.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        out[key] = value
    return out


def load_videomae_weights(model: VideoViT, path: str | Path) -> LoadReport:
    """Load a local VideoViT / official VideoMAE checkpoint into ``model`` (never downloads).

    Missing, unused and mismatched keys are logged by name; ``ValueError`` if nothing fits,
    ``FileNotFoundError`` naming ``path`` if it does not exist.
    """
    state = videomae_state_dict(read_checkpoint(path))
    return load_matching_weights(model, state, source=str(path))

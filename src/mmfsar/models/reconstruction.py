"""Masked-autoencoder pieces for VideoMAE pretraining (MM-CDFSL stage 1).

The encoder (:class:`~mmfsar.models.encoders.VideoViT`) sees the visible tokens only; the
decoder here re-inserts a learned mask token at every dropped position and predicts that
position's pixels. Targets are the clip's tubelets, normalised patch by patch, which makes the
task about structure rather than brightness and makes per-channel input normalisation (ImageNet
mean / std, flow scale) irrelevant to the targets.
"""

from __future__ import annotations

import math

import torch
from timm.layers import LayerNorm, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from mmfsar.models.encoders.vit import Grid, VideoViT, sinusoid_position_table


def patchify(x: torch.Tensor, tubelet_size: int, patch_size: int) -> torch.Tensor:
    """``(B, C, T, H, W)`` -> ``(B, N, tubelet*patch*patch*C)`` tubelets.

    Tokens are ordered as VideoViT's tubelet embedding (time slot, then row, then column); each
    tubelet's pixels are ordered (frame, y, x, channel), channel last as in VideoMAE.
    """
    batch, channels, time, height, width = x.shape
    if time % tubelet_size or height % patch_size or width % patch_size:
        raise ValueError(
            f"clip {tuple(x.shape)} does not divide into tubelets of "
            f"{tubelet_size}x{patch_size}x{patch_size}"
        )
    x = x.reshape(
        batch,
        channels,
        time // tubelet_size,
        tubelet_size,
        height // patch_size,
        patch_size,
        width // patch_size,
        patch_size,
    )
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # B, T', h, w, t, p, p, C
    return x.reshape(batch, -1, tubelet_size * patch_size * patch_size * channels)


def unpatchify(
    patches: torch.Tensor, grid: Grid, tubelet_size: int, patch_size: int
) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, P)`` -> ``(B, C, T, H, W)`` (to view predictions)."""
    batch, num_tokens, patch_dim = patches.shape
    slots, rows, cols = grid
    channels = patch_dim // (tubelet_size * patch_size * patch_size)
    if num_tokens != slots * rows * cols or channels * tubelet_size * patch_size**2 != patch_dim:
        raise ValueError(
            f"patches {tuple(patches.shape)} do not fit grid {grid} "
            f"with tubelet {tubelet_size}, patch {patch_size}"
        )
    x = patches.reshape(batch, slots, rows, cols, tubelet_size, patch_size, patch_size, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # B, C, T', t, h, p, w, p
    return x.reshape(batch, channels, slots * tubelet_size, rows * patch_size, cols * patch_size)


def normalized_patch_targets(
    patches: torch.Tensor, tubelet_size: int, channels: int, eps: float = 1e-6
) -> torch.Tensor:
    """VideoMAE's per-patch normalisation of :func:`patchify` output, same shape.

    Each token's pixels (the whole tubelet) are normalised per channel by their own mean and
    unbiased std, ``(x - mean) / (std + eps)``, as the official ``normlize_target`` does.
    ``tubelet_size`` does not change the result; it checks that the width is
    ``tubelet * patch² * channels``, which catches a wrong channel count or tubelet size.
    """
    batch, num_tokens, patch_dim = patches.shape
    pixels_per_frame, rest = divmod(patch_dim, tubelet_size * channels)
    if rest or math.isqrt(pixels_per_frame) ** 2 != pixels_per_frame:
        raise ValueError(
            f"patch width {patch_dim} is not tubelet_size={tubelet_size} x patch² x "
            f"channels={channels}"
        )
    x = patches.reshape(batch, num_tokens, patch_dim // channels, channels)
    x = (x - x.mean(dim=2, keepdim=True)) / (x.var(dim=2, unbiased=True, keepdim=True).sqrt() + eps)
    return x.reshape(batch, num_tokens, patch_dim)


def reconstruction_targets(
    x: torch.Tensor, *, tubelet_size: int, patch_size: int, normalize: bool = True
) -> torch.Tensor:
    """Pretraining targets of clips ``x``: tubelets, per-patch normalised unless told otherwise."""
    patches = patchify(x, tubelet_size, patch_size)
    if not normalize:
        return patches
    return normalized_patch_targets(patches, tubelet_size, x.shape[1])


class VideoMAEDecoder(nn.Module):
    """VideoMAE's light decoder: predicts the pixels of the masked tokens.

    Args:
        encoder_dim: width of the encoder's tokens.
        decoder_dim, depth, num_heads, mlp_ratio: decoder transformer size (MM-CDFSL: 192, 4, 3).
        patch_dim: pixels per token (``VideoViT.patch_dim``).
        grid: the encoder's token grid ``(T', h, w)``.
    """

    def __init__(
        self,
        *,
        encoder_dim: int,
        decoder_dim: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        patch_dim: int,
        grid: Grid,
    ) -> None:
        super().__init__()
        self.grid: Grid = tuple(int(g) for g in grid)  # type: ignore[assignment]
        self.num_tokens = math.prod(self.grid)
        self.encoder_to_decoder = nn.Linear(encoder_dim, decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "pos_embed", sinusoid_position_table(self.num_tokens, decoder_dim), persistent=False
        )
        self.blocks = nn.Sequential(
            *(
                Block(decoder_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True)
                for _ in range(depth)
            )
        )
        self.norm = LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, patch_dim)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        trunc_normal_(self.mask_token, std=0.02)

    @classmethod
    def for_encoder(
        cls,
        encoder: VideoViT,
        *,
        decoder_dim: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
    ) -> VideoMAEDecoder:
        """A decoder sized for ``encoder``'s tokens, grid and tubelets."""
        return cls(
            encoder_dim=encoder.feature_dim,
            decoder_dim=decoder_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            patch_dim=encoder.patch_dim,
            grid=encoder.grid,
        )

    def forward(self, visible_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, N_visible, encoder_dim)`` + ``(B, N)`` mask -> ``(B, N_masked, patch_dim)``.

        Predictions follow the order of ``mask``'s True positions in each sample, i.e. they line
        up with ``targets[mask].reshape(B, -1, patch_dim)``.
        """
        batch, num_visible, _ = visible_tokens.shape
        if mask.shape != (batch, self.num_tokens):
            raise ValueError(
                f"mask must be ({batch}, {self.num_tokens}) for grid {self.grid}, "
                f"got {tuple(mask.shape)}"
            )
        mask = mask.to(torch.bool)
        if ((~mask).sum(dim=1) != num_visible).any():
            raise ValueError(
                f"mask keeps {(~mask).sum(dim=1).tolist()} tokens, the encoder gave {num_visible}"
            )
        x_visible = self.encoder_to_decoder(visible_tokens)
        pos = self.pos_embed.expand(batch, -1, -1)
        dim = pos.shape[-1]
        pos_visible = pos[~mask].reshape(batch, num_visible, dim)
        pos_masked = pos[mask].reshape(batch, -1, dim)
        x = torch.cat([x_visible + pos_visible, self.mask_token + pos_masked], dim=1)
        x = self.blocks(x)
        return self.head(self.norm(x[:, num_visible:]))

"""Any timm image model applied frame by frame, then pooled over time (Lite-MKD's encoders).

Lite-MKD's teachers (ResNet-50 per modality) and students (ResNet-18, MobileNetV3) are 2-D
networks whose per-frame features feed a fusion module and a matching head, so this backbone
keeps one feature per frame (``frames``) besides the clip feature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import trunc_normal_
from torch import nn

from mmfsar.models.base import EncoderOutput, UnmaskedBackbone
from mmfsar.models.encoders.pretrained import create_timm_model, pooled_feature_dim


class TemporalTransformer(nn.Module):
    """Learned time embedding + a small pre-norm ``nn.TransformerEncoder`` over frame features."""

    def __init__(self, dim: int, *, num_frames: int, layers: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"feature dim {dim} is not divisible by temporal_heads={heads}")
        self.num_frames = num_frames
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, dim))
        trunc_normal_(self.time_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim_feedforward=2 * dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.shape[1] != self.num_frames:
            raise ValueError(
                f"temporal transformer built for {self.num_frames} frames, got {frames.shape[1]}"
            )
        return self.encoder(frames + self.time_embed)


def _mean_pool(dim: int, *, num_frames: int, layers: int, heads: int) -> nn.Module:
    return nn.Identity()


TEMPORAL_POOLS: dict[str, Callable[..., nn.Module]] = {
    "mean": _mean_pool,
    "transformer": TemporalTransformer,
}


class FrameCNN(UnmaskedBackbone):
    """A timm 2-D model on every frame; ``frames`` are per-frame features, ``pooled`` their mean.

    Args:
        in_channels, num_frames, img_size: input clip ``(B, in_channels, num_frames, img, img)``;
            ``img_size`` is checked against the input and given to timm models with a fixed input
            size (timm ViTs); 2-D CNNs would accept any size, but another size means another input
            pipeline than the one the model was built for.
        model_name: any timm model name (``resnet18``, ``resnet50``, ``mobilenetv3_large_100``...).
        pretrained: a local weight file for that model (timm format); the first convolution is
            adapted by timm when ``in_channels != 3``.
        temporal_pool: ``"mean"`` (frames unchanged) or ``"transformer"`` (frames contextualised
            by a small temporal transformer before the mean).
        temporal_layers, temporal_heads: size of that transformer.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_frames: int,
        img_size: int,
        model_name: str = "resnet18",
        pretrained: str | None = None,
        temporal_pool: str = "mean",
        temporal_layers: int = 1,
        temporal_heads: int = 4,
    ) -> None:
        super().__init__()
        if temporal_pool not in TEMPORAL_POOLS:
            raise ValueError(
                f"temporal_pool must be one of {sorted(TEMPORAL_POOLS)}, got {temporal_pool!r}"
            )
        self.in_channels = in_channels
        self.num_frames = num_frames
        self.img_size = img_size
        self.model = create_timm_model(
            model_name, in_channels=in_channels, img_size=img_size, pretrained=pretrained
        )
        self.feature_dim = pooled_feature_dim(self.model)
        self.temporal = TEMPORAL_POOLS[temporal_pool](
            self.feature_dim, num_frames=num_frames, layers=temporal_layers, heads=temporal_heads
        )

    def encode(self, x: torch.Tensor, *, return_tokens: bool = False) -> EncoderOutput:
        """Encode ``(B, C, T, H, W)`` clips; ``tokens`` (if asked) are the per-frame features."""
        expected = (self.in_channels, self.img_size, self.img_size)
        if x.ndim != 5 or (x.shape[1], x.shape[3], x.shape[4]) != expected:
            raise ValueError(
                f"FrameCNN expects clips (B, {self.in_channels}, T, {self.img_size}, "
                f"{self.img_size}), got {tuple(x.shape)}"
            )
        batch, channels, time, height, width = x.shape
        per_frame = self.model(x.transpose(1, 2).reshape(batch * time, channels, height, width))
        frames = self.temporal(per_frame.reshape(batch, time, self.feature_dim))
        return EncoderOutput(
            pooled=frames.mean(dim=1), frames=frames, tokens=frames if return_tokens else None
        )

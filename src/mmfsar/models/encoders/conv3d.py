"""A small 3D convolutional video encoder.

Why it exists: trained from scratch on a few hundred clips and a CPU budget, convolutions learn
far faster than a video ViT (which needs large data or pretrained weights), so the CPU-sized
presets use this network while the published recipes keep their ViT / ResNet encoders. The first
block is spatial only (as in C3D / R(2+1)D stems); the others are full 3×3×3 convolutions with
batch norm.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from mmfsar.models.base import EncoderOutput, UnmaskedBackbone


class Conv3DEncoder(UnmaskedBackbone):
    """Stacked Conv3d-BN-ReLU blocks, each halving the spatial size, then global pooling.

    Args:
        in_channels, num_frames, img_size: the input clips ``(B, C, T, H, W)``.
        widths: output channels of each block (the last one is the feature dimension).
        temporal_strides: temporal stride of each block (their product divides ``num_frames``).
        stem_temporal_kernel: temporal extent of the first block's kernel (odd). 1: the first block
            sees single frames; 3: it compares neighbouring frames at the input resolution, where
            thin moving limbs are still resolved (RGB: motion must be computed from the frames).
        instance_norm_input: standardise each clip's channels over time and space before the first
            block (instance normalisation without parameters, as IBN-Net / style-transfer networks
            use it to remove appearance): a clip's overall colour and contrast, which is what
            changes most between visual domains, no longer reaches the network.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_frames: int,
        img_size: int,
        widths: Sequence[int] = (32, 64, 128, 128),
        temporal_strides: Sequence[int] = (1, 1, 2, 2),
        stem_temporal_kernel: int = 1,
        instance_norm_input: bool = False,
    ) -> None:
        super().__init__()
        if len(widths) != len(temporal_strides):
            raise ValueError(f"widths {list(widths)} and temporal_strides {list(temporal_strides)} differ in length")
        if num_frames % math.prod(temporal_strides):
            raise ValueError(f"num_frames={num_frames} is not divisible by the temporal strides {list(temporal_strides)}")
        if img_size < 2 ** len(widths):
            raise ValueError(f"img_size={img_size} is too small for {len(widths)} stride-2 blocks")
        self.in_channels, self.num_frames, self.img_size = in_channels, num_frames, img_size
        blocks, c = [], in_channels
        for i, (w, st) in enumerate(zip(widths, temporal_strides)):
            k = (stem_temporal_kernel, 3, 3) if i == 0 else (3, 3, 3)
            pad = tuple(x // 2 for x in k)
            blocks += [nn.Conv3d(c, w, k, (st, 2, 2), pad, bias=False), nn.BatchNorm3d(w), nn.ReLU(inplace=True)]
            c = w
        if instance_norm_input:
            blocks.insert(0, nn.InstanceNorm3d(in_channels, affine=False))
        self.net = nn.Sequential(*blocks)
        self.feature_dim = c

    def encode(self, x: torch.Tensor, *, return_tokens: bool = False) -> EncoderOutput:
        expected = (self.in_channels, self.num_frames, self.img_size, self.img_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"Conv3DEncoder expects clips (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        frames = self.net(x).mean((3, 4)).transpose(1, 2)  # (B, T', D)
        return EncoderOutput(pooled=frames.mean(1), frames=frames)

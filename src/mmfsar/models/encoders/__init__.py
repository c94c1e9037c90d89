"""Backbones: one modality tensor -> :class:`~mmfsar.models.base.EncoderOutput`.

Each takes keyword-only arguments: its hyper-parameters (from ``configs/model/encoder/``) plus
the input-dependent ones a modality supplies (``Modality.encoder_inputs()`` and
``num_frames``). All share ``forward(x, *, mask=None, mask_ratio=0.0, return_tokens=False)``,
``feature_dim`` and ``supports_masking``.
"""

from mmfsar.models.encoders.conv3d import Conv3DEncoder
from mmfsar.models.encoders.frame_cnn import FrameCNN, TemporalTransformer
from mmfsar.models.encoders.pretrained import (
    LoadReport,
    create_timm_model,
    load_matching_weights,
    pooled_feature_dim,
    read_checkpoint,
    require_file,
    strip_prefix,
    unwrap_state_dict,
)
from mmfsar.models.encoders.stgcn import STGCN, spatial_partition_adjacency
from mmfsar.models.encoders.vit import (
    VideoViT,
    load_videomae_weights,
    sinusoid_position_table,
    tube_mask,
    videomae_state_dict,
)

__all__ = [
    "Conv3DEncoder",
    "FrameCNN",
    "LoadReport",
    "STGCN",
    "TemporalTransformer",
    "VideoViT",
    "create_timm_model",
    "load_matching_weights",
    "load_videomae_weights",
    "pooled_feature_dim",
    "read_checkpoint",
    "require_file",
    "sinusoid_position_table",
    "spatial_partition_adjacency",
    "strip_prefix",
    "tube_mask",
    "unwrap_state_dict",
    "videomae_state_dict",
]

"""The embedded default dataset: articulated figures performing parametric actions, rendered
to RGB video, optical flow, 2D pose and depth in two visual domains (see DATA_STRUCTURE.md)."""

from mmfsar.data.synthetic.generate import SyntheticConfig, ensure_synthetic, generate

__all__ = ["SyntheticConfig", "ensure_synthetic", "generate"]

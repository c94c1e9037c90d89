"""Classifier heads over clip features (plug-ins: ``head: {_target_: ..., _partial_: true}``,
built as ``head(in_features, num_classes)``; the linear head is ``torch.nn.Linear`` itself)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineClassifier(nn.Module):
    """Baseline++ head (Chen et al., "A Closer Look at Few-shot Classification", ICLR 2019):
    ``logits = scale · cos(feature, class weight)``.

    Why: a linear head lets features of the base classes grow along a few directions; the cosine
    head makes every class compete on the angle alone, which leaves features whose prototypes of
    *unseen* classes separate better. That is what few-shot evaluation on novel classes needs.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 10.0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, num_classes, scale
        self.weight = nn.Parameter(torch.randn(num_classes, in_features) * in_features**-0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).T


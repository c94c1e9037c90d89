"""Masked reconstruction loss (VideoMAE / MM-CDFSL stage 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_reconstruction_mse(
    pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared error between predictions and the targets of the masked tokens only.

    Args:
        pred: ``(B, N_masked, P)`` decoder predictions, in the order of ``mask``'s True positions.
        targets: ``(B, N, P)`` targets of every token (e.g. ``reconstruction_targets``).
        mask: ``(B, N)`` bool, True where a token was dropped (the same count per sample).
    """
    batch, num_tokens, patch_dim = targets.shape
    if mask.shape != (batch, num_tokens):
        raise ValueError(f"mask {tuple(mask.shape)} does not match targets {tuple(targets.shape)}")
    masked_targets = targets[mask.to(torch.bool)]
    if pred.shape[-1] != patch_dim or pred.numel() != masked_targets.numel():
        raise ValueError(
            f"predictions {tuple(pred.shape)} do not match the {masked_targets.shape[0]} "
            f"masked targets of width {patch_dim}"
        )
    return F.mse_loss(pred.reshape(-1, patch_dim), masked_targets)

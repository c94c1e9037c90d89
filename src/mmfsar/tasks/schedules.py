"""Learning-rate schedules beyond timm's cosine, in the form :class:`~mmfsar.tasks.common.Optimization`
builds them (``scheduler(optimizer, t_initial=, warmup_t=, warmup_lr_init=, lr_min=)``, stepped per
optimiser step with ``step_update``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.scheduler import MultiStepLRScheduler

__all__ = ["StepDecaySchedule"]


class StepDecaySchedule(MultiStepLRScheduler):
    """Linear warm-up, then the learning rate times ``decay_rate`` at each milestone: the skeleton-GCN
    recipe (CTR-GCN; MMCL's released config: lr 0.1, × 0.1 at epochs 90 and 100 of 110, 5 warm-up
    epochs).

    ``milestones`` are fractions of the whole run (warm-up included), so one config fits any run
    length: ``[90/110, 100/110]``. ``Optimization`` passes ``t_initial`` (the steps after the
    warm-up) and ``warmup_t``; the milestones are counted from the first step. ``lr_min`` is a
    floor (``Optimization``'s ``min_lr_ratio`` × lr; 0 in the recipe's config).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        t_initial: int,
        milestones: Sequence[float],
        decay_rate: float = 0.1,
        warmup_t: int = 0,
        warmup_lr_init: float = 0.0,
        lr_min: float = 0.0,
        t_in_epochs: bool = False,
        **kwargs: Any,
    ) -> None:
        fractions = [float(f) for f in milestones]
        if any(not 0 < f < 1 for f in fractions) or fractions != sorted(fractions):
            raise ValueError(
                f"StepDecaySchedule: milestones must be increasing fractions of the run in (0, 1), got {fractions}"
            )
        kwargs.pop("warmup_prefix", None)  # milestones count from the first step, warm-up included
        total = t_initial + warmup_t
        self.lr_min = float(lr_min)
        super().__init__(
            optimizer,
            decay_t=[max(1, round(f * total)) for f in fractions],
            decay_rate=decay_rate,
            warmup_t=warmup_t,
            warmup_lr_init=warmup_lr_init,
            warmup_prefix=False,
            t_in_epochs=t_in_epochs,
            **kwargs,
        )

    def _get_lr(self, t: int) -> list[float]:
        return [max(lr, self.lr_min) for lr in super()._get_lr(t)]

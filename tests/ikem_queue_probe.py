"""A test-only Lightning callback (``tests/test_ikem.py``'s DDP test): at the end of training,
every rank saves the MoCo queues it holds and the keys it computed itself in the last step.

Added to a run with ``+callbacks.queue_probe._target_=ikem_queue_probe.QueueProbe
+callbacks.queue_probe.out=<dir>`` and ``tests/`` on ``PYTHONPATH``."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class QueueProbe(Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.out.mkdir(parents=True, exist_ok=True)
        state = {
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "queues": {
                m: {"keys": q.keys.detach().cpu().clone(), "ptr": int(q.ptr)} for m, q in pl_module.queues.items()
            },
            "last_keys": {m: k.cpu().clone() for m, k in pl_module.last_keys.items()},
        }
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")

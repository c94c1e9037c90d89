"""Frozen models' outputs computed once, before training: ``cache=frozen`` (``configs/cache``).

Teachers in distillation and the per-modality encoders of a fusion teacher are frozen: the same
input gives the same output, so running them at every step repeats work. With this cache they
encode every training clip once, before the first step, and the training step looks their
outputs up by clip; the data loader then reads only the streams the trained part needs (the
student's RGB; nothing at all for a fusion trained on cached features), so a step costs about a
step of the trained part alone.

Which inputs the frozen models encode is ``views``:

* ``0``: each clip's deterministic evaluation view; the trained part still sees a fresh random
  augmentation at every load, matched to the frozen output of the un-augmented clip (offline
  distillation);
* ``K > 0``: K augmented views per clip, view v seeded by (seed, clip, v); training clips are
  then drawn from those K views, so the trained part and the frozen models see exactly the same
  input: the outputs are what running the frozen models at every step would give, over K
  augmentations per clip instead of one per epoch. The one-off cost is K passes over the clips,
  each clip's streams read (videos decoded) once for all its views.

It is a Lightning callback: when ``fit`` sets up (before the training loaders exist) it asks the
module for its ``frozen_models()`` and ``trained_modalities``, encodes, tells the data module what
to serve from now on, and gives the module the cache (``module.frozen_cache``); a resumed run
rebuilds it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from mmfsar.errors import ConfigError
from mmfsar.models.base import EncoderOutput


@dataclass
class _Table:
    """One frozen model's outputs for every (view, clip) of one training set."""

    pooled: Tensor  # (views, clips, D)
    frames: Tensor  # (views, clips, T, D)
    logits: Tensor | None  # (views, clips, C)

    def rows(self, index: Tensor, view: Tensor, device: torch.device) -> EncoderOutput:
        pick = lambda t: None if t is None else t[view, index].to(device)  # noqa: E731
        return EncoderOutput(pooled=pick(self.pooled), frames=pick(self.frames), logits=pick(self.logits))


class FrozenOutputCache(Callback):
    """Outputs of a training module's frozen models for every training clip (and view).

    Args:
        views: augmented views per clip (0: the un-augmented clip; see the module docstring).
        seed: seed of the views (default: torch's initial seed, i.e. the run's ``seed``).
    """

    def __init__(self, views: int = 0, seed: int | None = None) -> None:
        if views < 0:
            raise ConfigError(f"cache.views must be >= 0, got {views}")
        self.views = int(views)
        self.seed = seed
        self.tables: dict[str, dict[str, _Table]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before Lightning builds the training loaders (which a persistent worker would keep a copy
        of), on the device training will run on."""
        if stage != "fit":
            return
        models = pl_module.frozen_models()
        if not models:
            raise ConfigError(f"cache: {type(pl_module).__name__} has no frozen models whose outputs could be cached; drop cache=")
        if getattr(pl_module, "mask_ratio", 0.0) > 0:
            raise ConfigError("cache needs unmasked frozen models (mask_ratio=0): masked outputs change at every step")
        device = trainer.strategy.root_device
        for model in models.values():
            model.to(device)
        self.build(models, trainer.datamodule, device)
        trainer.datamodule.configure_training(
            views=self.views, seed=self._seed, modalities=list(pl_module.trained_modalities)
        )
        pl_module.frozen_cache = self

    @property
    def _seed(self) -> int:
        return int(self.seed if self.seed is not None else torch.initial_seed())

    @torch.no_grad()
    def build(self, models: dict[str, torch.nn.Module], datamodule: Any, device: torch.device) -> None:
        """Encode every training clip (every view) of every training set with ``models``."""
        from tqdm.auto import tqdm

        from mmfsar.tasks.common import frozen_module_outputs

        modalities = sorted({m for model in models.values() for m in model.modalities})
        for key, dataset in datamodule.train_sets.items():
            loader = datamodule.frozen_loader(key, modalities, views=self.views, seed=self._seed)
            size, views = len(dataset), max(1, self.views)
            parts: dict[str, dict[str, Tensor | None]] = {}
            filled = torch.zeros(views, size, dtype=torch.bool)
            for batch in tqdm(loader, desc=f"encoding {key} clips with the frozen models", leave=False):
                index = batch["index"]
                view = batch["view"] if "view" in batch else torch.zeros_like(index)
                outputs = frozen_module_outputs(models, {m: batch[m].to(device) for m in modalities})
                for name, out in outputs.items():
                    table = parts.setdefault(name, {})
                    for field in ("pooled", "frames", "logits"):
                        value = getattr(out, field)
                        if value is None:
                            table.setdefault(field, None)
                            continue
                        if table.get(field) is None:
                            table[field] = value.new_zeros(views, size, *value.shape[1:], device="cpu")
                        table[field][view, index] = value.cpu()
                filled[view, index] = True
            if not bool(filled.all()):
                raise RuntimeError(f"frozen output cache ({key}): {int((~filled).sum())} of {filled.numel()} (view, clip) pairs not encoded")
            self.tables[key] = {name: _Table(**fields) for name, fields in parts.items()}

    def lookup(self, key: str, batch: dict[str, Any], device: torch.device) -> dict[str, EncoderOutput]:
        """The frozen outputs of the clips of a training batch of ``key`` ("source" / "target")."""
        index = batch["index"].cpu()
        view = batch["view"].cpu() if self.views else torch.zeros_like(index)
        return {name: table.rows(index, view, device) for name, table in self.tables[key].items()}

"""Several independently augmented views of every training clip: the query / key pair of
contrastive learning (MoCo v2, CrosSCLR, IKEM; METHODS.md sections 3 and 6) as a data option.

Contrastive methods compare two augmentations of the same clip (the CrosSCLR / IKEM feeder
returns ``[data1, data2]``: the same sequence, temporally cropped and sheared twice). That is a
property of the training data, not of the model, so it lives here: ``train_views: V`` on a
training data module makes each training item carry V views, every stream stacked along a new
dimension after the batch, ``(B, V, ...)``; views differ in everything the augmentation draws
(temporal crop and jitter, flip, shear, crop box, colour) and share the clip. Each stream's
frames are read from disk once for all views.

* :class:`AugmentedViews`: the dataset wrapper.
* :class:`MultiViewTraining`: the data-module option; :class:`MultiViewProtocolDataModule`
  (a clip-level protocol's train clips, e.g. NTU cross-subject: what the skeleton papers
  pretrain on) and :class:`MultiViewPretrainDataModule` (base-class clips of the few-shot splits)
  are the two data modules with it.

With the frozen-output cache's fixed views (``cache=frozen cache.views=K``, :mod:`mmfsar.tasks.
frozen_cache`), the V views of an item are V *distinct* fixed views drawn at random among the K,
and ``"view"`` is ``(B, V)``: a frozen teacher's cached output of view 0 can then be paired with
the trained student's input of view 1, as IKEM's distillation feeds the teachers one augmentation
and the students the other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmfsar.data.dataset import UNLABELLED, ClipDataset
from mmfsar.data.datamodules import PretrainDataModule, ProtocolDataModule
from mmfsar.errors import ConfigError

__all__ = ["AugmentedViews", "MultiViewPretrainDataModule", "MultiViewProtocolDataModule", "MultiViewTraining"]


class AugmentedViews(Dataset):
    """Item ``i``: clip ``i`` of ``clips`` (a training :class:`ClipDataset`) loaded ``views``
    times with independent augmentations, ``{modality: (V, ...), "label", "clip_id", "domain",
    "index"}`` (plus ``"view"``: ``(V,)`` distinct fixed view numbers when ``clips`` draws from
    fixed seeded views). View ``v`` is exactly what one load of the clip with those draws gives."""

    def __init__(self, clips: ClipDataset, views: int) -> None:
        if not clips.train:
            raise ValueError("AugmentedViews needs a training ClipDataset (evaluation clips are not augmented)")
        if int(views) < 2:
            raise ConfigError(f"data.train_views must be >= 2 for augmented views, got {views}")
        self.clips = clips
        self.views = int(views)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        clips = self.clips
        rec = clips.records[index]
        fixed = clips.views  # read at load time: the frozen-output cache sets it before training
        if fixed and fixed < self.views:
            raise ConfigError(f"data.train_views={self.views} distinct views per clip need cache.views >= {self.views}, got {fixed}")
        view_ids = torch.randperm(fixed)[: self.views].tolist() if fixed else [None] * self.views
        drawn = [clips.draw(rec, v) for v in view_ids]
        frames = np.unique(np.concatenate([f for f, _ in drawn]))
        item: dict[str, Any] = {}
        for name, modality in clips.modalities.items():
            raw = modality.load(rec, frames)
            item[name] = torch.stack([modality.to_tensor(raw[np.searchsorted(frames, f)], p) for f, p in drawn])
        item["label"] = clips.labels[rec.label_name] if clips.labels is not None else UNLABELLED
        item["clip_id"] = rec.clip_id
        item["domain"] = rec.domain
        item["index"] = index
        if fixed:
            item["view"] = torch.tensor(view_ids)
        return item


class MultiViewTraining:
    """Data-module option (a mixin before a :class:`~mmfsar.data.datamodules.TrainingDataModule`):
    ``train_views`` augmented views of every training clip per item (1: plain clips, as without
    it). Validation and evaluation clips are unchanged."""

    def __init__(self, *, train_views: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(train_views) < 1:
            raise ConfigError(f"data.train_views must be >= 1, got {train_views}")
        self.train_views = int(train_views)

    def train_dataloader(self) -> dict[str, DataLoader]:
        if self.train_views == 1:
            return super().train_dataloader()
        if self.tasks is not None:
            raise ConfigError("data.train_views > 1 does not combine with episodic training (model.episodes)")
        return {key: self._loader(AugmentedViews(ds, self.train_views), train=True) for key, ds in self.train_sets.items()}


class MultiViewProtocolDataModule(MultiViewTraining, ProtocolDataModule):
    """:class:`~mmfsar.data.datamodules.ProtocolDataModule` with ``train_views`` views per clip."""


class MultiViewPretrainDataModule(MultiViewTraining, PretrainDataModule):
    """:class:`~mmfsar.data.datamodules.PretrainDataModule` with ``train_views`` views per clip."""

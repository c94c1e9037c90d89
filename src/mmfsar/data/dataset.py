"""Clips as model inputs: ``{modality: tensor, "label", "clip_id", "domain", "index"}``."""

from __future__ import annotations

import zlib
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mmfsar.data.meta import ClipRecord
from mmfsar.data.modalities import Modality
from mmfsar.data.transforms import ClipAugmentation, ClipParams, UniformSegments

UNLABELLED = -1


class ClipDataset(Dataset):
    """The clips ``records`` with every modality in ``modalities``, sampled and transformed alike.

    Args:
        records: the clips (their order defines ``index``).
        modalities: bound modalities by name.
        frames: the temporal sampler.
        train: random temporal jitter and random crops / flips (else deterministic).
        labels: class name -> integer label; ``None`` marks the clips as unlabelled (label -1).
        augmentation: the spatial augmentation sampled once per clip.
        aspect: frame width / height of the stored frames.
        views: with ``train``, 0 draws a fresh augmentation (temporal jitter, crop, flip) at every
            load; ``K > 0`` draws each load from K fixed augmented views per clip, view ``v`` of a
            clip seeded by (``view_seed``, clip id, ``v``), and adds its number as ``"view"``. A
            frozen model can then encode every view once (:class:`ClipViews`) and be looked up
            by (index, view) while a trained model sees exactly the same inputs (teacher caching
            in distillation).
    """

    def __init__(
        self,
        records: Sequence[ClipRecord],
        modalities: Mapping[str, Modality],
        frames: UniformSegments,
        *,
        train: bool,
        labels: Mapping[str, int] | None,
        augmentation: ClipAugmentation | None = None,
        aspect: float = 1.0,
        views: int = 0,
        view_seed: int = 0,
    ) -> None:
        self.records = list(records)
        self.modalities = dict(modalities)
        self.frames = frames
        self.train = train
        self.labels = labels
        self.augmentation = augmentation or ClipAugmentation()
        self.aspect = aspect
        self.views = views if train else 0
        self.view_seed = view_seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        view = int(torch.randint(self.views, ())) if self.views else None
        frame_idx, params = self.draw(rec, view)
        item: dict[str, Any] = {name: m(rec, frame_idx, params) for name, m in self.modalities.items()}
        item["label"] = self.labels[rec.label_name] if self.labels is not None else UNLABELLED
        item["clip_id"] = rec.clip_id
        item["domain"] = rec.domain
        item["index"] = index
        if view is not None:
            item["view"] = view
        return item

    def draw(self, rec: ClipRecord, view: int | None) -> tuple[np.ndarray, ClipParams]:
        """Frame indices and spatial parameters of one load of ``rec``: of its fixed ``view``, or
        (None) freshly random when training, deterministic otherwise."""
        generator = None if view is None else view_generator(self.view_seed, rec.clip_id, view)
        frame_idx = self.frames(rec.start_frame, rec.end_frame, jitter=self.train, clip_id=rec.clip_id, generator=generator)
        return frame_idx, self.augmentation.sample(self.aspect, train=self.train, generator=generator)

    def targets(self) -> torch.Tensor:
        """Integer labels of all clips (-1 when unlabelled), without loading any frame."""
        if self.labels is None:
            return torch.full((len(self),), UNLABELLED, dtype=torch.long)
        return torch.tensor([self.labels[r.label_name] for r in self.records], dtype=torch.long)


def view_generator(seed: int, clip_id: str, view: int) -> torch.Generator:
    """The random stream of one augmented view of one clip: the same in every process and run."""
    state = np.random.SeedSequence([seed, zlib.crc32(clip_id.encode()), view]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


class ClipViews(Dataset):
    """Every fixed view of every clip of ``clips`` (a :class:`ClipDataset` with ``views``): item
    ``i`` is ``{modality: (K, ...), "index": (K,), "view": (K,)}``, view ``v`` exactly what
    loading clip ``i`` as view ``v`` gives, but each stream's frames read (decoded) once for all
    K views. Batch with :meth:`collate`, which concatenates the views of the clips."""

    def __init__(self, clips: ClipDataset) -> None:
        if not clips.views:
            raise ValueError("ClipViews needs a training ClipDataset with fixed views (views > 0)")
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rec, views = self.clips.records[index], self.clips.views
        drawn = [self.clips.draw(rec, v) for v in range(views)]
        frames = np.unique(np.concatenate([f for f, _ in drawn]))
        item = {}
        for name, m in self.clips.modalities.items():
            raw = m.load(rec, frames)
            item[name] = torch.stack([m.to_tensor(raw[np.searchsorted(frames, f)], p) for f, p in drawn])
        item["index"] = torch.full((views,), index)
        item["view"] = torch.arange(views)
        return item

    @staticmethod
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.cat([it[k] for it in items]) for k in items[0]}

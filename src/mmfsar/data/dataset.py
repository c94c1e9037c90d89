"""Clips as model inputs: ``{modality: tensor, "label", "clip_id", "domain", "index"}``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from mmfsar.data.meta import ClipRecord
from mmfsar.data.modalities import Modality
from mmfsar.data.transforms import ClipAugmentation, UniformSegments

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
    ) -> None:
        self.records = list(records)
        self.modalities = dict(modalities)
        self.frames = frames
        self.train = train
        self.labels = labels
        self.augmentation = augmentation or ClipAugmentation()
        self.aspect = aspect

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        frame_idx = self.frames(rec.start_frame, rec.end_frame, jitter=self.train, clip_id=rec.clip_id)
        params = self.augmentation.sample(self.aspect, train=self.train)
        item: dict[str, Any] = {name: m(rec, frame_idx, params) for name, m in self.modalities.items()}
        item["label"] = self.labels[rec.label_name] if self.labels is not None else UNLABELLED
        item["clip_id"] = rec.clip_id
        item["domain"] = rec.domain
        item["index"] = index
        return item

    def targets(self) -> torch.Tensor:
        """Integer labels of all clips (-1 when unlabelled), without loading any frame."""
        if self.labels is None:
            return torch.full((len(self),), UNLABELLED, dtype=torch.long)
        return torch.tensor([self.labels[r.label_name] for r in self.records], dtype=torch.long)

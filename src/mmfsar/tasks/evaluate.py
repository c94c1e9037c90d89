"""Few-shot evaluation of any exported clip encoder on fixed episodes (``lit_main_eval.py``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from mmfsar.data.episodes import EpisodeSet
from mmfsar.fewshot import EpisodeClassifier, mean_confidence_interval, solve_episodes
from mmfsar.fewshot.engine import FeatureBank, encode_views, episode_positions


class FewShotEvalModule(L.LightningModule):
    """Encodes every clip of the evaluated split once (``views`` per clip), then solves all
    episodes on the features.

    Under DDP the test loader shards the clips; ``on_test_epoch_end`` gathers the features,
    solves this rank's share of the episodes (e = rank, rank + W, ...) and gathers the per-episode
    accuracies, so ``episode_accuracy`` is identical for any number of processes.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        classifier: EpisodeClassifier,
        views: int = 1,
        mask_ratio: float = 0.0,
        mask_seed: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = encoder.eval()
        self.classifier = classifier
        self.views = views
        self.mask_ratio = mask_ratio
        self.mask_seed = mask_seed
        self.features: torch.Tensor | None = None
        self.episode_accuracy: torch.Tensor | None = None
        self._bank: FeatureBank | None = None

    def on_test_epoch_start(self) -> None:
        self.encoder.eval()
        self._bank = FeatureBank(len(self.trainer.datamodule.clips), self.views)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        inputs = {m: batch[m] for m in self.encoder.modalities}
        feats = encode_views(
            self.encoder, inputs, batch["index"], views=self.views, mask_ratio=self.mask_ratio, seed=self.mask_seed
        )
        self._bank.add(batch["index"], feats)

    def on_test_epoch_end(self) -> None:
        dm = self.trainer.datamodule
        self.features = self._bank.gather(self.all_gather, self.trainer.world_size)
        self._bank = None
        acc = self.solve(self.features, dm.episodes, [r.clip_id for r in dm.clips.records])
        mean, ci = mean_confidence_interval(acc)
        self.log_dict({"test/acc": mean, "test/ci": ci}, sync_dist=False)

    def solve(self, features: torch.Tensor, episodes: EpisodeSet, clip_ids: list[str]) -> torch.Tensor:
        """Per-episode accuracy (E,) on ``features`` (num_clips, views, D) in ``clip_ids`` order."""
        positions = episode_positions(episodes, clip_ids).to(features.device)
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        shard = episodes.shard(rank, world).to(features.device)
        local = solve_episodes(self.classifier, features, positions[shard], episodes.settings.k_shot)
        acc = torch.full((len(episodes),), -1.0, device=features.device)
        acc[shard] = local.float()
        if world > 1:
            acc = self.all_gather(acc).max(0).values
        self.episode_accuracy = acc.cpu()
        return self.episode_accuracy

"""Few-shot evaluation of any exported clip encoder on fixed episodes (``lit_main_eval.py``)."""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import lightning as L
import torch
from torch import nn
from tqdm.auto import tqdm

from mmfsar.data.episodes import EpisodeSet
from mmfsar.fewshot import mean_confidence_interval
from mmfsar.fewshot.engine import FeatureBank, encode_views, episode_positions, solve_episodes


class FewShotEvalModule(L.LightningModule):
    """Encodes every clip of the evaluated split once (``views`` per clip), then solves all
    episodes on the features.

    Under DDP the test loader shards the clips; ``on_test_epoch_end`` gathers the features,
    solves this rank's share of the episodes (e = rank, rank + W, ...) and gathers the per-episode
    accuracies, so ``episode_accuracy`` is identical for any number of processes. Features that
    are already known (the on-disk cache) skip the encoder: call :meth:`solve` directly.

    ``chunk``: episodes solved per batch (the steps of the solving progress bar; memory).
    ``progress``: show that progress bar (rank 0 only; Lightning shows the encoding one).
    Classifiers that compare clips frame by frame (``uses_frames``) get per-frame features.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        classifier: nn.Module,
        views: int = 1,
        mask_ratio: float = 0.0,
        mask_seed: int = 0,
        chunk: int = 100,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if views < 1:
            raise ValueError(f"fewshot.views must be >= 1, got {views}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"fewshot.mask_ratio must be in [0, 1), got {mask_ratio}")
        if views > 1 and mask_ratio <= 0:
            raise ValueError("fewshot.views > 1 needs fewshot.mask_ratio > 0 (unmasked views are identical)")
        if chunk < 1:
            raise ValueError(f"fewshot.chunk must be >= 1, got {chunk}")
        self.encoder = encoder.eval()
        self.classifier = classifier
        self.views = views
        self.mask_ratio = mask_ratio
        self.mask_seed = mask_seed
        self.chunk = chunk
        self.progress = progress
        self.per_frame = bool(getattr(classifier, "uses_frames", False))
        self.features: torch.Tensor | None = None
        self.episode_accuracy: torch.Tensor | None = None
        self._bank: FeatureBank | None = None

    def setup(self, stage: str) -> None:
        # The test loader of a distributed run pads the last batch with repeated clips; the
        # feature bank averages them, so Lightning's advice to test on one device does not apply.
        warnings.filterwarnings("ignore", message=".*DistributedSampler.*replicates some samples.*")
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")

    def on_test_epoch_start(self) -> None:
        self.encoder.eval()
        self._bank = FeatureBank(len(self.trainer.datamodule.clips), self.views)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        inputs = {m: batch[m] for m in self.encoder.modalities}
        feats = encode_views(
            self.encoder,
            inputs,
            batch["index"],
            views=self.views,
            mask_ratio=self.mask_ratio,
            seed=self.mask_seed,
            frames=self.per_frame,
        )
        self._bank.add(batch["index"], feats)

    def on_test_epoch_end(self) -> None:
        dm = self.trainer.datamodule
        self.features = self._bank.gather(self.all_gather, self.trainer.world_size)
        self._bank = None
        acc = self.solve(self.features, dm.episodes, [r.clip_id for r in dm.clips.records])
        mean, ci = mean_confidence_interval(acc)
        self.log_dict({"test/acc": mean, "test/ci": ci}, sync_dist=True)  # equal on every rank

    def solve(self, features: torch.Tensor, episodes: EpisodeSet, clip_ids: list[str]) -> torch.Tensor:
        """Per-episode accuracy (E,) on ``features`` (num_clips, views, time, D) in ``clip_ids`` order.

        Inside a distributed test run each rank solves its share and the accuracies are
        gathered; outside one (cached features) this process solves every episode.
        """
        positions = episode_positions(episodes, clip_ids).to(features.device)
        inside = self._trainer is not None and self.trainer.state.stage is not None
        world = self.trainer.world_size if inside else 1
        rank = self.trainer.global_rank if inside else 0
        shard = episodes.shard(rank, world).to(features.device)
        show = self.progress and rank == 0 and (not inside or self.trainer.progress_bar_callback is not None)
        bar = tqdm(
            total=len(shard),
            desc=f"solving {len(episodes)} episodes",
            unit="episode",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.2,
            disable=not show,
        )
        with bar:
            local = solve_episodes(
                self.classifier,
                features,
                positions[shard],
                episodes.settings.k_shot,
                chunk=self.chunk,
                progress=bar.update,
                classes=episodes.classes.to(shard.device)[shard],
            )
        acc = torch.full((len(episodes),), -1.0, device=features.device)
        acc[shard] = local.float()
        if world > 1:
            acc = self.all_gather(acc).max(0).values
        self.episode_accuracy = acc.cpu()
        return self.episode_accuracy


def default_chunk(episodes: int, steps: int = 8, smallest: int = 600) -> int:
    """Episodes per solving batch: about ``steps`` progress steps, but never small batches: an
    iteration of the batched logistic regression costs nearly as much for 50 episodes as for
    600, so small batches would multiply the solving time (the usual 600 episodes: one batch)."""
    return max(smallest, math.ceil(episodes / steps))

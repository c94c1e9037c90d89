"""The cosine head, and the frozen-output cache that fusion training and distillation read frozen
models' outputs from (``cache=frozen``)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmfsar.data.datamodules import PretrainDataModule
from mmfsar.errors import ConfigError
from mmfsar.models.base import EncoderOutput
from mmfsar.models.heads import CosineClassifier
from mmfsar.tasks.frozen_cache import FrozenOutputCache


def test_cosine_head_is_scaled_cosine_similarity():
    head = CosineClassifier(2, 3, scale=10.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    logits = head(torch.tensor([[3.0, 0.0], [1.0, 1.0]]))
    expected = 10 * torch.tensor([[1.0, 0.0, 1 / math.sqrt(2)], [1 / math.sqrt(2), 1 / math.sqrt(2), 1.0]])
    torch.testing.assert_close(logits, expected)
    # only the direction of the feature counts
    torch.testing.assert_close(head(torch.tensor([[300.0, 0.0]])), logits[:1])


class MeanEncoder(nn.Module):
    """A frozen clip "model" whose outputs are easy to recompute: per-frame channel means."""

    modalities = ["rgb"]

    def forward(self, inputs: dict) -> EncoderOutput:
        frames = inputs["rgb"].mean((3, 4)).transpose(1, 2)  # (B, T, C)
        return EncoderOutput(pooled=frames.mean(1), frames=frames, logits=frames.sum((1, 2))[:, None])


@pytest.mark.parametrize("views", [0, 3])
def test_frozen_cache_gives_each_training_clip_the_output_of_its_own_view(tiny_dataset, make_modalities, views):
    dm = PretrainDataModule(
        root=tiny_dataset,
        modalities=make_modalities("rgb", "flow"),
        unlabelled_target=True,
        val_episodes={"n_way": 2, "k_shot": 1, "n_query": 2, "episodes": 2},
        batch_size=4,
        num_workers=0,
    )
    dm.setup("fit")
    cache = FrozenOutputCache(views=views, seed=5)
    cache.build({"t": MeanEncoder()}, dm, torch.device("cpu"))
    assert cache.tables["source"]["t"].pooled.shape == (max(1, views), len(dm.train_sets["source"]), 3)
    dm.configure_training(views=views, seed=5, modalities=["rgb"])
    for key, loader in dm.train_dataloader().items():
        for batch in loader:
            assert "flow" not in batch, "only the trained part's streams are loaded"
            looked_up = cache.lookup(key, batch, torch.device("cpu"))["t"]
            if views:  # the same view as the batch's: exactly the frozen model's output on it
                torch.testing.assert_close(looked_up.frames, MeanEncoder()(batch).frames, atol=1e-5, rtol=0)
            assert looked_up.logits.shape == (len(batch["index"]), 1)


def test_frozen_cache_refuses_modules_it_cannot_serve():
    cache = FrozenOutputCache(views=2)
    trainer = SimpleNamespace(datamodule=None)
    with pytest.raises(ConfigError, match="has no frozen models"):
        cache.setup(trainer, SimpleNamespace(frozen_models=lambda: {}), "fit")
    masked = SimpleNamespace(frozen_models=lambda: {"t": MeanEncoder()}, mask_ratio=0.75)
    with pytest.raises(ConfigError, match="mask_ratio=0"):
        cache.setup(trainer, masked, "fit")
    with pytest.raises(ConfigError, match="cache.views must be >= 0"):
        FrozenOutputCache(views=-1)

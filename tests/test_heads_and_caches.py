"""The cosine head, and the per-clip output cache that fusion training and cached distillation
read frozen encoders' outputs from."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mmfsar.models.base import EncoderOutput
from mmfsar.models.heads import CosineClassifier
from mmfsar.tasks.common import OutputCache, concat_outputs


def test_cosine_head_is_scaled_cosine_similarity():
    head = CosineClassifier(2, 3, scale=10.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    logits = head(torch.tensor([[3.0, 0.0], [1.0, 1.0]]))
    expected = 10 * torch.tensor([[1.0, 0.0, 1 / math.sqrt(2)], [1 / math.sqrt(2), 1 / math.sqrt(2), 1.0]])
    torch.testing.assert_close(logits, expected)
    # only the direction of the feature counts
    torch.testing.assert_close(head(torch.tensor([[300.0, 0.0]])), logits[:1])


class Clips(Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.arange(n, dtype=torch.float32)[:, None]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "rgb": self.x[i]}


def test_output_cache_looks_up_each_clip_of_each_pass():
    calls = []

    def encode(inputs):
        calls.append(1)
        x = inputs["rgb"]
        shift = 100.0 * (len(calls) > 2)  # the second pass (batches 3-4) sees "another view"
        return {"t": EncoderOutput(pooled=x + shift, frames=(x + shift)[:, None].repeat(1, 2, 1), logits=-x)}

    loader = DataLoader(Clips(7), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    cache = OutputCache.build(encode, [loader, loader], ["rgb"], torch.device("cpu"))["t"]
    assert cache.passes == 2 and cache.pooled.shape == (2, 7, 1) and cache.frames.shape == (2, 7, 2, 1)
    index = torch.tensor([6, 0, 3])
    first = cache.lookup(index, passes=torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(first.pooled[:, 0], torch.tensor([6.0, 0.0, 3.0]))
    torch.testing.assert_close(first.logits[:, 0], torch.tensor([-6.0, 0.0, -3.0]))
    second = cache.lookup(index, passes=torch.ones(3, dtype=torch.long))
    torch.testing.assert_close(second.pooled[:, 0], torch.tensor([106.0, 100.0, 103.0]))
    # random passes: every value is one of the clip's two views
    picked = cache.lookup(torch.arange(7).repeat(20)).pooled[:, 0]
    clip = torch.arange(7).repeat(20).float()
    assert torch.all((picked == clip) | (picked == clip + 100))
    assert (picked == clip).any() and (picked != clip).any()


def test_output_cache_refuses_an_incomplete_pass():
    class Dropping(Clips):
        def __len__(self) -> int:
            return 5

    loader = DataLoader(Dropping(5), batch_size=2, drop_last=True)
    encode = lambda inputs: {"t": EncoderOutput(pooled=inputs["rgb"], frames=inputs["rgb"][:, None])}  # noqa: E731
    with pytest.raises(RuntimeError, match="4 of 5 clips encoded"):
        OutputCache.build(encode, [loader], ["rgb"], torch.device("cpu"))


def test_concat_outputs_keeps_missing_fields_missing():
    a = EncoderOutput(pooled=torch.zeros(2, 3), frames=torch.zeros(2, 1, 3))
    b = EncoderOutput(pooled=torch.ones(1, 3), frames=torch.ones(1, 1, 3))
    out = concat_outputs([a, b], torch.device("cpu"))
    assert out.pooled.shape == (3, 3) and out.logits is None
    assert out.pooled[2].eq(1).all()

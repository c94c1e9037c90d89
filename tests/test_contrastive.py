"""MoCo queue / momentum encoder, CrosSCLR mining, IKEM exchange and relational distillation:
hand-computed values on tiny tensors, invariants, clear errors, and a two-process gloo run of
the queue's cross-rank gather."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mmfsar.losses.contrastive import (
    KnowledgeExchange,
    MoCoQueue,
    RelationalDistillation,
    check_aligned,
    concat_normalized,
    cross_modal_positives,
    crossclr_logits,
    crossclr_losses,
    make_momentum_copy,
    moco_logits,
    momentum_update,
    multi_positive_nce,
    positive_mask,
    relational_kd_logits,
    relational_kd_loss,
)


def keys_of(values: list[float]) -> torch.Tensor:
    """Keys ``[v, -v]``: easy to recognise in the queue."""
    return torch.tensor([[v, -v] for v in values])


def reference_ring(batches: list[list[float]], size: int) -> tuple[list[float | None], int]:
    """A plain-Python ring buffer: slot ``g mod size`` holds the ``g``-th key; None = initial."""
    slots: list[float | None] = [None] * size
    count = 0
    for batch in batches:
        for value in batch:
            slots[count % size] = value
            count += 1
    return slots, count % size


# --------------------------------------------------------------------------- queue


def test_queue_batches_of_three_into_eight_match_a_hand_ring_buffer():
    queue = MoCoQueue(dim=2, size=8, normalize=False)
    initial = queue.keys.clone()

    queue.enqueue(keys_of([0, 1, 2]))
    assert int(queue.ptr) == 3
    assert torch.equal(queue.keys[:3], keys_of([0, 1, 2]))
    assert torch.equal(queue.keys[3:], initial[3:])  # untouched rows keep their random init

    queue.enqueue(keys_of([3, 4, 5]))
    assert int(queue.ptr) == 6

    queue.enqueue(keys_of([6, 7, 8]))  # wraps: slots 6, 7, 0
    assert int(queue.ptr) == 1
    assert torch.equal(queue.keys, keys_of([8, 1, 2, 3, 4, 5, 6, 7]))
    assert torch.equal(queue.ordered(), keys_of([1, 2, 3, 4, 5, 6, 7, 8]))  # last 8 of 0..8

    queue.enqueue(keys_of([9, 10, 11]))
    assert int(queue.ptr) == 4
    assert torch.equal(queue.keys, keys_of([8, 9, 10, 11, 4, 5, 6, 7]))
    assert torch.equal(queue.ordered(), keys_of([4, 5, 6, 7, 8, 9, 10, 11]))


def test_queue_with_uneven_and_oversized_batches_keeps_the_last_keys_in_order():
    batches = [[0, 1, 2, 3, 4], [5], [6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [17, 18], [19, 20, 21, 22, 23, 24, 25]]
    queue = MoCoQueue(dim=2, size=7, normalize=False)
    for step, batch in enumerate(batches):
        queue.enqueue(keys_of(batch))
        slots, ptr = reference_ring(batches[: step + 1], 7)
        assert int(queue.ptr) == ptr
        for row, value in enumerate(slots):
            if value is not None:
                assert queue.keys[row].tolist() == [value, -value], (step, row)
        seen = [v for b in batches[: step + 1] for v in b]
        if len(seen) >= 7:
            assert torch.equal(queue.ordered(), keys_of(seen[-7:]))


def test_queue_stores_detached_normalised_keys():
    queue = MoCoQueue(dim=2, size=4)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(4))  # random unit init
    keys = torch.tensor([[3.0, 4.0], [0.0, -2.0]], requires_grad=True)
    queue.enqueue(keys * 1.0)
    assert not queue.keys.requires_grad and queue.keys.grad_fn is None
    assert torch.allclose(queue.keys[:2], torch.tensor([[0.6, 0.8], [0.0, -1.0]]))


def test_enqueue_after_computing_logits_still_backpropagates():
    """The queue is written out of place, so logits computed from it before the enqueue keep
    their saved tensors (an in-place write breaks autograd's version check)."""
    queue = MoCoQueue(dim=2, size=4)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    logits, labels = moco_logits(q, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), queue.keys, 0.1)
    queue.enqueue(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    F.cross_entropy(logits, labels).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_queue_rejects_bad_shapes():
    with pytest.raises(ValueError, match="positive dim and size"):
        MoCoQueue(dim=0, size=8)
    queue = MoCoQueue(dim=3, size=8)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        queue.enqueue(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        queue.enqueue(torch.zeros(3))


def test_check_aligned_catches_queues_out_of_step():
    a, b = MoCoQueue(dim=2, size=4), MoCoQueue(dim=3, size=4)
    a.enqueue(torch.ones(2, 2))
    b.enqueue(torch.ones(2, 3))
    check_aligned({"a": a, "b": b})
    a.enqueue(torch.ones(1, 2))
    with pytest.raises(ValueError, match="not aligned"):
        check_aligned({"a": a, "b": b})


# --------------------------------------------------------------------------- momentum encoder


def tiny_net(weight: list[float], bias: float, bn_weight: float, running_mean: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([weight]))
        net[0].bias.fill_(bias)
        net[1].weight.fill_(bn_weight)
        net[1].running_mean.fill_(running_mean)
    return net


def test_momentum_update_by_hand():
    online = tiny_net([1.0, 2.0], bias=3.0, bn_weight=1.0, running_mean=0.5)
    target = tiny_net([5.0, 6.0], bias=7.0, bn_weight=3.0, running_mean=0.0)
    momentum_update(online, target, momentum=0.9)
    # 0.9 * target + 0.1 * online
    assert torch.allclose(target[0].weight, torch.tensor([[0.9 * 5 + 0.1 * 1, 0.9 * 6 + 0.1 * 2]]))
    assert torch.allclose(target[0].weight, torch.tensor([[4.6, 5.6]]))
    assert math.isclose(target[0].bias.item(), 6.6, rel_tol=1e-6)
    assert math.isclose(target[1].weight.item(), 2.8, rel_tol=1e-6)
    assert target[1].running_mean.item() == 0.5  # buffers are copied, not averaged
    assert online[0].weight.tolist() == [[1.0, 2.0]]  # the online encoder is untouched


def test_momentum_copy_gets_no_gradient_and_is_independent():
    online = tiny_net([1.0, 2.0], bias=3.0, bn_weight=1.0, running_mean=0.0)
    target = make_momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    x = torch.randn(4, 2)
    (online(x) + target(x)).pow(2).sum().backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in online.parameters())
    with torch.no_grad():
        online[0].weight.add_(1.0)
    assert target[0].weight.tolist() == [[1.0, 2.0]]


def test_momentum_update_rejects_mismatches():
    with pytest.raises(ValueError, match="shape"):
        momentum_update(nn.Linear(2, 1), nn.Linear(2, 2), 0.9)
    with pytest.raises(ValueError, match="differ"):
        momentum_update(nn.Linear(2, 1), nn.Sequential(nn.Linear(2, 1)), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(nn.Linear(2, 1), nn.Linear(2, 1), 1.5)


# --------------------------------------------------------------------------- MoCo logits


def test_moco_logits_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.6, 0.8]])
    # row 0: q·k = 0.6, q·queue = [1, 0, 0.6]; row 1: q·k = 1, q·queue = [0, -1, 0.8]; / T = 0.5
    expected = torch.tensor([[1.2, 2.0, 0.0, 1.2], [2.0, 0.0, -2.0, 1.6]])
    logits, labels = moco_logits(q, k, queue, 0.5)
    assert torch.allclose(logits, expected)
    assert labels.tolist() == [0, 0]
    # q and k are normalised inside: scaled inputs give the same logits
    scaled, _ = moco_logits(q * torch.tensor([[3.0], [0.5]]), k * 7.0, queue, 0.5)
    assert torch.allclose(scaled, expected)


def test_moco_logits_keys_and_queue_get_no_gradient():
    q = torch.tensor([[1.0, 0.0]], requires_grad=True)
    k = torch.tensor([[0.6, 0.8]], requires_grad=True)
    queue = torch.tensor([[0.0, 1.0]], requires_grad=True)
    logits, labels = moco_logits(q, k, queue, 0.07)
    F.cross_entropy(logits, labels).backward()
    assert q.grad is not None and k.grad is None and queue.grad is None


def test_moco_logits_rejects_bad_input():
    q = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="k has feature dim 4"):
        moco_logits(q, torch.zeros(2, 4), torch.zeros(5, 3), 0.1)
    with pytest.raises(ValueError, match="queue has feature dim 2"):
        moco_logits(q, torch.zeros(2, 3), torch.zeros(5, 2), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        moco_logits(q, torch.zeros(2, 3), torch.zeros(5, 3), 0.0)


def test_concat_normalized_by_hand():
    out = concat_normalized([torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0]])])
    # each part normalised ([0.6, 0.8], [0, 1]), then the concatenation: / sqrt(2)
    assert torch.allclose(out, torch.tensor([[0.6, 0.8, 0.0, 1.0]]) / math.sqrt(2))
    with pytest.raises(ValueError, match="same leading shape"):
        concat_normalized([torch.zeros(2, 3), torch.zeros(3, 3)])


# --------------------------------------------------------------------------- CrosSCLR


def test_cross_modal_positives_pick_the_hand_chosen_neighbours():
    q_other = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    queue_other = torch.tensor([[0.8, 0.6], [0.0, 1.0], [-1.0, 0.0], [0.6, -0.8]])
    # similarities: row 0 [0.8, 0, -1, 0.6]; row 1 [0.6, 1, 0, -0.8]
    top1 = cross_modal_positives(q_other, queue_other, topk=1)
    assert top1.dtype == torch.bool
    assert top1.tolist() == [[True, False, False, False], [False, True, False, False]]
    top2 = cross_modal_positives(q_other, queue_other, topk=2)
    assert top2.tolist() == [[True, False, False, True], [True, True, False, False]]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="topk"):
            cross_modal_positives(q_other, queue_other, topk=bad)


def test_multi_positive_nce_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0), 0.0], [math.log(3.0), 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # row 0: exp = [1, 2, 1], sum 4, positives 0 and 1: -(log 1/4 + log 2/4) / 2 = 1.5 log 2
    # row 1: exp = [3, 1, 1], sum 5, positive 0: -log 3/5
    expected = (1.5 * math.log(2.0) + math.log(5.0 / 3.0)) / 2
    assert math.isclose(multi_positive_nce(logits, mask).item(), expected, rel_tol=1e-6)
    # not the "-log(sum_pos exp / sum_all exp)" variant
    pooled_form = (math.log(4.0 / 3.0) + math.log(5.0 / 3.0)) / 2
    assert not math.isclose(multi_positive_nce(logits, mask).item(), pooled_form, rel_tol=1e-3)


def test_multi_positive_nce_with_only_the_key_is_cross_entropy():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 0] = True
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(multi_positive_nce(logits, mask), expected)


def test_multi_positive_nce_rejects_rows_without_positive_and_bad_shapes():
    with pytest.raises(ValueError, match=r"rows \[1\] have no positive"):
        multi_positive_nce(torch.zeros(2, 3), torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="same shape"):
        multi_positive_nce(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))


def test_crossclr_logits_take_their_positives_from_the_other_view():
    q, k = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # own view: nearest entry is 0
    q_other = torch.tensor([[0.0, 1.0]])
    queue_other = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # other view: nearest entry is 1
    logits, mask = crossclr_logits(q, k, queue, q_other, queue_other, temperature=1.0, topk=1)
    # [q·k, q·Q = (1, 0), (q·Q) ⊙ (q_o·Q_o) = (1·0, 0·1)]
    assert torch.allclose(logits, torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]]))
    assert mask.tolist() == [[True, False, True, False, True]]
    logits, mask = crossclr_logits(q, k, queue, q_other, queue_other, temperature=0.5, topk=1, context=False)
    assert torch.allclose(logits, torch.tensor([[2.0, 2.0, 0.0]]))
    assert mask.tolist() == [[True, False, True]]


def test_crossclr_losses_average_the_pairwise_terms():
    gen = torch.Generator().manual_seed(1)
    names = ("joint", "motion", "bone")
    queries = {n: torch.randn(3, 4, generator=gen) for n in names}
    keys = {n: torch.randn(3, 4, generator=gen) for n in names}
    queues = {n: F.normalize(torch.randn(5, 4, generator=gen), dim=1) for n in names}
    losses = crossclr_losses(queries, keys, queues, temperature=0.2, topk=2)
    for name in names:
        pairs = [
            multi_positive_nce(
                *crossclr_logits(
                    queries[name], keys[name], queues[name], queries[o], queues[o], temperature=0.2, topk=2
                )
            )
            for o in names
            if o != name
        ]
        assert torch.allclose(losses[name], torch.stack(pairs).mean())
    with pytest.raises(ValueError, match="expected modalities"):
        crossclr_losses(queries, {"joint": keys["joint"]}, queues, temperature=0.2)


def test_positive_mask_layout():
    mined = torch.tensor([[False, True]])
    assert positive_mask(mined, context=True).tolist() == [[True, False, True, False, True]]
    assert positive_mask(mined, context=False).tolist() == [[True, False, True]]


# --------------------------------------------------------------------------- IKEM


def test_knowledge_exchange_by_hand():
    module = KnowledgeExchange(dims={"a": 4, "b": 4}, key_dim=2, temperature=1.0)
    module.heads["a"] = nn.Identity()  # so that the hand computation starts from the features
    module.heads["b"] = nn.Identity()
    keys = {"a": torch.tensor([[1.0, 0.0]], requires_grad=True), "b": torch.tensor([[0.0, 1.0]])}
    queues = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([[1.0, 0.0], [1.0, 0.0]])}
    features = {
        "a": torch.tensor([[1.0, 0.0, 0.0, 1.0]], requires_grad=True),
        "b": torch.tensor([[0.0, 1.0, 1.0, 0.0]]),
    }
    # positive = [1, 0, 0, 1]/√2; negatives = [1, 0, 1, 0]/√2 and [0, 1, 1, 0]/√2
    # a: f = [1, 0, 0, 1]/√2 -> logits [1, 1/2, 0]; b: f = [0, 1, 1, 0]/√2 -> logits [0, 1/2, 1]
    expected_a = -math.log(math.e / (math.e + math.exp(0.5) + 1.0))
    expected_b = -math.log(1.0 / (1.0 + math.exp(0.5) + math.e))
    losses = module(features, keys, queues)
    assert math.isclose(losses["a"].item(), expected_a, rel_tol=1e-6)
    assert math.isclose(losses["b"].item(), expected_b, rel_tol=1e-6)
    losses["a"].backward()
    assert features["a"].grad is not None and keys["a"].grad is None


def test_knowledge_exchange_heads_and_errors():
    module = KnowledgeExchange(dims={"joint": 5, "motion": 3, "bone": 4}, key_dim=2)
    assert module.heads["motion"][-1].out_features == 6  # to the concatenated key space, 3 × 2
    gen = torch.Generator().manual_seed(0)
    features = {
        "joint": torch.randn(2, 5, generator=gen),
        "motion": torch.randn(2, 3, generator=gen),
        "bone": torch.randn(2, 4, generator=gen),
    }
    keys = {n: torch.randn(2, 2, generator=gen) for n in features}
    queues = {n: F.normalize(torch.randn(7, 2, generator=gen), dim=1) for n in features}
    losses = module(features, keys, queues)
    assert set(losses) == {"joint", "motion", "bone"} and all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="expected modalities"):
        module(features, {"joint": keys["joint"]}, queues)
    with pytest.raises(ValueError, match=r"keys\['bone'\] has feature dim 3"):
        module(features, {**keys, "bone": torch.zeros(2, 3)}, queues)


# hand case of the relational distillation: B = 2, K = 3, 2-d teacher space and modality x
S = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
T_FEAT = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
QUEUE_T = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]])
Q_X = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
QUEUE_X = torch.tensor([[0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
# s·t = [0.6, 0];  s·Q_T = [1, 0, 0.6] and [0, 1, -0.8];  q_x·Q_x = [0.6, 1, 0] and [0.8, 0, -1]
# product = [0.6, 0, 0] and [0, 0, 0.8]; all / T = 0.5
HAND_LOGITS = [[1.2, 2.0, 0.0, 1.2, 1.2, 0.0, 0.0], [0.0, 0.0, 2.0, -1.6, 0.0, 0.0, 1.6]]
# top-1 of q_x·Q_x: entry 1 (row 0), entry 0 (row 1), marked in the queue and context blocks
HAND_MASK = [[True, False, True, False, False, True, False], [True, True, False, False, True, False, False]]


def test_relational_kd_logits_and_mask_by_hand():
    logits, mask = relational_kd_logits(S, T_FEAT, QUEUE_T, Q_X, QUEUE_X, 0.5)
    assert torch.allclose(logits, torch.tensor(HAND_LOGITS))
    assert mask.tolist() == HAND_MASK


def test_relational_kd_loss_by_hand():
    total = 0.0
    for row, row_mask in zip(HAND_LOGITS, HAND_MASK, strict=True):
        denominator = sum(math.exp(v) for v in row)
        positives = [v for v, m in zip(row, row_mask, strict=True) if m]
        total += -sum(v - math.log(denominator) for v in positives) / len(positives)
    s = S.clone().requires_grad_()
    q_x = Q_X.clone().requires_grad_()
    loss = relational_kd_loss(s, T_FEAT, QUEUE_T, q_x, QUEUE_X, 0.5)
    assert math.isclose(loss.item(), total / 2, rel_tol=1e-6)
    loss.backward()
    assert s.grad is not None and q_x.grad is None  # the teacher modality is frozen


def test_relational_kd_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="t has feature dim 3"):
        relational_kd_logits(S, torch.zeros(2, 3), QUEUE_T, Q_X, QUEUE_X, 0.5)
    with pytest.raises(ValueError, match="queue_x has 4 rows, expected 3"):
        relational_kd_logits(S, T_FEAT, QUEUE_T, Q_X, torch.zeros(4, 2), 0.5)


def test_relational_distillation_module_matches_the_functions_and_enqueues():
    gen = torch.Generator().manual_seed(2)
    module = RelationalDistillation(
        student_dims={"joint": 5, "bone": 3}, teacher_dims={"j": 2, "m": 3}, queue_size=6, temperature=0.2
    )
    assert module.heads["bone"][-1].out_features == 5  # into the concatenated teacher space, 2 + 3
    students = {"joint": torch.randn(4, 5, generator=gen), "bone": torch.randn(4, 3, generator=gen)}
    teachers = {"j": torch.randn(4, 2, generator=gen), "m": torch.randn(4, 3, generator=gen)}
    queue_t = module.teacher_queue.keys
    queues_x = {x: module.queues[x].keys for x in ("j", "m")}
    t = concat_normalized([teachers["j"], teachers["m"]])

    losses = module(students, teachers)

    for name in ("joint", "bone"):
        s = module.heads[name](students[name])
        expected = torch.stack(
            [relational_kd_loss(s, t, queue_t, teachers[x], queues_x[x], 0.2) for x in ("j", "m")]
        ).mean()
        assert torch.allclose(losses[name], expected)
    check_aligned([module.teacher_queue, *module.queues.values()])
    assert int(module.teacher_queue.ptr) == 4
    assert torch.allclose(module.teacher_queue.keys[:4], t)
    assert torch.allclose(module.queues["m"].keys[:4], F.normalize(teachers["m"], dim=1))
    with pytest.raises(ValueError, match="expected modalities"):
        module(students, {"j": teachers["j"]})


# --------------------------------------------------------------------------- DDP


def _ddp_enqueue(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        queue = MoCoQueue(dim=2, size=8, normalize=False)
        # step 1: uneven batches (rank 0: 3 keys, rank 1: 2), step 2: 3 keys each
        steps = {0: [[0, 1, 2], [10, 11, 12]], 1: [[100, 101], [110, 111, 112]]}[rank]
        for values in steps:
            queue.enqueue(keys_of(values))
        torch.save({"keys": queue.keys, "ptr": queue.ptr}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_enqueue_gathers_the_keys_of_every_rank_in_rank_order(tmp_path):
    mp.spawn(_ddp_enqueue, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    # gathered per step, rank 0 first: [0, 1, 2, 100, 101], then [10, 11, 12, 110, 111, 112]
    slots, ptr = reference_ring([[0, 1, 2, 100, 101], [10, 11, 12, 110, 111, 112]], 8)
    # 11 keys: the first 8 fill slots 0..7, then 110, 111, 112 overwrite slots 0, 1, 2
    assert slots == [110, 111, 112, 100, 101, 10, 11, 12] and ptr == 3
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        assert int(state["ptr"]) == 3
        assert torch.equal(state["keys"], keys_of(slots))
        # read from the pointer: the last 8 keys of the rank-ordered concatenation
        assert torch.equal(torch.roll(state["keys"], -3, 0), keys_of([100, 101, 10, 11, 12, 110, 111, 112]))

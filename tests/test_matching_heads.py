"""Matching heads (prototype, frame cosine, OTAM, TRX): values computed by hand, invariants,
batching, clear errors, and their Hydra configs."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mmfsar.fewshot import OTAM, TRX, EpisodeClassifier, FrameCosineHead, otam_distance
from mmfsar.fewshot import PrototypeClassifier as PrototypeHead

HEAD_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "fewshot" / "classifier"


def episodes(e: int, n: int, k: int, q: int, t: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(e, n, k, t, d, generator=generator), torch.randn(e, q, t, d, generator=generator)


# ---------------------------------------------------------------- OTAM


def smin(*values: float, gamma: float) -> float:
    return -gamma * math.log(sum(math.exp(-v / gamma) for v in values))


def test_otam_matches_the_padded_recursion_written_out_by_hand():
    # 2-d unit frames at angles: the cost 1 - cos is 1 - cos(angle difference)
    q_angles, s_angles = [0.0, 0.7, 1.9], [0.2, 1.0, 2.5]
    cost = [[1 - math.cos(a - b) for b in s_angles] for a in q_angles]
    g = 0.1
    # padded columns 0 and 4 are zeros; Γ[l][m] written cell by cell (columns 0..4)
    r0 = [0.0]
    r0.append(cost[0][0] + r0[0])
    r0.append(cost[0][1] + r0[1])
    r0.append(cost[0][2] + r0[2])
    r0.append(0.0 + r0[3])
    r1 = [0.0]  # zero column: only the vertical move from 0
    r1.append(cost[1][0] + smin(r0[0], r1[0], gamma=g))
    r1.append(cost[1][1] + smin(r0[1], r1[1], gamma=g))
    r1.append(cost[1][2] + smin(r0[2], r1[2], gamma=g))
    r1.append(0.0 + smin(r0[3], r1[3], r0[4], gamma=g))
    r2 = [0.0]
    r2.append(cost[2][0] + smin(r1[0], r2[0], gamma=g))
    r2.append(cost[2][1] + smin(r1[1], r2[1], gamma=g))
    r2.append(cost[2][2] + smin(r1[2], r2[2], gamma=g))
    r2.append(0.0 + smin(r1[3], r2[3], r1[4], gamma=g))
    expected = r2[4]

    got = otam_distance(torch.tensor(cost, dtype=torch.float64), smoothing=g)
    assert got.item() == pytest.approx(expected, abs=1e-12)

    def frames(angles: list[float]) -> torch.Tensor:
        return torch.tensor([[math.cos(a), math.sin(a)] for a in angles], dtype=torch.float64)

    head = OTAM(smoothing=g, temperature=0.5)
    logits = head(frames(s_angles)[None, None, None], frames(q_angles)[None, None])
    assert logits.shape == (1, 1, 1)
    assert logits.item() == pytest.approx(-expected / 0.5, abs=1e-12)


def hard_otam(cost: list[list[float]]) -> float:
    """The padded recursion with a hard minimum, in plain Python."""
    rows, cols = len(cost), len(cost[0]) + 2
    padded = [[0.0] + row + [0.0] for row in cost]
    inf = float("inf")
    gamma = [[inf] * cols for _ in range(rows)]
    for l, m in itertools.product(range(rows), range(cols)):
        if l == 0 and m == 0:
            gamma[l][m] = padded[l][m]
            continue
        options = []
        if m > 0:
            options.append(gamma[l][m - 1])
            if l > 0:
                options.append(gamma[l - 1][m - 1])
        if l > 0 and m in (0, cols - 1):
            options.append(gamma[l - 1][m])
        gamma[l][m] = padded[l][m] + min(options)
    return gamma[-1][-1]


def released_otam(cost: list[list[float]], gamma: float) -> float:
    """The released OTAM code's recursion (vertical moves also in the first real column), plain Python."""
    rows, cols = len(cost), len(cost[0]) + 2
    padded = [[0.0] + row + [0.0] for row in cost]
    cum = [[0.0] * cols for _ in range(rows)]
    for m in range(1, cols):
        cum[0][m] = padded[0][m] + cum[0][m - 1]
    for l in range(1, rows):
        cum[l][1] = padded[l][1] + smin(cum[l - 1][0], cum[l - 1][1], cum[l][0], gamma=gamma)
        for m in range(2, cols - 1):
            cum[l][m] = padded[l][m] + smin(cum[l - 1][m - 1], cum[l][m - 1], gamma=gamma)
        cum[l][-1] = padded[l][-1] + smin(cum[l - 1][-2], cum[l - 1][-1], cum[l][-2], gamma=gamma)
    return cum[-1][-1]


def test_otam_small_smoothing_approaches_the_hard_alignment_and_the_released_boundary_option():
    generator = torch.Generator().manual_seed(3)
    cost = torch.rand(4, 5, 6, generator=generator, dtype=torch.float64) * 2  # L=5 query, M=6 support frames
    for matrix in cost:
        hard = hard_otam(matrix.tolist())
        assert otam_distance(matrix, smoothing=0).item() == pytest.approx(hard, abs=1e-12)
        assert otam_distance(matrix, smoothing=1e-4).item() == pytest.approx(hard, abs=2e-3)
        soft = otam_distance(matrix, smoothing=0.1).item()
        assert soft < hard - 0.05  # the smooth minimum is strictly below: the comparison above means something
        released = otam_distance(matrix, smoothing=0.1, vertical_in_first_column=True).item()
        assert released == pytest.approx(released_otam(matrix.tolist(), 0.1), abs=1e-10)
        assert released < soft  # more paths; equal again with a hard minimum:
        hard_released = otam_distance(matrix, smoothing=0, vertical_in_first_column=True)
        assert hard_released.item() == pytest.approx(hard)
    # batched over leading dimensions: same as one by one
    torch.testing.assert_close(otam_distance(cost, smoothing=0.1), torch.stack([otam_distance(c) for c in cost]))


@pytest.mark.parametrize("released", [False, True])
def test_otam_gradients_match_finite_differences(released: bool):
    generator = torch.Generator().manual_seed(9)
    cost = torch.rand(2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda c: otam_distance(c, smoothing=0.2, vertical_in_first_column=released), (cost,)
    )
    support = torch.randn(1, 2, 2, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    query = torch.randn(1, 2, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(OTAM(bidirectional=True, vertical_in_first_column=released), (support, query))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_otam_picks_the_time_warped_copy_of_a_support_clip(bidirectional: bool):
    generator = torch.Generator().manual_seed(1)
    support = torch.randn(1, 4, 1, 8, 16, generator=generator)
    warp = torch.tensor([0, 0, 1, 2, 3, 5, 6, 7])  # frame 0 repeated, frame 4 dropped
    query = support[0, 2, 0, warp][None, None] + 0.05 * torch.randn(1, 1, 8, 16, generator=generator)
    logits = OTAM(bidirectional=bidirectional)(support, query)
    assert logits.argmax(-1).item() == 2
    assert (logits[0, 0, 2] - logits[0, 0].topk(2).values[1]).item() > 1.0  # by a margin


def test_bidirectional_otam_is_symmetric_in_query_and_support():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(8, 12, generator=generator), torch.randn(8, 12, generator=generator)

    def distance(head: OTAM, support: torch.Tensor, query: torch.Tensor) -> float:
        return head(support[None, None, None], query[None, None]).item()

    both = OTAM(bidirectional=True)
    assert distance(both, a, b) == pytest.approx(distance(both, b, a), abs=1e-6)
    one = OTAM(bidirectional=False)
    assert abs(distance(one, a, b) - distance(one, b, a)) > 1e-3  # one direction alone is not symmetric
    # bidirectional = the mean of both directions
    assert distance(both, a, b) == pytest.approx(0.5 * (distance(one, a, b) + distance(one, b, a)), abs=1e-6)


def test_otam_shot_reductions():
    support, query = episodes(2, 3, 4, 3, 5, 6, seed=4)
    per_shot = torch.stack(
        [OTAM()(support[:, :, k : k + 1], query) for k in range(4)], dim=-1
    )  # logits against each shot alone
    torch.testing.assert_close(OTAM(shots="mean_distance")(support, query), per_shot.mean(-1))
    mean_clip = support.mean(2, keepdim=True)
    torch.testing.assert_close(OTAM(shots="mean_frames")(support, query), OTAM()(mean_clip, query))


# ---------------------------------------------------------------- TRX


def test_trx_tuple_counts_for_eight_frames():
    head = TRX(dim=16, num_frames=8, cardinalities=(2, 3), proj_dim=8)
    pairs, triples = (t.tuples for t in head.transformers)
    assert pairs.shape == (28, 2) and triples.shape == (56, 3)
    for tuples in (pairs, triples):
        assert bool((tuples[:, 1:] > tuples[:, :-1]).all())  # ordered t_1 < t_2 < ...
        assert len({tuple(row) for row in tuples.tolist()}) == len(tuples)


def sinusoid(num_frames: int, dim: int) -> torch.Tensor:
    return torch.tensor(
        [
            [
                0.1 * (math.sin if j % 2 == 0 else math.cos)(t / 10000 ** ((j - j % 2) / dim))
                for j in range(dim)
            ]
            for t in range(num_frames)
        ]
    )


def naive_trx_logits(head: TRX, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """TRX written out tuple by tuple with the head's own weights (no dropout: eval mode)."""
    e_count, n_count, k_count, t_count, dim = support.shape
    per_cardinality = []
    for ct in head.transformers:
        tuples = list(itertools.combinations(range(t_count), ct.cardinality))
        position = sinusoid(t_count, dim) if head.positions is not None else 0.0
        query_map = ct.query if ct.query is not None else ct.key
        query_norm = ct.query_norm if ct.query_norm is not None else ct.key_norm
        distances = torch.zeros(e_count, query.shape[1], n_count)
        for e, q, n in itertools.product(range(e_count), range(query.shape[1]), range(n_count)):
            clip = query[e, q] + position
            shots = [support[e, n, k] + position for k in range(k_count)]
            support_tuples = [torch.cat([s[t] for t in tup]) for s in shots for tup in tuples]
            keys = [ct.key_norm(ct.key(x)) for x in support_tuples]
            values = [ct.value(x) for x in support_tuples]
            total = 0.0
            for tup in tuples:
                x = torch.cat([clip[t] for t in tup])
                query_key = query_norm(query_map(x))
                weights = torch.softmax(torch.stack([query_key @ k for k in keys]) / math.sqrt(ct.proj_dim), 0)
                prototype = sum(w * v for w, v in zip(weights, values))
                total = total + (prototype - ct.value(x)).square().sum()
            distances[e, q, n] = total / len(tuples)
        per_cardinality.append(distances)
    stacked = torch.stack(per_cardinality, -1)
    return -stacked.sum(-1) if head.combine == "sum" else -stacked.norm(dim=-1)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(shared_key_query=False, combine="norm", position_encoding=False, cardinalities=(1, 3))],
)
def test_trx_equals_the_method_written_out_tuple_by_tuple(options: dict):
    torch.manual_seed(0)
    head = TRX(dim=6, num_frames=4, proj_dim=5, **options).eval()
    support, query = episodes(2, 2, 2, 3, 4, 6, seed=5)
    with torch.no_grad():
        for module in head.modules():  # LayerNorm affine parameters away from their identity init
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        expected = naive_trx_logits(head, support, query)
        got = head(support, query)
    assert got.shape == (2, 3, 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_trx_ignores_the_order_of_shots_but_not_the_order_of_frames():
    torch.manual_seed(0)
    head = TRX(dim=8, num_frames=5, proj_dim=16).eval()
    support, query = episodes(2, 3, 4, 2, 5, 8, seed=6)
    with torch.no_grad():
        logits = head(support, query)
        shuffled = support.clone()
        shuffled[1, 2] = support[1, 2, torch.tensor([2, 0, 3, 1])]
        torch.testing.assert_close(head(shuffled, query), logits, rtol=1e-5, atol=1e-5)
        reversed_clip = support.clone()
        reversed_clip[1, 2, 0] = support[1, 2, 0].flip(0)
        changed = head(reversed_clip, query)
    assert (changed[1, :, 2] - logits[1, :, 2]).abs().min() > 1e-3
    torch.testing.assert_close(changed[0], logits[0])  # other episodes untouched


def test_trx_gradients_reach_the_features_and_every_parameter():
    torch.manual_seed(0)
    head = TRX(dim=8, num_frames=4, proj_dim=16, shared_key_query=False)
    support, query = episodes(2, 3, 2, 4, 4, 8, seed=7)
    support.requires_grad_(True)
    query.requires_grad_(True)
    logits = head(support, query)
    assert logits.shape == (2, 4, 3)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.arange(4).repeat(2) % 3).backward()
    assert support.grad.abs().sum() > 0 and query.grad.abs().sum() > 0
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- prototype and frame cosine


def test_prototype_head_with_one_time_step_is_nearest_centroid():
    support = torch.tensor([[[[1.0, 0.0]], [[3.0, 2.0]]], [[[0.0, 4.0]], [[2.0, 2.0]]]])  # (N=2, K=2, T=1, D=2)
    query = torch.tensor([[[2.0, 1.0]], [[0.0, 3.0]], [[5.0, 5.0]]])  # (Q=3, T=1, D=2)
    prototypes = [[(1 + 3) / 2, (0 + 2) / 2], [(0 + 2) / 2, (4 + 2) / 2]]  # (2, 1) and (1, 3)
    expected = [[-sum((qi - pi) ** 2 for qi, pi in zip(q[0].tolist(), p)) / 2.0 for p in prototypes] for q in query]
    logits = PrototypeHead(temperature=2.0, dim=2, num_frames=8)(support[None], query[None])  # num_frames not checked
    torch.testing.assert_close(logits[0], torch.tensor(expected))
    assert logits[0].argmax(-1).tolist() == [0, 1, 1]
    cosine = PrototypeHead(metric="cosine")(support[None], query[None])[0]
    norm = lambda v: math.sqrt(sum(x * x for x in v))  # noqa: E731
    expected_cos = [
        [sum(a * b for a, b in zip(q[0].tolist(), p)) / (norm(q[0].tolist()) * norm(p)) for p in prototypes]
        for q in query
    ]
    torch.testing.assert_close(cosine, torch.tensor(expected_cos))


def test_frame_cosine_head_by_hand():
    # one class of two 2-frame shots, one query; D = 2
    support = torch.tensor([[[[1.0, 0.0], [3.0, 0.0]], [[0.0, 2.0], [0.0, 0.0]]]])  # frame means (2, 0), (0, 1)
    query = torch.tensor([[[1.0, 1.0], [1.0, 3.0]]])  # frame mean (1, 2)
    prototype, q = (1.0, 0.5), (1.0, 2.0)
    expected = (prototype[0] * q[0] + prototype[1] * q[1]) / (math.hypot(*prototype) * math.hypot(*q)) / 0.1
    head = FrameCosineHead(num_frames=2)
    assert head.uses_frames
    assert head(support[None], query[None]).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="built for 2 frames"):
        head(support[None, :, :, :1], query[None, :, :1])


# ---------------------------------------------------------------- all heads

ALL_HEADS = {
    "prototype": lambda: PrototypeHead(),
    "prototype_cosine": lambda: PrototypeHead(metric="cosine", temperature=0.5),
    "frame_cosine": lambda: FrameCosineHead(),
    "otam": lambda: OTAM(),
    "otam_bidirectional_mean_frames": lambda: OTAM(bidirectional=True, shots="mean_frames", smoothing=0.05),
    "trx": lambda: TRX(dim=8, num_frames=5, proj_dim=12).eval(),
}


@pytest.mark.parametrize("name", sorted(ALL_HEADS))
def test_batched_episodes_equal_one_episode_at_a_time(name: str):
    torch.manual_seed(0)
    head = ALL_HEADS[name]()
    support, query = episodes(3, 4, 2, 3, 5, 8, seed=8)
    with torch.no_grad():
        batched = head(support, query)
        single = torch.cat([head(support[i : i + 1], query[i : i + 1]) for i in range(3)])
    assert batched.shape == (3, 3, 4)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL_HEADS))
def test_heads_reject_mismatched_shapes(name: str):
    head = ALL_HEADS[name]()
    support, query = episodes(2, 3, 2, 4, 5, 8)
    bad = {
        r"support must be \(episodes, ways, shots, frames, dim\)": (support[0], query),
        r"query must be \(episodes, queries, frames, dim\)": (support, query[0]),
        "2 episodes but query has 1": (support, query[:1]),
        "5 frames but query has 4": (support, query[:, :, :4]),
        "support features are 8-d but query features are 7-d": (support, query[..., :7]),
        "floating point": (support.long(), query.long()),
        "every size must be >= 1": (support[:, :, :0], query),
    }
    for message, (s, q) in bad.items():
        with pytest.raises(ValueError, match=message):
            head(s, q)


def test_heads_built_for_a_size_reject_other_sizes():
    support, query = episodes(1, 2, 1, 2, 5, 8)
    with pytest.raises(ValueError, match="built for 16-d features, got 8-d"):
        TRX(dim=16, num_frames=5, proj_dim=4)(support, query)
    with pytest.raises(ValueError, match="built for 6 frames, got 5"):
        TRX(dim=8, num_frames=6, proj_dim=4)(support, query)
    with pytest.raises(ValueError, match="built for 6 frames, got 5"):
        OTAM(dim=8, num_frames=6)(support, query)
    with pytest.raises(ValueError, match="built for 4-d features"):
        PrototypeHead(dim=4)(support, query)
    # a pooled-feature head takes T = 1 whatever num_frames says
    assert PrototypeHead(dim=8, num_frames=6)(support[:, :, :, :1], query[:, :, :1]).shape == (1, 2, 2)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PrototypeHead(metric="manhattan"), "metric must be"),
        (lambda: PrototypeHead(temperature=0), "temperature must be > 0"),
        (lambda: FrameCosineHead(temperature=-1.0), "temperature must be > 0"),
        (lambda: OTAM(smoothing=-0.1), "smoothing must be >= 0"),
        (lambda: OTAM(shots="max"), "shots must be"),
        (lambda: OTAM(num_frames=0), "num_frames must be a positive integer"),
        (lambda: TRX(dim=8, num_frames=4, cardinalities=(2, 5)), "cardinality 5 needs at least 5 frames"),
        (lambda: TRX(dim=8, num_frames=4, cardinalities=(2, 2)), "distinct"),
        (lambda: TRX(dim=8, num_frames=4, cardinalities=(0,)), "each cardinality must be a positive integer"),
        (lambda: TRX(dim=8, num_frames=4, combine="max"), "combine must be"),
        (lambda: TRX(dim=8, num_frames=4, dropout=1.0), "dropout must be in"),
        (lambda: TRX(dim=None, num_frames=4), "dim must be a positive integer"),
    ],
)
def test_bad_hyper_parameters_are_clear_errors(build, message: str):
    with pytest.raises(ValueError, match=message):
        build()


def test_otam_distance_rejects_bad_costs():
    with pytest.raises(ValueError, match="cost must be"):
        otam_distance(torch.zeros(4))
    with pytest.raises(ValueError, match="cost must be"):
        otam_distance(torch.zeros(3, 0, 4))
    with pytest.raises(ValueError, match="smoothing must be >= 0"):
        otam_distance(torch.zeros(3, 3), smoothing=-1)


@pytest.mark.parametrize(
    "config, cls",
    [("prototype", PrototypeHead), ("frame_cosine", FrameCosineHead), ("otam", OTAM), ("trx", TRX)],
)
def test_head_configs_instantiate_and_run(config: str, cls: type):
    cfg = OmegaConf.load(HEAD_CONFIGS / f"{config}.yaml")
    head = instantiate(cfg)(dim=16, num_frames=4)
    assert type(head) is cls and isinstance(head, EpisodeClassifier)
    support, query = episodes(2, 5, 1, 5, 4, 16)
    if not head.uses_frames:
        support, query = support.mean(3, keepdim=True), query.mean(2, keepdim=True)
    logits = head(support, query)
    assert logits.shape == (2, 5, 5) and torch.isfinite(logits).all()


def test_the_engine_embeds_each_clip_once_and_agrees_with_the_head():
    """``episode_probabilities`` runs a head's per-clip part once per clip of the bank and matches
    episodes on the embedded clips: the same probabilities as calling the head on each episode."""
    from mmfsar.fewshot import episode_probabilities

    torch.manual_seed(0)
    bank = torch.randn(12, 1, 4, 8)
    episodes = torch.stack([torch.randperm(12)[:9].view(3, 3) for _ in range(5)])  # 3-way 2-shot 1-query
    for head in (TRX(dim=8, num_frames=4, proj_dim=6).eval(), OTAM(dim=8, num_frames=4)):
        probs = episode_probabilities(head, bank, episodes, 2, chunk=2)
        for e, episode in enumerate(episodes):
            support, query = bank[episode[:, :2], 0][None], bank[episode[:, 2:], 0].reshape(1, 3, 4, 8)
            expected = torch.softmax(head(support, query), -1).view(3, 1, 3)
            torch.testing.assert_close(probs[e], expected, rtol=1e-5, atol=1e-6)


def test_trx_prototype_and_gram_forms_agree(monkeypatch):
    from mmfsar.fewshot.matching import _CrossTransformer

    torch.manual_seed(1)
    head = TRX(dim=8, num_frames=5, proj_dim=6).eval()
    support, query = episodes(3, 4, 2, 3, 5, 8, seed=2)
    with torch.no_grad():
        direct = head(support, query)
        monkeypatch.setattr(_CrossTransformer, "PROTOTYPE_BUDGET", 0)  # force the Gram-matrix form
        gram = head(support, query)
    torch.testing.assert_close(direct, gram, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "head",
    [
        TRX(dim=8, num_frames=4, proj_dim=6, cardinalities=(2, 3), shared_key_query=False),
        TRX(dim=8, num_frames=4, proj_dim=6, combine="norm"),
        OTAM(dim=8, num_frames=4, bidirectional=True),
    ],
    ids=["trx_2_3_own_query_map", "trx_norm", "otam_mean_distance"],
)
def test_the_pairwise_form_gives_the_episodes_direct_logits(head: EpisodeClassifier, monkeypatch):
    """Heads whose logits factor into (query, support clip) terms are solved from a table of those
    terms, one row per pair; the table is used (match is never called) and the probabilities
    equal the direct form's, with two query views and shots drawn in any order."""
    from mmfsar.fewshot import engine

    torch.manual_seed(0)
    head.eval()
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
    bank = torch.randn(10, 2, 4, 8)
    episodes = torch.stack([torch.randperm(10)[:9].view(3, 3) for _ in range(40)])  # 3-way 2-shot 1-query
    monkeypatch.setattr(engine, "PAIR_TABLE_BUDGET", 0)
    direct = engine.episode_probabilities(head, bank, episodes, 2, chunk=16)
    monkeypatch.setattr(engine, "PAIR_TABLE_BUDGET", 1 << 26)
    monkeypatch.setattr(engine, "PAIR_BLOCK", 700)  # several table blocks, several gathers per chunk
    monkeypatch.setattr(type(head), "match", lambda *a, **k: pytest.fail("the direct form ran"))
    pairwise = engine.episode_probabilities(head, bank, episodes, 2, chunk=16)
    torch.testing.assert_close(pairwise, direct, rtol=1e-5, atol=1e-6)


def test_trx_pair_table_holds_each_shots_prototype_and_its_attention_mass():
    """One support clip's row: its tuples' values mixed by the softmax over its own tuples, and the
    log of that softmax's normaliser; two shots combine by a softmax of the normalisers."""
    torch.manual_seed(3)
    head = TRX(dim=4, num_frames=3, proj_dim=5, cardinalities=(2,), position_encoding=False).eval()
    ct = head.transformers[0]
    clips = torch.randn(3, 3, 4)
    with torch.no_grad():
        rows = head.embed(clips)
        table = head.pair_table(rows[:1], rows[1:])  # query 0, support clips 1 and 2
        assert [tuple(t.shape) for t in table] == [(1, 2, 3, 6)]  # per tuple: a prototype of 5, a log-normaliser
        tuples = list(itertools.combinations(range(3), 2))
        pair = lambda c: [torch.cat([clips[c, t] for t in tup]) for tup in tuples]  # noqa: E731
        query_keys = [ct.key_norm(ct.key(x)) for x in pair(0)]
        for s in (1, 2):
            keys = [ct.key_norm(ct.key(x)) for x in pair(s)]
            values = torch.stack([ct.value(x) for x in pair(s)])
            scores = torch.stack([torch.stack([q @ k for k in keys]) for q in query_keys]) / math.sqrt(5)
            expected = torch.cat([torch.softmax(scores, -1) @ values, torch.logsumexp(scores, -1, keepdim=True)], -1)
            torch.testing.assert_close(table[0][0, s - 1], expected, rtol=1e-5, atol=1e-6)
        pairs = torch.tensor([0, 1]).view(1, 1, 1, 2)  # 1 episode, 1 query, 1 class of 2 shots
        logits = head.match_pairs(table, pairs, rows[None, :1])
        support = clips[None, None, 1:]
        torch.testing.assert_close(logits, head(support, clips[None, :1]), rtol=1e-5, atol=1e-6)
    assert OTAM(shots="mean_frames").pair_width() is None

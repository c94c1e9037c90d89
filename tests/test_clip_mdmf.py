"""CLIP-MDMF's pieces: prompt selection, temporal views, fusion, OTAM, mutual distillation, the head."""

from __future__ import annotations

import math

import pytest
import torch

from mmfsar.models.clip_mdmf import (
    ClipMDMFHead,
    GlobalTemporalView,
    LocalTemporalView,
    PromptFrameFusion,
    _otam_distance,
    _otam_one_way,
    mutual_distillation_loss,
    select_prompts,
)


def _clip_on_circle(cosines: list[float], norms: list[float]) -> torch.Tensor:
    """Frames (T, 2) at angle acos(c) (first quadrant), of the given lengths."""
    return torch.tensor([[n * c, n * math.sqrt(1 - c * c)] for c, n in zip(cosines, norms)])


def test_prompt_scores_are_the_mean_of_the_top4_frame_similarities() -> None:
    first = [0.9, -0.2, 0.5, 0.7, 0.1, 0.3]
    second = [0.99, 0.98, 0.97, 0.96, 0.0, 0.0]
    norms = [1.0, 2.0, 0.5, 3.0, 1.5, 4.0]  # the scores are cosines: frame length must not matter
    frames = torch.stack([_clip_on_circle(first, norms), _clip_on_circle(second, norms)])[None]  # (1, 2, 6, 2)
    texts = torch.tensor([[[2.0, 0.0], [0.0, 0.5]]])  # class 0 along x, class 1 along y

    expected = []
    for cosines in (first, second):
        to_class0 = sorted(cosines)[-4:]
        to_class1 = sorted(math.sqrt(1 - c * c) for c in cosines)[-4:]
        expected.append([sum(to_class0) / 4, sum(to_class1) / 4])
    assert expected[0][0] == pytest.approx(0.6)  # 0.9, 0.7, 0.5, 0.3

    index, scores = select_prompts(frames, texts, topk=4, sample=False)
    torch.testing.assert_close(scores, torch.tensor([expected]), rtol=1e-5, atol=1e-6)
    assert index.tolist() == [[1, 0]]  # 0.949 > 0.6 for the first clip, 0.975 > 0.630 for the second
    shared_index, shared_scores = select_prompts(frames, texts[0], topk=4, sample=False)  # (C, D) texts
    assert torch.equal(shared_index, index) and torch.equal(shared_scores, scores)


def test_sampled_prompts_follow_softmax_of_200_times_the_scores() -> None:
    # One frame direction at angle a with sin(a) - cos(a) = ln(3)/200: s = (cos a, sin a), so
    # softmax(200 s) = (1/4, 3/4) exactly; at temperature 1 it is (1/(1+e^d), 1/(1+e^-d)) with d = ln(3)/200.
    gap = math.log(3) / 200
    angle = math.pi / 4 + math.asin(gap / math.sqrt(2))
    assert math.sin(angle) - math.cos(angle) == pytest.approx(gap)
    clips = 20000
    frames = torch.tensor([math.cos(angle), math.sin(angle)]).expand(1, clips, 4, 2)
    texts = torch.eye(2)[None]

    drawn, _ = select_prompts(frames, texts, sample=True, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (1, clips)
    assert drawn.float().mean().item() == pytest.approx(0.75, abs=0.015)  # std of the mean: 0.003
    again, _ = select_prompts(frames, texts, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)

    flat, _ = select_prompts(frames, texts, temperature=1.0, sample=True, generator=torch.Generator().manual_seed(1))
    assert flat.float().mean().item() == pytest.approx(1 / (1 + math.exp(-gap)), abs=0.015)

    best, _ = select_prompts(frames, texts, sample=False)
    assert bool((best == 1).all())


def test_prompt_selection_rejects_bad_shapes() -> None:
    frames = torch.randn(2, 3, 4, 8)
    with pytest.raises(ValueError, match="topk"):
        select_prompts(frames, torch.randn(2, 5, 8), topk=5, sample=False)
    with pytest.raises(ValueError, match="text dim"):
        select_prompts(frames, torch.randn(2, 5, 7), sample=False)
    with pytest.raises(ValueError, match="text_feats must be"):
        select_prompts(frames, torch.randn(3, 5, 8), sample=False)


@pytest.mark.parametrize(("view", "reach"), [(LocalTemporalView, 2), (GlobalTemporalView, 7)])
def test_temporal_views_see_exactly_their_receptive_field(view: type[torch.nn.Module], reach: int) -> None:
    torch.manual_seed(0)
    module = view(8)
    assert module.receptive_field == 2 * reach + 1
    frames, perturbed_frame = 20, 10
    x = torch.randn(2, frames, 8)
    y = x.clone()
    y[:, perturbed_frame] += torch.randn(2, 8)
    with torch.no_grad():
        before, after = module(x), module(y)
    assert before.shape == x.shape
    changed = ((after - before).abs().amax(dim=(0, 2)) > 1e-6).nonzero().flatten().tolist()
    assert changed == list(range(perturbed_frame - reach, perturbed_frame + reach + 1))
    with pytest.raises(ValueError, match=r"\(B, T, 8\)"):
        module(torch.randn(2, frames, 9))


def test_fusion_context_queries_the_prompted_frames() -> None:
    """Context token t only asks (output 1+t depends on it alone); frames and prompt are read by all."""
    torch.manual_seed(0)
    fusion = PromptFrameFusion(16, 4).eval()
    prompt, frames, context = torch.randn(3, 16), torch.randn(3, 6, 16), torch.randn(3, 6, 16)
    with torch.no_grad():
        base = fusion(prompt, frames, context)
        assert base.shape == (3, 7, 16)

        def changed_tokens(**change: torch.Tensor) -> list[int]:
            inputs = {"prompt": prompt, "frames": frames, "context": context, **change}
            out = fusion(**inputs)
            return ((out - base).abs().amax(dim=(0, 2)) > 1e-6).nonzero().flatten().tolist()

        new_context = context.clone()
        new_context[:, 2] += torch.randn(3, 16)
        assert changed_tokens(context=new_context) == [3]
        new_frames = frames.clone()
        new_frames[:, 2] += torch.randn(3, 16)  # random: LayerNorm would cancel a constant shift
        assert changed_tokens(frames=new_frames) == list(range(7))
        assert changed_tokens(prompt=prompt + torch.randn(3, 16)) == list(range(7))
    with pytest.raises(ValueError, match="prompt must be"):
        fusion(torch.randn(2, 16), frames, context)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_mutual_distillation_teacher_weight_and_kl_by_hand() -> None:
    # query 0: the local view agrees more with the text (0.6 > 0.5) and teaches the global view;
    # query 1: the global view does (0.45 > 0.2).
    p_local = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]], requires_grad=True)
    p_global = torch.tensor([[0.4, 0.4, 0.2], [0.1, 0.8, 0.1]], requires_grad=True)
    agree_local, agree_global = torch.tensor([0.6, 0.2]), torch.tensor([0.5, 0.45])

    result = mutual_distillation_loss(p_local, p_global, agree_local, agree_global)
    kl0 = _kl([0.7, 0.2, 0.1], [0.4, 0.4, 0.2])
    kl1 = _kl([0.1, 0.8, 0.1], [0.3, 0.3, 0.4])
    w0, w1 = 0.7 + 0.6, 0.8 + 0.45  # teacher's max probability + its text agreement
    assert result.local_is_teacher.tolist() == [True, False]
    torch.testing.assert_close(result.weight, torch.tensor([w0, w1]))
    torch.testing.assert_close(result.kl, torch.tensor([kl0, kl1]))
    assert result.loss.item() == pytest.approx((w0 * kl0 + w1 * kl1) / (w0 + w1), rel=1e-5)

    result.loss.backward()  # only the student side of each query receives a gradient
    assert p_local.grad[0].abs().sum() == 0 and p_global.grad[0].abs().sum() > 0
    assert p_global.grad[1].abs().sum() == 0 and p_local.grad[1].abs().sum() > 0

    only_local = mutual_distillation_loss(p_local, p_global, agree_local, agree_global, teachers="local")
    assert only_local.loss.item() == pytest.approx(kl0, rel=1e-5)
    low, high = torch.tensor([0.1, 0.1]), torch.tensor([0.9, 0.9])
    nobody = mutual_distillation_loss(p_local, p_global, low, high, teachers="local")
    assert nobody.loss.item() == 0  # the global view teaches both queries: no local teacher to count
    tie = mutual_distillation_loss(p_local, p_global, agree_local, agree_local)
    assert tie.local_is_teacher.tolist() == [True, True]


def test_mutual_distillation_rejects_bad_input() -> None:
    p = torch.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="text_agreement_global"):
        mutual_distillation_loss(p, p, torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="one shape"):
        mutual_distillation_loss(p, p[:, :2], torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="teachers"):
        mutual_distillation_loss(p, p, torch.ones(2), torch.ones(2), teachers="student")


def _hard_otam(dist: list[list[float]]) -> float:
    """OTAM's recurrence with a hard min, written out cell by cell (zero column on each side)."""
    rows, cols = len(dist), len(dist[0]) + 2
    padded = [[0.0, *row, 0.0] for row in dist]
    gamma = [[0.0] * cols for _ in range(rows)]
    for m in range(1, cols):
        gamma[0][m] = gamma[0][m - 1] + padded[0][m]
    for l in range(1, rows):
        gamma[l][0] = gamma[l - 1][0]
        for m in range(1, cols):
            options = [gamma[l - 1][m - 1], gamma[l][m - 1]]
            if m == cols - 1:
                options.append(gamma[l - 1][m])
            gamma[l][m] = padded[l][m] + min(options)
    return gamma[-1][-1]


def test_otam_recurrence_by_hand() -> None:
    # 2x2 closed form: min(a + b, d + min(a, c)) with a=.5, b=.1, c=.2, d=.3 -> 0.5
    assert _hard_otam([[0.5, 0.1], [0.2, 0.3]]) == pytest.approx(0.5)
    torch.manual_seed(0)
    dist = torch.rand(2, 3, 4) * 2  # a batch of two 3x4 cost matrices
    soft = _otam_one_way(dist, smoothing=1e-4)
    for b in range(2):
        assert soft[b].item() == pytest.approx(_hard_otam(dist[b].tolist()), abs=1e-3)
    # the smooth minimum is below the hard one
    assert bool((_otam_one_way(dist, smoothing=0.5) < soft).all())

    q, s = torch.randn(5, 8, 6), torch.randn(5, 8, 6)
    cost = 1 - torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(s, dim=-1).transpose(1, 2)
    both = _otam_distance(q, s, smoothing=0.1, bidirectional=True)
    one_way = _otam_distance(q, s, smoothing=0.1, bidirectional=False)
    torch.testing.assert_close(one_way, _otam_one_way(cost, 0.1))
    torch.testing.assert_close(both, 0.5 * (_otam_one_way(cost, 0.1) + _otam_one_way(cost.transpose(1, 2), 0.1)))


E, N, K, Q, T, D = 2, 3, 2, 4, 8, 16


def _episode(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    support = torch.randn(E, N, K, T, D, generator=generator)
    query = torch.randn(E, Q, T, D, generator=generator)
    text = torch.randn(E, N, D, generator=generator)
    return support, query, text


def test_head_outputs_and_consistency() -> None:
    torch.manual_seed(0)
    # a low prompt temperature: sampling would scatter the prompts, eval mode must take the argmax
    head = ClipMDMFHead(dim=D, heads=4, prompt_temperature=1.0).eval()
    support, query, text = _episode()
    with torch.no_grad():
        out = head(support, query, support_text=text)
    assert out["logits"].shape == (E, Q, N) and out["kd_loss"].shape == ()
    torch.testing.assert_close(out["logits"], -(out["distance_local"] + out["distance_global"]))
    _, scores = select_prompts(query, text, sample=False)
    torch.testing.assert_close(out["prompt_scores"], scores)
    assert torch.equal(out["prompt_index"], scores.argmax(dim=-1))
    agreement = out["text_agreement"]
    assert bool(((agreement >= 1 / N - 1e-6) & (agreement <= 1)).all())
    expected_kd = mutual_distillation_loss(
        torch.softmax(-out["distance_local"], dim=-1),
        torch.softmax(-out["distance_global"], dim=-1),
        agreement[..., 0],
        agreement[..., 1],
    )
    torch.testing.assert_close(out["kd_loss"], expected_kd.loss)
    assert out["kd_loss"].item() >= 0


def test_head_assembles_its_pieces_as_documented() -> None:
    """Recompute the eval-mode logits clip by clip from the head's own modules: support clips are
    prompted with their class text, the query with its best-scoring class text; prototypes are the
    mean over shots of the fused frames; logits = -(OTAM_local + OTAM_global)."""
    torch.manual_seed(3)
    head = ClipMDMFHead(dim=D, heads=4).eval()
    support, query, text = _episode(3)
    with torch.no_grad():
        logits = head(support, query, support_text=text)["logits"]
        expected = torch.zeros(E, Q, N)
        for e in range(E):
            _, scores = select_prompts(query[e], text[e], sample=False)
            for view, fusion in ((head.local_view, head.local_fusion), (head.global_view, head.global_fusion)):

                def fused_frames(clip: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
                    return fusion(prompt[None], clip[None], view(clip[None]))[0, 1:]

                prototypes = [
                    sum(fused_frames(support[e, n, k], text[e, n]) for k in range(K)) / K for n in range(N)
                ]
                for q in range(Q):
                    fused_query = fused_frames(query[e, q], text[e, int(scores[q].argmax())])
                    for n in range(N):
                        expected[e, q, n] -= _otam_distance(fused_query, prototypes[n], smoothing=0.1).item()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_head_is_invariant_to_shot_order_and_equivariant_to_class_order() -> None:
    torch.manual_seed(1)
    head = ClipMDMFHead(dim=D, heads=4).eval()
    support, query, text = _episode(1)
    with torch.no_grad():
        base = head(support, query, support_text=text)["logits"]
        shuffled_shots = head(support.flip(2), query, support_text=text)["logits"]
        order = torch.tensor([2, 0, 1])
        permuted = head(support[:, order], query, support_text=text[:, order])["logits"]
    torch.testing.assert_close(shuffled_shots, base, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(permuted, base[..., order], rtol=1e-4, atol=1e-5)


def test_head_trains_with_sampled_prompts() -> None:
    torch.manual_seed(2)
    head = ClipMDMFHead(dim=D, heads=4).train()
    support, query, text = _episode(2)
    support.requires_grad_(True)
    first = head(support, query, support_text=text, generator=torch.Generator().manual_seed(5))
    second = head(support, query, support_text=text, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first["prompt_index"], second["prompt_index"])
    labels = torch.arange(N).repeat_interleave(Q // N + 1)[:Q].expand(E, Q)
    loss = torch.nn.functional.cross_entropy(first["logits"].reshape(-1, N), labels.reshape(-1)) + first["kd_loss"]
    loss.backward()
    assert support.grad is not None and support.grad.abs().sum() > 0
    assert head.local_view.conv1.weight.grad.abs().sum() > 0 and head.global_fusion.mlp[0].weight.grad.abs().sum() > 0


def test_head_rejects_bad_shapes() -> None:
    head = ClipMDMFHead(dim=D, heads=4)
    support, query, text = _episode()
    with pytest.raises(ValueError, match="support_text"):
        head(support, query, support_text=text[:, :2])
    with pytest.raises(ValueError, match="query must be"):
        head(support, query[..., :4, :], support_text=text)
    with pytest.raises(ValueError, match="support must be"):
        head(support[..., :8], query, support_text=text)
    with pytest.raises(ValueError, match="kd_teachers"):
        ClipMDMFHead(dim=D, kd_teachers="nobody")

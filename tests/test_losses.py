"""Distillation loss terms: plain functions against hand values, terms on hand-made batches."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mmfsar.losses.distill import (
    Contrastive,
    CrossEntropy,
    DistillBatch,
    DistillSpec,
    LogitKD,
    Relation,
    TranslationMSE,
    info_nce,
    logit_kd,
    relation_loss,
    translation_mse,
)
from mmfsar.models.base import EncoderOutput

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "distill" / "loss"


def output(pooled: torch.Tensor, logits: torch.Tensor | None = None) -> EncoderOutput:
    return EncoderOutput(pooled=pooled, frames=pooled.unsqueeze(1), logits=logits)


def make_batch(
    spec: DistillSpec, labels: list[int], *, seed: int = 0, logits_from: str | None = None
) -> DistillBatch:
    gen = torch.Generator().manual_seed(seed)
    b = len(labels)
    student = output(
        torch.randn(b, spec.student_dim, generator=gen, requires_grad=False).requires_grad_()
    )
    teachers = {}
    for name, dim in spec.teacher_dims.items():
        logits = torch.randn(b, spec.num_classes, generator=gen) if name == logits_from else None
        teachers[name] = output(torch.randn(b, dim, generator=gen), logits)
    return DistillBatch(
        student=student, teachers=teachers, labels=torch.tensor(labels, dtype=torch.long)
    )


SPEC = DistillSpec(student_dim=6, teacher_dims={"rgb": 6, "flow": 4}, num_classes=3)


# --------------------------------------------------------------------------- logit KD


def test_logit_kd_equals_hand_value():
    # z_t / T = [ln 3, 0] -> p_t = [3/4, 1/4]; z_s = 0 -> p_s = [1/2, 1/2]
    temperature = 2.0
    teacher = torch.tensor([[temperature * math.log(3.0), 0.0]], dtype=torch.float64)
    student = torch.zeros(1, 2, dtype=torch.float64)
    expected = temperature**2 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert logit_kd(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-12)


def test_logit_kd_is_zero_for_equal_logits():
    logits = torch.randn(5, 7, dtype=torch.float64)
    assert logit_kd(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-12)


def test_logit_kd_scales_with_t_squared():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    teacher = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    # scaling logits and T together keeps the distributions, so only the T^2 factor moves
    base = logit_kd(student, teacher, 1.5)
    assert logit_kd(3 * student, 3 * teacher, 4.5).item() == pytest.approx(
        9 * base.item(), rel=1e-10
    )
    # for large T, T^2 * KL -> sum_c (d_c - mean d)^2 / (2C) with d = z_t - z_s: T-independent
    diff = teacher - student
    limit = ((diff - diff.mean(dim=1, keepdim=True)) ** 2).sum(dim=1).mean() / (2 * diff.shape[1])
    for temperature in (200.0, 2000.0):
        assert logit_kd(student, teacher, temperature).item() == pytest.approx(
            limit.item(), rel=2e-2
        )


def test_logit_kd_term_on_labelled_clips_only():
    spec = DistillSpec(student_dim=4, teacher_dims={"fusion": 4}, num_classes=3)
    term = LogitKD(spec=spec, temperature=4.0)
    batch = make_batch(spec, [0, -1, 2, 1], logits_from="fusion")
    # teacher logits = the term's own head applied to the student feature -> zero loss
    with torch.no_grad():
        batch.teachers["fusion"].logits = term.head(batch.student.pooled)
    assert term(batch).item() == pytest.approx(0.0, abs=1e-6)
    batch.teachers["fusion"].logits[1, 0] += 10.0  # unlabelled clip: ignored
    assert term(batch).item() == pytest.approx(0.0, abs=1e-6)
    batch.teachers["fusion"].logits[0, 0] += 10.0
    expected = logit_kd(
        term.head(batch.student.pooled[[0, 2, 3]]), batch.teachers["fusion"].logits[[0, 2, 3]], 4.0
    )
    assert term(batch).item() == pytest.approx(expected.item(), rel=1e-6) and expected.item() > 0.1
    term_all = LogitKD(spec=spec, labelled_only=False)
    term_all.load_state_dict(term.state_dict())
    everything = logit_kd(term.head(batch.student.pooled), batch.teachers["fusion"].logits, 4.0)
    assert term_all(batch).item() == pytest.approx(everything.item(), rel=1e-6)
    assert everything.item() != pytest.approx(expected.item(), rel=1e-2)


def test_logit_kd_picks_teacher_or_says_why_not():
    spec = DistillSpec(student_dim=4, teacher_dims={"rgb": 4, "flow": 4}, num_classes=3)
    batch = make_batch(spec, [0, 1, 2])
    with pytest.raises(ValueError, match="none of the teachers has logits"):
        LogitKD(spec=spec)(batch)
    batch.teachers["rgb"].logits = torch.randn(3, 3)
    batch.teachers["flow"].logits = torch.randn(3, 3)
    with pytest.raises(ValueError, match="several teachers"):
        LogitKD(spec=spec)(batch)
    assert torch.isfinite(LogitKD(spec=spec, teacher="flow")(batch))
    with pytest.raises(ValueError, match="unknown teachers"):
        LogitKD(spec=spec, teacher="depth")
    with pytest.raises(ValueError, match="num_classes"):
        LogitKD(spec=DistillSpec(student_dim=4, teacher_dims={"rgb": 4}, num_classes=0))


# --------------------------------------------------------------------------- relation


def test_relation_zero_for_identical_positive_for_different():
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(6, 8, generator=gen)
    assert relation_loss(feats, feats.clone(), tau=8.0).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(6, 8, generator=gen)
    assert relation_loss(feats, other, tau=8.0).item() > 0.05


def test_relation_invariances_are_the_distance_ones():
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    teacher = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    base = relation_loss(student, teacher, tau=8.0).item()
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    moved = teacher @ rotation + torch.randn(1, 6, generator=gen, dtype=torch.float64)
    assert relation_loss(student, moved, tau=8.0).item() == pytest.approx(base, abs=1e-5)
    # not scale-invariant: tau fixes the scale of the distances
    assert abs(relation_loss(3 * student, 3 * teacher, tau=8.0).item() - base) > 1e-2


def test_relation_degenerate_inputs():
    eye = torch.eye(4)  # all items equidistant: constant rows, still "identical relations"
    assert relation_loss(eye, eye.clone(), tau=8.0).item() == pytest.approx(0.0, abs=1e-7)
    two = torch.randn(2, 3, requires_grad=True)  # one entry per row: nothing to transfer
    loss = relation_loss(two, torch.randn(2, 3), tau=8.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(two.grad, torch.zeros_like(two))
    coinciding = torch.zeros(4, 3, requires_grad=True)  # flat student rows, varied teacher rows
    loss = relation_loss(coinciding, torch.randn(4, 3), tau=8.0)
    loss.backward()
    assert loss.item() == pytest.approx(1.0, abs=1e-6) and torch.isfinite(coinciding.grad).all()


def test_relation_term_uses_class_prototypes_and_averages_teachers():
    spec = DistillSpec(student_dim=5, teacher_dims={"rgb": 5, "flow": 3}, num_classes=4)
    labels = [0, 0, 1, 2, 2, -1, 3]
    batch = make_batch(spec, labels, seed=4)
    groups = [[0, 1], [2], [3, 4], [6]]  # clip 5 is unlabelled

    def protos(x):
        return torch.stack([x[g].mean(0) for g in groups])

    expected = 0.5 * sum(
        relation_loss(protos(batch.student.pooled), protos(batch.teachers[n].pooled), 8.0)
        for n in ("rgb", "flow")
    )
    assert Relation(spec=spec)(batch).item() == pytest.approx(expected.item(), rel=1e-5)
    samples = Relation(spec=spec, over="samples", teachers=["flow"])(batch)
    expected_samples = relation_loss(batch.student.pooled, batch.teachers["flow"].pooled, 8.0)
    assert samples.item() == pytest.approx(expected_samples.item(), rel=1e-5)


def test_relation_samples_mode_needs_no_labels():
    spec = DistillSpec(student_dim=5, teacher_dims={"rgb": 5}, num_classes=0)
    batch = make_batch(spec, [-1] * 5, seed=5)
    assert Relation(spec=spec, over="samples")(batch).item() > 0
    assert Relation(spec=spec)(batch).item() == 0.0


# --------------------------------------------------------------------------- translation MSE


def identity_translator(term: TranslationMSE, name: str) -> None:
    first, _, second = term.translators[name]
    with torch.no_grad():
        for layer in (first, second):
            layer.weight.copy_(torch.eye(*layer.weight.shape))
            layer.bias.zero_()


def test_translation_mse_zero_when_translation_exact_and_hand_value_otherwise():
    spec = DistillSpec(student_dim=4, teacher_dims={"rgb": 4, "pose": 2}, num_classes=0)
    term = TranslationMSE(spec=spec, teachers=["rgb"])
    identity_translator(term, "rgb")
    student = torch.rand(3, 4) + 0.1  # positive: the ReLU passes it unchanged
    batch = DistillBatch(
        student=output(student),
        teachers={"rgb": output(student.clone()), "pose": output(torch.zeros(3, 2))},
        labels=torch.full((3,), -1),
    )
    assert term(batch).item() == pytest.approx(0.0, abs=1e-7)
    batch.teachers["rgb"] = output(student + 1.0)
    assert term(batch).item() == pytest.approx(1.0, rel=1e-6)

    both = TranslationMSE(spec=spec)
    identity_translator(both, "rgb")
    with torch.no_grad():  # g_pose(x) = [2, -1] whatever x: MSE against 0 is (4 + 1) / 2
        both.translators["pose"][2].weight.zero_()
        both.translators["pose"][2].bias.copy_(torch.tensor([2.0, -1.0]))
    assert both(batch).item() == pytest.approx(1.0 + 2.5, rel=1e-6)
    assert translation_mse({"a": torch.ones(2, 3)}, {"a": torch.zeros(2, 3)}).item() == 1.0
    with pytest.raises(ValueError, match="same non-empty teachers"):
        translation_mse({"a": torch.ones(1)}, {"b": torch.ones(1)})


def test_translation_hidden_width_and_teacher_is_never_updated():
    spec = DistillSpec(student_dim=4, teacher_dims={"flow": 6}, num_classes=0)
    term = TranslationMSE(spec=spec, hidden=9)
    assert (
        term.translators["flow"][0].out_features == 9
        and term.translators["flow"][2].out_features == 6
    )
    batch = make_batch(spec, [-1, -1])
    batch.teachers["flow"].pooled.requires_grad_()
    term(batch).backward()
    assert batch.teachers["flow"].pooled.grad is None and batch.student.pooled.grad is not None
    with pytest.raises(KeyError, match="teacher 'flow' has no output"):
        term(DistillBatch(student=batch.student, teachers={}, labels=batch.labels))


# --------------------------------------------------------------------------- InfoNCE


def test_info_nce_aligned_orthogonal_is_zero_and_constant_is_log_b():
    eye = torch.eye(4)
    assert info_nce(eye, eye.clone(), temperature=0.01).item() == pytest.approx(0.0, abs=1e-6)
    constant = torch.ones(4, 3)
    assert info_nce(constant, 2 * constant, temperature=0.07).item() == pytest.approx(
        math.log(4), rel=1e-6
    )


def test_info_nce_is_the_symmetric_cross_entropy():
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).t() / 0.5
    target = torch.arange(5)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    assert info_nce(a, b, 0.5).item() == pytest.approx(expected.item(), rel=1e-6)
    assert info_nce(a, b, 0.5).item() != pytest.approx(
        F.cross_entropy(logits, target).item(), rel=1e-3
    )


def test_contrastive_term_trains_its_projections_only():
    term = Contrastive(spec=SPEC, proj_dim=8)
    batch = make_batch(SPEC, [-1, -1, -1, -1])
    for out in batch.teachers.values():
        out.pooled.requires_grad_()
    loss = term(batch)
    loss.backward()
    assert loss.item() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())
    assert all(out.pooled.grad is None for out in batch.teachers.values())
    assert set(term.student_proj) == set(term.teacher_proj) == {"rgb", "flow"}


# --------------------------------------------------------------------------- CE, no-label batches


def test_cross_entropy_ignores_unlabelled_clips():
    term = CrossEntropy(spec=SPEC)
    batch = make_batch(SPEC, [2, -1, 0, -1])
    expected = F.cross_entropy(term.head(batch.student.pooled[[0, 2]]), torch.tensor([2, 0]))
    assert term(batch).item() == pytest.approx(expected.item(), rel=1e-6)
    with torch.no_grad():
        batch.student.pooled[[1, 3]] += 100.0
    assert term(batch).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    "make_term",
    [
        lambda: CrossEntropy(spec=SPEC),
        lambda: LogitKD(spec=SPEC, teacher="rgb"),
        lambda: Relation(spec=SPEC),
        lambda: TranslationMSE(spec=SPEC),
        lambda: Contrastive(spec=SPEC, proj_dim=4),
    ],
    ids=["ce", "logit_kd", "relation", "translation", "contrastive"],
)
def test_every_parameter_gets_a_gradient_on_unlabelled_batches(make_term):
    term = make_term()
    batch = make_batch(SPEC, [-1, -1, -1, -1], logits_from="rgb")
    loss = term(batch)
    assert loss.dim() == 0
    loss.backward()
    assert batch.student.pooled.grad is not None
    for name, param in term.named_parameters():
        assert param.grad is not None, name
    if isinstance(term, (CrossEntropy, LogitKD, Relation)):
        assert loss.item() == 0.0
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in term.parameters())


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("config", "cls", "weight"),
    [
        ("translation_mse", TranslationMSE, 1.0),
        ("logit_kd", LogitKD, 1.0),
        ("relation", Relation, 0.5),
        ("contrastive", Contrastive, 1.0),
        ("ce", CrossEntropy, 1.0),
    ],
)
def test_configs_build_terms_once_dims_are_known(config, cls, weight):
    factory = instantiate(OmegaConf.load(CONFIGS / f"{config}.yaml"))
    term = factory(spec=SPEC)
    assert type(term) is cls and term.weight == weight
    batch = make_batch(SPEC, [0, 1, 2, -1, 1], logits_from="flow")
    loss = term.weight * term(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    if config == "logit_kd":
        assert term.temperature == 4.0


# --------------------------------------------------------------------------- Lite-MKD on episodes


def _episode_batch(student_kl, student_ce, support_ce, teacher_logits, teacher_support, target):
    from mmfsar.losses.distill import EpisodeDistillBatch

    return EpisodeDistillBatch(
        student_logits={"kl": torch.tensor(student_kl), "ce": torch.tensor(student_ce), "support_ce": torch.tensor(support_ce)},
        teacher_logits=torch.tensor(teacher_logits),
        teacher_support=torch.tensor(teacher_support),
        target=torch.tensor(target),
    )


def test_episode_kd_relation_and_ce_by_hand():
    from mmfsar.losses.distill import EpisodeCE, EpisodeKD, EpisodeRelation

    kl_logits = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    ce_logits = [[0.5, 0.0, 0.0], [0.0, 0.0, 1.0]]
    teacher = [[4.0, 0.0, 0.0], [0.0, 0.0, 4.0]]
    # support (N=3, K=2, T=2, D=1): prototypes (mean over shots) 0, 1, 3 at both frames (student),
    # 0, 2, 2 (teacher)
    student_support = [[[[0.0], [0.0]], [[0.0], [0.0]]], [[[1.0], [1.0]], [[1.0], [1.0]]], [[[2.0], [2.0]], [[4.0], [4.0]]]]
    teacher_support = [[[[0.0], [0.0]], [[0.0], [0.0]]], [[[2.0], [2.0]], [[2.0], [2.0]]], [[[2.0], [2.0]], [[2.0], [2.0]]]]
    batch = _episode_batch(kl_logits, ce_logits, student_support, teacher, teacher_support, [0, 2])

    T = 4.0  # T^2 * mean over queries of KL(p_teacher || p_student) at temperature T
    expected_kd = 0.0
    for s_row, t_row in zip(kl_logits, teacher):
        ps = [math.exp(v / T) for v in s_row]
        pt = [math.exp(v / T) for v in t_row]
        ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
        expected_kd += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    expected_kd = T * T * expected_kd / 2
    assert EpisodeKD(temperature=4.0)(batch).item() == pytest.approx(expected_kd, rel=1e-5)

    def relation_rows(protos):  # -‖P_c - P_c'‖² / tau over frames (T=2, tau=2), softmax over c' != c
        rows = []
        for c, p in enumerate(protos):
            scores = [-(2 * (p - q) ** 2) / 2 for j, q in enumerate(protos) if j != c]
            e = [math.exp(v) for v in scores]
            rows.append([v / sum(e) for v in e])
        return rows

    def pearson(a, b):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
        return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))

    s_rows, t_rows = relation_rows([0.0, 1.0, 3.0]), relation_rows([0.0, 2.0, 2.0])
    # the teacher's last two prototypes coincide: its rows 1 and 2 are not constant, row 0 is
    expected_relation = 1 - sum(pearson(a, b) if max(b) - min(b) > 1e-12 else 0.0 for a, b in zip(s_rows, t_rows)) / 3
    assert EpisodeRelation()(batch).item() == pytest.approx(expected_relation, rel=1e-5)

    expected_ce = -(math.log(math.exp(0.5) / (math.exp(0.5) + 2)) + math.log(math.e / (math.e + 2))) / 2
    assert EpisodeCE()(batch).item() == pytest.approx(expected_ce, rel=1e-6)


def test_episode_feature_mse_by_hand_and_only_with_target_clips():
    from mmfsar.losses.distill import EpisodeFeatureMSE

    batch = _episode_batch([[0.0, 0.0]], [[0.0, 0.0]], [[[[0.0]]], [[[0.0]]]], [[0.0, 0.0]], [[[[0.0]]], [[[0.0]]]], [0])
    term = EpisodeFeatureMSE(weight=0.5)
    assert term.uses_unlabelled_target and term.weight == 0.5
    with pytest.raises(ValueError, match="distill.unlabelled_target=true"):
        term(batch)
    # 2 clips, 2 frames, 2 dims: squared differences 1, 0, 4, 0 | 0, 9, 0, 0 -> 14 / 8
    batch.unlabelled_student = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 3.0], [0.0, 0.0]]], requires_grad=True)
    batch.unlabelled_teacher = torch.zeros(2, 2, 2, requires_grad=True)
    loss = term(batch)
    assert loss.item() == pytest.approx(14 / 8)
    loss.backward()
    assert batch.unlabelled_teacher.grad is None  # the teacher's side is detached
    assert torch.allclose(batch.unlabelled_student.grad, 2 * batch.unlabelled_student.detach() / 8)


def test_two_branch_head_infers_with_the_sum_of_its_branches():
    from mmfsar.fewshot import PrototypeClassifier
    from mmfsar.fewshot.matching import TwoBranchHead

    head = TwoBranchHead(dim=2, num_frames=3, out_dim=2, head=PrototypeClassifier)
    with torch.no_grad():  # h1 = identity, h2 = doubles
        head.h1.weight.copy_(torch.eye(2))
        head.h1.bias.zero_()
        head.h2.weight.copy_(2 * torch.eye(2))
        head.h2.bias.zero_()
    support = torch.tensor([[[[[1.0, 0.0]] * 3], [[[0.0, 1.0]] * 3]]])  # (1, 2 ways, 1 shot, 3 frames, 2)
    query = torch.tensor([[[[1.0, 1.0]] * 3]])  # (1, 1, 3, 2)
    branches = head.branches(support, query)
    # h1: squared distances from (1, 1) to (1, 0) and (0, 1) are 1 and 1; h2 doubles them all: 4 and 4
    assert branches["kl"].tolist() == [[[-1.0, -1.0]]] and branches["ce"].tolist() == [[[-4.0, -4.0]]]
    assert torch.equal(head(support, query), branches["kl"] + branches["ce"])
    assert branches["support_ce"].shape == (1, 2, 1, 3, 2) and torch.equal(branches["support_ce"], 2 * support)
    assert torch.equal(head.teacher_space(support), support)  # h1: the kl branch's input

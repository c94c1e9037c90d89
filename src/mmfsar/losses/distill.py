"""Distillation loss terms: plug-ins that the distillation module sums.

A term is an ``nn.Module`` built once the feature sizes are known (``factory(spec=...)``, the
configs in ``configs/distill/loss/`` are ``_partial_``) and called on a :class:`DistillBatch`;
it returns its *unweighted* scalar, and the module adds ``term.weight * term(batch)``. Each term
owns the trainable parameters it needs (translation MLPs, projection and classifier heads), so
choosing a term in the config is all it takes for them to be optimised.

Every term also exists as a plain function on tensors (``translation_mse``, ``logit_kd``,
``relation_loss``, ``info_nce``), which is what the tests check against hand-computed values.

Teachers are frozen: their features are detached here as well, so no term can leak a gradient
into a teacher even if it was built without ``requires_grad_(False)``. Terms that use labels
look only at clips with ``label >= 0``; on a batch without any, they return a zero that still
depends on all their parameters, so every parameter receives a (zero) gradient and DDP never
sees an unused parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfsar.models.base import EncoderOutput

__all__ = [
    "DistillSpec",
    "DistillBatch",
    "DistillTerm",
    "TranslationMSE",
    "LogitKD",
    "Relation",
    "Contrastive",
    "CrossEntropy",
    "EpisodeCE",
    "EpisodeDistillBatch",
    "EpisodeKD",
    "EpisodeRelation",
    "EpisodeTerm",
    "EpisodeFeatureMSE",
    "translation_mse",
    "logit_kd",
    "relation_matrix",
    "relation_loss",
    "info_nce",
]


@dataclass
class DistillSpec:
    """Sizes a term needs to build its parameters."""

    student_dim: int
    teacher_dims: dict[str, int]  # teacher name -> feature dim
    num_classes: int  # base classes (0 if no labelled data)


@dataclass
class DistillBatch:
    """What every term sees for one training step."""

    student: EncoderOutput
    teachers: dict[str, EncoderOutput]
    labels: Tensor  # (B,) long, -1 = unlabelled clip


# --------------------------------------------------------------------------- plain functions


def translation_mse(pred: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
    """MM-CDFSL's loss: sum over teachers of the MSE (mean over batch and dims) between the
    student feature translated into teacher m's space and teacher m's feature. Equal weights,
    a sum (not a mean), as in the paper, so adding a teacher adds a term."""
    if set(pred) != set(target) or not pred:
        raise ValueError(
            "translation_mse needs the same non-empty teachers, "
            f"got {sorted(pred)} and {sorted(target)}"
        )
    return sum(F.mse_loss(pred[name], target[name]) for name in sorted(pred))


def logit_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton / Lite-MKD knowledge distillation: ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``,
    averaged over the batch. The ``T²`` keeps the gradient's size independent of ``T``: for
    large ``T`` the loss tends to ``Σ_c (d_c − mean d)² / (2C)`` with ``d = z_t − z_s``."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and "
            f"teacher logits {tuple(teacher_logits.shape)} differ"
        )
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def relation_matrix(feats: Tensor, tau: float) -> Tensor:
    """Lite-MKD's relation rows: ``S[c, c'] = −‖P_c − P_c'‖² / τ`` for ``c ≠ c'``, each
    row softmaxed over the other items. Returns ``(N, N−1)``: row ``c`` without its diagonal.

    Depends only on pairwise distances, so it is invariant to translating or rotating all the
    features, but not to scaling them (``τ`` sets the scale).
    """
    n = feats.shape[0]
    feats = feats.float()
    sq_norms = feats.pow(2).sum(dim=-1)
    # expanded form: no sqrt, so the gradient stays finite where two items coincide
    dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * feats @ feats.t()).clamp_min(0.0)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=feats.device)
    scores = (-dist / tau)[off_diagonal].view(n, n - 1)
    return scores.softmax(dim=-1)


def relation_loss(
    student_feats: Tensor, teacher_feats: Tensor, tau: float, eps: float = 1e-8
) -> Tensor:
    """``1 − mean over rows of Pearson(student row, teacher row)`` of the relation matrices.

    The feature dims may differ (only distances are compared). With fewer than three items a
    row has a single entry (always 1 after the softmax), so there is no relation to transfer
    and the loss is zero. A row that is constant in both (all items equidistant) counts as
    perfectly correlated, so identical inputs always give exactly zero.
    """
    if student_feats.shape[0] != teacher_feats.shape[0]:
        raise ValueError(
            f"relation_loss needs as many student ({student_feats.shape[0]}) "
            f"as teacher ({teacher_feats.shape[0]}) items"
        )
    if student_feats.shape[0] < 3:
        return 0.0 * student_feats.sum()
    rows_s = relation_matrix(student_feats, tau)
    rows_t = relation_matrix(teacher_feats, tau)
    centred_s = rows_s - rows_s.mean(dim=-1, keepdim=True)
    centred_t = rows_t - rows_t.mean(dim=-1, keepdim=True)
    norm_s = centred_s.norm(dim=-1)
    norm_t = centred_t.norm(dim=-1)
    covariance = (centred_s * centred_t).sum(dim=-1)
    pearson = covariance / (norm_s.clamp_min(eps) * norm_t.clamp_min(eps))
    both_constant = (norm_s < eps) & (norm_t < eps)
    pearson = torch.where(both_constant, torch.ones_like(pearson), pearson)
    return 1.0 - pearson.mean()


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE (CLIP / MMCL): ``a[i]`` and ``b[i]`` are the positive pair, the other
    clips of the batch the negatives; cosine similarities divided by ``temperature``, mean of
    the a→b and b→a cross-entropies. Equals ``log B`` when all features are the same."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"info_nce needs paired batches, got {a.shape[0]} and {b.shape[0]} rows")
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    logits = a @ b.t() / temperature
    targets = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


# --------------------------------------------------------------------------- terms


class DistillTerm(nn.Module):
    """Base of the loss terms: keeps the spec and the weight the module multiplies with.

    Subclasses implement ``forward(batch) -> unweighted scalar``.
    """

    def __init__(self, *, spec: DistillSpec, weight: float = 1.0) -> None:
        super().__init__()
        self.spec = spec
        self.weight = float(weight)

    def forward(self, batch: DistillBatch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _select_teachers(self, teachers: Sequence[str] | None) -> list[str]:
        """The named teachers (default: all of the spec's), checked against the spec."""
        available = list(self.spec.teacher_dims)
        chosen = list(available if teachers is None else teachers)
        unknown = [name for name in chosen if name not in self.spec.teacher_dims]
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: unknown teachers {unknown}; the run has {available}"
            )
        if not chosen:
            raise ValueError(
                f"{type(self).__name__} needs at least one teacher; the run has {available}"
            )
        return chosen

    def _needs_classes(self) -> int:
        if self.spec.num_classes <= 0:
            raise ValueError(
                f"{type(self).__name__} trains a classifier head and needs labelled base classes "
                "(spec.num_classes is 0); drop this term or distil on labelled clips"
            )
        return self.spec.num_classes

    @staticmethod
    def _teacher(batch: DistillBatch, name: str) -> EncoderOutput:
        if name not in batch.teachers:
            raise KeyError(
                f"teacher {name!r} has no output in this batch; "
                f"teachers present: {sorted(batch.teachers)}"
            )
        return batch.teachers[name]

    def _zero(self, batch: DistillBatch) -> Tensor:
        """A zero that depends on every parameter of the term and on the student's feature."""
        total = 0.0 * batch.student.pooled.float().sum()
        for param in self.parameters():
            total = total + 0.0 * param.sum()
        return total


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


def _detached(feats: Tensor, like: Tensor) -> Tensor:
    return feats.detach().to(like.dtype)


class TranslationMSE(DistillTerm):
    """MM-CDFSL stage 2: a translation MLP ``g_m`` per teacher maps the student's pooled feature
    into teacher m's space; loss ``Σ_m MSE(g_m(f_s), f_m)``. Needs no labels.

    Args:
        teachers: which teachers to translate to (default: all).
        hidden: width of ``g_m``'s hidden layer (default: the teacher's dim, as in the paper).
    """

    def __init__(
        self,
        *,
        spec: DistillSpec,
        weight: float = 1.0,
        teachers: Sequence[str] | None = None,
        hidden: int | None = None,
    ) -> None:
        super().__init__(spec=spec, weight=weight)
        self.teachers = self._select_teachers(teachers)
        self.translators = nn.ModuleDict(
            {
                name: _mlp(
                    spec.student_dim, hidden or spec.teacher_dims[name], spec.teacher_dims[name]
                )
                for name in self.teachers
            }
        )

    def forward(self, batch: DistillBatch) -> Tensor:
        student = batch.student.pooled
        pred = {name: self.translators[name](student) for name in self.teachers}
        target = {
            name: _detached(self._teacher(batch, name).pooled, pred[name]) for name in self.teachers
        }
        return translation_mse(pred, target)


class LogitKD(DistillTerm):
    """Lite-MKD / Hinton KD: the term's own linear head gives the student logits, which are
    pulled towards the teacher's base-class logits (softened by ``temperature``).

    Args:
        temperature: ``T`` (Lite-MKD: 4).
        teacher: whose logits to use; default: the single teacher whose output has logits.
        labelled_only: use only clips with a label (Lite-MKD); ``False`` distils on all clips,
            since teacher logits exist for unlabelled clips too.
    """

    def __init__(
        self,
        *,
        spec: DistillSpec,
        weight: float = 1.0,
        temperature: float = 4.0,
        teacher: str | None = None,
        labelled_only: bool = True,
    ) -> None:
        super().__init__(spec=spec, weight=weight)
        if temperature <= 0:
            raise ValueError(f"LogitKD temperature must be positive, got {temperature}")
        if teacher is not None:
            self._select_teachers([teacher])
        self.temperature = float(temperature)
        self.teacher = teacher
        self.labelled_only = labelled_only
        self.head = nn.Linear(spec.student_dim, self._needs_classes())

    def _teacher_logits(self, batch: DistillBatch) -> Tensor:
        if self.teacher is not None:
            logits = self._teacher(batch, self.teacher).logits
            if logits is None:
                raise ValueError(
                    f"LogitKD: teacher {self.teacher!r} has no logits "
                    "(it was exported without a classifier head)"
                )
            return logits
        with_logits = [name for name, out in batch.teachers.items() if out.logits is not None]
        if len(with_logits) != 1:
            problem = (
                "none of the teachers has logits"
                if not with_logits
                else f"several teachers have logits {sorted(with_logits)}"
            )
            raise ValueError(
                f"LogitKD: {problem}; name one with `teacher=` "
                f"(teachers: {sorted(batch.teachers)}), "
                "and make sure its encoder was pretrained with a classifier head"
            )
        return batch.teachers[with_logits[0]].logits

    def forward(self, batch: DistillBatch) -> Tensor:
        teacher_logits = self._teacher_logits(batch)
        if teacher_logits.shape[-1] != self.head.out_features:
            raise ValueError(
                f"LogitKD: teacher logits have {teacher_logits.shape[-1]} classes, "
                f"the student head {self.head.out_features} (spec.num_classes)"
            )
        student_logits = self.head(batch.student.pooled)
        keep = (
            batch.labels >= 0
            if self.labelled_only
            else torch.ones_like(batch.labels, dtype=torch.bool)
        )
        if not bool(keep.any()):
            return self._zero(batch)
        return logit_kd(
            student_logits[keep].float(), teacher_logits[keep].detach().float(), self.temperature
        )


class Relation(DistillTerm):
    """Lite-MKD's relation distillation: the student's matrix of (softmaxed) negative squared
    distances between class prototypes should correlate with the teacher's, averaged over
    teachers. Transfers the geometry between classes, not the features themselves, so the
    student's and teachers' feature dims may differ and no parameters are needed.

    Args:
        tau: distance scale ``τ`` (Lite-MKD: 8).
        over: ``"prototypes"`` (class means of the labelled clips of the batch, Lite-MKD) or
            ``"samples"`` (every clip, which works without labels).
        teachers: which teachers (default: all).
    """

    def __init__(
        self,
        *,
        spec: DistillSpec,
        weight: float = 1.0,
        tau: float = 8.0,
        over: Literal["prototypes", "samples"] = "prototypes",
        teachers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(spec=spec, weight=weight)
        if over not in ("prototypes", "samples"):
            raise ValueError(f"Relation: `over` must be 'prototypes' or 'samples', got {over!r}")
        self.tau = float(tau)
        self.over = over
        self.teachers = self._select_teachers(teachers)

    @staticmethod
    def _prototypes(feats: Tensor, labels: Tensor) -> Tensor:
        classes, index = torch.unique(labels, return_inverse=True)
        onehot = F.one_hot(index, num_classes=classes.numel()).to(feats.dtype)
        return (onehot.t() @ feats) / onehot.sum(dim=0).unsqueeze(1)

    def _items(self, feats: Tensor, labels: Tensor) -> Tensor:
        if self.over == "samples":
            return feats
        keep = labels >= 0
        if not bool(keep.any()):
            return feats[:0]
        return self._prototypes(feats[keep], labels[keep])

    def forward(self, batch: DistillBatch) -> Tensor:
        student = self._items(batch.student.pooled.float(), batch.labels)
        if student.shape[0] < 3:
            return self._zero(batch)
        losses = [
            relation_loss(
                student,
                self._items(self._teacher(batch, name).pooled.detach().float(), batch.labels),
                self.tau,
            )
            for name in self.teachers
        ]
        return torch.stack(losses).mean()


class Contrastive(DistillTerm):
    """MMCL / IKEM-style alignment: symmetric InfoNCE between the student's projected feature
    and each teacher's projected feature of the same clip, the rest of the batch as negatives,
    averaged over teachers. Needs no labels; unlike MSE it asks the student to tell clips apart
    the way the teacher does, not to reproduce the teacher's coordinates.

    Per teacher, the student side is an MLP (``student_dim → student_dim → proj_dim``) and the
    teacher side a linear map (``teacher_dim → proj_dim``); both belong to this term.

    Args:
        temperature: InfoNCE temperature (IKEM 0.07, MMCL 0.4).
        proj_dim: size of the shared projection space.
        teachers: which teachers (default: all).
    """

    def __init__(
        self,
        *,
        spec: DistillSpec,
        weight: float = 1.0,
        temperature: float = 0.07,
        proj_dim: int = 128,
        teachers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(spec=spec, weight=weight)
        if temperature <= 0:
            raise ValueError(f"Contrastive temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.teachers = self._select_teachers(teachers)
        self.student_proj = nn.ModuleDict(
            {name: _mlp(spec.student_dim, spec.student_dim, proj_dim) for name in self.teachers}
        )
        self.teacher_proj = nn.ModuleDict(
            {name: nn.Linear(spec.teacher_dims[name], proj_dim) for name in self.teachers}
        )

    def forward(self, batch: DistillBatch) -> Tensor:
        student = batch.student.pooled
        losses = []
        for name in self.teachers:
            teacher = _detached(self._teacher(batch, name).pooled, student)
            losses.append(
                info_nce(
                    self.student_proj[name](student),
                    self.teacher_proj[name](teacher),
                    self.temperature,
                )
            )
        return torch.stack(losses).mean()


class CrossEntropy(DistillTerm):
    """Supervised cross-entropy of the term's own linear head on the labelled clips (Lite-MKD's
    ``z_ce`` head, MMCL's ``fc``), so labelled source clips keep the student discriminative.

    Args:
        label_smoothing: passed to ``F.cross_entropy``.
    """

    def __init__(
        self, *, spec: DistillSpec, weight: float = 1.0, label_smoothing: float = 0.0
    ) -> None:
        super().__init__(spec=spec, weight=weight)
        self.label_smoothing = float(label_smoothing)
        self.head = nn.Linear(spec.student_dim, self._needs_classes())

    def forward(self, batch: DistillBatch) -> Tensor:
        keep = batch.labels >= 0
        if not bool(keep.any()):
            return self._zero(batch)
        logits = self.head(batch.student.pooled[keep]).float()
        return F.cross_entropy(logits, batch.labels[keep], label_smoothing=self.label_smoothing)


# --------------------------------------------------------------------------- episodic terms (Lite-MKD as published)


@dataclass
class EpisodeDistillBatch:
    """What the episodic distillation terms see for one N-way K-shot Q-query task.

    student_logits: the student head's branches (``TwoBranchHead.branches``): ``kl`` / ``ce`` query
        logits (Q, N) and ``support_ce``, the h2 support features (N, K, T, D).
    teacher_logits: the frozen teacher's query logits (Q, N) (its own matching head).
    teacher_support: the teacher's support features (N, K, T, D_t).
    target: each query's way (Q,).
    unlabelled_student / unlabelled_teacher: with ``distill.unlabelled_target``, a batch of
        unlabelled target-domain clips: the student's features in the teacher's space
        (``TwoBranchHead.teacher_space``, h1) and the teacher's features, (B, T, D_t) each.
    """

    student_logits: dict[str, Tensor]
    teacher_logits: Tensor
    teacher_support: Tensor
    target: Tensor
    unlabelled_student: Tensor | None = None
    unlabelled_teacher: Tensor | None = None


class EpisodeTerm(nn.Module):
    """Base of the episodic distillation terms: keeps the weight the module multiplies with;
    ``forward(batch: EpisodeDistillBatch) -> unweighted scalar``. A term with
    ``uses_unlabelled_target`` needs the batch's unlabelled target clips."""

    uses_unlabelled_target = False

    def __init__(self, *, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)


class EpisodeKD(EpisodeTerm):
    """Lite-MKD's query-level distillation: ``T² · KL(softmax(z_teacher/T) ‖ softmax(z_kl/T))``
    over the task's queries, the student's ``kl`` branch against the teacher's episode logits."""

    def __init__(self, *, weight: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__(weight=weight)
        if temperature <= 0:
            raise ValueError(f"EpisodeKD temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, batch: EpisodeDistillBatch) -> Tensor:
        return logit_kd(batch.student_logits["kl"].float(), batch.teacher_logits.detach().float(), self.temperature)


class EpisodeRelation(EpisodeTerm):
    """Lite-MKD's support-level distillation: the relations between the task's class prototypes
    (mean over shots of the support features, frames flattened), ``S[c, c'] = -‖P_c - P_c'‖² / τ``
    (c ≠ c'), row-softmaxed, of the student (h2 branch) should correlate with the teacher's:
    ``1 - mean_rows Pearson``. ``tau``: default the number of frames (the released code divides
    the squared Frobenius distance by the sequence length, 8)."""

    def __init__(self, *, weight: float = 0.5, tau: float | None = None) -> None:
        super().__init__(weight=weight)
        self.tau = tau

    def forward(self, batch: EpisodeDistillBatch) -> Tensor:
        student = batch.student_logits["support_ce"].float().mean(1)  # (N, T, D)
        teacher = batch.teacher_support.detach().float().mean(1)
        tau = float(self.tau if self.tau is not None else student.shape[1])
        return relation_loss(student.flatten(1), teacher.flatten(1), tau)


class EpisodeFeatureMSE(EpisodeTerm):
    """A cross-domain addition to Lite-MKD (not in the paper, which trains within one domain): on
    unlabelled target-domain clips, the student's per-frame features in the teacher's space (h1,
    the input of its ``kl`` branch) regress the teacher's, MSE averaged over clips, frames and dims.
    The query KD teaches h1 → head to reproduce the teacher's logits on source tasks; this makes
    h1 reproduce the teacher's features where there are no labels, so the head sees on the
    target domain what it learnt to score (MM-CDFSL's translation loss, aimed at h1)."""

    uses_unlabelled_target = True

    def forward(self, batch: EpisodeDistillBatch) -> Tensor:
        if batch.unlabelled_student is None or batch.unlabelled_teacher is None:
            raise ValueError("EpisodeFeatureMSE needs unlabelled target clips: set distill.unlabelled_target=true")
        return F.mse_loss(batch.unlabelled_student.float(), batch.unlabelled_teacher.detach().float())


class EpisodeCE(EpisodeTerm):
    """The student's ``ce`` branch on the task's query labels (Lite-MKD weighs it 1/16)."""

    def forward(self, batch: EpisodeDistillBatch) -> Tensor:
        return F.cross_entropy(batch.student_logits["ce"].float(), batch.target)

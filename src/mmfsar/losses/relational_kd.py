"""IKEM's relational cross-modality distillation as a distillation-term plug-in
(``configs/distill/loss/relational_kd.yaml``, METHODS.md section 3).

The loss itself (logits ``[s·t, s·Q_T, (q_x·Q_x) ⊙ (s·Q_T)] / T``, positives = column 0 and the
top-1 neighbour of ``q_x`` in ``Q_x``), the student's projection head and the teacher queues are
:class:`~mmfsar.losses.contrastive.RelationalDistillation`; this term connects it to the
distillation module's :class:`~mmfsar.losses.distill.DistillBatch`: the student's pooled feature
and every selected teacher's pooled output (which, for IKEM's teachers, is their contrastive
embedding: :class:`~mmfsar.tasks.contrastive.RelationalDistillModule` with
``model.teacher_feature=projection``). Several students are several runs, each with its own term.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from mmfsar.losses.contrastive import RelationalDistillation
from mmfsar.losses.distill import DistillBatch, DistillSpec, DistillTerm

__all__ = ["RelationalKD"]


class RelationalKD(DistillTerm):
    """The student learns the teachers' relations (anchor, mined positive, negatives).

    Per step: the loss of the batch against the queues (mean over the teacher modalities ``x``
    of the multi-positive InfoNCE), then the teachers' features of the batch enter the queues,
    gathered over DDP ranks (every rank calls the term once per step).

    Args:
        queue_size: K, past teacher features kept (IKEM on NTU: 32768; smaller than the number of
            training clips on small data, so the queue holds no stale copy of a clip).
        temperature: T (0.07).
        hidden: the student head's hidden width (default: the concatenated teacher dim, as the
            reference's ``Linear(d, 3d) → ReLU → Linear(3d, 3d)`` with ``3d = 6 · 128``).
        topk: mined positives per teacher modality (IKEM: 1).
        teachers: which teachers (default: all), in the order of the concatenation ``t``.
    """

    def __init__(
        self,
        *,
        spec: DistillSpec,
        weight: float = 1.0,
        queue_size: int = 32768,
        temperature: float = 0.07,
        hidden: int | None = None,
        topk: int = 1,
        teachers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(spec=spec, weight=weight)
        self.teachers = self._select_teachers(teachers)
        self.relational = RelationalDistillation(
            student_dims={"student": spec.student_dim},
            teacher_dims={name: spec.teacher_dims[name] for name in self.teachers},
            queue_size=queue_size,
            temperature=temperature,
            hidden=hidden,
            topk=topk,
        )

    def forward(self, batch: DistillBatch) -> Tensor:
        teachers = {name: self._teacher(batch, name).pooled for name in self.teachers}
        return self.relational({"student": batch.student.pooled}, teachers)["student"]

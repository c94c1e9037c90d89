"""Clip-level protocol evaluation (``lit_main_eval.py --config-name eval_protocol``).

The skeleton literature reports on clip-level protocols (NTU cross-subject / cross-view /
cross-setup, NTU-120 one-shot; METHODS.md 6): every exported encoder is frozen, encodes each clip
of the protocol once, and a :class:`ProtocolClassifier` turns the features of the support clips
(the ``train`` subset for linear evaluation, the ``exemplar`` subset for the one-shot protocol)
into class scores for the ``test`` clips. Several encoders (``encoder=[joint.pt,bone.pt]``) give
the multi-stream result: their scores averaged, as the two- and four-stream ensembles of the
skeleton papers report it.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfsar.errors import DataError
from mmfsar.fewshot.engine import FeatureBank


class ProtocolClassifier(ABC):
    """Class scores of the test clips from the frozen features of the support clips.

    ``support_subset``: which subset of the protocol is the labelled support (``train`` or
    ``exemplar``); ``reads``: which output of the encoder it reads (``pooled`` features or the
    classifier head's ``logits``)."""

    support_subset: str = "train"
    reads: str = "pooled"

    @abstractmethod
    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, num_classes: int) -> Tensor:
        """(Q, num_classes) scores of the ``query`` features (Q, D), from ``support`` (S, D)
        labelled ``support_labels`` (S,). Classes without support clips score ``-inf``."""


class LinearProbe(ProtocolClassifier):
    """Linear evaluation: multinomial logistic regression on standardised frozen features, fitted
    to convergence by full-batch L-BFGS (deterministic, no learning-rate schedule to tune, unlike
    the SGD epochs of MoCo's linear protocol that it replaces).

    Args:
        weight_decay: L2 penalty ``weight_decay / 2 · ||W||²`` added to the mean cross-entropy.
        max_iter: L-BFGS iterations.
    """

    support_subset = "train"

    def __init__(self, *, weight_decay: float = 1e-3, max_iter: int = 300) -> None:
        if weight_decay < 0 or max_iter < 1:
            raise ValueError(f"LinearProbe: need weight_decay >= 0 and max_iter >= 1, got {weight_decay}, {max_iter}")
        self.weight_decay = weight_decay
        self.max_iter = max_iter

    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, num_classes: int) -> Tensor:
        mean, std = support.mean(0), support.std(0).clamp_min(1e-6)
        x = ((support - mean) / std).double()
        weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
        opt = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=self.max_iter, history_size=20, line_search_fn="strong_wolfe",
            tolerance_grad=1e-7, tolerance_change=1e-10,
        )  # fmt: skip

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x @ weight + bias, support_labels) + 0.5 * self.weight_decay * weight.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        logits = (((query - mean) / std).double() @ weight + bias).detach().float()
        return logits.masked_fill(~_present(support_labels, num_classes), float("-inf"))


class ExemplarMatching(ProtocolClassifier):
    """The one-shot protocol (NTU-120's): each test clip is given the class of the exemplar it is
    most similar to (cosine similarity of the features; the mean feature of a class's exemplars
    when it has several)."""

    support_subset = "exemplar"

    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, num_classes: int) -> Tensor:
        sums = torch.zeros(num_classes, support.shape[1]).index_add_(0, support_labels, F.normalize(support, dim=-1))
        sims = F.normalize(query, dim=-1) @ F.normalize(sums, dim=-1).T
        return sims.masked_fill(~_present(support_labels, num_classes), float("-inf"))


class TrainedHead(ProtocolClassifier):
    """The classifier head the encoder was trained with on the protocol's train clips (supervised
    top-1 / top-5, as the skeleton papers report their models): its logits are the scores. The
    head must classify the protocol's classes, in the protocol's order."""

    support_subset = "train"
    reads = "logits"

    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, num_classes: int) -> Tensor:
        if query.shape[1] != num_classes:
            raise DataError(
                f"the encoder's head scores {query.shape[1]} classes, the protocol has {num_classes}: "
                "evaluate a model trained on this protocol, or use protocol=linear"
            )
        return query


def _present(labels: Tensor, num_classes: int) -> Tensor:
    return torch.bincount(labels, minlength=num_classes) > 0


def topk_accuracy(scores: Tensor, labels: Tensor, k: int) -> float:
    """Percent of rows whose label is among the ``k`` highest scores (k capped at the class count)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return 100.0 * float((top == labels[:, None]).any(1).float().mean())


class ProtocolEncodeModule(L.LightningModule):
    """Encodes every clip of the protocol once with each frozen encoder (pooled clip features,
    or with ``reads="logits"`` the scores of the encoder's classifier head).

    Under DDP each rank encodes its share of the test loader; ``on_test_epoch_end`` gathers the
    banks, so :attr:`features` (one ``(clips, D)`` tensor per encoder) is complete on every rank.
    """

    def __init__(self, *, encoders: Sequence[nn.Module], reads: str = "pooled") -> None:
        super().__init__()
        if reads not in ("pooled", "logits"):
            raise ValueError(f"reads must be 'pooled' or 'logits', got {reads!r}")
        self.encoders = nn.ModuleList(encoders)
        self.reads = reads
        self.features: list[Tensor] = []
        self._banks: list[FeatureBank] = []

    def setup(self, stage: str) -> None:
        warnings.filterwarnings("ignore", message=".*DistributedSampler.*replicates some samples.*")

    def on_test_epoch_start(self) -> None:
        self.encoders.eval()
        self._banks = [FeatureBank(len(self.trainer.datamodule.clips)) for _ in self.encoders]

    @torch.no_grad()
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        for bank, encoder in zip(self._banks, self.encoders):
            out = getattr(encoder({m: batch[m] for m in encoder.modalities}), self.reads)
            if out is None:
                raise DataError(f"{type(encoder).__name__} has no classifier head: its logits cannot be the scores")
            bank.add(batch["index"], out[:, None, None])

    def on_test_epoch_end(self) -> None:
        self.features = [b.gather(self.all_gather, self.trainer.world_size)[:, 0, 0].cpu() for b in self._banks]
        self._banks = []


def protocol_scores(
    classifier: ProtocolClassifier, features: Tensor, labels: Tensor, positions: dict[str, Tensor], num_classes: int
) -> Tensor:
    """The classifier's (test clips, classes) scores from one encoder's features of every clip."""
    support = positions[classifier.support_subset]
    test = positions["test"]
    return classifier.scores(features[support], labels[support], features[test], num_classes)


def check_protocol(classifier: ProtocolClassifier, labels: Tensor, positions: dict[str, Tensor], classes: list[str], name: str) -> None:
    """Every test clip's class has support clips (else an error naming the classes), before encoding."""
    subset = classifier.support_subset
    if subset not in positions:
        raise DataError(f"protocol {name!r} has no {subset} clips, which {type(classifier).__name__} needs")
    missing = sorted(set(labels[positions["test"]].tolist()) - set(labels[positions[subset]].tolist()))
    if missing:
        names = [classes[i] for i in missing]
        raise DataError(
            f"protocol {name!r}: test classes without {subset} clips: {names[:10]}{' ...' if len(names) > 10 else ''}; "
            f"{type(classifier).__name__} cannot score them (the one-shot protocol: protocol=oneshot)"
        )

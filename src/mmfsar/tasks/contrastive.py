"""IKEM's two training stages (Wei et al. 2023; METHODS.md sections 3 and 6), self-supervised.

**Stage 1,** :class:`ContrastivePretrainModule`: MoCo v2 on one modality (SkeletonCLR-style, the
joint-stream baseline) or on several at once (IKEM's six skeleton modalities). Every modality has
a query encoder (ST-GCN + MoCo v2 projection head), a momentum key encoder (``θ_k ← m θ_k + (1 −
m) θ_q``, no gradient) and a queue of the last K keys of every DDP rank. Each clip arrives as two
augmentations (``data.train_views=2``, :mod:`mmfsar.data.views`): the query encoder sees view 0,
the key encoder view 1, and the loss is InfoNCE over ``[q·k ; q·queue] / T``. From
``warmup_epochs`` on (several modalities), the cross-modal stage replaces it per modality ``a``
with CrosSCLR's cross-view loss (mean over the other modalities ``b`` of the multi-positive
InfoNCE whose extra positives are the top-k neighbours of the sample in ``b``'s queue) plus
IKEM's knowledge exchange (``a``'s pooled feature, through an MLP, against the concatenation of
all modalities' keys), the reference's per-modality sum. Queues are enqueued in lock-step, so
row j of every queue is the same clip (which the mining and the exchange assume).

**Stage 2,** :class:`RelationalDistillModule`: IKEM's relational cross-modality distillation,
a :class:`~mmfsar.tasks.distill.DistillModule` whose teachers are the frozen stage-1 encoders
(a multi-stream export counts as its streams) and whose loss is the ``relational_kd`` term
(:class:`~mmfsar.losses.relational_kd.RelationalKD`). As in the reference, the teachers see one
augmentation of a clip and the student the other (``data.train_views=2``), and the teachers'
feature is their contrastive embedding (``model.teacher_feature=projection``). One student per
run (``model.student_modality``): the students share nothing but the frozen teachers, whose
outputs the frozen-output cache computes once per run, so three runs cost three small caches and
each student is one ``encoder.pt`` that every evaluation reads as it is; the three-stream result
is the multi-stream evaluation of the three exports (the reference averages their logits).

Both export what they train through the ordinary export: the query encoder (with its projection
head, which distillation reads) or, for several modalities, one
:class:`~mmfsar.models.multistream.MultiStreamEncoder` of all of them; the student encoder.
Validation on a clip-level protocol (no classifier head to score the test clips) is the
leave-one-out nearest-neighbour top-1 among the protocol's test clips (:func:`loo_nn_accuracy`),
a label-free model's cheapest monitor; on few-shot data, the usual val-class episodes.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from mmfsar.errors import ConfigError
from mmfsar.losses.contrastive import (
    KnowledgeExchange,
    MoCoQueue,
    check_aligned,
    crossclr_losses,
    make_momentum_copy,
    moco_logits,
    momentum_update,
)
from mmfsar.losses.distill import DistillBatch, DistillSpec
from mmfsar.models.base import EncoderOutput, ModalityEncoder, build_encoder, given
from mmfsar.models.multistream import MULTISTREAM_TARGET, MultiStreamEncoder
from mmfsar.tasks.common import (
    Optimization,
    TrainingModule,
    _partial_validation,
    frozen_module_outputs,
    modality_encoder_config,
)
from mmfsar.tasks.distill import DistillModule, _concat, _student

__all__ = ["ContrastivePretrainModule", "RelationalDistillModule", "TeacherStream", "loo_nn_accuracy"]


def loo_nn_accuracy(features: Tensor, labels: Tensor) -> float:
    """Leave-one-out 1-nearest-neighbour top-1 (percent): each clip takes the label of its most
    cosine-similar *other* clip."""
    if features.shape[0] < 2:
        raise ValueError("leave-one-out nearest neighbour needs at least two clips")
    feats = F.normalize(features.float(), dim=1)
    sims = (feats @ feats.T).fill_diagonal_(float("-inf"))
    return 100.0 * float((labels[sims.argmax(1)] == labels).float().mean())


def _check_two_views(datamodule: Any, what: str) -> None:
    if getattr(datamodule, "train_views", 1) < 2:
        raise ConfigError(
            f"{what} needs two augmented views of every training clip: "
            "data._target_=mmfsar.data.views.MultiViewProtocolDataModule (or MultiViewPretrainDataModule) "
            "with data.train_views=2"
        )


class NeighbourValidation:
    """``val/acc`` of a module without a classifier head on a clip-level protocol: the
    leave-one-out nearest-neighbour top-1 among the protocol's test clips, features gathered over
    DDP ranks. On few-shot data (val episodes), the :class:`TrainingModule` default."""

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.trainer.datamodule.val_episodes is not None:
            return super().validation_step(batch, batch_idx)
        self._bank.add(batch["index"], self.validation_features(batch).pooled[:, None, None])

    def on_validation_epoch_end(self) -> None:
        dm = self.trainer.datamodule
        if dm.val_episodes is not None:
            return super().on_validation_epoch_end()
        bank, self._bank = self._bank, None
        if self.trainer.sanity_checking:
            return
        if _partial_validation(self.trainer, len(dm.val_set), dm.eval_batch_size):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn("validation ran on part of the test clips: the nearest-neighbour val/acc is not computed")
            return
        feats = bank.gather(self.all_gather, self.trainer.world_size)[:, 0, 0]
        labels = dm.val_set.targets().to(feats.device)
        self.log("val/acc", loo_nn_accuracy(feats, labels), prog_bar=True, sync_dist=False)


class ContrastivePretrainModule(NeighbourValidation, TrainingModule):
    """MoCo v2 per modality, with CrosSCLR mining and IKEM's knowledge exchange after a warm-up.

    Args:
        encoders: modality -> query encoder, a :class:`ModalityEncoder` whose head is the MoCo
            projection (``num_classes`` = the key size); the dict order is the concatenation order.
        encoder_configs: the configs that rebuild them (for the export).
        queue_size: K per modality (32768 on NTU; below the number of training clips on small data).
        temperature: T (0.07). momentum: m of the key encoders (0.999).
        warmup_epochs: epochs of plain MoCo before the cross-modal stage (IKEM: 150 of 300);
            None: never (plain MoCo for every modality).
        topk: CrosSCLR's mined positives per other modality (1). context: CrosSCLR's context block.
        knowledge_exchange: add IKEM's knowledge exchange in the cross-modal stage.
        exchange_hidden: the exchange MLPs' hidden width (default ``M · key size``).
    """

    def __init__(
        self,
        *,
        encoders: Mapping[str, ModalityEncoder],
        encoder_configs: Mapping[str, Mapping[str, Any]],
        optim: Optimization,
        queue_size: int = 32768,
        temperature: float = 0.07,
        momentum: float = 0.999,
        warmup_epochs: int | None = None,
        topk: int = 1,
        context: bool = True,
        knowledge_exchange: bool = True,
        exchange_hidden: int | None = None,
    ) -> None:
        super().__init__(optim=optim)
        if not encoders:
            raise ConfigError("ContrastivePretrainModule needs at least one modality (config key `modality`)")
        heads = {m: getattr(e, "head", None) for m, e in encoders.items()}
        missing = [m for m, h in heads.items() if h is None]
        if missing:
            raise ConfigError(
                f"contrastive encoders need a projection head (model.projection, model.key_dim); {missing} have none"
            )
        key_dims = {m: int(h.out_features) for m, h in heads.items()}
        if len(set(key_dims.values())) != 1:
            raise ConfigError(f"every modality's key must have the same size, got {key_dims}")
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"model.momentum must lie in [0, 1], got {momentum}")
        if warmup_epochs is not None and warmup_epochs < 0:
            raise ConfigError(f"model.warmup_epochs must be >= 0 or null, got {warmup_epochs}")
        self.modalities = list(encoders)
        self.key_dim = next(iter(key_dims.values()))
        self.encoders = nn.ModuleDict(dict(encoders))
        self.key_encoders = nn.ModuleDict({m: make_momentum_copy(e) for m, e in encoders.items()})
        self.queues = nn.ModuleDict({m: MoCoQueue(self.key_dim, queue_size) for m in self.modalities})
        self.encoder_configs = {m: dict(encoder_configs[m]) for m in self.modalities}
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.warmup_epochs = warmup_epochs
        self.topk = int(topk)
        self.context = bool(context)
        cross = warmup_epochs is not None and len(self.modalities) > 1
        self.exchange = (
            KnowledgeExchange(
                dims={m: e.feature_dim for m, e in encoders.items()},
                key_dim=self.key_dim,
                hidden=exchange_hidden,
                temperature=temperature,
            )
            if cross and knowledge_exchange
            else None
        )
        self.last_keys: dict[str, Tensor] = {}  # this rank's keys of the last step, before the gather (diagnostics)

    @classmethod
    def build(cls, cfg: DictConfig, datamodule: Any) -> "ContrastivePretrainModule":
        """From the ``model`` config (``configs/model/contrastive.yaml``) and the data module."""
        _check_two_views(datamodule, "contrastive pretraining")
        encoders, configs = {}, {}
        for m in datamodule.modalities:
            configs[m] = modality_encoder_config(
                cfg.encoder, m, datamodule.encoder_inputs(m), int(cfg.key_dim), cfg.projection
            )
            encoders[m] = instantiate(configs[m], _convert_="all")
        return cls(
            encoders=encoders,
            encoder_configs=configs,
            optim=instantiate(cfg.optim),
            queue_size=cfg.queue_size,
            temperature=cfg.temperature,
            momentum=cfg.momentum,
            warmup_epochs=cfg.warmup_epochs,
            topk=cfg.topk,
            context=cfg.context,
            knowledge_exchange=cfg.knowledge_exchange,
            exchange_hidden=cfg.get("exchange_hidden"),
        )

    # --- what the stage exports ---------------------------------------------------------------
    def exported_encoder(self) -> tuple[nn.Module, dict[str, Any]]:
        if len(self.modalities) == 1:
            (m,) = self.modalities
            return self.encoders[m], self.encoder_configs[m]
        config = {
            "_target_": MULTISTREAM_TARGET,
            "streams": self.encoder_configs,
        }
        return MultiStreamEncoder(streams=dict(self.encoders)), config

    @property
    def trained_modalities(self) -> list[str]:
        return list(self.modalities)

    def validation_features(self, batch: dict[str, Any]) -> EncoderOutput:
        encoder, _ = self.exported_encoder()
        return encoder({m: batch[m] for m in self.modalities})

    # --- the contrastive step -----------------------------------------------------------------
    @property
    def cross_modal(self) -> bool:
        """Whether this epoch trains the cross-modal stage (after the warm-up, several modalities)."""
        return self.warmup_epochs is not None and len(self.modalities) > 1 and self.current_epoch >= self.warmup_epochs

    @torch.no_grad()
    def momentum_keys(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Update every key encoder from its query encoder (``momentum``), then encode the key view."""
        keys = {}
        for m in self.modalities:
            momentum_update(self.encoders[m], self.key_encoders[m], self.momentum)
            keys[m] = self.key_encoders[m]({m: inputs[m]}).logits
        return keys

    def contrastive_losses(self, outputs: Mapping[str, EncoderOutput], keys: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Named loss terms of one step against the current queues (before they are updated):
        ``{m}/moco`` (warm-up or one modality), or ``{m}/crossclr`` and ``{m}/exchange``."""
        queues = {m: self.queues[m].keys for m in self.modalities}
        queries = {m: outputs[m].logits for m in self.modalities}
        if not self.cross_modal:
            return {
                f"{m}/moco": F.cross_entropy(*moco_logits(queries[m], keys[m], queues[m], self.temperature))
                for m in self.modalities
            }
        check_aligned(dict(self.queues))
        terms = {
            f"{m}/crossclr": loss
            for m, loss in crossclr_losses(
                queries, keys, queues, temperature=self.temperature, topk=self.topk, context=self.context
            ).items()
        }
        if self.exchange is not None:
            pooled = {m: outputs[m].pooled for m in self.modalities}
            terms |= {f"{m}/exchange": loss for m, loss in self.exchange(pooled, keys, queues).items()}
        return terms

    def enqueue(self, keys: Mapping[str, Tensor]) -> None:
        """Every modality's keys (gathered over DDP ranks) into its queue, in lock-step."""
        for m in self.modalities:
            self.queues[m].enqueue(keys[m])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        parts = [batch[k] for k in ("source", "target") if k in batch]
        views = {m: torch.cat([p[m] for p in parts]) for m in self.modalities}  # (B, V, ...)
        keys = self.momentum_keys({m: x[:, 1] for m, x in views.items()})
        outputs = {m: self.encoders[m]({m: x[:, 0]}) for m, x in views.items()}
        terms = self.contrastive_losses(outputs, keys)
        self.last_keys = {m: k.detach() for m, k in keys.items()}
        self.enqueue(keys)
        loss = sum(terms.values())
        self.log_training(loss, batch_size=next(iter(views.values())).shape[0], terms=terms)
        return loss


class TeacherStream(nn.Module):
    """One frozen teacher modality of relational distillation: the clip encoder's output with
    ``pooled`` = the feature distilled, its contrastive embedding (``feature="projection"``: the
    MoCo projection head's output, IKEM's teacher feature) or its pooled backbone feature."""

    def __init__(self, encoder: nn.Module, *, feature: str = "projection", source: str = "") -> None:
        super().__init__()
        if feature not in ("projection", "pooled"):
            raise ConfigError(f"model.teacher_feature must be 'projection' or 'pooled', got {feature!r}")
        if feature == "projection" and getattr(encoder, "head", None) is None:
            raise ConfigError(
                f"teacher {source or type(encoder).__name__} has no projection head: export it from the contrastive "
                "stage (model=contrastive), or distil its pooled feature with model.teacher_feature=pooled"
            )
        self.encoder = encoder
        self.feature = feature

    @property
    def modalities(self) -> list[str]:
        return self.encoder.modalities

    @property
    def feature_dim(self) -> int:
        return int(self.encoder.head.out_features) if self.feature == "projection" else int(self.encoder.feature_dim)

    def forward(self, inputs: Mapping[str, Tensor], **kwargs: Any) -> EncoderOutput:
        out = self.encoder(inputs, **kwargs)
        pooled = out.logits if self.feature == "projection" else out.pooled
        return EncoderOutput(pooled=pooled, frames=out.frames)


def teacher_streams(name: str, path: str, *, feature: str) -> dict[str, TeacherStream]:
    """The teacher modalities of one export: each stream of a multi-stream export (named by its
    stream), or the export itself (named ``name``)."""
    encoder = build_encoder(path)
    parts = dict(encoder.streams) if isinstance(encoder, MultiStreamEncoder) else {name: encoder}
    return {stream: TeacherStream(enc, feature=feature, source=f"{stream!r} ({path})") for stream, enc in parts.items()}


class RelationalDistillModule(NeighbourValidation, DistillModule):
    """IKEM stage 2: a student encoder learns the frozen teachers' relations (``relational_kd``).

    Args (beyond :class:`~mmfsar.tasks.distill.DistillModule`'s):
        two_views: the teachers see view 0 of every clip and the student view 1 (the reference);
            False: both see the same view.
    """

    def __init__(self, *, two_views: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.two_views = bool(two_views)

    @classmethod
    def build(cls, cfg: DictConfig, datamodule: Any) -> "RelationalDistillModule":
        """From the ``model`` config (``configs/model/relational_distill.yaml``) and the data module."""
        student, student_cfg = _student(cfg, datamodule)
        teachers: dict[str, TeacherStream] = {}
        for name, path in given(cfg.teachers).items():
            for stream, teacher in teacher_streams(name, path, feature=cfg.teacher_feature).items():
                if stream in teachers:
                    raise ConfigError(f"model.teachers: teacher modality {stream!r} is given twice (again in {path})")
                teachers[stream] = teacher
        spec = DistillSpec(
            student_dim=student.feature_dim, teacher_dims={n: t.feature_dim for n, t in teachers.items()}, num_classes=0
        )
        terms = {name: instantiate(term)(spec=spec) for name, term in (cfg.losses or {}).items() if term is not None}
        return cls(
            student=student,
            student_config=student_cfg,
            teachers=teachers,
            terms=terms,
            optim=instantiate(cfg.optim),
            two_views=getattr(datamodule, "train_views", 1) >= 2,
        )

    def _view(self, x: Tensor, view: int) -> Tensor:
        return x[:, view] if self.two_views else x

    def teacher_outputs(self, keys: list[str], parts: list[dict[str, Any]]) -> dict[str, EncoderOutput]:
        """The frozen teachers' outputs on view 0 of the clips: looked up in the frozen-output cache
        (the clips' first fixed view) or computed on the batch."""
        if self.frozen_cache is not None:
            looked_up = []
            for key, part in zip(keys, parts):
                wanted = {"index": part["index"], "view": self._view(part["view"], 0)} if "view" in part else part
                looked_up.append(self.frozen_cache.lookup(key, wanted, self.device))
            return {n: _concat([o[n] for o in looked_up]) for n in self._teachers}
        needed = {m for t in self._teachers.values() for m in t.modalities}
        inputs = {m: torch.cat([self._view(p[m], 0) for p in parts]) for m in needed}
        return frozen_module_outputs(self._teachers, inputs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        keys = [k for k in ("source", "target") if k in batch]
        parts = [batch[k] for k in keys]
        labels = torch.cat([p["label"] for p in parts])
        student = self.student({m: torch.cat([self._view(p[m], 1) for p in parts]) for m in self.student.modalities})
        db = DistillBatch(student=student, teachers=self.teacher_outputs(keys, parts), labels=labels)
        losses = {name: term(db) for name, term in self.terms.items()}
        loss = sum(term.weight * losses[name] for name, term in self.terms.items())
        self.log_training(loss, batch_size=labels.shape[0], terms=losses)
        return loss

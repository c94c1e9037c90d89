"""Episodic training: an encoder and a few-shot classifier (matching head) trained together on
N-way K-shot Q-query tasks of the base classes, as the field trains OTAM, TRX, HyRSM, CLIP-FSAR
and Lite-MKD's teacher.

Each training step is one task (``model.episodes``; the data module draws it,
:class:`~mmfsar.data.episodes.TaskDataset`): its clips are encoded, split into support and
queries, and the cross-entropy of the classifier's query logits is minimised (TRX steps the
optimiser every 16 tasks: ``trainer.accumulate_grad_batches=16``). Validation solves the fixed val
episodes with the same classifier, and the export carries it, so ``lit_main_eval.py`` evaluates
with the trained head.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from mmfsar.data.episodes import EpisodeSettings, split_task
from mmfsar.errors import ConfigError
from mmfsar.fewshot import EpisodeClassifier
from mmfsar.models.base import EncoderOutput, exported_modalities, given, load_export, plain_config
from mmfsar.tasks.common import Optimization, TrainingModule, modality_encoder_config, probe_frames
from mmfsar.tasks.fusion import build_fusion_teacher


def classifier_for(cfg: Mapping[str, Any], encoder: nn.Module, clip: Mapping[str, Any]) -> tuple[EpisodeClassifier, dict]:
    """A few-shot classifier (a ``_partial_`` config) sized for ``encoder``'s features on this
    data, and the full config that rebuilds it (for the export)."""
    config = {k: v for k, v in plain_config(cfg).items() if k != "_partial_"}
    config.update(dim=int(encoder.feature_dim), num_frames=probe_frames(encoder, clip))
    return instantiate(config, _convert_="all"), config


class EpisodicModule(TrainingModule):
    """Trains ``encoder`` (a clip encoder) and ``classifier`` with cross-entropy over the query
    logits of one task per step.

    Args:
        encoder / encoder_config: the clip encoder and the config that rebuilds it.
        classifier / classifier_config: the few-shot classifier (matching head) and its config.
        task: the tasks' settings (the data module's ``task_settings``).
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        encoder_config: Mapping[str, Any],
        classifier: EpisodeClassifier,
        classifier_config: Mapping[str, Any],
        task: EpisodeSettings,
        optim: Optimization,
    ) -> None:
        super().__init__(optim=optim)
        self.encoder = encoder
        self.encoder_config = dict(encoder_config)
        self.classifier = classifier
        self.classifier_config = dict(classifier_config)
        self.task = task
        self.frozen_cache = None
        self.train_acc = MulticlassAccuracy(num_classes=task.n_way)

    @classmethod
    def build(cls, cfg: DictConfig, datamodule: Any) -> "EpisodicModule":
        """A new clip encoder on the one configured modality (or the export ``init_from``'s)."""
        if datamodule.task_settings is None:
            raise ConfigError("episodic training needs model.episodes (n_way, k_shot, n_query, episodes, seed)")
        if len(datamodule.modalities) != 1:
            raise ConfigError(
                f"episodic training of one encoder reads one modality, got {sorted(datamodule.modalities)}; "
                "fuse several with model=episodic_fusion"
            )
        (modality,) = datamodule.modalities
        if cfg.get("init_from"):
            payload = load_export(cfg.init_from)
            encoder_cfg = {**payload["encoder"], "num_classes": 0}
            encoder = instantiate(encoder_cfg, _convert_="all")
            encoder.load_state_dict({k: v for k, v in payload["state_dict"].items() if not k.startswith("head.")})
        else:
            encoder_cfg = modality_encoder_config(cfg.encoder, modality, datamodule.encoder_inputs(modality))
            encoder = instantiate(encoder_cfg, _convert_="all")
        return cls.assemble(cfg, datamodule, encoder, encoder_cfg)

    @classmethod
    def assemble(cls, cfg: DictConfig, datamodule: Any, encoder: nn.Module, encoder_cfg: dict[str, Any]) -> "EpisodicModule":
        """The module around a built ``encoder``: its matching head (``model.classifier``), the
        data's task settings and the optimisation."""
        classifier, classifier_cfg = classifier_for(cfg.classifier, encoder, datamodule.val_set[0])
        return cls(
            encoder=encoder,
            encoder_config=encoder_cfg,
            classifier=classifier,
            classifier_config=classifier_cfg,
            task=datamodule.task_settings,
            optim=instantiate(cfg.optim),
        )

    @classmethod
    def modality_configs(cls, model_cfg: DictConfig, modalities: DictConfig) -> dict[str, dict[str, Any]]:
        paths = {"init_from": model_cfg.init_from} if model_cfg.get("init_from") else {}
        return exported_modalities(paths, modalities)

    @property
    def val_classifier(self) -> nn.Module:
        return self.classifier

    def exported_encoder(self) -> tuple[nn.Module, dict[str, Any]]:
        return self.encoder, self.encoder_config

    def exported_classifier(self) -> tuple[nn.Module, dict[str, Any]]:
        return self.classifier, self.classifier_config

    @property
    def trained_modalities(self) -> list[str]:
        return list(self.encoder.modalities)

    def task_features(self, out: EncoderOutput) -> Tensor:
        """(clips, T, D) features for the classifier: per frame, or pooled (T = 1)."""
        return out.frames if self.classifier.uses_frames else out.pooled[:, None]

    def encode_training_task(self, task: dict[str, Any]) -> EncoderOutput:
        return self.encoder({m: task[m] for m in self.encoder.modalities})

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        support, query, target = split_task(self.task_features(self.encode_training_task(batch["source"])), self.task)
        logits = self.classifier(support, query)[0]
        loss = F.cross_entropy(logits, target)
        self.log_training(loss, batch_size=1, accuracy=(logits, target))
        return loss

    def validation_features(self, batch: dict[str, Any]) -> EncoderOutput:
        return self.encoder({m: batch[m] for m in self.encoder.modalities})


class EpisodicFusionModule(EpisodicModule):
    """Episodic training of a fusion teacher (Lite-MKD's MFM over exported per-modality encoders)
    with a matching head (Lite-MKD: TRX). With frozen encoders and ``cache=frozen`` the encoders'
    per-frame features are computed once and each step runs only the fusion and the head."""

    @classmethod
    def build(cls, cfg: DictConfig, datamodule: Any) -> "EpisodicFusionModule":
        if datamodule.task_settings is None:
            raise ConfigError("episodic training needs model.episodes (n_way, k_shot, n_query, episodes, seed)")
        teacher, teacher_cfg = build_fusion_teacher(cfg, datamodule, num_classes=0)
        return cls.assemble(cfg, datamodule, teacher, teacher_cfg)

    @classmethod
    def modality_configs(cls, model_cfg: DictConfig, modalities: DictConfig) -> dict[str, dict[str, Any]]:
        return exported_modalities(given(model_cfg.encoders), {})

    def frozen_models(self) -> dict[str, nn.Module]:
        return dict(self.encoder.encoders) if self.encoder.freeze_encoders else {}

    @property
    def trained_modalities(self) -> list[str]:
        return [] if self.encoder.freeze_encoders else self.encoder.modalities

    def encode_training_task(self, task: dict[str, Any]) -> EncoderOutput:
        if self.frozen_cache is None:
            return super().encode_training_task(task)
        cached = self.frozen_cache.lookup("source", task, self.device)
        return self.encoder.fuse({name: out.frames for name, out in cached.items()})

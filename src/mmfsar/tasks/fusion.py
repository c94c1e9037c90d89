"""The fusion teacher: exported per-modality encoders, fused per frame (Lite-MKD's MFM or a
concatenation baseline), trained with cross-entropy on the base classes."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mmfsar.errors import ConfigError
from mmfsar.models.base import EncoderOutput, build_encoder, exported_modalities, given, load_export, plain_config
from mmfsar.models.fusion import FusionTeacher, encoder_dims
from mmfsar.tasks.common import Optimization, TrainingModule, probe_frames


def build_fusion_teacher(cfg: DictConfig, datamodule: Any, *, num_classes: int) -> tuple[FusionTeacher, dict[str, Any]]:
    """A :class:`FusionTeacher` over the exported encoders ``cfg.encoders`` (``cfg.fusion``,
    ``cfg.head`` when ``num_classes`` > 0, ``cfg.freeze_encoders``) and the config that rebuilds
    it: the export stores the config, the trained encoders are passed in as objects."""
    paths = given(cfg.encoders)
    if len(paths) < 2:
        raise ConfigError("model.encoders: give at least two exported encoders, e.g. model.encoders.rgb=.../encoder.pt")
    datamodule.channels  # binds the modalities
    payloads = {name: load_export(path) for name, path in paths.items()}
    encoders = {name: build_encoder(payload) for name, payload in payloads.items()}
    frames = {name: probe_frames(enc, datamodule.val_set[0]) for name, enc in encoders.items()}
    if len(set(frames.values())) != 1:
        raise ConfigError(f"the encoders give different numbers of per-frame features {frames}; fusion needs one")
    teacher_cfg = {
        "_target_": "mmfsar.models.fusion.FusionTeacher",
        "encoders": {name: payload["encoder"] for name, payload in payloads.items()},
        "fusion": {**plain_config(cfg.fusion), "dims": encoder_dims(encoders), "num_frames": frames.popitem()[1]},
        "num_classes": num_classes,
        "head": plain_config(cfg.head) if num_classes else None,
        "freeze_encoders": cfg.freeze_encoders,
    }
    return instantiate(teacher_cfg, encoders=encoders, _convert_="all"), teacher_cfg


class FusionTeacherModule(TrainingModule):
    """Trains the fusion (and, with ``freeze_encoders=False``, the encoders) of a
    :class:`~mmfsar.models.fusion.FusionTeacher` on labelled source clips of the base classes.

    With frozen encoders and ``cache=frozen`` (:mod:`mmfsar.tasks.frozen_cache`), the encoders
    encode the training clips once and each step fuses their cached per-frame features: training
    the fusion then costs a small fraction of running the encoders every step.
    """

    def __init__(self, *, teacher: FusionTeacher, teacher_config: Mapping[str, Any], optim: Optimization) -> None:
        super().__init__(optim=optim)
        self.teacher = teacher
        self.teacher_config = dict(teacher_config)
        self.frozen_cache = None
        self.train_acc = MulticlassAccuracy(num_classes=teacher.head.out_features)

    @classmethod
    def modality_configs(cls, model_cfg: DictConfig, modalities: DictConfig) -> dict[str, dict[str, Any]]:
        return exported_modalities(model_cfg.encoders, {})

    @classmethod
    def build(cls, cfg: DictConfig, datamodule: Any) -> "FusionTeacherModule":
        if not datamodule.labelled_source:
            raise ConfigError("the fusion teacher trains on labelled source clips: set data.labelled_source=true")
        teacher, teacher_cfg = build_fusion_teacher(cfg, datamodule, num_classes=len(datamodule.base_classes))
        return cls(teacher=teacher, teacher_config=teacher_cfg, optim=instantiate(cfg.optim))

    def exported_encoder(self) -> tuple[nn.Module, dict[str, Any]]:
        return self.teacher, self.teacher_config

    def frozen_models(self) -> dict[str, nn.Module]:
        return dict(self.teacher.encoders) if self.teacher.freeze_encoders else {}

    @property
    def trained_modalities(self) -> list[str]:
        return [] if self.teacher.freeze_encoders else self.teacher.modalities

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        src = batch["source"]
        if self.frozen_cache is not None:
            cached = self.frozen_cache.lookup("source", src, self.device)
            logits = self.teacher.fuse({name: out.frames for name, out in cached.items()}).logits
        else:
            logits = self.teacher({m: src[m] for m in self.teacher.modalities}).logits
        loss = F.cross_entropy(logits, src["label"])
        self.log_training(loss, batch_size=logits.shape[0], accuracy=(logits, src["label"]))
        return loss

    def validation_features(self, batch: dict[str, Any]) -> EncoderOutput:
        return self.teacher({m: batch[m] for m in self.teacher.modalities})

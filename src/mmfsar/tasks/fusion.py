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

from mmfsar.data.errors import DataError
from mmfsar.models.base import EncoderOutput, build_encoder, load_export
from mmfsar.models.fusion import FusionTeacher
from mmfsar.tasks.common import OutputCache, TrainingModule, build_partial, probe_frames, to_plain


def given(paths: Mapping[str, str | None] | None) -> dict[str, str]:
    """The entries of a name -> exported-file mapping that are set (config slots may be null)."""
    return {k: v for k, v in (paths or {}).items() if v is not None}


def exported_modalities(paths: Mapping[str, str], configured: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Configured modalities plus those the exported encoders at ``paths`` were trained on.

    An exported encoder must be fed exactly as it was trained, so its stored modality config is
    used; a configured modality of the same name that reads clips differently is an error.
    ``encoder_args`` are not compared: they shape a new encoder, and the export carries its own.
    """
    out = dict(to_plain(configured) or {})
    for name, path in given(paths).items():
        for m, mcfg in load_export(path)["modalities"].items():
            keys = (set(out.get(m, {})) | set(mcfg)) - {"encoder_args"}
            diff = sorted(k for k in keys if out[m].get(k) != mcfg.get(k)) if m in out else []
            if diff:
                raise DataError(
                    f"modality {m!r}: the configured settings differ from those encoder {name!r} ({path}) "
                    f"was trained with, in keys {diff}; drop modality={m} or match modalities.{m}"
                )
            out[m] = mcfg
    return out


class FusionTeacherModule(TrainingModule):
    """Trains the fusion (and, with ``freeze_encoders=False``, the encoders) of a
    :class:`~mmfsar.models.fusion.FusionTeacher` on labelled source clips of the base classes.

    Frozen encoders give the same output for the same input, so with ``cache_passes > 0`` they
    encode the training clips once per pass (each pass a new random augmentation of every clip)
    before training, and each step fuses the cached per-frame features of one pass: training
    the fusion then costs a small fraction of running the encoders every step.
    """

    def __init__(
        self, *, teacher: nn.Module, teacher_config: Mapping[str, Any], cache_passes: int = 0, **optim: Any
    ) -> None:
        super().__init__(**optim)
        if cache_passes and not teacher.freeze_encoders:
            raise DataError("model.cache_passes needs frozen encoders (model.freeze_encoders=true)")
        self.teacher = teacher
        self.teacher_config = dict(teacher_config)
        self.cache_passes = cache_passes
        self._cache: dict[str, OutputCache] = {}
        self.train_acc = MulticlassAccuracy(num_classes=teacher.head.out_features)

    @classmethod
    def modality_configs(cls, model_cfg: DictConfig, modalities: DictConfig) -> dict[str, dict[str, Any]]:
        return exported_modalities(model_cfg.encoders, {})

    @classmethod
    def build(cls, cfg: DictConfig, datamodule: Any) -> "FusionTeacherModule":
        paths = given(cfg.encoders)
        if len(paths) < 2:
            raise DataError("model.encoders: give at least two exported encoders, e.g. model.encoders.rgb=.../encoder.pt")
        if not datamodule.labelled_source:
            raise DataError("the fusion teacher trains on labelled source clips: set data.labelled_source=true")
        datamodule.channels  # binds the modalities
        encoders, configs = {}, {}
        for name, path in paths.items():
            payload = load_export(path)
            encoders[name], configs[name] = build_encoder(payload), payload["encoder"]
        frames = {name: probe_frames(enc, datamodule) for name, enc in encoders.items()}
        if len(set(frames.values())) != 1:
            raise DataError(f"the encoders give different numbers of per-frame features {frames}; fusion needs one")
        fusion_cfg = {
            **to_plain(cfg.fusion),
            "dims": {name: enc.feature_dim for name, enc in encoders.items()},
            "num_frames": next(iter(frames.values())),
        }
        teacher_cfg = {
            "_target_": "mmfsar.models.fusion.FusionTeacher",
            "encoders": configs,
            "fusion": fusion_cfg,
            "num_classes": len(datamodule.base_classes),
            "head": to_plain(cfg.head),
            "freeze_encoders": cfg.freeze_encoders,
        }
        teacher = FusionTeacher(
            encoders=encoders,
            fusion=instantiate(fusion_cfg, _convert_="all"),
            num_classes=teacher_cfg["num_classes"],
            head=build_partial(cfg.head),
            freeze_encoders=cfg.freeze_encoders,
        )
        return cls(
            teacher=teacher,
            teacher_config=teacher_cfg,
            cache_passes=cfg.get("cache_passes", 0),
            optimizer=build_partial(cfg.optimizer),
            scheduler=build_partial(cfg.scheduler),
            scale_lr=cfg.scale_lr,
            weight_decay=cfg.weight_decay,
        )

    def exported_encoder(self) -> tuple[nn.Module, dict[str, Any]]:
        return self.teacher, self.teacher_config

    def on_fit_start(self) -> None:
        if self.cache_passes and not self._cache:
            dm, encoders = self.trainer.datamodule, self.teacher.encoders
            modalities = self.teacher.modalities
            self._cache = OutputCache.build(
                lambda inputs: {name: enc(inputs) for name, enc in encoders.items()},
                [dm.training_clips("source", modalities, augment=True)] * self.cache_passes,
                modalities,
                self.device,
                desc="caching encoder outputs",
            )
            dm.keep_training_modalities([])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        src = batch["source"]
        if self._cache:
            index = src["index"]
            passes = torch.randint(0, self.cache_passes, index.shape)
            frames = {n: c.lookup(index, passes).frames.to(self.device) for n, c in self._cache.items()}
            logits = self.teacher.fuse(frames).logits
        else:
            logits = self.teacher({m: src[m] for m in self.teacher.modalities}).logits
        loss = F.cross_entropy(logits, src["label"])
        self.train_acc(logits.detach(), src["label"])
        bs = logits.shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        self.log("train/acc", self.train_acc, batch_size=bs)
        return loss

    def validation_features(self, batch: dict[str, Any]) -> EncoderOutput:
        return self.teacher({m: batch[m] for m in self.teacher.modalities})

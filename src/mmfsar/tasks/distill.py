"""Stage 2: distil frozen teachers into an RGB student (MM-CDFSL, Lite-MKD and relatives).

The loss is a weighted sum of plug-in terms (``model.losses``: translation MSE, logit KD,
relation, contrastive, CE), each owning its trainable heads. Teachers are frozen by
construction: kept outside the module's registered children (so they are in no optimiser, no
checkpoint and no DDP wrapper), always in ``eval()``, run under ``torch.inference_mode()`` (in
bf16 on GPU). Student and teachers see the same clips and, with ``mask_ratio > 0``, the same
tube mask (MM-CDFSL).

With ``cache_teachers`` (no masking), the teachers encode the training clips once, before
training; training then loads only the student's modality and looks the teacher outputs up by
clip, so a distillation step costs about a plain step of the student. Which inputs the teachers
encode is ``cache_views``:

* ``0``: each clip's deterministic evaluation view; the student still sees a fresh random
  augmentation, matched to the teachers' output on the un-augmented clip (offline distillation);
* ``K > 0``: K augmented views per clip, each seeded by the clip and its number; the training
  clips are then drawn from those K views, so student and teachers see exactly the same input
  (the teachers' outputs are what running them at every step would give, over K augmentations
  instead of one per epoch). The teachers' one-off cost is K passes over the training clips.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from mmfsar.data.errors import DataError
from mmfsar.fewshot.engine import masking_grid
from mmfsar.losses.distill import DistillBatch, DistillSpec
from mmfsar.models.base import EncoderOutput, build_encoder, load_export
from mmfsar.tasks.common import (
    OutputCache,
    TrainingModule,
    build_partial,
    concat_outputs,
    encoder_inputs,
    modality_encoder_config,
    to_plain,
)
from mmfsar.tasks.fusion import exported_modalities, given


class DistillModule(TrainingModule):
    """Args:
    student: the clip encoder being trained (one modality, RGB for the published methods).
    student_config: Hydra config that rebuilds the student (for the export).
    teachers: frozen clip encoders by name.
    terms: loss terms by name (each with a ``weight``).
    mask_ratio: shared tube-mask ratio (0: no masking).
    cache_teachers: encode the training clips with the teachers once, before training.
    cache_views: with ``cache_teachers``, how many seeded augmented views per clip (0: the
        un-augmented clip only; see the module docstring).
    """

    def __init__(
        self,
        *,
        student: nn.Module,
        student_config: Mapping[str, Any],
        teachers: Mapping[str, nn.Module],
        terms: Mapping[str, nn.Module],
        mask_ratio: float = 0.0,
        cache_teachers: bool = False,
        cache_views: int = 0,
        **optim: Any,
    ) -> None:
        super().__init__(**optim)
        if cache_teachers and mask_ratio > 0:
            raise DataError("distill.cache_teachers needs distill.mask_ratio=0: masked teacher outputs change every step")
        if cache_views < 0 or (cache_views and not cache_teachers):
            raise DataError(f"distill.cache_views={cache_views} needs distill.cache_teachers=true and a count >= 0")
        if not teachers:
            raise DataError("model.teachers: give at least one exported teacher (name=path/to/encoder.pt)")
        if not terms:
            raise DataError("model.losses: no loss term selected")
        self.student = student
        self.student_config = dict(student_config)
        self.terms = nn.ModuleDict(terms)
        self.mask_ratio = mask_ratio
        self.cache_teachers = cache_teachers
        self.cache_views = cache_views
        self.teachers = _FrozenTeachers(teachers)
        self._teacher_cache: dict[str, dict[str, OutputCache]] = {}
        self.grid = None
        if mask_ratio > 0:
            grids = {"student": masking_grid(student)} | {n: masking_grid(t) for n, t in teachers.items()}
            if len(set(grids.values())) != 1:
                raise DataError(f"a shared tube mask needs one token grid, got {grids}")
            self.grid = grids["student"]

    @classmethod
    def modality_configs(cls, model_cfg: DictConfig, modalities: DictConfig) -> dict[str, dict[str, Any]]:
        paths = given(model_cfg.teachers)
        if model_cfg.init_from:
            paths["student"] = model_cfg.init_from
        return exported_modalities(paths, modalities)

    @classmethod
    def build(cls, cfg: DictConfig, datamodule: Any) -> "DistillModule":
        modality = cfg.student_modality
        if modality not in datamodule.modalities:
            raise DataError(f"model.student_modality={modality!r} is not among the loaded modalities {sorted(datamodule.modalities)}")
        if cfg.init_from:
            payload = load_export(cfg.init_from)
            student_cfg = {**payload["encoder"], "num_classes": 0}
            if student_cfg.get("modality") != modality:
                raise DataError(f"model.init_from={cfg.init_from} is a {student_cfg.get('modality')!r} encoder, not {modality!r}")
            student = instantiate(student_cfg, _convert_="all")
            weights = {k: v for k, v in payload["state_dict"].items() if not k.startswith("head.")}
            student.load_state_dict(weights)
        else:
            student_cfg = modality_encoder_config(cfg.encoder, modality, encoder_inputs(datamodule, modality))
            student = instantiate(student_cfg, _convert_="all")
        teachers = {name: build_encoder(path) for name, path in given(cfg.teachers).items()}
        spec = DistillSpec(
            student_dim=student.feature_dim,
            teacher_dims={n: t.feature_dim for n, t in teachers.items()},
            num_classes=len(datamodule.base_classes) if datamodule.labelled_source else 0,
        )
        terms = {name: instantiate(term)(spec=spec) for name, term in (cfg.losses or {}).items() if term is not None}
        return cls(
            student=student,
            student_config=student_cfg,
            teachers=teachers,
            terms=terms,
            mask_ratio=cfg.mask_ratio,
            cache_teachers=cfg.get("cache_teachers", False),
            cache_views=cfg.get("cache_views", 0),
            optimizer=build_partial(cfg.optimizer),
            scheduler=build_partial(cfg.scheduler),
            scale_lr=cfg.scale_lr,
            weight_decay=cfg.weight_decay,
        )

    def exported_encoder(self) -> tuple[nn.Module, dict[str, Any]]:
        return self.student, self.student_config

    def on_fit_start(self) -> None:
        self.teachers.to(self.device)
        if self.cache_teachers and not self._teacher_cache:
            self.build_teacher_cache(self.trainer.datamodule)

    def build_teacher_cache(self, datamodule: Any) -> None:
        """Encode every training clip with the teachers once per cached view, then make the data
        module load only the student's modalities (and, with ``cache_views``, only those views)."""
        modalities = sorted(self.teachers.modalities)
        if self.cache_views:
            datamodule.fix_training_views(self.cache_views, seed=torch.initial_seed())
        for key in datamodule.train_sets:
            if self.cache_views:
                loaders = [datamodule.training_views(key, modalities)]
            else:
                loaders = [datamodule.training_clips(key, modalities, augment=False)]
            self._teacher_cache[key] = OutputCache.build(
                self.teachers, loaders, modalities, self.device, desc=f"caching teacher outputs ({key} clips)"
            )
        datamodule.keep_training_modalities(list(self.student.modalities))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        keys = [k for k in ("source", "target") if k in batch]
        parts = [batch[k] for k in keys]
        needed = set(self.student.modalities) | (set() if self.cache_teachers else self.teachers.modalities)
        inputs = {m: torch.cat([p[m] for p in parts]) for m in needed}
        labels = torch.cat([p["label"] for p in parts])
        kwargs = {}
        if self.grid is not None:
            from mmfsar.models.encoders.vit import tube_mask

            kwargs["mask"] = tube_mask(labels.shape[0], self.grid, self.mask_ratio, device=labels.device)
        student = self.student(inputs, **kwargs)
        if self.cache_teachers:
            teachers = {
                n: concat_outputs(
                    [self._teacher_cache[k][n].lookup(p["index"], p.get("view")) for k, p in zip(keys, parts)], labels.device
                )
                for n in self.teachers.models
            }
        else:
            teachers = self.teachers(inputs, **kwargs)
        db = DistillBatch(student=student, teachers=teachers, labels=labels)
        losses = {name: term(db) for name, term in self.terms.items()}
        loss = sum(term.weight * losses[name] for name, term in self.terms.items())
        bs = labels.shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=bs)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        return loss

    def validation_features(self, batch: dict[str, Any]) -> EncoderOutput:
        return self.student({m: batch[m] for m in self.student.modalities})


class _FrozenTeachers:
    """Teachers held outside the module tree: never trained, never saved, never wrapped by DDP."""

    def __init__(self, teachers: Mapping[str, nn.Module]) -> None:
        self.models = {n: t.eval().requires_grad_(False) for n, t in teachers.items()}
        self.modalities = {m for t in self.models.values() for m in t.modalities}

    def to(self, device: torch.device) -> "_FrozenTeachers":
        for t in self.models.values():
            t.to(device)
        return self

    def __call__(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, EncoderOutput]:
        device = next(iter(inputs.values())).device
        out = {}
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for name, t in self.models.items():
                out[name] = t.eval()(inputs, **kwargs)
        # inference tensors cannot enter autograd graphs: copy them out as normal float tensors
        return {n: _normal(o) for n, o in out.items()}


def _normal(out: EncoderOutput) -> EncoderOutput:
    values = {f.name: getattr(out, f.name) for f in fields(out)}
    return EncoderOutput(**{k: v.float().clone() if torch.is_tensor(v) else v for k, v in values.items()})

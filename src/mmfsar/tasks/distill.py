"""Stage 2: distil frozen teachers into an RGB student (MM-CDFSL, Lite-MKD and relatives).

The loss is a weighted sum of plug-in terms (``model.losses``: translation MSE, logit KD,
relation, contrastive, CE), each owning its trainable heads. Teachers are frozen by
construction: kept outside the module's registered children (so they are in no optimiser, no
checkpoint and no DDP wrapper), always in ``eval()``, run under ``torch.inference_mode()`` (in
bf16 on GPU). Student and teachers see the same clips and, with ``mask_ratio > 0``, the same
tube mask (MM-CDFSL). With ``cache=frozen`` the teachers encode the training clips once, before
training (:mod:`mmfsar.tasks.frozen_cache`), so a step costs about a plain step of the student.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from mmfsar.errors import ConfigError
from mmfsar.data.episodes import split_task
from mmfsar.losses.distill import DistillBatch, DistillSpec, DistillTerm, EpisodeDistillBatch
from mmfsar.models.base import (
    EncoderOutput,
    build_encoder,
    exported_modalities,
    given,
    load_export,
    masking_grid,
    plain_config,
)
from mmfsar.models.fusion import FusionTeacher
from mmfsar.tasks.common import Optimization, TrainingModule, frozen_module_outputs, modality_encoder_config
from mmfsar.tasks.episodic import EpisodicModule


class DistillModule(TrainingModule):
    """Args:
    student: the clip encoder being trained (one modality, RGB for the published methods).
    student_config: Hydra config that rebuilds the student (for the export).
    teachers: frozen clip encoders by name.
    terms: loss terms by name (each with a ``weight``).
    mask_ratio: shared tube-mask ratio (0: no masking).
    """

    def __init__(
        self,
        *,
        student: nn.Module,
        student_config: Mapping[str, Any],
        teachers: Mapping[str, nn.Module],
        terms: Mapping[str, nn.Module],
        optim: Optimization,
        mask_ratio: float = 0.0,
    ) -> None:
        super().__init__(optim=optim)
        if not teachers:
            raise ConfigError("model.teachers: give at least one exported teacher (name=path/to/encoder.pt)")
        if not terms:
            raise ConfigError("model.losses: no loss term selected")
        self.student = student
        self.student_config = dict(student_config)
        self.terms = nn.ModuleDict(terms)
        self.mask_ratio = mask_ratio
        self.frozen_cache = None
        # a plain dict, not a ModuleDict: no optimiser, checkpoint or DDP wrapper ever sees them
        self._teachers = {n: t.eval().requires_grad_(False) for n, t in teachers.items()}
        self.grid = None
        if mask_ratio > 0:
            grids = {"student": masking_grid(student)} | {n: masking_grid(t) for n, t in teachers.items()}
            if len(set(grids.values())) != 1:
                raise ConfigError(f"a shared tube mask needs one token grid, got {grids}")
            self.grid = grids["student"]

    @classmethod
    def modality_configs(cls, model_cfg: DictConfig, modalities: DictConfig) -> dict[str, dict[str, Any]]:
        paths = given(model_cfg.teachers)
        if model_cfg.init_from:
            paths["student"] = model_cfg.init_from
        return exported_modalities(paths, modalities)

    @classmethod
    def build(cls, cfg: DictConfig, datamodule: Any) -> "DistillModule":
        student, student_cfg = _student(cfg, datamodule)
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
            optim=instantiate(cfg.optim),
        )

    def exported_encoder(self) -> tuple[nn.Module, dict[str, Any]]:
        return self.student, self.student_config

    def frozen_models(self) -> dict[str, nn.Module]:
        return self._teachers

    @property
    def trained_modalities(self) -> list[str]:
        return list(self.student.modalities)

    def on_fit_start(self) -> None:
        for teacher in self._teachers.values():
            teacher.to(self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        keys = [k for k in ("source", "target") if k in batch]
        parts = [batch[k] for k in keys]
        labels = torch.cat([p["label"] for p in parts])
        kwargs = {}
        if self.grid is not None:
            from mmfsar.models.encoders.vit import tube_mask

            kwargs["mask"] = tube_mask(labels.shape[0], self.grid, self.mask_ratio, device=labels.device)
        needed = set(self.student.modalities)
        if self.frozen_cache is None:
            needed |= {m for t in self._teachers.values() for m in t.modalities}
        inputs = {m: torch.cat([p[m] for p in parts]) for m in needed}
        student = self.student(inputs, **kwargs)
        if self.frozen_cache is not None:
            looked_up = [self.frozen_cache.lookup(k, p, self.device) for k, p in zip(keys, parts)]
            teachers = {n: _concat([o[n] for o in looked_up]) for n in self._teachers}
        else:
            teachers = frozen_module_outputs(self._teachers, inputs, **kwargs)
        db = DistillBatch(student=student, teachers=teachers, labels=labels)
        losses = {name: term(db) for name, term in self.terms.items()}
        loss = sum(term.weight * losses[name] for name, term in self.terms.items())
        self.log_training(loss, batch_size=labels.shape[0], terms=losses)
        return loss

    def validation_features(self, batch: dict[str, Any]) -> EncoderOutput:
        return self.student({m: batch[m] for m in self.student.modalities})


def _concat(outputs: list[EncoderOutput]) -> EncoderOutput:
    """Outputs of several batch parts, concatenated along the batch."""
    cat = lambda field: None if getattr(outputs[0], field) is None else torch.cat([getattr(o, field) for o in outputs])  # noqa: E731
    return EncoderOutput(pooled=cat("pooled"), frames=cat("frames"), logits=cat("logits"))


class EpisodicDistillModule(EpisodicModule):
    """Lite-MKD as published: a light student encoder with a two-branch head
    (:class:`~mmfsar.fewshot.matching.TwoBranchHead`: projections h1, h2 into the teacher's feature
    space, one matching head) learns on N-way K-shot tasks of base classes from a frozen episodic
    teacher (an export that carries its matching head, e.g. ``model=episodic_fusion``'s MFM + TRX):
    the teacher's query logits (KD), its support-prototype relations and the labels (episode
    terms, ``distill=lite_mkd``). Inference: ``z_kl + z_ce``; the export carries the head.
    With ``distill.unlabelled_target`` (``distill=lite_mkd_target``) each task comes with a batch
    of unlabelled target-domain clips, encoded in the same pass (a cross-domain addition; Lite-MKD
    has one domain). Two kinds of terms use them: episode terms with ``uses_unlabelled_target``
    (``episode_feature_mse``: the student's h1 features against the teacher's), and the clip-level
    terms of ``DistillModule`` (a :class:`~mmfsar.losses.distill.DistillTerm`, e.g.
    ``translation_mse``), which see the target clips as a :class:`DistillBatch`: the student
    encoder's output and, as the teachers, the teacher's frozen parts (a fusion teacher's
    per-modality encoders, MM-CDFSL's teachers; otherwise the teacher itself).

    The teacher and its head are held outside the module tree (no optimiser, checkpoint or DDP
    wrapper sees them), in ``eval()`` without gradients; with ``cache=frozen`` the outputs of the
    teacher's frozen parts are computed once per clip (and view); a fusion teacher's fusion and
    its head still run on every task.
    """

    def __init__(
        self,
        *,
        teacher: nn.Module,
        teacher_classifier: nn.Module,
        terms: Mapping[str, nn.Module],
        **episodic: Any,
    ) -> None:
        super().__init__(**episodic)
        if not terms:
            raise ConfigError("model.losses: no loss term selected")
        self.terms = nn.ModuleDict(terms)
        self._teachers = {"teacher": teacher.eval().requires_grad_(False)}
        # in a plain dict too: not a registered submodule, so in no state dict, optimiser or wrapper
        self._teacher_heads = {"teacher": teacher_classifier.eval().requires_grad_(False)}

    @classmethod
    def modality_configs(cls, model_cfg: DictConfig, modalities: DictConfig) -> dict[str, dict[str, Any]]:
        paths = given({"teacher": model_cfg.teacher, "student": model_cfg.init_from})
        return exported_modalities(paths, modalities)

    @classmethod
    def build(cls, cfg: DictConfig, datamodule: Any) -> "EpisodicDistillModule":
        from mmfsar.models.base import build_exported_classifier
        from mmfsar.tasks.episodic import classifier_for

        if datamodule.task_settings is None:
            raise ConfigError("episodic distillation needs model.episodes (n_way, k_shot, n_query, episodes, seed)")
        if not cfg.teacher:
            raise ConfigError("model.teacher: give the exported episodic teacher (encoder.pt with its matching head)")
        payload = load_export(cfg.teacher)
        teacher, teacher_classifier = build_encoder(payload), build_exported_classifier(payload)
        if teacher_classifier is None:
            raise ConfigError(
                f"model.teacher={cfg.teacher} carries no matching head: train the teacher episodically "
                "(model=episodic_fusion) so its episode logits can be distilled"
            )
        student, student_cfg = _student(cfg, datamodule)
        head_cfg = {**plain_config(cfg.classifier), "out_dim": int(teacher.feature_dim)}
        classifier, classifier_cfg = classifier_for(head_cfg, student, datamodule.val_set[0])
        parts = _frozen_parts(teacher)
        spec = DistillSpec(
            student_dim=int(student.feature_dim), teacher_dims={n: int(m.feature_dim) for n, m in parts.items()}, num_classes=0
        )
        terms = {name: _episodic_term(term, spec) for name, term in (cfg.losses or {}).items() if term is not None}
        wanting = sorted(name for name, term in terms.items() if _uses_target_clips(term))
        if bool(wanting) != ("target" in datamodule.train_sets):
            raise ConfigError(
                f"model.losses {wanting} use unlabelled target clips: set distill.unlabelled_target=true"
                if wanting
                else "distill.unlabelled_target=true, but no term in model.losses uses target clips "
                "(distill=lite_mkd_target, or distill/loss@distill.losses.feature=episode_feature_mse)"
            )
        return cls(
            encoder=student,
            encoder_config=student_cfg,
            classifier=classifier,
            classifier_config=classifier_cfg,
            task=datamodule.task_settings,
            optim=instantiate(cfg.optim),
            teacher=teacher,
            teacher_classifier=teacher_classifier,
            terms=terms,
        )

    def frozen_models(self) -> dict[str, nn.Module]:
        return _frozen_parts(self._teachers["teacher"])

    def on_fit_start(self) -> None:
        self._teachers["teacher"].to(self.device)
        self._teacher_heads["teacher"].to(self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        task, clips = batch["source"], batch.get("target")
        parts = [task] if clips is None else [task, clips]
        encoded = self.encoder({m: torch.cat([p[m] for p in parts]) for m in self.encoder.modalities})
        features = self.task_features(encoded)
        n_task = self.task.n_way * (self.task.k_shot + self.task.n_query)
        support, query, target = split_task(features[:n_task], self.task)
        student = {k: v[0] for k, v in self.classifier.branches(support, query).items()}
        teacher = [self._teacher_outputs(key, part) for key, part in zip(("source", "target"), parts)]
        t_support, t_query, _ = split_task(teacher[0][0], self.task)
        with torch.inference_mode():
            teacher_logits = self._teacher_heads["teacher"].eval()(t_support, t_query)[0]
        unlabelled, target_clips = {}, None
        if clips is not None:
            t_frames, t_parts = teacher[1]
            unlabelled = {"unlabelled_student": self.classifier.teacher_space(features[n_task:]), "unlabelled_teacher": t_frames}
            labels = torch.full((t_frames.shape[0],), -1, dtype=torch.long, device=t_frames.device)
            target_clips = DistillBatch(student=encoded.rows(slice(n_task, None)), teachers=t_parts, labels=labels)
        db = EpisodeDistillBatch(
            student_logits=student, teacher_logits=teacher_logits.clone(), teacher_support=t_support[0], target=target, **unlabelled
        )
        losses = {name: term(target_clips if isinstance(term, DistillTerm) else db) for name, term in self.terms.items()}
        loss = sum(term.weight * losses[name] for name, term in self.terms.items())
        self.log_training(loss, batch_size=1, terms=losses, accuracy=(student["kl"] + student["ce"], target))
        return loss

    def _teacher_outputs(self, key: str, clips: dict[str, Any]) -> tuple[torch.Tensor, dict[str, EncoderOutput]]:
        """The frozen teacher on a batch of clips: its features as its head takes them (B, T, D),
        and the outputs of its frozen parts (:func:`_frozen_parts`)."""
        teacher = self._teachers["teacher"]
        if self.frozen_cache is not None:
            outputs = self.frozen_cache.lookup(key, clips, self.device)
        else:
            outputs = frozen_module_outputs(self.frozen_models(), {m: clips[m] for m in teacher.modalities})
        if "teacher" in outputs:
            out = outputs["teacher"]
        else:
            with torch.no_grad():
                out = teacher.eval().fuse({name: o.frames for name, o in outputs.items()})
        return (out.frames if self._teacher_heads["teacher"].uses_frames else out.pooled[:, None]), outputs


def _frozen_parts(teacher: nn.Module) -> dict[str, nn.Module]:
    """What of an episodic teacher the frozen-output cache stores and the clip-level terms see as
    teachers: a fusion teacher's frozen per-modality encoders (its fusion runs per task), or the
    teacher itself."""
    if isinstance(teacher, FusionTeacher) and teacher.freeze_encoders:
        return dict(teacher.encoders)
    return {"teacher": teacher}


def _episodic_term(config: Any, spec: DistillSpec) -> nn.Module:
    """An episodic distillation term from its config; a ``_partial_`` one (a clip-level
    :class:`DistillTerm`, which sizes its heads from the features) is given ``spec``."""
    term = instantiate(config)
    return term(spec=spec) if isinstance(term, functools.partial) else term


def _uses_target_clips(term: nn.Module) -> bool:
    """Clip-level terms see the unlabelled target clips; episode terms say whether they need them."""
    return isinstance(term, DistillTerm) or bool(getattr(term, "uses_unlabelled_target", False))


def _student(cfg: DictConfig, datamodule: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The student clip encoder on ``cfg.student_modality``: from the export ``cfg.init_from``
    (its base-class head dropped), or new from the backbone preset ``cfg.encoder``."""
    modality = cfg.student_modality
    if modality not in datamodule.modalities:
        raise ConfigError(f"model.student_modality={modality!r} is not among the loaded modalities {sorted(datamodule.modalities)}")
    if not cfg.init_from:
        student_cfg = modality_encoder_config(cfg.encoder, modality, datamodule.encoder_inputs(modality))
        return instantiate(student_cfg, _convert_="all"), student_cfg
    payload = load_export(cfg.init_from)
    student_cfg = {**payload["encoder"], "num_classes": 0}
    if student_cfg.get("modality") != modality:
        raise ConfigError(f"model.init_from={cfg.init_from} is a {student_cfg.get('modality')!r} encoder, not {modality!r}")
    student = instantiate(student_cfg, _convert_="all")
    student.load_state_dict({k: v for k, v in payload["state_dict"].items() if not k.startswith("head.")})
    return student, student_cfg

"""MMCL (Liu, Chen & Liu, ACM MM 2024; METHODS.md section 4): a skeleton model co-learned with RGB
and class text, tested on skeletons alone.

The trained model is a plain skeleton classifier (a :class:`~mmfsar.models.base.ModalityEncoder`:
a GCN and its ``fc`` head). Two extra signals shape it during training only:

* **Feature alignment** (:class:`~mmfsar.losses.mmcl.FeatureAlignment`): the clip's feature from a
  *frozen* RGB encoder → MLP → the skeleton feature's space, symmetric InfoNCE (τ = 0.4) against the
  skeleton's pooled feature (no skeleton projection when the sizes agree, as released).
* **Feature refinement** (:class:`~mmfsar.losses.mmcl.TextRefinement`): the class text feature →
  MLP → softmax ``(p⁺, p⁻)``; ``refined = (p⁺·W⁺ + p⁻·W⁻) ⊙ fc(x)``, ``W±`` initialised to 1.

``loss = CE(fc(x)) + 0.2 · CE(refined) + 0.1 · L_align`` (:func:`~mmfsar.losses.mmcl.mmcl_loss`).
The export is the skeleton encoder with its ``fc`` head and nothing else: evaluation (supervised
top-1 with ``eval_protocol protocol=head``, linear evaluation, few-shot episodes) reads skeletons
only, and a dataset without ``rgb/`` and ``text/`` serves it.

Where we depart from the released code (``liujf69/MMCL-Action``), and why:

* The RGB encoder is **frozen** (any exported mmfsar clip encoder; the paper's is an ImageNet
  Inception-v3 on one frame, which its code fine-tunes through the alignment loss). Frozen, its
  output depends on the clip alone, so with ``cache=frozen`` it is computed once per clip (and
  view) before training, and an MMCL step costs about a plain CE step of the skeleton model
  (``benchmarks/bench_mmcl.py``). ``rgb_output`` picks the feature: ``pooled`` (default: the clip
  feature) or ``logits`` (its classifier's scores, as the released code feeds Inception-v3's 1000
  logits).
* The text is **per class** (``text/features.npy``), not per clip (the paper's multimodal-LLM
  answer about one frame): a clip's text is its class's (see :mod:`mmfsar.losses.mmcl`).
* The RGB encoder reads the clip at the frame count it was exported with: when the skeleton model
  samples another number of frames, the frozen encoder gets evenly spaced frames of the same
  sampled clip (:class:`FrameSubsampled`), so a skeleton preset keeps its own temporal resolution.
* Validation reads the skeleton stream only (RGB is neither needed nor decoded for it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mmfsar.errors import ConfigError
from mmfsar.losses.mmcl import FeatureAlignment, TextRefinement, mmcl_loss
from mmfsar.models.base import EncoderOutput, ModalityEncoder, build_encoder, exported_modalities, load_export
from mmfsar.tasks.common import Optimization, TrainingModule, frozen_module_outputs, modality_encoder_config

__all__ = ["FrameSubsampled", "MMCLModule", "subsample_frames"]

RGB_OUTPUTS = ("pooled", "logits")


def subsample_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``num_frames`` evenly spaced time steps of a batch of clips ``(B, C, T, ...)`` (time is
    dimension 2 for every mmfsar modality): step ``j`` takes the sampled frame nearest the centre
    of the ``j``-th of ``num_frames`` equal segments, ``⌊(j + ½)·T / num_frames⌋``; unchanged when
    ``T == num_frames`` (and frames repeat when ``T < num_frames``)."""
    time = x.shape[2]
    if time == num_frames:
        return x
    index = ((torch.arange(num_frames, device=x.device) + 0.5) * time / num_frames).long()
    return x.index_select(2, index)


class FrameSubsampled(nn.Module):
    """A frozen clip encoder fed ``num_frames`` evenly spaced frames of longer (or shorter) clips
    (:func:`subsample_frames`), so an encoder exported at 8 frames teaches a 16-frame skeleton model."""

    def __init__(self, encoder: nn.Module, num_frames: int) -> None:
        super().__init__()
        if num_frames < 1:
            raise ValueError(f"FrameSubsampled: num_frames must be >= 1, got {num_frames}")
        self.encoder = encoder
        self.num_frames = int(num_frames)

    @property
    def modalities(self) -> list[str]:
        return list(self.encoder.modalities)

    @property
    def feature_dim(self) -> int:
        return int(self.encoder.feature_dim)

    def forward(self, inputs: Mapping[str, torch.Tensor], **kwargs: Any) -> EncoderOutput:
        return self.encoder({m: subsample_frames(inputs[m], self.num_frames) for m in self.modalities}, **kwargs)


class MMCLModule(TrainingModule):
    """Trains a skeleton classifier with MMCL's objective; exports only the skeleton classifier.

    Args:
        encoder: the skeleton :class:`ModalityEncoder` with its ``fc`` head (the exported model).
        encoder_config: the config that rebuilds ``encoder`` (kept for the export).
        teacher: the frozen RGB clip encoder (None only when ``align_weight`` is 0).
        alignment: feature alignment (RGB MLP, InfoNCE); None only when ``align_weight`` is 0.
        refinement: text refinement (gate MLP, ``W±``, the class text); None only when
            ``refine_weight`` is 0.
        refine_weight, align_weight: the weights of ``CE(refined)`` and ``L_align`` (0.2, 0.1).
        rgb_output: the teacher output aligned with the skeleton feature (``pooled`` or ``logits``).
    """

    def __init__(
        self,
        *,
        encoder: ModalityEncoder,
        encoder_config: Mapping[str, Any],
        teacher: nn.Module | None,
        alignment: FeatureAlignment | None,
        refinement: TextRefinement | None,
        optim: Optimization,
        refine_weight: float = 0.2,
        align_weight: float = 0.1,
        rgb_output: str = "pooled",
    ) -> None:
        super().__init__(optim=optim)
        if encoder.head is None:
            raise ConfigError("MMCL trains a classifier: the skeleton encoder needs its fc head (num_classes > 0)")
        if rgb_output not in RGB_OUTPUTS:
            raise ConfigError(f"model.rgb_output must be one of {RGB_OUTPUTS}, got {rgb_output!r}")
        for name, weight, part in (
            ("align_weight", align_weight, alignment),
            ("refine_weight", refine_weight, refinement),
        ):
            if weight < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {weight}")
            if weight > 0 and part is None:
                raise ConfigError(f"model.{name}={weight} needs its module (alignment / refinement), got None")
        if align_weight > 0 and teacher is None:
            raise ConfigError(
                "model.teacher: MMCL's feature alignment needs the exported RGB encoder "
                "(model.teacher=<run>/encoder.pt)"
            )
        self.encoder = encoder
        self.encoder_config = dict(encoder_config)
        self.modality = encoder.modality
        self.alignment = alignment if align_weight > 0 else None
        self.refinement = refinement if refine_weight > 0 else None
        self.refine_weight = float(refine_weight)
        self.align_weight = float(align_weight)
        self.rgb_output = rgb_output
        self.frozen_cache = None
        # a plain dict, not a submodule: no optimiser, checkpoint, export or DDP wrapper sees it
        self._teachers = (
            {"rgb": teacher.eval().requires_grad_(False)} if teacher is not None and align_weight > 0 else {}
        )
        self.train_acc = MulticlassAccuracy(num_classes=encoder.head.out_features)

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def modality_configs(cls, model_cfg: DictConfig, modalities: DictConfig) -> dict[str, dict[str, Any]]:
        """The configured (skeleton) modality plus the RGB encoder's, exactly as it was exported
        (none when ``align_weight`` is 0: the RGB clips are then never read)."""
        aligned = model_cfg.get("teacher") and float(model_cfg.align_weight) > 0
        paths = {"teacher": model_cfg.teacher} if aligned else {}
        return exported_modalities(paths, modalities)

    @classmethod
    def build(cls, cfg: DictConfig, datamodule: Any) -> MMCLModule:
        """From the ``model`` config (``configs/model/mmcl.yaml``) and the set-up data module
        (``ProtocolDataModule``: a protocol's classes; or base-class source clips)."""
        from mmfsar.data.text import read_class_text

        if "target" in datamodule.train_sets:
            raise ConfigError("MMCL trains on labelled clips: set data.unlabelled_target=false")
        align_weight, refine_weight = float(cfg.align_weight), float(cfg.refine_weight)
        teacher, payload = None, None
        if cfg.get("teacher") and align_weight > 0:
            payload = load_export(cfg.teacher)
            teacher = build_encoder(payload)
        elif align_weight > 0:
            raise ConfigError("model.teacher: give the exported RGB encoder (model.teacher=<run>/encoder.pt), "
                              "or set model.align_weight=0 to train without feature alignment")  # fmt: skip
        teacher_modalities = set(teacher.modalities) if teacher is not None else set()
        students = [m for m in datamodule.modalities if m not in teacher_modalities]
        if len(students) != 1:
            raise ConfigError(
                f"MMCL trains one skeleton stream: the configured modalities other than the RGB encoder's "
                f"{sorted(teacher_modalities)} are {students}; choose one with modality=skeleton "
                "(or skeleton_bone, ...)"
            )
        (modality,) = students
        classes = list(datamodule.base_classes)
        enc_cfg = modality_encoder_config(
            cfg.encoder, modality, datamodule.encoder_inputs(modality), len(classes), cfg.get("head")
        )
        encoder = instantiate(enc_cfg, _convert_="all")

        alignment = None
        if teacher is not None:
            frames = int(payload["frames"].get("num_frames", datamodule.frames.num_frames))
            if frames != datamodule.frames.num_frames:
                rank_zero_info(
                    f"MMCL: the RGB encoder {cfg.teacher} was exported at {frames} frames; it reads {frames} evenly "
                    f"spaced frames of the {datamodule.frames.num_frames} sampled per clip"
                )
                teacher = FrameSubsampled(teacher, frames)
            rgb_dim = _output_dim(teacher, datamodule.train_sets["source"][0], cfg.rgb_output, cfg.teacher)
            proj_dim = cfg.alignment.get("proj_dim") or encoder.feature_dim  # the skeleton's space, as released
            alignment = instantiate(cfg.alignment, skeleton_dim=encoder.feature_dim, rgb_dim=rgb_dim, proj_dim=proj_dim)
        refinement = None
        if refine_weight > 0:
            text = read_class_text(datamodule.root, classes, need="features").features
            refinement = instantiate(
                cfg.refinement, text_dim=int(text.shape[1]), num_classes=len(classes), class_text=text
            )
        return cls(
            encoder=encoder,
            encoder_config=enc_cfg,
            teacher=teacher,
            alignment=alignment,
            refinement=refinement,
            optim=instantiate(cfg.optim),
            refine_weight=refine_weight,
            align_weight=align_weight,
            rgb_output=cfg.rgb_output,
        )

    # --- what the stage trains and exports --------------------------------------------------
    def exported_encoder(self) -> tuple[nn.Module, dict[str, Any]]:
        return self.encoder, self.encoder_config

    def frozen_models(self) -> dict[str, nn.Module]:
        return self._teachers

    @property
    def trained_modalities(self) -> list[str]:
        return [self.modality]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule
        if stage == "fit" and getattr(dm, "val_set", None) is not None:
            # validation scores the skeleton model: its loader need not read (decode) the RGB clips
            dm.val_set.modalities = {self.modality: dm.modalities[self.modality]}

    def on_fit_start(self) -> None:
        for teacher in self._teachers.values():
            teacher.to(self.device)

    # --- training ---------------------------------------------------------------------------
    def rgb_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """The frozen RGB encoder's ``rgb_output`` for the clips of a training batch: looked up in
        the frozen-output cache, or computed (``eval()``, ``inference_mode``) without one."""
        if self.frozen_cache is not None:
            out = self.frozen_cache.lookup("source", batch, self.device)["rgb"]
        else:
            teacher = self._teachers["rgb"]
            out = frozen_module_outputs(self._teachers, {m: batch[m] for m in teacher.modalities})["rgb"]
        return getattr(out, self.rgb_output)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        clips = batch["source"]
        labels = clips["label"]
        out = self.encoder({self.modality: clips[self.modality]})
        losses = {"ce": F.cross_entropy(out.logits, labels)}
        refined = out.logits
        if self.refinement is not None:
            refined = self.refinement(out.logits, labels=labels)
            losses["refine_ce"] = F.cross_entropy(refined, labels)
        align = out.logits.new_zeros(())
        if self.alignment is not None:
            align = losses["align"] = self.alignment(out.pooled, self.rgb_features(clips))
        loss = mmcl_loss(
            out.logits, refined, labels, align, refine_weight=self.refine_weight, align_weight=self.align_weight
        )
        self.log_training(loss, batch_size=labels.shape[0], terms=losses, accuracy=(out.logits, labels))
        return loss

    def validation_features(self, batch: dict[str, Any]) -> EncoderOutput:
        return self.encoder({self.modality: batch[self.modality]})


def _output_dim(teacher: nn.Module, clip: Mapping[str, Any], field: str, path: str) -> int:
    """Size of the frozen encoder's ``field`` output, from one (unbatched) training clip."""
    if field not in RGB_OUTPUTS:
        raise ConfigError(f"model.rgb_output must be one of {RGB_OUTPUTS}, got {field!r}")
    with torch.no_grad():
        out = getattr(teacher.eval()({m: clip[m][None] for m in teacher.modalities}), field)
    if out is None:
        raise ConfigError(
            f"model.rgb_output={field!r}: the RGB encoder {path} has no classifier head; use rgb_output=pooled"
        )
    return int(out.shape[-1])

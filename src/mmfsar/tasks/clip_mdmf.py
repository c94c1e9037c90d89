"""CLIP-MDMF (Guo et al., Knowledge-Based Systems 2024; METHODS.md section 5) as an episodic training module.

Each training step is one N-way K-shot task of the base classes (``model.episodes``, drawn as
:class:`~mmfsar.tasks.episodic.EpisodicModule` draws them). The CLIP image tower gives every
frame a feature, the frozen text tower gives every base class a text feature (encoded once, at
build time), and :class:`~mmfsar.models.clip_mdmf.ClipMDMFHead` does the rest: prompts (a support
clip its class's text, a query the text of a class sampled from softmax(200·s)), the local and
global temporal views, the prompt-frame cross-attention per view, prototypes (mean over shots),
bidirectional OTAM, ``logits = -(D_local + D_global)`` and the mutual distillation between views:

    loss = CE(logits, query labels) + kd_weight · L_KD (+ video_text_weight · CE(video-text))

The optional video-text term (the released code's ``class_logits``, off by default there:
``lambdas = [0, 1, 1]``) scores each clip's mean frame feature against every base class's text
(cosine / ``video_text_temperature``); it trains the image tower only, so it needs an unfrozen one.

**Frozen or fine-tuned image tower.** The released code fine-tunes CLIP's image tower (Adam, lr
1e-6 .. 1e-5, 16 tasks per step) with the text tower frozen; that is the default here
(``model.clip.freeze=false``). Frozen (``model.clip.freeze=true``), the tower is a frozen model:
with ``cache=frozen`` every training clip's frame features are computed once before training and a
step runs only the views, the attention and the matching (``benchmarks/bench_clip_mdmf.py``);
the tiny preset does that.

Validation solves the val episodes with the trained head, prompted with the val classes' texts;
the export carries the CLIP (both towers, :class:`~mmfsar.models.clip_towers.ClipTowers`) and the
head (:class:`~mmfsar.fewshot.clip_mdmf.ClipMDMFClassifier`), and ``lit_main_eval.py`` binds the
evaluated classes' texts to it: text is used at test time, as in the paper.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from mmfsar.data.episodes import EpisodeSettings, split_task
from mmfsar.errors import ConfigError
from mmfsar.fewshot.clip_mdmf import ClipMDMFClassifier
from mmfsar.models.base import EncoderOutput, exported_modalities, load_export
from mmfsar.models.clip_towers import ClipTowers, clip_towers_config, configured_weights, require_clip_weights
from mmfsar.tasks.common import Optimization, TrainingModule
from mmfsar.tasks.episodic import classifier_for

TOWERS_TARGET = "mmfsar.models.clip_towers.ClipTowers"


class ClipMDMFModule(TrainingModule):
    """Trains CLIP-MDMF's head (and, unless frozen, CLIP's image tower) on tasks of the base classes.

    Args:
        towers / towers_config: the CLIP (text tower frozen) and the config that rebuilds it.
        classifier / classifier_config: the matching head as a few-shot classifier, bound to the val classes.
        base_text: ``(C_base, D)`` unit-norm text features of the base classes, row = label.
        task: the tasks' settings. kd_weight: weight of the mutual distillation.
        video_text_weight / video_text_temperature: the optional video-text cross-entropy.
    """

    def __init__(
        self,
        *,
        towers: ClipTowers,
        towers_config: Mapping[str, Any],
        classifier: ClipMDMFClassifier,
        classifier_config: Mapping[str, Any],
        base_text: Tensor,
        task: EpisodeSettings,
        optim: Optimization,
        kd_weight: float = 1.0,
        video_text_weight: float = 0.0,
        video_text_temperature: float = 0.01,
    ) -> None:
        super().__init__(optim=optim)
        if not towers.freeze_text:
            raise ConfigError(
                "CLIP-MDMF keeps CLIP's text tower frozen (its class texts are encoded once): model.text.freeze=true"
            )
        if video_text_weight > 0 and towers.freeze_image:
            raise ConfigError(
                "model.video_text_weight > 0 trains the image tower, which is frozen (model.clip.freeze=true): "
                "it would add a constant; set model.video_text_weight=0 or unfreeze the tower"
            )
        if kd_weight < 0 or video_text_weight < 0 or video_text_temperature <= 0:
            raise ConfigError(
                "model.kd_weight and model.video_text_weight must be >= 0, model.video_text_temperature > 0"
            )
        self.towers = towers
        self.towers_config = dict(towers_config)
        self.classifier = classifier
        self.classifier_config = dict(classifier_config)
        self.register_buffer("base_text", base_text.float(), persistent=False)
        self.task = task
        self.kd_weight = kd_weight
        self.video_text_weight = video_text_weight
        self.video_text_temperature = video_text_temperature
        self.frozen_cache = None
        self.train_acc = MulticlassAccuracy(num_classes=task.n_way)

    # --- building ------------------------------------------------------------------------------
    @classmethod
    def modality_configs(cls, model_cfg: DictConfig, modalities: DictConfig) -> dict[str, dict[str, Any]]:
        """Where the CLIP comes from is checked here, before any data is read: one of
        ``model.init_from`` (an export of the CLIP pretraining or of CLIP-MDMF) and
        ``model.clip.pretrained`` (a CLIP checkpoint file), and the file must exist."""
        init_from, pretrained = model_cfg.get("init_from"), configured_weights(model_cfg.clip)
        if (init_from is None) == (pretrained is None):
            raise ConfigError(
                "CLIP-MDMF starts from a CLIP: give model.clip.pretrained=/path/to/clip_checkpoint.pt (OpenAI or "
                "open_clip "
                "weights of the model/encoder@model.clip architecture) or model.init_from=<run>/encoder.pt (a CLIP "
                f"exported by experiment=clip_mdmf_tiny/clip), not {'both' if init_from else 'neither'}"
            )
        if pretrained is not None:
            require_clip_weights(model_cfg.clip, "model.clip")
        paths = {"init_from": init_from} if init_from else {}
        return exported_modalities(paths, modalities)

    @classmethod
    def build(cls, cfg: DictConfig, datamodule: Any) -> "ClipMDMFModule":
        if datamodule.task_settings is None:
            raise ConfigError("CLIP-MDMF trains on tasks: set model.episodes (n_way, k_shot, n_query, episodes, seed)")
        if len(datamodule.modalities) != 1:
            raise ConfigError(f"CLIP-MDMF reads one RGB stream, got modalities {sorted(datamodule.modalities)}")
        (modality,) = datamodule.modalities
        towers, towers_cfg = cls.build_towers(cfg, datamodule, modality)
        base_text = towers.encode_classes(datamodule.root, datamodule.base_classes)
        classifier, classifier_cfg = classifier_for(cfg.classifier, towers, datamodule.val_set[0])
        if not isinstance(classifier, ClipMDMFClassifier):
            raise ConfigError(
                "model.classifier must be CLIP-MDMF's head (fewshot/classifier=clip_mdmf), "
                f"got {type(classifier).__name__}"
            )
        classifier.bind_classes(datamodule.val_episodes.class_names, root=datamodule.root, encoder=towers)
        return cls(
            towers=towers,
            towers_config=towers_cfg,
            classifier=classifier,
            classifier_config=classifier_cfg,
            base_text=base_text,
            task=datamodule.task_settings,
            optim=instantiate(cfg.optim),
            kd_weight=float(cfg.kd_weight),
            video_text_weight=float(cfg.video_text_weight),
            video_text_temperature=float(cfg.video_text_temperature),
        )

    @staticmethod
    def build_towers(cfg: DictConfig, datamodule: Any, modality: str) -> tuple[ClipTowers, dict[str, Any]]:
        """The CLIP from a checkpoint file (``model.clip``) or from an export (``model.init_from``;
        its architecture, weights and text settings, with ``model.clip.freeze`` / ``model.text.freeze``)."""
        if not cfg.get("init_from"):
            inputs = datamodule.encoder_inputs(modality)
            towers_cfg = clip_towers_config(cfg.clip, modality=modality, inputs=inputs, text=cfg.text)
            return instantiate(towers_cfg, _convert_="all"), towers_cfg
        payload = load_export(cfg.init_from)
        if payload["encoder"].get("_target_") != TOWERS_TARGET:
            raise ConfigError(
                f"model.init_from={cfg.init_from} is a {payload['encoder'].get('_target_')} export; "
                "CLIP-MDMF needs a CLIP with "
                "its text tower (an export of experiment=clip_mdmf_tiny/clip or of CLIP-MDMF)"
            )
        inputs = datamodule.encoder_inputs(modality)
        if any(payload["encoder"][key] != inputs[key] for key in ("num_frames", "img_size")):
            log_inputs = {k: payload["encoder"][k] for k in ("num_frames", "img_size")}
            raise ConfigError(f"model.init_from={cfg.init_from} was built for {log_inputs}, the data gives {inputs}")
        towers_cfg = {
            **payload["encoder"],
            "freeze_image": bool(cfg.clip.get("freeze", False)),
            "freeze_text": bool(cfg.text.get("freeze", True)),
        }
        towers = instantiate(towers_cfg, _convert_="all")
        towers.load_state_dict(payload["state_dict"])
        towers.image.train(towers.training)  # re-applies the frozen tower's eval mode
        return towers, towers_cfg

    # --- what the stage trains, caches and exports ------------------------------------------------
    @property
    def val_classifier(self) -> ClipMDMFClassifier:
        return self.classifier

    def frozen_models(self) -> dict[str, ClipTowers]:
        return {"clip": self.towers} if self.towers.freeze_image else {}

    @property
    def trained_modalities(self) -> list[str]:
        return [] if self.towers.freeze_image else list(self.towers.modalities)

    def exported_encoder(self) -> tuple[ClipTowers, dict[str, Any]]:
        return self.towers, self.towers_config

    def exported_classifier(self) -> tuple[ClipMDMFClassifier, dict[str, Any]]:
        return self.classifier, self.classifier_config

    def validation_features(self, batch: dict[str, Any]) -> EncoderOutput:
        return self.towers(batch)

    # --- a training step -------------------------------------------------------------------------
    def task_frames(self, task: dict[str, Any]) -> Tensor:
        """(clips, T, D) frame features of a task's clips: from the frozen-output cache, or encoded."""
        if self.frozen_cache is not None:
            return self.frozen_cache.lookup("source", task, self.device)["clip"].frames
        return self.towers(task).frames

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        task = batch["source"]
        frames = self.task_frames(task)
        support, query, target = split_task(frames, self.task)
        labels = task["label"].view(self.task.n_way, -1)  # base-class label of every clip, way by way
        out = self.classifier.head(support, query, support_text=self.base_text[labels[:, 0]][None])
        logits = out["logits"][0]
        ce = F.cross_entropy(logits, target)
        loss = ce + self.kd_weight * out["kd_loss"]
        metrics = {"train/ce": ce.detach(), "train/kd": out["kd_loss"].detach()}
        if self.video_text_weight > 0:
            video_text = self.video_text_logits(frames)
            vt = F.cross_entropy(video_text, labels.reshape(-1))
            loss = loss + self.video_text_weight * vt
            metrics["train/video_text"] = vt.detach()
        self.train_acc(logits.detach(), target)
        self.log_dict({"train/loss": loss.detach(), **metrics}, prog_bar=True, batch_size=1)
        self.log("train/acc", self.train_acc, batch_size=1)
        self.log("train/local_teaches", out["local_is_teacher"].float().mean(), batch_size=1)
        return loss

    def video_text_logits(self, frames: Tensor) -> Tensor:
        """(clips, C_base): cosine of each clip's mean frame feature with every base-class text / τ."""
        return F.normalize(frames.mean(dim=1), dim=-1) @ self.base_text.T / self.video_text_temperature

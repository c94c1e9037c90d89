"""A CLIP trained by mmfsar: frames <-> class descriptions of the base classes, open_clip's contrastive loss.

CLIP-MDMF (METHODS.md section 5) starts from a pretrained CLIP. None can be downloaded here, so
the embedded data gets its own: the same open_clip model class at a tiny size
(:data:`~mmfsar.models.encoders.clip.TINY_CLIP_MODEL`), both towers trained from scratch on the
labelled source clips of the base classes, each clip paired with its class's text (the dataset's
description, ``text/descriptions.csv``). The loss is open_clip's own ``ClipLoss`` (symmetric
InfoNCE with CLIP's learnable temperature, clamped to 100 as open_clip's training does).

**Batches of distinct classes.** CLIP's loss takes the i-th text as the only match of the i-th
image; two clips of one class in a batch would make identical texts negatives of each other. So a
batch is a task of ``model.episodes`` (N classes, M = k_shot + n_query clips each, drawn as
episodic training draws its tasks) and the loss is the mean of M · F ``ClipLoss`` terms, each over
N images of N different classes: clip slot m, frame slot f (``frames_per_clip`` = F random
frames of each clip, each its own image, as CLIP is trained on images; None: the mean of all
the clip's frame embeddings, one image per clip).

The export is a :class:`~mmfsar.models.clip_towers.ClipTowers` (image tower as the clip encoder,
text tower beside it, the text settings it was trained with): ``lit_main_eval.py`` evaluates its
frame features with any classifier, and CLIP-MDMF starts from it (``model.init_from``).
Validation: nearest centroid on the pooled frame features of the val episodes.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from open_clip.loss import ClipLoss
from torch import Tensor

from mmfsar.data.episodes import EpisodeSettings
from mmfsar.errors import ConfigError
from mmfsar.models.base import EncoderOutput, plain_config
from mmfsar.models.clip_towers import ClipTowers, class_texts, clip_towers_config, require_clip_weights
from mmfsar.tasks.common import Optimization, TrainingModule

MAX_LOGIT_SCALE = math.log(100.0)  # open_clip's training clamps CLIP's temperature to 1/100


class ClipPretrainModule(TrainingModule):
    """Trains both towers of a CLIP with open_clip's ``ClipLoss`` on tasks of distinct base classes.

    Args:
        towers / towers_config: the CLIP and the config that rebuilds it.
        class_tokens: ``(C_base, L)`` token ids of the base classes' templated texts, row = label.
        task: the batches' settings (``model.episodes``: N classes, k_shot + n_query clips each).
        frames_per_clip: random frames per clip, each an image (None: the clip's mean embedding).
    """

    def __init__(
        self,
        *,
        towers: ClipTowers,
        towers_config: Mapping[str, Any],
        class_tokens: Tensor,
        task: EpisodeSettings,
        frames_per_clip: int | None = None,
        optim: Optimization,
    ) -> None:
        super().__init__(optim=optim)
        if towers.freeze_image or towers.freeze_text:
            raise ConfigError(
                "CLIP pretraining trains both towers: set model.clip.freeze=false and model.text.freeze=false"
            )
        if frames_per_clip is not None and not 1 <= frames_per_clip <= towers.image.num_frames:
            raise ConfigError(
                f"model.frames_per_clip={frames_per_clip} must be in [1, {towers.image.num_frames}] or null"
            )
        self.towers = towers
        self.towers_config = dict(towers_config)
        self.register_buffer("class_tokens", class_tokens, persistent=False)
        self.task = task
        self.frames_per_clip = frames_per_clip
        self.clip_loss = ClipLoss()

    @classmethod
    def modality_configs(cls, model_cfg: DictConfig, modalities: DictConfig) -> dict[str, dict[str, Any]]:
        require_clip_weights(model_cfg.clip, "model.clip")  # before any data is read
        return plain_config(modalities) or {}

    @classmethod
    def build(cls, cfg: DictConfig, datamodule: Any) -> "ClipPretrainModule":
        if datamodule.task_settings is None:
            raise ConfigError("CLIP pretraining draws batches of distinct classes: set model.episodes")
        if len(datamodule.modalities) != 1:
            raise ConfigError(f"CLIP sees one RGB stream, got modalities {sorted(datamodule.modalities)}")
        (modality,) = datamodule.modalities
        inputs = datamodule.encoder_inputs(modality)
        towers_cfg = clip_towers_config(cfg.clip, modality=modality, inputs=inputs, text=cfg.text)
        towers = instantiate(towers_cfg, _convert_="all")
        texts = class_texts(datamodule.root, datamodule.base_classes, source=towers.text_source)
        return cls(
            towers=towers,
            towers_config=towers_cfg,
            class_tokens=towers.text.tokenize(texts),
            task=datamodule.task_settings,
            frames_per_clip=cfg.get("frames_per_clip"),
            optim=instantiate(cfg.optim),
        )

    @property
    def trained_modalities(self) -> list[str]:
        return list(self.towers.modalities)

    def exported_encoder(self) -> tuple[ClipTowers, dict[str, Any]]:
        return self.towers, self.towers_config

    def validation_features(self, batch: dict[str, Any]) -> EncoderOutput:
        return self.towers(batch)

    def image_features(self, clips: Tensor) -> Tensor:
        """``(B, 3, T, H, W)`` -> ``(B, F, D)`` unit-norm image embeddings (F frames, or 1 clip mean)."""
        if self.frames_per_clip is None:
            return F.normalize(self.towers.image(clips).pooled, dim=-1)[:, None]
        picks = torch.rand(clips.shape[0], clips.shape[2], device=clips.device).argsort(dim=1)
        picks = picks[:, : self.frames_per_clip]
        index = picks[:, None, :, None, None].expand(-1, clips.shape[1], -1, *clips.shape[3:])
        return F.normalize(self.towers.image(clips.gather(2, index)).frames, dim=-1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        task = batch["source"]
        ways, per_way = self.task.n_way, self.task.k_shot + self.task.n_query
        labels = task["label"].view(ways, per_way)
        if not bool((labels == labels[:, :1]).all()):
            raise RuntimeError("a CLIP pretraining batch must hold each class's clips together (a task)")
        text = self.towers.text(self.class_tokens[labels[:, 0]])  # (N, D), unit norm
        images = self.image_features(task[self.towers.modality])  # (N·M, F, D)
        images = images.view(ways, per_way * images.shape[1], -1).transpose(0, 1)  # (M·F, N, D)
        scale = self.towers.logit_scale.exp()
        loss = torch.stack([self.clip_loss(image, text, scale) for image in images]).mean()
        with torch.no_grad():
            hits = (images @ text.T).argmax(-1) == torch.arange(ways, device=text.device)
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/acc": 100.0 * hits.float().mean(),
                "train/logit_scale": scale.detach(),
            },
            prog_bar=True,
            batch_size=1,
        )
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.towers.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

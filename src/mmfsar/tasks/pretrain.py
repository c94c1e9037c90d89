"""Stage 1: one encoder per modality (MM-CDFSL's pretraining, or plain supervised training).

``L = recon(source) + w_tgt · recon(target) + λ_ce · CE(source labels)``: masked reconstruction
of per-patch-normalised tubelets (tube mask, ratio 0.9, light decoder) on labelled source clips
and on unlabelled target clips of the base classes, plus cross-entropy of a head on the
LayerNorm'd mean of the visible tokens. ``w_tgt = 0`` is the released MM-CDFSL code (which
computes the target reconstruction but never adds it); without a decoder the module is a plain
supervised classifier (e.g. a frame CNN for Lite-MKD's teachers); given unlabelled target clips
(``data.unlabelled_target``), it encodes them in the same batch as the source clips, so batch-norm
statistics cover both domains.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mmfsar.errors import ConfigError
from mmfsar.losses.reconstruction import masked_reconstruction_mse
from mmfsar.models.base import EncoderOutput, ModalityEncoder
from mmfsar.models.reconstruction import normalized_patch_targets, patchify
from mmfsar.tasks.common import Optimization, TrainingModule, modality_encoder_config


class PretrainModule(TrainingModule):
    """Trains ``encoder`` (a :class:`ModalityEncoder` with a base-class head) on one modality.

    Args:
        encoder: the clip encoder being trained; its head classifies the base classes.
        encoder_config: the Hydra config that rebuilds ``encoder`` (kept for the export).
        decoder: reconstruction decoder (``None``: supervised only).
        mask_ratio: tube-mask ratio of the reconstruction passes.
        ce_weight: λ_ce. target_recon_weight: w_tgt.
    """

    def __init__(
        self,
        *,
        encoder: ModalityEncoder,
        encoder_config: Mapping[str, Any],
        decoder: nn.Module | None = None,
        mask_ratio: float = 0.9,
        ce_weight: float = 1.0,
        target_recon_weight: float = 1.0,
        optim: Optimization,
    ) -> None:
        super().__init__(optim=optim)
        self.encoder = encoder
        self.encoder_config = dict(encoder_config)
        self.decoder = decoder
        self.modality = encoder.modality
        self.mask_ratio = mask_ratio
        self.ce_weight = ce_weight
        self.target_recon_weight = target_recon_weight
        self.train_acc = MulticlassAccuracy(num_classes=encoder.head.out_features)

    @classmethod
    def build(cls, cfg: DictConfig, datamodule: Any) -> "PretrainModule":
        """From the ``model`` config and the (prepared) data module."""
        if len(datamodule.modalities) != 1:
            raise ConfigError(
                f"pretraining trains one modality at a time, got modalities {sorted(datamodule.modalities)}; "
                "sweep them with -m modality=rgb,flow,pose"
            )
        (modality,) = datamodule.modalities
        num_classes = len(datamodule.base_classes)
        enc_cfg = modality_encoder_config(cfg.encoder, modality, datamodule.encoder_inputs(modality), num_classes, cfg.get("head"))
        encoder = instantiate(enc_cfg, _convert_="all")
        decoder = None
        if cfg.decoder is not None:
            bb = encoder.backbone
            if not getattr(bb, "supports_masking", False):
                raise ConfigError(f"model.decoder needs a token encoder (VideoViT), got {type(bb).__name__}")
            decoder = instantiate(cfg.decoder)(bb)  # VideoMAEDecoder.for_encoder, sized for its tokens
        return cls(
            encoder=encoder,
            encoder_config=enc_cfg,
            decoder=decoder,
            mask_ratio=cfg.mask_ratio,
            ce_weight=_weight(cfg.ce_weight, modality),
            target_recon_weight=_weight(cfg.target_recon_weight, modality),
            optim=instantiate(cfg.optim),
        )

    def exported_encoder(self) -> tuple[nn.Module, dict[str, Any]]:
        return self.encoder, self.encoder_config

    @property
    def trained_modalities(self) -> list[str]:
        return [self.modality]

    def _reconstruction(self, x: torch.Tensor) -> tuple[torch.Tensor, EncoderOutput]:
        bb = self.encoder.backbone
        out = bb(x, mask_ratio=self.mask_ratio, return_tokens=True)
        targets = normalized_patch_targets(patchify(x, bb.tubelet_size, bb.patch_size), bb.tubelet_size, bb.in_channels)
        pred = self.decoder(out.tokens, out.mask)
        return masked_reconstruction_mse(pred, targets, out.mask), out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        src = batch["source"]
        x = src[self.modality]
        losses: dict[str, torch.Tensor] = {}
        if self.decoder is not None:
            losses["recon_source"], out = self._reconstruction(x)
            logits = self.encoder.head(out.pooled)
            if self.target_recon_weight > 0:
                losses["recon_target"], _ = self._reconstruction(batch["target"][self.modality])
        elif "target" in batch:
            # no reconstruction: unlabelled target clips share the batch, hence the batch-norm
            # statistics, of the labelled source clips (AdaBN-style use of the target domain)
            both = torch.cat([x, batch["target"][self.modality]])
            logits = self.encoder({self.modality: both}).logits[: x.shape[0]]
        else:
            logits = self.encoder({self.modality: x}).logits
        losses["ce"] = F.cross_entropy(logits, src["label"])
        loss = (
            losses.get("recon_source", 0.0)
            + self.target_recon_weight * losses.get("recon_target", 0.0)
            + self.ce_weight * losses["ce"]
        )
        self.log_training(loss, batch_size=x.shape[0], terms=losses, accuracy=(logits, src["label"]))
        return loss

    def validation_features(self, batch: dict[str, Any]) -> EncoderOutput:
        return self.encoder({self.modality: batch[self.modality]})


def _weight(value: float | Mapping[str, float], modality: str) -> float:
    """A loss weight given as a number or per modality (``{rgb: 0.05, default: 0.01}``)."""
    if isinstance(value, (int, float)):
        return float(value)
    if modality in value:
        return float(value[modality])
    if "default" in value:
        return float(value["default"])
    raise ConfigError(f"loss weight {dict(value)} has no entry for modality {modality!r} and no 'default'")

"""What every encoder returns, the clip-encoder interface, and the exported ``encoder.pt``.

Backbones (``models/encoders``) map one modality tensor ``(B, C, T, H, W)`` (keypoints:
``(B, C, T, J)``) to an :class:`EncoderOutput`. A *clip encoder* maps a clip dict
``{modality: tensor}`` to an :class:`EncoderOutput`: :class:`ModalityEncoder` wraps one backbone
for one modality; fusion teachers combine several. Everything the evaluation engine, the
distillation module and the next stage load is a clip encoder exported by :func:`export_encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

import mmfsar
from mmfsar.errors import ConfigError

EXPORT_FORMAT = 1


@dataclass
class EncoderOutput:
    """Features of a batch of clips.

    pooled: (B, D) clip feature (ViT: LayerNorm of the mean of visible tokens).
    frames: (B, T', D) per-frame features (one per temporal slot; Lite-MKD's fusion needs them).
    tokens: (B, N_visible, D) token sequence, only when asked for (ViT).
    mask: (B, N) bool, True where a token was dropped (ViT with masking), else None.
    logits: (B, C) base-class logits when the encoder carries a classifier head, else None.
    """

    pooled: torch.Tensor
    frames: torch.Tensor
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def with_logits(self, logits: torch.Tensor | None) -> "EncoderOutput":
        return replace(self, logits=logits)

    def rows(self, index: slice | torch.Tensor) -> "EncoderOutput":
        """Some clips' outputs: every field indexed along the batch."""
        return EncoderOutput(**{f.name: None if (v := getattr(self, f.name)) is None else v[index] for f in fields(self)})


class UnmaskedBackbone(nn.Module):
    """Base of the backbones that cannot drop tokens (CNNs, GCNs): the backbone signature of
    :class:`~mmfsar.models.encoders.VideoViT`, with masking refused; subclasses implement
    :meth:`encode`."""

    supports_masking = False

    def forward(
        self, x: torch.Tensor, *, mask: torch.Tensor | None = None, mask_ratio: float = 0.0, return_tokens: bool = False
    ) -> EncoderOutput:
        if mask is not None or mask_ratio > 0:
            raise ValueError(f"{type(self).__name__} cannot drop tokens: masking needs a VideoViT backbone")
        return self.encode(x, return_tokens=return_tokens)

    def encode(self, x: torch.Tensor, *, return_tokens: bool = False) -> EncoderOutput:  # pragma: no cover
        raise NotImplementedError


class ModalityEncoder(nn.Module):
    """One backbone on one modality of a clip, with an optional base-class classifier head.

    The head is what pretraining trains with cross-entropy; kept in the export, it gives
    distillation its teacher logits. ``head`` builds it from ``(feature_dim, num_classes)``
    (default ``nn.Linear``; see :mod:`mmfsar.models.heads`).
    """

    def __init__(
        self,
        *,
        modality: str,
        backbone: nn.Module,
        num_classes: int = 0,
        head: Callable[[int, int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.modality = modality
        self.backbone = backbone
        self.head = (head or nn.Linear)(backbone.feature_dim, num_classes) if num_classes else None

    @property
    def modalities(self) -> list[str]:
        return [self.modality]

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def forward(self, inputs: Mapping[str, torch.Tensor], **kwargs: Any) -> EncoderOutput:
        if self.modality not in inputs:
            raise KeyError(f"encoder needs modality {self.modality!r}, inputs have {sorted(inputs)}")
        out = self.backbone(inputs[self.modality], **kwargs)
        return out.with_logits(self.head(out.pooled) if self.head is not None else None)


def export_encoder(
    path: str | Path,
    encoder: nn.Module,
    *,
    encoder_config: Mapping[str, Any],
    modalities: Mapping[str, Mapping[str, Any]],
    frames: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
    classifier: nn.Module | None = None,
    classifier_config: Mapping[str, Any] | None = None,
) -> Path:
    """Save a clip encoder with everything needed to rebuild it and feed it.

    ``encoder_config`` is a Hydra config (with ``_target_``) that builds ``encoder`` exactly
    (its ``pretrained`` weight-file paths are cleared: the trained weights are in the file);
    ``modalities`` / ``frames`` are the configs of the input pipeline it was trained with. A
    ``classifier`` trained with the encoder (an episodic run's matching head), with the config that
    rebuilds it, goes into the file too, and evaluation uses it (:func:`build_exported_classifier`).
    The file holds only tensors and plain containers, so ``torch.load(weights_only=True)`` reads it.
    Written atomically (a temporary file renamed into place).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": EXPORT_FORMAT,
        "mmfsar_version": mmfsar.__version__,
        "encoder": _without_pretrained(plain_config(encoder_config)),
        "modalities": plain_config(modalities),
        "frames": plain_config(frames),
        "feature_dim": int(encoder.feature_dim),
        "info": plain_config(info or {}),
        "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
    }
    if classifier is not None:
        payload["classifier"] = {
            "config": plain_config(classifier_config),
            "state_dict": {k: v.detach().cpu() for k, v in classifier.state_dict().items()},
        }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_export(path: str | Path) -> dict[str, Any]:
    """Read an exported encoder file (weights-only), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable mmfsar encoder file: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT or "encoder" not in payload:
        raise ValueError(
            f"{path} is not an mmfsar encoder export (format {EXPORT_FORMAT}); "
            "pass the encoder.pt written at the end of a pretraining or distillation run"
        )
    return payload


def build_encoder(payload: Mapping[str, Any] | str | Path) -> nn.Module:
    """Rebuild a clip encoder from :func:`export_encoder`'s file (or its loaded payload)."""
    from hydra.utils import instantiate

    if not isinstance(payload, Mapping):
        payload = load_export(payload)
    encoder = instantiate(payload["encoder"], _convert_="all")
    missing, unexpected = encoder.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"encoder weights do not fit its config: missing {missing}, unexpected {unexpected}")
    return encoder


def build_exported_classifier(payload: Mapping[str, Any]) -> nn.Module | None:
    """The few-shot classifier an export carries (an episodic run's matching head), or None."""
    from hydra.utils import instantiate

    entry = payload.get("classifier")
    if entry is None:
        return None
    classifier = instantiate(entry["config"], _convert_="all")
    classifier.load_state_dict(entry["state_dict"])
    return classifier.eval()


def given(paths: Mapping[str, str | None] | None) -> dict[str, str]:
    """The entries of a name -> exported-file mapping that are set (config slots may be null)."""
    return {k: v for k, v in (paths or {}).items() if v is not None}


def exported_modalities(paths: Mapping[str, str], configured: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Configured modalities plus those the exported encoders at ``paths`` were trained on.

    An exported encoder must be fed exactly as it was trained, so its stored modality config is
    used; a configured modality of the same name that reads clips differently is an error.
    ``encoder_args`` are not compared: they shape a new encoder, and the export carries its own.
    """
    out = dict(plain_config(configured) or {})
    for name, path in given(paths).items():
        for m, mcfg in load_export(path)["modalities"].items():
            keys = (set(out.get(m, {})) | set(mcfg)) - {"encoder_args"}
            diff = sorted(k for k in keys if out[m].get(k) != mcfg.get(k)) if m in out else []
            if diff:
                raise ConfigError(
                    f"modality {m!r}: the configured settings differ from those encoder {name!r} ({path}) "
                    f"was trained with, in keys {diff}; drop modality={m} or match modalities.{m}"
                )
            out[m] = mcfg
    return out


def masking_grid(encoder: nn.Module) -> tuple[int, int, int]:
    """The token grid of a clip encoder whose backbone can drop tokens (ViT), else a clear error."""
    backbone = getattr(encoder, "backbone", None)
    if backbone is None or not getattr(backbone, "supports_masking", False):
        raise ConfigError(
            "masking (a mask ratio > 0) needs a single-modality token encoder (VideoViT); "
            f"{type(encoder).__name__} cannot drop tokens"
        )
    return tuple(backbone.grid)


def _without_pretrained(cfg: Any) -> Any:
    """Every ``pretrained`` key set to None, recursively."""
    if isinstance(cfg, dict):
        return {k: None if k == "pretrained" else _without_pretrained(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [_without_pretrained(v) for v in cfg]
    return cfg


def plain_config(obj: Any) -> Any:
    """OmegaConf / tuples / paths -> plain dicts, lists and strings (weights-only loadable)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        return {str(k): plain_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_config(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj

"""A CLIP as one exported clip encoder: the image tower on every frame, and the text tower beside it.

CLIP-MDMF (METHODS.md section 5) needs both towers of one CLIP at every stage: frame features
from the image tower, class-text features from the text tower, in the same joint space. Training
fine-tunes (or freezes) the image tower and keeps the text tower frozen; evaluation encodes the
*novel* classes' texts, which only exist at test time. So the two towers travel together, as one
clip encoder (:class:`ClipTowers`) in one ``encoder.pt``:

* ``forward`` is an ordinary clip encoder (``{modality: (B, 3, T, H, W)}`` ->
  :class:`~mmfsar.models.base.EncoderOutput`, per-frame features in ``frames``), so every
  few-shot classifier, the frozen-output cache and ``lit_main_eval.py`` use it as they use any
  encoder (``fewshot.classifier=prototype`` on a CLIP export: CLIP frame features, no training);
* :meth:`ClipTowers.encode_classes` turns a dataset's class names into unit-norm text features,
  from the text the towers were trained with (``text_source``: the dataset's class descriptions,
  ``text/descriptions.csv``, or the class names) through the prompt ``template``.

Weights come from a local CLIP checkpoint (:func:`~mmfsar.models.encoders.clip.load_open_clip`:
OpenAI or open_clip files of the usual architectures; nothing is ever downloaded) or, after
``export_encoder`` cleared ``pretrained``, from the export's own state dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mmfsar.data.text import read_class_text
from mmfsar.errors import ConfigError
from mmfsar.models.base import EncoderOutput, plain_config
from mmfsar.models.encoders.clip import ClipFrameEncoder, ClipTextEncoder

TEXT_SOURCES = ("descriptions", "names")
CLIP_FRAME_ENCODER = "mmfsar.models.encoders.clip.ClipFrameEncoder"


def class_texts(root: str | Path, class_names: Sequence[str], *, source: str) -> list[str]:
    """One text per class: its description from ``root/text/descriptions.csv`` (a clear
    :class:`~mmfsar.errors.DataError` names the classes without one) or its name, underscores
    read as spaces (``"arm_swing"`` -> ``"arm swing"``; Kinetics' names are already words)."""
    if source not in TEXT_SOURCES:
        raise ConfigError(f"text source must be one of {TEXT_SOURCES}, got {source!r}")
    if source == "names":
        return [str(name).replace("_", " ") for name in class_names]
    text = read_class_text(root, class_names, need="descriptions")
    return [text.descriptions[name] for name in class_names]


def clip_towers_config(
    image: Mapping[str, Any],
    *,
    modality: str,
    inputs: Mapping[str, Any],
    text: Mapping[str, Any],
) -> dict[str, Any]:
    """The config of :class:`ClipTowers` from a ``model/encoder=clip_*`` config (a
    :class:`~mmfsar.models.encoders.clip.ClipFrameEncoder` backbone config), the data's encoder
    ``inputs`` (``datamodule.encoder_inputs``) and the text settings (``template``, ``source``,
    ``freeze``). What the towers are built from is what the export stores."""
    image = {k: v for k, v in plain_config(image).items() if k != "_partial_"}
    if image.pop("_target_", CLIP_FRAME_ENCODER) != CLIP_FRAME_ENCODER:
        raise ConfigError(
            f"the CLIP config must be a model/encoder=clip_* config ({CLIP_FRAME_ENCODER}), got {image}"
        )
    text = plain_config(text) or {}
    unknown = sorted(set(text) - {"template", "source", "freeze"})
    if unknown:
        raise ConfigError(f"text settings: unknown key(s) {unknown} (template, source, freeze)")
    return {
        "_target_": "mmfsar.models.clip_towers.ClipTowers",
        "modality": modality,
        "model_name": image.pop("model_name"),
        "pretrained": image.pop("pretrained", None),
        "freeze_image": bool(image.pop("freeze", False)),
        "model_overrides": image.pop("model_overrides", None) or {},
        "template": text.get("template", "{}"),
        "text_source": text.get("source", "descriptions"),
        "freeze_text": bool(text.get("freeze", True)),
        **{k: v for k, v in plain_config(inputs).items() if k in ("in_channels", "num_frames", "img_size")},
        **image,
    }


def configured_weights(image: Mapping[str, Any]) -> str | None:
    """``pretrained`` of a ``model/encoder=clip_*`` config; None when unset or left ``???``."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(image, DictConfig) and OmegaConf.is_missing(image, "pretrained"):
        return None
    return image.get("pretrained")


def require_clip_weights(image: Mapping[str, Any], key: str) -> None:
    """The configured CLIP weights must be a file that exists: checked before any data is read
    or any model built. A checkpoint architecture's ``pretrained: ???`` must be filled in."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(image, DictConfig) and OmegaConf.is_missing(image, "pretrained"):
        raise ConfigError(
            f"{key}.pretrained: give the local CLIP weights file of the {image.get('model_name')!r} architecture "
            f"({key}.pretrained=/path/to/checkpoint.pt; nothing is downloaded)"
        )
    pretrained = configured_weights(image)
    if pretrained is not None and not Path(str(pretrained)).expanduser().is_file():
        raise FileNotFoundError(
            f"{key}.pretrained: CLIP weights file not found: {pretrained} (a local checkpoint of the "
            f"{image.get('model_name')!r} architecture: OpenAI's .pt or an open_clip state dict; "
            "nothing is downloaded)"
        )


class ClipTowers(nn.Module):
    """CLIP's image tower as a clip encoder of one RGB modality, with its text tower.

    Args:
        modality: the stream the image tower reads (``rgb``).
        model_name, pretrained, model_overrides: the CLIP (see
            :func:`~mmfsar.models.encoders.clip.load_open_clip`); ``pretrained=None`` is random
            (an export rebuilt before its weights load, or a CLIP the project trains itself).
        in_channels, num_frames, img_size: the clips' shape, from the modality.
        freeze_image: the image tower takes no gradient (CLIP-MDMF's released code fine-tunes it).
        freeze_text: the text tower takes no gradient (CLIP-MDMF, CLIP-FSAR: frozen).
        template: prompt each class text goes through (``"a photo of {}"`` for class names, as the
            released code; ``"{}"`` for full descriptions).
        text_source: ``descriptions`` or ``names``, see :func:`class_texts`.

    Both towers are read from the same file (twice: each keeps its half of the model).
    """

    supports_masking = False

    def __init__(
        self,
        *,
        modality: str,
        model_name: str,
        pretrained: str | Path | None,
        in_channels: int,
        num_frames: int,
        img_size: int,
        freeze_image: bool = False,
        freeze_text: bool = True,
        template: str = "{}",
        text_source: str = "descriptions",
        model_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if text_source not in TEXT_SOURCES:
            raise ConfigError(f"text_source must be one of {TEXT_SOURCES}, got {text_source!r}")
        self.modality = modality
        self.text_source = text_source
        self.image = ClipFrameEncoder(
            model_name=model_name,
            pretrained=pretrained,
            in_channels=in_channels,
            num_frames=num_frames,
            img_size=img_size,
            freeze=freeze_image,
            model_overrides=model_overrides,
        )
        self.text = ClipTextEncoder(
            model_name=model_name,
            pretrained=pretrained,
            template=template,
            freeze=freeze_text,
            model_overrides=model_overrides,
        )

    @property
    def modalities(self) -> list[str]:
        return [self.modality]

    @property
    def feature_dim(self) -> int:
        return self.image.feature_dim

    @property
    def freeze_image(self) -> bool:
        return self.image.freeze

    @property
    def freeze_text(self) -> bool:
        return self.text.freeze

    @property
    def logit_scale(self) -> nn.Parameter:
        """CLIP's learnable log temperature of the contrastive loss (kept in the text tower's half)."""
        return self.text.model.logit_scale

    def forward(self, inputs: Mapping[str, torch.Tensor], **kwargs: Any) -> EncoderOutput:
        if self.modality not in inputs:
            raise KeyError(f"ClipTowers reads modality {self.modality!r}, inputs have {sorted(inputs)}")
        return self.image(inputs[self.modality], **kwargs)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(len(texts), D)`` unit-norm text features (templated), in the image tower's space."""
        return self.text.encode(list(texts))

    @torch.no_grad()
    def encode_classes(self, root: str | Path, class_names: Sequence[str]) -> torch.Tensor:
        """``(C, D)`` unit-norm features of the classes' texts (``text_source``), no gradient."""
        return self.encode_texts(class_texts(root, class_names, source=self.text_source)).float()

"""CLIP image and text towers from ``open_clip``, with weights read from a local file only.

CLIP-MDMF (METHODS.md section 5) and CLIP-FSAR build on CLIP: per-frame features from the image
tower, class-text features from the text tower, both in CLIP's joint embedding space (so a frame
and a class name can be compared by cosine). This module gives

* :func:`load_open_clip`: an ``open_clip`` model by architecture name, its weights from a local
  checkpoint (OpenAI's TorchScript ``.pt`` or an open_clip state dict), or random weights when
  ``pretrained=None`` is asked for explicitly;
* :data:`TINY_CLIP_MODEL` (``mmfsar-tiny-vit``): a ViT-CLIP small enough to train on the
  synthetic data on a CPU, registered with open_clip so that ``open_clip.get_tokenizer`` knows it;
* :class:`ClipFrameEncoder`: the image tower as an mmfsar backbone (``(B, 3, T, H, W)`` ->
  :class:`~mmfsar.models.base.EncoderOutput`);
* :class:`ClipTextEncoder`: class names / descriptions -> L2-normalised text features.

Nothing is ever downloaded. open_clip would fetch weights for a pretrained *tag* (``"openai"``,
``"laion2b_s34b_b88k"``...) or an ``hf-hub:`` name; here open_clip only ever builds the
architecture (``pretrained=None``) and the weights are read by this module from the path given,
after checking that the file exists. As a second line of defence, importing this module puts
huggingface_hub in offline mode for the whole process (``HF_HUB_OFFLINE=1``, also patched into
``huggingface_hub.constants`` when timm imported it first). The tokenizer of every CLIP model with
the original text tower is open_clip's ``SimpleTokenizer``, whose BPE vocabulary
(``bpe_simple_vocab_16e6.txt.gz``) ships inside the open_clip package.

**Input normalisation.** CLIP's image tower was trained on RGB in [0, 1] normalised with
``OPENAI_DATASET_MEAN`` / ``OPENAI_DATASET_STD`` = (0.48145466, 0.4578275, 0.40821073) /
(0.26862954, 0.26130258, 0.27577711), not with the RGB modality's default (0.45, 0.225). With
pretrained CLIP weights, set the modality to CLIP's statistics:
``modalities.rgb.mean=[0.48145466,0.4578275,0.40821073] modalities.rgb.std=[0.26862954,0.26130258,0.27577711]``
(:data:`CLIP_MEAN` / :data:`CLIP_STD`). A model trained from scratch (the tiny one) can use either.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any


def _forbid_hub_downloads() -> None:
    """huggingface_hub offline for this process, also if it was imported (by timm) before us."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


_forbid_hub_downloads()

import open_clip  # noqa: E402
import torch  # noqa: E402
from open_clip.model import (  # noqa: E402
    convert_to_custom_text_state_dict,
    resize_pos_embed,
    resize_text_pos_embed,
)
from torch import nn  # noqa: E402

from mmfsar.models.base import EncoderOutput  # noqa: E402
from mmfsar.models.encoders.pretrained import read_checkpoint, strip_prefix, unwrap_state_dict  # noqa: E402

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_CLIP_MODEL = "mmfsar-tiny-vit"
# ViT-CLIP for 64 px frames on a CPU: 8x8 patches of 8 px, 4 blocks of width 128 (4 heads); text
# tower of 2 blocks, 32 tokens (class names and short descriptions fit); joint space of 128-d.
# The vocabulary stays CLIP's (49408 BPE tokens): the tokenizer is the packaged one.
MMFSAR_CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    TINY_CLIP_MODEL: {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
    },
}

# Keys of OpenAI's TorchScript files that are attributes, not weights.
_OPENAI_JIT_ATTRIBUTES = ("input_resolution", "context_length", "vocab_size")


def register_clip_configs(configs: Mapping[str, Mapping[str, Any]] = MMFSAR_CLIP_CONFIGS) -> None:
    """Make our architectures known to open_clip (``create_model``, ``get_tokenizer``, ``list_models``).

    open_clip's public ``add_model_config`` only takes JSON files; the configs live in this module
    (nothing is written into the package's folder), so they go into its registry dict, which its
    rescans keep.
    """
    registry = getattr(open_clip.factory, "_MODEL_CONFIGS", None)
    if not isinstance(registry, dict):
        raise RuntimeError(
            f"open_clip {open_clip.__version__} has no model-config registry (factory._MODEL_CONFIGS); "
            "pin the open-clip-torch version from requirements.txt"
        )
    for name, cfg in configs.items():
        if not all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(f"CLIP config {name!r} needs embed_dim, vision_cfg and text_cfg, has {sorted(cfg)}")
        registry[name] = deepcopy(dict(cfg))


register_clip_configs()


def load_open_clip(
    model_name: str,
    pretrained: str | Path | None,
    *,
    img_size: int | None = None,
    **model_overrides: Any,
) -> nn.Module:
    """An open_clip model (``encode_image``, ``encode_text``) with weights from a local file.

    Args:
        model_name: an open_clip architecture (``ViT-B-16``, ``ViT-B-16-quickgelu``, ``RN50``...,
            see ``open_clip.list_models()``) or one of ours (:data:`TINY_CLIP_MODEL`). ``hf-hub:``
            and ``local-dir:`` names are refused (open_clip would read or fetch configs itself), and
            so are architectures with a Hugging Face text tower (built from the hub).
        pretrained: path of a checkpoint for that architecture: OpenAI's TorchScript ``.pt``, an
            open_clip state dict or training checkpoint (``.pt`` / ``.pth`` / ``.bin`` /
            ``.safetensors``; ``state_dict`` / ``module.`` wrappers are unwrapped). ``None`` builds
            random weights and must be asked for explicitly (a model the project trains itself).
            A pretrained *tag* such as ``"openai"`` is not a file and is refused, never downloaded.
        img_size: input size of the image tower when it differs from the architecture's; the
            checkpoint's position embedding is interpolated to it.
        model_overrides: merged into the architecture's config (dicts recursively), e.g.
            ``vision_cfg={"layers": 2}`` or ``quick_gelu=True``.

    A missing file raises ``FileNotFoundError`` naming it and the architecture before anything is
    read or built. OpenAI's TorchScript checkpoints were trained with QuickGELU: for them
    ``quick_gelu=True`` is set unless the overrides say otherwise, so the plain ``ViT-B-16`` name
    gives the same features as ``ViT-B-16-quickgelu``. Weights that do not fit the architecture
    raise ``ValueError`` naming the file and the keys.
    """
    path = _require_weights(pretrained, model_name) if pretrained is not None else None
    cfg = _model_config(model_name)
    is_torchscript = path is not None and _is_torchscript_archive(path)
    if is_torchscript and "quick_gelu" not in model_overrides and not cfg.get("quick_gelu", False):
        log.info("%s is an OpenAI TorchScript checkpoint: building %s with QuickGELU", path, model_name)
        model_overrides = {**model_overrides, "quick_gelu": True}
    cfg = _merge(cfg, model_overrides)
    if img_size is not None:
        cfg["vision_cfg"]["image_size"] = int(img_size)
    if "hf_model_name" in cfg["text_cfg"]:
        raise ValueError(
            f"{model_name!r} has a Hugging Face text tower ({cfg['text_cfg']['hf_model_name']}), which open_clip "
            "builds from the Hugging Face hub; use an architecture with CLIP's own text tower"
        )
    if "timm_model_name" in cfg["vision_cfg"]:  # timm's ImageNet weights would come from a hub: never
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    custom_text = bool(cfg.pop("custom_text", False))

    with _quiet_random_init_warning():
        model = open_clip.create_model(
            model_name,
            pretrained=None,
            load_weights=False,
            pretrained_image=False,
            pretrained_text=False,
            force_custom_text=custom_text,
            force_image_size=img_size,
            **cfg,
        )
    if path is None:
        log.info("%s: random initialisation (pretrained=None)", model_name)
        return model
    state_dict = read_clip_state_dict(path)
    _load_into(model, state_dict, source=f"{path} ({model_name})")
    return model


def read_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a CLIP checkpoint file: OpenAI TorchScript or a (wrapped) state dict."""
    path = _require_weights(path, "CLIP")
    if _is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():  # torch deprecates TorchScript; OpenAI's files are TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                archive = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ValueError(f"cannot read TorchScript CLIP checkpoint {path}: {exc}") from exc
        state_dict = dict(archive.state_dict())
        for key in _OPENAI_JIT_ATTRIBUTES:
            state_dict.pop(key, None)
    else:
        state_dict = unwrap_state_dict(read_checkpoint(path))
    state_dict = strip_prefix(state_dict, "module.")
    if not state_dict:
        raise ValueError(f"{path} holds no tensors: not a CLIP checkpoint")
    return state_dict


def _load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """Strict load after open_clip's own format fixes (text-tower layout, position-embedding size)."""
    state_dict = open_clip.convert.convert_state_dict(model, state_dict)
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    if "logit_scale" in state_dict and state_dict["logit_scale"].ndim != model.logit_scale.ndim:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
    if getattr(model, "logit_bias", None) is not None and "logit_bias" not in state_dict:
        state_dict["logit_bias"] = torch.zeros_like(model.logit_bias)
    # Buffers the model rebuilds itself (e.g. the causal mask a scripted model saves) are not weights.
    own = model.state_dict()
    derived = {name for name, _ in model.named_buffers()} - set(own)
    state_dict = {k: v for k, v in state_dict.items() if k not in derived}
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k} {list(v.shape)} vs {list(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"CLIP weights {source} do not fit the architecture: "
            f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}, "
            f"shape mismatch {mismatched[:10]}"
        )
    model.load_state_dict(state_dict, strict=True)
    log.info("loaded CLIP weights %s", source)


def _require_weights(pretrained: str | Path, model_name: str) -> Path:
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP weights file not found: {path} (expected a local checkpoint of the {model_name!r} "
            "architecture; weights are only read from local files, pretrained tags are never downloaded)"
        )
    return path


def _model_config(model_name: str) -> dict[str, Any]:
    if not isinstance(model_name, str) or ":" in model_name:
        raise ValueError(
            f"model_name must be an open_clip architecture name, got {model_name!r} "
            "(hf-hub: / local-dir: sources are not used: give the architecture and a weights file)"
        )
    cfg = open_clip.get_model_config(model_name.replace("/", "-"))
    if cfg is None:
        raise ValueError(f"unknown CLIP architecture {model_name!r}; known: {', '.join(open_clip.list_models())}")
    return cfg


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = deepcopy(value)
    return merged


def _is_torchscript_archive(path: Path) -> bool:
    """A TorchScript file is a zip archive with a ``constants.pkl`` record (what torch.load checks)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name == "constants.pkl" or name.endswith("/constants.pkl") for name in archive.namelist())


@contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """open_clip warns that the model is random; here the weights are loaded right after."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    logging.root.addFilter(keep)
    try:
        yield
    finally:
        logging.root.removeFilter(keep)


def _output_dim(tower: nn.Module, img_size: int) -> int:
    dim = getattr(tower, "output_dim", None)
    if dim:
        return int(dim)
    with torch.no_grad():
        return int(tower(torch.zeros(1, 3, img_size, img_size)).shape[-1])


class ClipFrameEncoder(nn.Module):
    """CLIP's image tower on every frame: ``frames`` (B, T, D) in CLIP's joint space, ``pooled`` their mean.

    Features are the projected image embeddings (``encode_image`` without normalisation), so they
    compare with :class:`ClipTextEncoder`'s features by cosine, as CLIP-MDMF's prompt selection
    does. Only the image tower is kept (the text tower's weights are not part of this module).

    Args:
        model_name, pretrained: see :func:`load_open_clip` (``pretrained=None``: random weights,
            e.g. :data:`TINY_CLIP_MODEL` trained on the synthetic data).
        in_channels: must be 3 (CLIP sees RGB).
        num_frames, img_size: the clips' shape ``(B, 3, num_frames, img_size, img_size)``;
            ``img_size`` may differ from the architecture's (position embedding interpolated).
        freeze: the tower stays in eval mode, takes no gradient and is left out of any optimiser
            (``requires_grad=False``); its outputs carry no graph.
        model_overrides: passed to :func:`load_open_clip`.

    Inputs are normalised with CLIP's statistics when the weights are CLIP's (module docstring).
    """

    supports_masking = False

    def __init__(
        self,
        *,
        model_name: str,
        pretrained: str | Path | None,
        in_channels: int,
        num_frames: int,
        img_size: int,
        freeze: bool = False,
        model_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if in_channels != 3:
            raise ValueError(f"ClipFrameEncoder needs RGB input (in_channels=3), got in_channels={in_channels}")
        if num_frames < 1 or img_size < 1:
            raise ValueError(f"num_frames and img_size must be positive, got {num_frames}, {img_size}")
        self.in_channels, self.num_frames, self.img_size = in_channels, num_frames, img_size
        self.freeze = freeze
        model = load_open_clip(model_name, pretrained, img_size=img_size, **dict(model_overrides or {}))
        self.visual = model.visual
        self.feature_dim = _output_dim(self.visual, img_size)
        if freeze:
            self.visual.requires_grad_(False)
            self.visual.eval()

    def train(self, mode: bool = True) -> "ClipFrameEncoder":
        super().train(mode)
        if self.freeze:
            self.visual.eval()
        return self

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        mask_ratio: float = 0.0,
        return_tokens: bool = False,
    ) -> EncoderOutput:
        """Encode ``(B, 3, T, H, W)`` clips; ``tokens`` (if asked) are the per-frame features."""
        if mask is not None or mask_ratio > 0:
            raise ValueError("ClipFrameEncoder cannot mask tokens; use a VideoViT backbone for masked inference")
        expected = (self.in_channels, self.img_size, self.img_size)
        if x.ndim != 5 or (x.shape[1], x.shape[3], x.shape[4]) != expected:
            raise ValueError(
                f"ClipFrameEncoder expects clips (B, 3, T, {self.img_size}, {self.img_size}), got {tuple(x.shape)}"
            )
        batch, channels, time, height, width = x.shape
        images = x.transpose(1, 2).reshape(batch * time, channels, height, width)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            per_frame = self.visual(images)
        frames = per_frame.reshape(batch, time, -1)
        return EncoderOutput(pooled=frames.mean(dim=1), frames=frames, tokens=frames if return_tokens else None)


class ClipTextEncoder(nn.Module):
    """Class names or descriptions -> L2-normalised CLIP text features ``(C, D)``.

    Each text goes through ``template`` first: CLIP-FSAR / CLIP-MDMF's released code encodes
    ``"a photo of {class name}"``; use ``"{}"`` for full descriptions. Frozen by default, as in
    CLIP-MDMF (the text features are computed once per class set). Only the text tower is kept.
    """

    def __init__(
        self,
        *,
        model_name: str,
        pretrained: str | Path | None,
        template: str = "a photo of {}",
        freeze: bool = True,
        model_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' where the text goes, got {template!r}")
        text_cfg = _model_config(model_name)["text_cfg"]
        if text_cfg.get("hf_tokenizer_name"):
            raise ValueError(
                f"{model_name!r} needs the Hugging Face tokenizer {text_cfg['hf_tokenizer_name']!r}, which is not "
                "packaged; ClipTextEncoder supports architectures with CLIP's own BPE tokenizer"
            )
        self.template, self.freeze = template, freeze
        model = load_open_clip(model_name, pretrained, **dict(model_overrides or {}))
        model.visual = None
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(model_name.replace("/", "-"))
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> "ClipTextEncoder":
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """``(C, context_length)`` token ids of the templated texts."""
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be a non-empty list of strings, got {texts!r}")
        return self.tokenizer([self.template.format(text) for text in texts])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(C, L)`` -> normalised features ``(C, D)``."""
        device = next(self.model.parameters()).device
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            return self.model.encode_text(tokens.to(device), normalize=True)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """All texts in one batch -> ``(len(texts), D)`` unit-norm features."""
        return self(self.tokenize(texts))

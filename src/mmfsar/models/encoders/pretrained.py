"""Loading pretrained weights from local files, with a report of what did not fit.

Nothing here downloads: every checkpoint is a file the user points to. Loading is lenient (a
checkpoint may cover only part of a model, e.g. an official VideoMAE file without our fc_norm)
but never silent: keys that are missing, unexpected or of a different shape are logged by name,
and a checkpoint of which nothing fits is an error, since it is almost always the wrong file.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

log = logging.getLogger(__name__)

# Containers under which training scripts store the weights (DeiT/VideoMAE, DeepSpeed, Lightning).
STATE_DICT_KEYS = ("model", "module", "state_dict")


def require_file(path: str | Path, *, what: str = "pretrained checkpoint") -> Path:
    """The path as a ``Path``, or a ``FileNotFoundError`` naming it (before any library sees it)."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(
            f"{what} not found: {resolved} (weights are only read from local files)"
        )
    return resolved


def read_checkpoint(path: str | Path) -> Any:
    """Load a ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors`` file onto the CPU.

    Pickled files are read with ``weights_only=True``; ``argparse.Namespace`` is allowed because
    the official VideoMAE / timm training checkpoints store their arguments that way.
    """
    path = require_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc


def unwrap_state_dict(
    checkpoint: Any, keys: Iterable[str] = STATE_DICT_KEYS
) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: itself, or the first of ``keys`` that holds one."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint is a {type(checkpoint).__name__}, not a state dict")
    for key in keys:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            return unwrap_state_dict(inner, keys)
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with the prefix removed, the rest dropped; unchanged if none has it.

    Selects one sub-module of a wrapped model (VideoMAE's ``encoder.``, our ``backbone.``).
    """
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict)
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


@dataclass
class LoadReport:
    """What a lenient load did: which weights were copied and which were not, and why."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        lines = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        if self.mismatched:
            lines.append(
                "shape mismatch (kept the model's initial value): "
                + ", ".join(
                    f"{k} checkpoint {list(c)} vs model {list(m)}" for k, c, m in self.mismatched
                )
            )
        if self.missing:
            lines.append("missing in checkpoint (kept initial value): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append("not used from checkpoint: " + ", ".join(self.unexpected))
        return "\n  ".join(lines)


def load_matching_weights(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str
) -> LoadReport:
    """Copy the tensors whose name and shape fit ``module``; warn about the rest.

    Raises ``ValueError`` when nothing fits, with the report, so a wrong file cannot pass
    unnoticed as a randomly initialised model.
    """
    own = module.state_dict()
    report = LoadReport(source=source)
    fitting: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name not in own:
            report.unexpected.append(name)
        elif tensor.shape != own[name].shape:
            report.mismatched.append((name, tuple(tensor.shape), tuple(own[name].shape)))
        else:
            fitting[name] = tensor
    report.missing = [name for name in own if name not in state_dict]
    report.loaded = sorted(fitting)
    if not fitting:
        raise ValueError(f"no weight of the checkpoint fits the model.\n  {report.summary()}")
    module.load_state_dict(fitting, strict=False)
    if not report.complete:
        log.warning("partial weight load from %s", report.summary())
    else:
        log.info("%s", report.summary())
    return report


def create_timm_model(
    model_name: str, *, in_channels: int, img_size: int, pretrained: str | Path | None = None
) -> nn.Module:
    """A timm model without classifier (``num_classes=0``), optionally from a local weight file.

    The file goes through timm's own mechanism (``pretrained_cfg_overlay=dict(file=...)``), which
    strips the classifier and adapts the first convolution to ``in_channels != 3`` (channels
    repeated and rescaled; summed for one channel). timm gives a local file priority over its
    hubs, so nothing is fetched. Models with a fixed input size (timm ViTs, Swin) are built for
    ``img_size``; others are size-agnostic and do not take it.
    """
    cfg = get_pretrained_cfg(model_name)
    size = {"img_size": img_size} if cfg is not None and cfg.fixed_input_size else {}
    if pretrained is None:
        return timm.create_model(
            model_name, pretrained=False, num_classes=0, in_chans=in_channels, **size
        )
    path = require_file(pretrained, what=f"pretrained weights for {model_name}")
    return timm.create_model(
        model_name,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        num_classes=0,
        in_chans=in_channels,
        **size,
    )


def pooled_feature_dim(model: nn.Module) -> int:
    """Width of a classifier-less timm model's output (``head_hidden_size``: MobileNetV3's
    pooled features pass a head convolution wider than ``num_features``)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)

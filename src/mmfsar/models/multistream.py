"""Pieces of the contrastive skeleton methods (CrosSCLR, IKEM; METHODS.md sections 3 and 6) that
live in exported encoders: MoCo v2's projection head and a clip encoder made of several streams.

* :class:`ProjectionMLP`: MoCo v2's projection ``Linear → ReLU → Linear`` on the pooled feature.
  In the CrosSCLR / IKEM code it *is* the ST-GCN's classifier layer (``fc``, built with
  ``num_class = 128`` and widened into an MLP), so here it is a classifier-head plug-in of
  :class:`~mmfsar.models.base.ModalityEncoder` (``head(in_features, num_classes)``): an encoder
  exported by the contrastive stage carries it, its ``logits`` are the 128-d contrastive
  embedding, and relational distillation reads the teachers' embeddings from it
  (``model.teacher_feature=projection``). Linear evaluation and few-shot episodes read the pooled
  feature, as the references' linear evaluation does (``fc`` replaced by a linear classifier).
* :class:`MultiStreamEncoder`: several single-modality encoders as one clip encoder. IKEM's
  six-modality teacher is exported as one file (all six streams, one command per stage), and the
  pooled feature is IKEM's teacher feature ``t = normalize(concat of the normalised streams)``:
  every stream weighs the same, whatever its feature scale. :func:`combine_exports` (also
  ``python -m mmfsar.models.multistream OUT.pt A.pt B.pt ...``) joins separately trained exports,
  e.g. the three distilled students, into one, so ``lit_main_eval.py`` can run few-shot episodes
  on a multi-stream model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mmfsar.errors import ConfigError
from mmfsar.models.base import EncoderOutput, build_encoder, export_encoder, load_export

__all__ = ["MULTISTREAM_TARGET", "MultiStreamEncoder", "ProjectionMLP", "combine_exports"]

# the exports' `_target_`, spelled out: under `python -m mmfsar.models.multistream` the class's __module__ is "__main__"
MULTISTREAM_TARGET = "mmfsar.models.multistream.MultiStreamEncoder"


class ProjectionMLP(nn.Module):
    """MoCo v2's projection head, built as ``head(in_features, num_classes)``: ``in_features →
    hidden → num_classes`` with a ReLU (hidden defaults to ``in_features``, as in MoCo v2 and the
    CrosSCLR / IKEM code: ``Linear(d, d) → ReLU → Linear(d, 128)``)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(num_classes)
        width = int(hidden or in_features)
        self.net = nn.Sequential(nn.Linear(self.in_features, width), nn.ReLU(inplace=True), nn.Linear(width, self.out_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def _unit_concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``normalize(cat(normalize(p)))`` along the last dim (IKEM's teacher feature)."""
    return F.normalize(torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1), dim=-1)


class MultiStreamEncoder(nn.Module):
    """Several clip encoders (one per stream, e.g. IKEM's six skeleton modalities) as one.

    ``pooled`` = ``normalize(cat(normalize(pooled_s) for s in streams))`` (IKEM's ``t``; equal
    weight per stream), ``frames`` the same per time step (the streams must give the same number
    of time steps), ``logits`` None. :attr:`streams` keeps each stream's encoder, with its
    projection head when it has one, for the distillation stage to use one by one.

    Args:
        streams: stream name -> clip encoder (an instantiated module, or its config when rebuilt
            from an export); the order fixes the concatenation order.
    """

    def __init__(self, *, streams: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not streams:
            raise ConfigError("MultiStreamEncoder needs at least one stream")
        self.streams = nn.ModuleDict(dict(streams))

    @property
    def modalities(self) -> list[str]:
        return list(dict.fromkeys(m for enc in self.streams.values() for m in enc.modalities))

    @property
    def feature_dim(self) -> int:
        return sum(int(enc.feature_dim) for enc in self.streams.values())

    def forward(self, inputs: Mapping[str, torch.Tensor], **kwargs: Any) -> EncoderOutput:
        outs = [enc(inputs, **kwargs) for enc in self.streams.values()]
        steps = {o.frames.shape[1] for o in outs}
        if len(steps) != 1:
            raise ValueError(f"MultiStreamEncoder: the streams give different numbers of time steps {sorted(steps)}")
        return EncoderOutput(pooled=_unit_concat([o.pooled for o in outs]), frames=_unit_concat([o.frames for o in outs]))


def combine_exports(paths: Mapping[str, str | Path], out: str | Path, *, info: Mapping[str, Any] | None = None) -> Path:
    """Write one :class:`MultiStreamEncoder` export from several exported encoders (stream name
    -> ``encoder.pt``); the exports must sample frames alike and agree on shared modalities.
    A multi-stream export's streams are taken one by one (no nesting)."""
    if len(paths) < 2:
        raise ConfigError(f"combine_exports needs at least two encoders, got {list(paths)}")
    streams: dict[str, nn.Module] = {}
    configs: dict[str, Any] = {}
    modalities: dict[str, Any] = {}
    frames = None
    for name, path in paths.items():
        payload = load_export(path)
        if frames is not None and payload["frames"] != frames:
            raise ConfigError(f"{path} samples frames as {payload['frames']}, the earlier encoders as {frames}")
        frames = payload["frames"]
        for m, cfg in payload["modalities"].items():
            if modalities.setdefault(m, cfg) != cfg:
                raise ConfigError(f"{path} reads modality {m!r} with other settings than an earlier encoder")
        encoder = build_encoder(payload)
        parts = dict(encoder.streams) if isinstance(encoder, MultiStreamEncoder) else {name: encoder}
        part_cfgs = payload["encoder"]["streams"] if isinstance(encoder, MultiStreamEncoder) else {name: payload["encoder"]}
        for part, module in parts.items():
            if part in streams:
                raise ConfigError(f"combine_exports: stream {part!r} given twice (from {path})")
            streams[part], configs[part] = module, part_cfgs[part]
    combined = MultiStreamEncoder(streams=streams)
    config = {"_target_": MULTISTREAM_TARGET, "streams": configs}
    return export_encoder(
        out,
        combined,
        encoder_config=config,
        modalities=modalities,
        frames=frames,
        info={"combined_from": {k: str(v) for k, v in paths.items()}, **(info or {})},
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Join exported encoders into one multi-stream encoder.pt (streams named by their parent folders).")
    ap.add_argument("out", help="the multi-stream encoder.pt to write")
    ap.add_argument("encoders", nargs="+", help="exported encoder.pt files, or NAME=PATH")
    args = ap.parse_args(argv)
    paths = {}
    for item in args.encoders:
        name, _, path = item.rpartition("=") if "=" in item else (Path(item).parent.name, "", item)
        paths[name] = path
    print(combine_exports(paths, args.out))


if __name__ == "__main__":
    main()

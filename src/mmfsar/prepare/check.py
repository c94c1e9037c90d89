"""The validator's report on a prepared dataset, for every stream its ``meta.json`` lists.

Each stream is checked with the modality that reads it (``rgb``/``rgb_*`` -> :class:`RGB`,
``flow`` -> :class:`Flow`, ``pose`` -> :class:`Pose`, ``depth`` -> :class:`Depth`, ``skeleton``
-> :class:`Skeleton`, its joints, which also checks the layout in ``meta.json``); the map is
:data:`MODALITY_OF_STREAM`, extended by prefix (``rgb_frames`` -> ``rgb``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mmfsar.data.episodes import EpisodeSettings
from mmfsar.errors import DataError
from mmfsar.data.meta import DatasetMeta
from mmfsar.data.validate import ValidationReport, validate_dataset

MODALITY_OF_STREAM = {
    "rgb": "mmfsar.data.modalities.RGB",
    "flow": "mmfsar.data.modalities.Flow",
    "pose": "mmfsar.data.modalities.Pose",
    "depth": "mmfsar.data.modalities.Depth",
    "skeleton": "mmfsar.data.modalities.Skeleton",
}


def stream_modalities(meta: DatasetMeta, only: Sequence[str] | None = None) -> dict:
    """One bound-able :class:`~mmfsar.data.modalities.Modality` per stream of ``meta``."""
    from hydra.utils import get_class

    out = {}
    for stream in meta.modalities:
        if only and stream not in only:
            continue
        target = MODALITY_OF_STREAM.get(stream) or MODALITY_OF_STREAM.get(stream.split("_", 1)[0])
        if target is None:
            continue
        out[stream] = get_class(target)(name=stream, stream=stream)
    if only:
        unknown = sorted(set(only) - set(out))
        if unknown:
            raise DataError(f"cannot check stream(s) {unknown}: not in meta.json or no modality reads them")
    return out


def check_dataset(
    root: str | Path,
    *,
    decode: bool = True,
    streams: Sequence[str] | None = None,
    episodes: EpisodeSettings | None = None,
    progress: bool = True,
) -> ValidationReport:
    """``validate_dataset`` on ``root`` for its streams (``decode=False``: files and lengths only)."""
    root = Path(root)
    try:
        meta = DatasetMeta.load(root)
    except DataError as exc:
        report = ValidationReport(root)
        report.problems.append(str(exc))
        return report
    modalities = stream_modalities(meta, streams)
    return validate_dataset(root, modalities, episodes=episodes, decode=decode, progress=progress)

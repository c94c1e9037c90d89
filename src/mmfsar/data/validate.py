"""Check a whole dataset and report *every* problem at once.

    python -m mmfsar.data.validate data.root=/path/to/dataset modality=[rgb,flow,pose]

Checks, in order, without stopping at the first failure: the meta file, every annotation row
(malformed rows, unknown classes, splits that disagree with meta.json), every clip of every
selected modality (missing or unreadable file, frame range beyond the stored frames, wrong
array shape or type), and whether the val / novel classes of each domain can give the requested
episodes (classes with fewer than k_shot + n_query clips, n_way larger than the number of
classes). Exit status 1 when anything is wrong.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from tqdm.auto import tqdm

from mmfsar.data.episodes import EpisodeSettings, episode_problems
from mmfsar.errors import DataError
from mmfsar.data.meta import ANNOTATION_FILE, ClipRecord, DatasetFolder, DatasetMeta, check_records, parse_annotations
from mmfsar.data.modalities import Modality
from mmfsar.data.transforms import UniformSegments


@dataclass
class ValidationReport:
    root: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    clips: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"dataset {self.root}: {self.clips} clips checked"]
        lines += [f"  note: {n}" for n in self.notes]
        if self.ok:
            lines.append("OK: no problems found")
        else:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def validate_dataset(
    root: str | Path,
    modalities: Mapping[str, Modality],
    *,
    frames: UniformSegments | None = None,
    episodes: EpisodeSettings | None = None,
    annotation_file: str = ANNOTATION_FILE,
    decode: bool = True,
    progress: bool = True,
) -> ValidationReport:
    """Validate ``root`` for the given modalities and episode settings.

    ``decode`` reads the frames evaluation would sample from every clip (catching unreadable
    files and wrong shapes); without it only existence and lengths are checked.
    """
    root = Path(root)
    report = ValidationReport(root)
    try:
        meta = DatasetMeta.load(root)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    try:
        records, row_problems = parse_annotations(root / annotation_file)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    report.problems += row_problems
    report.problems += check_records(records, meta)
    report.clips = len(records)
    folder = DatasetFolder(root, meta, records)

    usable: dict[str, Modality] = {}
    for name, m in modalities.items():
        try:
            usable[name] = m.bind(folder)
        except DataError as exc:
            report.problems.append(f"modality {name!r}: {exc}")
    frames = frames or UniformSegments()
    report.problems += clip_problems(records, usable, frames=frames, decode=decode, progress=progress)
    short = sum(rec.num_frames < frames.num_frames for rec in records)
    if short:
        report.notes.append(
            f"{short} clips have fewer than {frames.num_frames} frames: their frames are repeated evenly "
            "(documented short-clip rule); set data.frames.min_frames to reject them instead"
        )
    if episodes is not None:
        report.problems += _episode_problems(records, meta, episodes)
    return report


def clip_problems(
    records: Sequence[ClipRecord],
    modalities: Mapping[str, Modality],
    *,
    frames: UniformSegments | None = None,
    decode: bool = False,
    progress: bool = False,
    limit: int | None = None,
) -> list[str]:
    """What is wrong with the files of ``records`` for the bound ``modalities``, one line each:
    a missing or unreadable file (each video container is opened and each ``.npy`` header read,
    for the stored frame count), a clip range beyond the stored frames and, with ``decode``, the
    frames evaluation samples (wrong shape or type, NaN or inf values). ``limit``: stop after that
    many problems (a pre-training check needs the first few, not a full report)."""
    frames = frames or UniformSegments()
    lengths: dict[tuple[str, str], int | None] = {}
    problems: list[str] = []
    for rec in tqdm(records, desc="validating", unit="clip", disable=not progress):
        for name, m in modalities.items():
            key = (m.stream, rec.video)
            if key not in lengths:
                try:
                    lengths[key] = m.reader.length(rec.video)
                except DataError as exc:
                    lengths[key] = None
                    problems.append(f"clip {rec.clip_id!r}, {name}: {exc}")
            n = lengths[key]
            if n is None:
                continue
            if rec.end_frame > n:
                problems.append(
                    f"clip {rec.clip_id!r}, {name}: frames [{rec.start_frame}, {rec.end_frame}) requested "
                    f"but {m.reader.locate(rec.video)} has {n} frames"
                )
                continue
            if decode:
                try:
                    m.load(rec, frames(rec.start_frame, rec.end_frame, jitter=False, clip_id=rec.clip_id))
                except DataError as exc:
                    problems.append(str(exc))
        if limit is not None and len(problems) >= limit:
            break
    return problems


def _episode_problems(records: Sequence, meta: DatasetMeta, settings: EpisodeSettings) -> list[str]:
    problems = []
    for split in ("val", "novel"):
        for domain in sorted({r.domain for r in records}):
            counts = Counter(r.label_name for r in records if r.split == split and r.domain == domain)
            if not counts:  # nothing of this split in this domain: nothing to evaluate there
                continue
            for c in meta.classes_of(split):
                counts.setdefault(c, 0)
            for p in episode_problems(dict(counts), settings):
                problems.append(f"{split} classes, domain {domain!r}: {p}")
    return problems


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    from mmfsar.utils.paths import CONFIG_DIR

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="validate")
    def run(cfg: DictConfig) -> None:
        from hydra.utils import instantiate

        from mmfsar.data.modalities import build_modalities

        report = validate_dataset(
            cfg.data.root,
            build_modalities(cfg.modalities),
            frames=instantiate(cfg.data.frames),
            episodes=EpisodeSettings(**{k: cfg.fewshot[k] for k in ("n_way", "k_shot", "n_query", "episodes", "seed")}),
            annotation_file=cfg.data.annotation_file,
            decode=cfg.decode,
        )
        print(report)
        if not report.ok:
            sys.exit(1)

    run()


if __name__ == "__main__":
    main()

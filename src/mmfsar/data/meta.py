"""Dataset description: the meta file and the annotation table (see DATA_STRUCTURE.md).

A dataset is a folder with ``meta.json`` (dataset-level facts: fps, classes and their split,
per-modality file format, joint names and skeleton edges) and ``annotations.csv`` (one row per
clip). Everything here is plain data and cheap to load, so it can be checked before any long work
starts.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mmfsar.errors import DataError

META_FILE = "meta.json"
ANNOTATION_FILE = "annotations.csv"
ANNOTATION_COLUMNS = ("clip_id", "class", "domain", "split", "video", "start_frame", "end_frame")
SPLITS = ("base", "val", "novel")
PROTOCOL_SUBSETS = ("train", "test", "exemplar")


@dataclass(frozen=True)
class ClipRecord:
    """One annotated clip: frames ``[start_frame, end_frame)`` of source video ``video``."""

    clip_id: str
    label_name: str
    domain: str
    split: str
    video: str
    start_frame: int
    end_frame: int

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame


@dataclass(frozen=True)
class ClassInfo:
    name: str
    split: str


@dataclass
class DatasetMeta:
    """Contents of ``meta.json``.

    ``modalities`` maps a modality name to its storage description: ``{"format": <reader
    format>, "dir": <sub-folder>, ...reader options}``. ``joints`` / ``edges`` describe the pose
    skeleton; joints named ``left_*`` / ``right_*`` are swapped by a horizontal flip.
    """

    name: str
    fps: float
    classes: list[ClassInfo]
    modalities: dict[str, dict[str, Any]]
    frame_size: tuple[int, int] | None = None
    joints: list[str] = field(default_factory=list)
    edges: list[tuple[int, int]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, root: str | Path) -> "DatasetMeta":
        path = Path(root) / META_FILE
        if not path.is_file():
            raise DataError(f"dataset meta file not found: {path} (see DATA_STRUCTURE.md)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
        missing = [k for k in ("name", "fps", "classes", "modalities") if k not in raw]
        if missing:
            raise DataError(f"{path}: missing required keys {missing}")
        classes = []
        for i, c in enumerate(raw["classes"]):
            if not isinstance(c, dict) or "name" not in c or "split" not in c:
                raise DataError(f"{path}: classes[{i}] must be an object with 'name' and 'split'")
            if c["split"] not in SPLITS:
                raise DataError(
                    f"{path}: class {c['name']!r} has split {c['split']!r}, expected one of {SPLITS}"
                )
            classes.append(ClassInfo(str(c["name"]), str(c["split"])))
        dup = [n for n, k in Counter(c.name for c in classes).items() if k > 1]
        if dup:
            raise DataError(f"{path}: classes listed more than once: {dup}")
        joints = list(raw.get("joints", []))
        edges = [tuple(e) for e in raw.get("edges", [])]
        for a, b in edges:
            if not (0 <= a < len(joints) and 0 <= b < len(joints)):
                raise DataError(f"{path}: edge ({a}, {b}) refers to a joint outside 0..{len(joints) - 1}")
        known = {"name", "fps", "classes", "modalities", "frame_size", "joints", "edges"}
        return cls(
            name=str(raw["name"]),
            fps=float(raw["fps"]),
            classes=classes,
            modalities={k: dict(v) for k, v in raw["modalities"].items()},
            frame_size=tuple(raw["frame_size"]) if raw.get("frame_size") else None,
            joints=joints,
            edges=edges,
            extra={k: v for k, v in raw.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "fps": self.fps,
            "classes": [{"name": c.name, "split": c.split} for c in self.classes],
            "modalities": self.modalities,
            "joints": self.joints,
            "edges": [list(e) for e in self.edges],
        }
        if self.frame_size is not None:
            out["frame_size"] = list(self.frame_size)
        out.update(self.extra)
        return out

    def save(self, root: str | Path) -> None:
        (Path(root) / META_FILE).write_text(json.dumps(self.to_dict(), indent=1))

    def classes_of_all(self) -> list[str]:
        """Every class name, in meta order."""
        return [c.name for c in self.classes]

    def classes_of(self, split: str) -> list[str]:
        """Class names of one split, in meta order (which defines integer labels)."""
        return [c.name for c in self.classes if c.split == split]

    @property
    def split_of(self) -> dict[str, str]:
        return {c.name: c.split for c in self.classes}

    def flip_permutation(self) -> list[int]:
        """Joint permutation of a horizontal flip: ``left_x`` <-> ``right_x``."""
        index = {n: i for i, n in enumerate(self.joints)}
        perm = list(range(len(self.joints)))
        for i, n in enumerate(self.joints):
            for a, b in (("left_", "right_"), ("right_", "left_")):
                if n.startswith(a) and b + n[len(a):] in index:
                    perm[i] = index[b + n[len(a):]]
        return perm


def read_annotations(path: str | Path) -> list[ClipRecord]:
    """Read ``annotations.csv``; every malformed row is reported, naming its line."""
    records, problems = parse_annotations(path)
    if problems:
        raise DataError("\n".join(problems))
    return records


def parse_annotations(path: str | Path) -> tuple[list[ClipRecord], list[str]]:
    """The well-formed rows of ``annotations.csv`` and a description of every malformed one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    problems: list[str] = []
    records: list[ClipRecord] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = tuple(reader.fieldnames or ())
        missing = [c for c in ANNOTATION_COLUMNS if c not in cols]
        if missing:
            raise DataError(f"{path}: missing columns {missing}; expected {list(ANNOTATION_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            try:
                start, end = int(row["start_frame"]), int(row["end_frame"])
            except (TypeError, ValueError):
                problems.append(f"{path}:{line}: clip {row.get('clip_id')!r}: start/end frame not integers")
                continue
            if start < 0 or end <= start:
                problems.append(
                    f"{path}:{line}: clip {row['clip_id']!r}: empty or negative frame range [{start}, {end})"
                )
                continue
            records.append(
                ClipRecord(row["clip_id"], row["class"], row["domain"], row["split"], row["video"], start, end)
            )
    dup = [c for c, k in Counter(r.clip_id for r in records).items() if k > 1]
    if dup:
        problems.append(f"{path}: duplicate clip ids {dup[:10]}{' ...' if len(dup) > 10 else ''}")
    return records, problems


def write_annotations(path: str | Path, records: Iterable[ClipRecord]) -> None:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ANNOTATION_COLUMNS)
        for r in records:
            w.writerow([r.clip_id, r.label_name, r.domain, r.split, r.video, r.start_frame, r.end_frame])


def check_records(records: Sequence[ClipRecord], meta: DatasetMeta) -> list[str]:
    """Consistency of the annotation rows with the meta file: known classes, matching splits."""
    problems = []
    split_of = meta.split_of
    for r in records:
        if r.label_name not in split_of:
            problems.append(f"clip {r.clip_id!r}: unknown class {r.label_name!r} (not in meta.json classes)")
        elif split_of[r.label_name] != r.split:
            problems.append(
                f"clip {r.clip_id!r}: split {r.split!r} but class {r.label_name!r} is in split "
                f"{split_of[r.label_name]!r} in meta.json"
            )
    return problems


@dataclass
class DatasetFolder:
    """A dataset folder: its meta, its clips, and where its files are."""

    root: Path
    meta: DatasetMeta
    records: list[ClipRecord]

    @classmethod
    def open(cls, root: str | Path, annotation_file: str = ANNOTATION_FILE) -> "DatasetFolder":
        root = Path(root)
        meta = DatasetMeta.load(root)
        records = read_annotations(root / annotation_file)
        problems = check_records(records, meta)
        if problems:
            raise DataError(f"{root / annotation_file}:\n" + "\n".join(problems))
        return cls(root, meta, records)

    def select(self, *, splits: Sequence[str], domains: Sequence[str] | None = None) -> list[ClipRecord]:
        """Clips of the given splits (and domains), sorted by clip id for reproducibility."""
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            raise DataError(f"unknown split(s) {unknown}, expected a subset of {SPLITS}")
        out = [r for r in self.records if r.split in splits and (domains is None or r.domain in domains)]
        if domains is not None:
            present = {r.domain for r in self.records}
            missing = [d for d in domains if d not in present]
            if missing:
                raise DataError(f"{self.root}: no clips of domain(s) {missing}; present: {sorted(present)}")
        return sorted(out, key=lambda r: r.clip_id)

    def modality_dir(self, modality: str) -> Path:
        info = self.meta.modalities.get(modality)
        if info is None:
            raise DataError(
                f"{self.root}: the dataset has no modality {modality!r}; "
                f"meta.json lists {sorted(self.meta.modalities)}"
            )
        return self.root / info.get("dir", modality)


def read_protocol(root: str | Path, meta: DatasetMeta, name: str) -> dict[str, str]:
    """A clip-level protocol of the dataset (``meta.json`` ``"protocols": {name: {"file": ...}}``,
    a CSV ``clip_id,subset``): clip id -> subset (``train``, ``test``, ``exemplar``). Unlike the
    class-disjoint few-shot splits, a protocol divides the clips of the same classes (NTU
    cross-subject / cross-view / cross-setup, the one-shot exemplars)."""
    protocols = meta.extra.get("protocols") or {}
    if name not in protocols:
        raise DataError(f"{Path(root) / META_FILE}: no protocol {name!r}; the dataset has {sorted(protocols) or 'none'}")
    path = Path(root) / protocols[name]["file"]
    if not path.is_file():
        raise DataError(f"protocol {name!r}: file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != ("clip_id", "subset"):
            raise DataError(f"{path}: expected the columns clip_id,subset, got {reader.fieldnames}")
        rows = [(line, row["clip_id"], row["subset"]) for line, row in enumerate(reader, start=2)]
    bad = [f"{path}:{line}: clip {clip!r}: unknown subset {subset!r}" for line, clip, subset in rows if subset not in PROTOCOL_SUBSETS]
    if bad:
        raise DataError("\n".join(bad[:20]))
    subsets = {clip: subset for _, clip, subset in rows}
    if len(subsets) != len(rows):
        raise DataError(f"{path}: a clip is listed more than once")
    return subsets


def write_protocol(root: str | Path, name: str, subsets: Mapping[str, str]) -> str:
    """Write ``protocols/<name>.csv`` (``clip_id,subset``) into a dataset folder, atomically (a
    temporary file renamed into place); returns the path relative to the folder, for ``meta.json``."""
    relative = f"protocols/{name}.csv"
    path = Path(root) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clip_id", "subset"])
        w.writerows(sorted(subsets.items()))
    tmp.replace(path)
    return relative

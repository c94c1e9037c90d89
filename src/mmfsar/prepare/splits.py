"""Import the standard few-shot split lists into base / val / novel classes.

The published few-shot splits are text files with one video per line, one file per split:

``cmn`` / ``arn`` (Kinetics-100 of CMN, Zhu & Yang 2018; HMDB51 / UCF101 of ARN, Zhang et al. 2020)
    ``class name/video_id``, e.g. ``blasting sand/-kYzxMKp514_000086_000096`` or
    ``ApplyLipstick/v_ApplyLipstick_g01_c01``. The class is named by the line.
``otam`` (Something-Something v2 of OTAM, Cao et al. 2020)
    ``<split><n>/<video_id>``, e.g. ``train12/45678``: the n-th class of that split, videos by
    their SSv2 number. The class is named by the dataset (the ``class`` of the video in the
    catalogue) when each group maps to one distinct dataset class, else by the group (``train12``).

``auto`` recognises the OTAM form and otherwise reads ``class/video``. A trailing label number
(``path 12``, as in UCF101's own lists) and a video extension are ignored. The train list gives
the **base** classes, val the **val** classes and test the **novel** classes.

A listed video is looked up in the dataset's catalogue (``annotations.all.csv``, every clip
``prepare videos`` found; else ``annotations.csv``) by its id, ``class/video`` path, or base name.
The new ``annotations.csv`` keeps the listed videos only, with the class and split of the lists;
videos listed but missing on disk are reported (and written to ``.prepare/splits/missing.txt``).
"""

from __future__ import annotations

import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mmfsar.errors import DataError
from mmfsar.data.meta import ANNOTATION_FILE, ClassInfo, ClipRecord, DatasetMeta
from mmfsar.data.readers import FrameReader
from mmfsar.prepare.common import (
    CATALOG_FILE,
    STATE_DIR,
    StageResult,
    catalog_records,
    require_dataset,
    save_annotations,
    save_meta,
)
from mmfsar.prepare.videos import VIDEO_EXTENSIONS

SPLIT_OF_LIST = {"train": "base", "val": "val", "test": "novel"}
_OTAM_GROUP = re.compile(r"^(train|val|test)(\d+)$")
_TRAILING_LABEL = re.compile(r"\s+\d+$")


@dataclass(frozen=True)
class SplitEntry:
    """One parsed line: its group (a class name, or an OTAM ``trainN`` group) and video id."""

    split: str
    group: str
    video: str
    where: str


def _clean(line: str) -> str:
    line = _TRAILING_LABEL.sub("", line.strip())
    for ext in VIDEO_EXTENSIONS:
        if line.lower().endswith(ext):
            return line[: -len(ext)]
    return line


def parse_class_video(line: str, where: str) -> tuple[str, str]:
    """``class name/video_id`` (CMN, ARN)."""
    group, sep, video = _clean(line).rpartition("/")
    if not sep or not group.strip() or not video.strip():
        raise DataError(f"{where}: cannot parse {line.strip()!r}: expected 'class name/video_id'")
    return group.strip(), video.strip()


def parse_otam(line: str, where: str) -> tuple[str, str]:
    """``trainN/video_id`` (OTAM's SSv2 lists)."""
    group, video = parse_class_video(line, where)
    if not _OTAM_GROUP.match(group):
        raise DataError(f"{where}: cannot parse {line.strip()!r}: expected '<train|val|test><n>/video_id'")
    return group, video


SPLIT_STYLES: dict[str, Callable[[str, str], tuple[str, str]]] = {
    "cmn": parse_class_video,
    "arn": parse_class_video,
    "otam": parse_otam,
}


def _lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    return [
        (i, ln) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip() and not ln.lstrip().startswith("#")
    ]


def detect_style(path: Path) -> str:
    lines = _lines(path)
    groups = [_clean(ln).rpartition("/")[0] for _, ln in lines]
    return "otam" if groups and all(_OTAM_GROUP.match(g) for g in groups) else "cmn"


def read_split_file(path: str | Path, split: str, style: str = "auto") -> list[SplitEntry]:
    """Every entry of one list; every line that does not parse is reported, naming file:line."""
    path = Path(path)
    if style == "auto":
        style = detect_style(path)
    if style not in SPLIT_STYLES:
        raise DataError(f"unknown split style {style!r}; known: auto, {', '.join(sorted(SPLIT_STYLES))}")
    parse = SPLIT_STYLES[style]
    entries, problems = [], []
    for n, line in _lines(path):
        where = f"{path}:{n}"
        try:
            group, video = parse(line, where)
        except DataError as exc:
            problems.append(str(exc))
            continue
        entries.append(SplitEntry(split, group, video, where))
    if problems:
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} line(s) of {path} do not parse:\n" + "\n".join(problems[:20]) + more)
    if not entries:
        raise DataError(f"{path}: no entries")
    return entries


# ------------------------------------------------------------------------------------------ import
@dataclass
class SplitResult(StageResult):
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    missing: list[SplitEntry] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'split':<6} {'classes':>7} {'listed':>7} {'found':>7} {'missing':>7}"]
        for split, c in self.counts.items():
            lines.append(f"{split:<6} {c['classes']:>7} {c['listed']:>7} {c['found']:>7} {c['missing']:>7}")
        return "\n".join(lines)

    def summary(self, limit: int = 20) -> str:
        lines = [self.table()]
        if self.missing:
            lines.append(f"{len(self.missing)} listed video(s) missing on disk, e.g.:")
            lines += [f"  {e.split}: {e.group}/{e.video} ({e.where})" for e in self.missing[:limit]]
        lines += [f"  note: {n}" for n in self.notes]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  - {p}" for p in self.problems[:limit]]
        return "\n".join(lines)


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


class _Index:
    """Catalogue lookup by video id, ``class/basename`` and basename."""

    def __init__(self, records: list[ClipRecord]) -> None:
        self.by_video: dict[str, list[ClipRecord]] = defaultdict(list)
        for r in records:
            self.by_video[r.video].append(r)
        self.by_base: dict[str, list[str]] = defaultdict(list)
        for v in self.by_video:
            self.by_base[v.rsplit("/", 1)[-1]].append(v)

    def find(self, e: SplitEntry) -> tuple[str | None, str | None]:
        """(video, None) or (None, why it is ambiguous) or (None, None) when absent."""
        for key in (f"{e.group}/{e.video}", e.video):
            if key in self.by_video:
                return key, None
        cands = self.by_base.get(e.video.rsplit("/", 1)[-1], [])
        if len(cands) == 1:
            return cands[0], None
        if len(cands) > 1:
            same = [v for v in cands if _norm(self.by_video[v][0].label_name) == _norm(e.group)]
            if len(same) == 1:
                return same[0], None
            return None, f"{e.where}: {e.group}/{e.video} matches several videos {cands[:5]}"
        return None, None


def import_splits(
    root: str | Path,
    *,
    train: str | Path,
    val: str | Path | None = None,
    test: str | Path | None = None,
    style: str = "auto",
    check_files: bool = True,
) -> SplitResult:
    """Rewrite ``annotations.csv`` and the classes of ``meta.json`` from the split lists."""
    root = Path(root)
    require_dataset(root)
    lists = {"base": train, "val": val, "novel": test}
    entries: list[SplitEntry] = []
    for split, path in lists.items():
        if path is not None:
            entries += read_split_file(path, split, style)
    result = SplitResult("splits")

    # class-disjointness of the lists, and one class per video
    splits_of_group: dict[str, set[str]] = defaultdict(set)
    for e in entries:
        splits_of_group[e.group].add(e.split)
    shared = {g: sorted(s) for g, s in splits_of_group.items() if len(s) > 1}
    if shared:
        raise DataError(
            f"classes listed in more than one split (splits must be class-disjoint): {dict(list(shared.items())[:10])}"
        )

    catalog = catalog_records(root)
    if not (root / CATALOG_FILE).is_file():  # keep the full catalogue so other splits can be imported later
        shutil.copyfile(root / ANNOTATION_FILE, root / CATALOG_FILE)
    index = _Index(catalog)
    meta = DatasetMeta.load(root)
    rgb = _stream_reader(root, meta) if check_files else None

    matched: dict[str, SplitEntry] = {}
    for e in entries:
        video, why = index.find(e)
        if why:
            result.problems.append(why)
            continue
        if video is None or (rgb is not None and not rgb.locate(video).exists()):
            result.missing.append(e)
            continue
        prev = matched.get(video)
        if prev is not None and prev.group != e.group:
            result.problems.append(f"{e.where}: video {video!r} is also listed as class {prev.group!r} ({prev.where})")
            continue
        matched[video] = e

    names = _class_names(entries, matched, index, result)
    records: list[ClipRecord] = []
    for video, e in matched.items():
        for r in index.by_video[video]:
            records.append(
                ClipRecord(r.clip_id, names[e.group], r.domain, e.split, r.video, r.start_frame, r.end_frame)
            )
    records.sort(key=lambda r: ({"base": 0, "val": 1, "novel": 2}[r.split], r.label_name, r.clip_id))

    listed_classes = {s: {names[e.group] for e in entries if e.split == s} for s in lists}
    found_classes = {s: {r.label_name for r in records if r.split == s} for s in lists}
    for split in lists:
        if lists[split] is None:
            continue
        listed = [e for e in entries if e.split == split]
        miss = sum(1 for e in result.missing if e.split == split)
        result.counts[split] = {
            "classes": len(found_classes[split]),
            "listed": len(listed),
            "found": len({v for v, e in matched.items() if e.split == split}),
            "missing": miss,
        }
        empty = sorted(listed_classes[split] - found_classes[split])
        if empty:
            result.problems.append(f"{split}: no video on disk for listed class(es) {empty[:10]}; they are left out")
    if not records:
        raise DataError(
            f"none of the {len(entries)} listed videos is in {root} (e.g. {entries[0].group}/{entries[0].video})"
        )

    meta.classes = [ClassInfo(c, s) for s in ("base", "val", "novel") for c in sorted(found_classes[s])]
    meta.extra.setdefault("prepare", {})["splits"] = {
        k: str(v) for k, v in (("style", style), ("train", train), ("val", val), ("test", test)) if v is not None
    }
    save_annotations(root, ANNOTATION_FILE, records)
    save_meta(root, meta)
    unlisted = len(index.by_video) - len(matched)
    if unlisted:
        result.notes.append(
            f"{unlisted} video(s) of the catalogue are in no list and were left out of {ANNOTATION_FILE}"
        )
    state = root / STATE_DIR / "splits"
    state.mkdir(parents=True, exist_ok=True)
    (state / "missing.txt").write_text("".join(f"{e.split}\t{e.group}/{e.video}\t{e.where}\n" for e in result.missing))
    if result.missing:
        result.notes.append(f"the {len(result.missing)} missing video(s) are listed in {state / 'missing.txt'}")
    result.done = list(matched)
    return result


def _stream_reader(root: Path, meta: DatasetMeta) -> FrameReader | None:
    for name in ("rgb", "rgb_frames"):
        info = meta.modalities.get(name)
        if info:
            return FrameReader.create(info["format"], root / info.get("dir", name), **info.get("reader", {}))
    return None


def _class_names(
    entries: list[SplitEntry], matched: dict[str, SplitEntry], index: _Index, result: SplitResult
) -> dict[str, str]:
    """Group -> class name: the group itself, except OTAM groups named by the dataset's classes."""
    groups = list(dict.fromkeys(e.group for e in entries))
    names = {g: g for g in groups}
    otam = [g for g in groups if _OTAM_GROUP.match(g)]
    if not otam:
        return names
    dataset_classes: dict[str, Counter] = defaultdict(Counter)
    for video, e in matched.items():
        dataset_classes[e.group][index.by_video[video][0].label_name] += 1
    mapping = {g: c.most_common(1)[0][0] for g, c in dataset_classes.items() if len(c) == 1}
    one_to_one = len(mapping) == len(dataset_classes) and len(set(mapping.values())) == len(mapping)
    if one_to_one and mapping:
        for g in otam:
            names[g] = mapping.get(g, g)
    else:
        result.notes.append(
            "OTAM groups do not map one-to-one onto the dataset's classes, so classes are named by their group "
            "(train0, ..., test23)"
        )
    return names

"""NTU RGB+D 60 / 120 skeletons: the ``.skeleton`` reader, body selection, file-name ids, the
published protocols, and the importer behind ``python -m mmfsar.prepare skeleton OUT SRC``.

**File format** (METHODS.md section 6, the dataset's README): line 1 holds the frame count; per
frame a line with the body count, then per body a line of 10 body attributes (tracking id,
clipped edges, hand confidences and states, restricted flag, lean x / y, tracking state), the
joint count (25), and per joint a line of 12 values (x, y, z in metres, depth x / y, colour x / y,
orientation w / x / y / z, tracking state). Only x, y, z are kept.

**Body selection** (the standard preprocessing of ST-GCN / 2s-AGCN / CTR-GCN / CrosSCLR): bodies
are tracked across frames by their tracking id; the motion energy of a body is the sum, over its
25 joints and 3 axes, of the variance of the coordinate over the frames where the body is present
(CTR-GCN's ``get_raw_skes_data``); the two bodies with the largest energy are kept, most energetic
first (ties: the earlier to appear first). A frame without a body, or a body absent from a frame,
gives zeros, so the output is ``(T, 2, 25, 3)`` float32 with T the file's frame count. CTR-GCN's
further denoising heuristics (spread and length filters) and the per-sequence centring are left
to the modality / transforms, so the stored stream is the sensor's data.

**Protocols** (clip -> ``train`` / ``test``, plus ``exemplar`` for the one-shot exemplars; clips
outside a protocol, e.g. NTU-120-only clips in an NTU-60 protocol, are absent from it):

* ``ntu60_xsub`` / ``ntu60_xview``: setups 1-17, actions 1-60; training subjects
  :data:`NTU60_XSUB_TRAIN`; cameras 2, 3 train, 1 test.
* ``ntu120_xsub`` / ``ntu120_xset``: all 32 setups and 120 actions; the 53 training subjects
  :data:`NTU120_XSUB_TRAIN`; even setup ids train, odd test.
* ``ntu120_oneshot``: 20 novel classes A1, A7, ..., A115 (test), 100 auxiliary classes (train),
  and one published exemplar per novel class (:data:`NTU120_ONESHOT_EXEMPLARS`).

**Few-shot split** written into ``annotations.csv`` (class-disjoint, METHODS.md vocabulary):
``novel`` = the one-shot protocol's 20 novel classes (action id = 1 mod 6); ``val`` = 20 of the
auxiliary classes, A4, A10, ..., A118 (action id = 4 mod 6: as evenly spread over the NTU-60 and
NTU-120 halves, and over single-person and two-person actions, as the novel classes, and as far
from them as possible); ``base`` = the other 80. On NTU-60 alone the same rule gives
40 / 10 / 10. Class names are the action ids (``A001`` ...), which the file names carry.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mmfsar.data.meta import ANNOTATION_FILE, META_FILE, ClassInfo, ClipRecord, DatasetMeta, write_protocol
from mmfsar.data.skeleton import NTU25, SkeletonLayout
from mmfsar.errors import DataError
from mmfsar.prepare.common import (
    StageResult,
    StageState,
    atomic_file,
    clean_stale_temporaries,
    run_jobs,
    save_annotations,
    save_meta,
    signature,
)

NUM_JOINTS = 25
BODY_FIELDS = 10
JOINT_FIELDS = 12
KEPT_BODIES = 2
FPS = 30.0
STREAM = "skeleton"
PROTOCOL_DIR = "protocols"

__all__ = [
    "NTU60_XSUB_TRAIN",
    "NTU120_ONESHOT_EXEMPLARS",
    "NTU120_ONESHOT_NOVEL",
    "NTU120_XSUB_TRAIN",
    "NTU_PROTOCOLS",
    "SKELETON_SOURCES",
    "NtuIds",
    "NtuProtocol",
    "SkeletonSequence",
    "add_arguments",
    "few_shot_split",
    "import_ntu_skeletons",
    "load_npy_skeleton",
    "load_ntu_skeleton",
    "motion_energy",
    "parse_ntu_name",
    "protocol_subsets",
    "read_skeleton_file",
    "run",
    "select_bodies",
]


# ------------------------------------------------------------------------------------- file names
class NtuIds(NamedTuple):
    """The ids a file name ``S<setup>C<camera>P<subject>R<replication>A<action>`` encodes."""

    setup: int
    camera: int
    subject: int
    replication: int
    action: int

    @property
    def in_ntu60(self) -> bool:
        """NTU RGB+D 60 is setups 1-17 and actions 1-60; NTU-120 adds setups 18-32, actions 61-120."""
        return self.setup <= 17 and self.action <= 60


_NAME = re.compile(r"S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})")
_ID_RANGES = {"setup": 32, "camera": 3, "subject": 106, "replication": 2, "action": 120}


def sample_name(path_or_name: str | Path) -> str:
    """``.../S001C002P003R002A013.skeleton`` (or ``.skeleton.npy``, ``.npy``) -> ``S001C002P003R002A013``."""
    name = Path(path_or_name).name
    return name.removesuffix(".npy").removesuffix(".skeleton")


def parse_ntu_name(name: str | Path) -> NtuIds:
    """The ids of an NTU sample name (a bare name, or a file name / path ending in it)."""
    stem = sample_name(name)
    m = _NAME.fullmatch(stem)
    if m is None:
        raise DataError(
            f"{str(name)!r} is not an NTU RGB+D sample name S<setup>C<camera>P<subject>R<replication>A<action> "
            "with three digits each (e.g. S001C002P003R002A013)"
        )
    ids = NtuIds(*(int(g) for g in m.groups()))
    bad = [f"{k}={v} (1..{_ID_RANGES[k]})" for k, v in ids._asdict().items() if not 1 <= v <= _ID_RANGES[k]]
    if bad:
        raise DataError(f"{str(name)!r}: ids outside the dataset's ranges: {', '.join(bad)}")
    return ids


def class_name(action: int) -> str:
    return f"A{action:03d}"


# -------------------------------------------------------------------------------------- protocols
NTU60_XSUB_TRAIN = frozenset({1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38})
# The 53 training subjects of NTU-120 cross-subject (Liu et al., TPAMI 2019), as listed in
# CTR-GCN's data/ntu120/seq_transformation.py (get_indices, 'CSub').
NTU120_XSUB_TRAIN = NTU60_XSUB_TRAIN | frozenset(
    {45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82, 83, 84, 85, 86, 89, 91, 92, 93,
     94, 95, 97, 98, 100, 103}
)  # fmt: skip
NTU120_ONESHOT_NOVEL = frozenset(range(1, 121, 6))  # A1, A7, ..., A115
FEW_SHOT_VAL = frozenset(range(4, 121, 6))  # A4, A10, ..., A118: our val classes (module docstring)
# The exemplar of each novel class published with NTU RGB+D 120 (github.com/shahroudy/NTURGB-D,
# "Evaluation protocol of one-shot action recognition"): performer 8, camera 3, first replication.
NTU120_ONESHOT_EXEMPLARS = frozenset(
    f"S{1 if a <= 60 else 18:03d}C003P008R001A{a:03d}" for a in sorted(NTU120_ONESHOT_NOVEL)
)


@dataclass(frozen=True)
class NtuProtocol:
    """A clip-level protocol: ``rule(ids, name)`` gives the clip's subset, or None if outside it."""

    name: str
    description: str
    rule: Callable[[NtuIds, str], str | None]
    ntu120: bool  # needs NTU-120 data (written by default only when the import holds NTU-120 clips)


def _ntu60_xsub(ids: NtuIds, name: str) -> str | None:
    return None if not ids.in_ntu60 else "train" if ids.subject in NTU60_XSUB_TRAIN else "test"


def _ntu60_xview(ids: NtuIds, name: str) -> str | None:
    return None if not ids.in_ntu60 else "train" if ids.camera in (2, 3) else "test"


def _ntu120_xsub(ids: NtuIds, name: str) -> str | None:
    return "train" if ids.subject in NTU120_XSUB_TRAIN else "test"


def _ntu120_xset(ids: NtuIds, name: str) -> str | None:
    return "train" if ids.setup % 2 == 0 else "test"


def _ntu120_oneshot(ids: NtuIds, name: str) -> str | None:
    if ids.action not in NTU120_ONESHOT_NOVEL:
        return "train"
    return "exemplar" if name in NTU120_ONESHOT_EXEMPLARS else "test"


NTU_PROTOCOLS: dict[str, NtuProtocol] = {
    p.name: p
    for p in (
        NtuProtocol("ntu60_xsub", "NTU-60 cross-subject: 20 training subjects", _ntu60_xsub, False),
        NtuProtocol("ntu60_xview", "NTU-60 cross-view: cameras 2, 3 train, camera 1 test", _ntu60_xview, False),
        NtuProtocol("ntu120_xsub", "NTU-120 cross-subject: 53 training subjects", _ntu120_xsub, True),
        NtuProtocol("ntu120_xset", "NTU-120 cross-setup: even setups train, odd test", _ntu120_xset, True),
        NtuProtocol(
            "ntu120_oneshot",
            "NTU-120 one-shot: 100 auxiliary classes train, 20 novel classes test against one exemplar each",
            _ntu120_oneshot,
            True,
        ),
    )
}


def protocol_subsets(protocol: str, clips: Iterable[str]) -> dict[str, str]:
    """``{clip: subset}`` of ``protocol`` for the clips (NTU sample names) that belong to it."""
    p = NTU_PROTOCOLS.get(protocol)
    if p is None:
        raise DataError(f"unknown NTU protocol {protocol!r}; known: {sorted(NTU_PROTOCOLS)}")
    out = {}
    for clip in clips:
        subset = p.rule(parse_ntu_name(clip), clip)
        if subset is not None:
            out[clip] = subset
    return out


def few_shot_split(action: int) -> str:
    """The class-disjoint few-shot split of an action class (module docstring)."""
    if action in NTU120_ONESHOT_NOVEL:
        return "novel"
    return "val" if action in FEW_SHOT_VAL else "base"


# --------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class SkeletonSequence:
    """Every body of one ``.skeleton`` file, tracked by its id.

    ``joints`` is float32 ``(T, B, 25, 3)`` in metres (zeros where a body is absent), ``present``
    bool ``(T, B)``, ``body_ids`` the tracking ids in order of first appearance.
    """

    path: Path
    body_ids: tuple[str, ...]
    joints: np.ndarray
    present: np.ndarray

    @property
    def num_frames(self) -> int:
        return int(self.joints.shape[0])

    def select(self, keep: int = KEPT_BODIES) -> np.ndarray:
        """The ``keep`` bodies of largest motion energy: float32 ``(T, keep, 25, 3)``."""
        out = select_bodies(self.joints, self.present, keep=keep)
        if not out.any():
            raise DataError(f"{self.path}: all-zero skeleton sequence (no body with non-zero joints in "
                            f"any of its {self.num_frames} frames)")  # fmt: skip
        return out


def motion_energy(joints: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per body: the sum over joints and axes of the coordinate's variance over the frames where
    the body is present. ``joints`` (T, B, V, 3), ``present`` (T, B) -> (B,)."""
    m = present.astype(np.float64)[:, :, None, None]
    count = np.maximum(m.sum(0), 1.0)
    x = joints.astype(np.float64)
    mean = (x * m).sum(0) / count
    return (((x - mean) ** 2 * m).sum(0) / count).sum(axis=(-2, -1))


def select_bodies(joints: np.ndarray, present: np.ndarray, *, keep: int = KEPT_BODIES) -> np.ndarray:
    """The ``keep`` most energetic bodies, most energetic first (ties: the earlier first); fewer
    bodies are padded with zeros. ``(T, B, V, 3)`` -> float32 ``(T, keep, V, 3)``."""
    order = np.argsort(-motion_energy(joints, present), kind="stable")[:keep]
    out = np.zeros((joints.shape[0], keep, *joints.shape[2:]), np.float32)
    out[:, : len(order)] = joints[:, order]
    return out


class _Lines:
    """The lines of a text file, read front to back, with errors naming file and line number."""

    def __init__(self, path: Path, lines: list[str]) -> None:
        self.path, self.lines, self.pos = path, lines, 0

    def error(self, line: int, message: str) -> DataError:
        return DataError(f"{self.path}:{line}: {message}")

    def take(self, count: int, what: str) -> list[str]:
        if self.pos + count > len(self.lines):
            raise self.error(len(self.lines) + 1, f"file ends early (truncated?): expected {what}")
        block = self.lines[self.pos : self.pos + count]
        self.pos += count
        return block

    def integer(self, what: str) -> int:
        (text,) = self.take(1, what)
        try:
            value = int(text.strip())
        except ValueError:
            raise self.error(self.pos, f"expected {what} (an integer), got {text.strip()[:60]!r}") from None
        if value < 0:
            raise self.error(self.pos, f"{what} is negative ({value})")
        return value

    def numbers(self, count: int, fields: int, what: str) -> tuple[list[list[str]], np.ndarray]:
        """``count`` lines of ``fields`` numbers each: the tokens and their float64 ``(count, fields)``."""
        first = self.pos + 1
        rows = [line.split() for line in self.take(count, what)]
        for i, row in enumerate(rows):
            if len(row) != fields:
                raise self.error(first + i, f"{what}: expected {fields} values, got {len(row)}")
        try:
            return rows, np.array(rows, dtype=np.float64)
        except ValueError:
            for i, row in enumerate(rows):
                try:
                    [float(v) for v in row]
                except ValueError:
                    raise self.error(first + i, f"{what}: non-numeric value in {' '.join(row)[:80]!r}") from None
            raise

    def rest_is_blank(self) -> None:
        for i in range(self.pos, len(self.lines)):
            if self.lines[i].strip():
                raise self.error(i + 1, "unexpected content after the last frame (wrong frame count?)")


def read_skeleton_file(path: str | Path, max_bodies: int = 4) -> SkeletonSequence:
    """Parse one NTU ``.skeleton`` file; bodies are tracked by their tracking id.

    A truncated file, a joint count other than 25, a frame with more than ``max_bodies`` bodies,
    a body listed twice in a frame, non-numeric or non-finite coordinates are a
    :class:`DataError` naming the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    src = _Lines(path, text.splitlines())
    num_frames = src.integer("the frame count")
    ids: dict[str, int] = {}
    frames: list[list[tuple[int, np.ndarray]]] = []
    for f in range(num_frames):
        count = src.integer(f"the body count of frame {f + 1}")
        if count > max_bodies:
            raise src.error(src.pos, f"frame {f + 1} has {count} bodies, more than max_bodies={max_bodies}")
        bodies = []
        for b in range(count):
            where = f"body {b + 1} of frame {f + 1}"
            info_line = src.pos + 1
            body_id = src.numbers(1, BODY_FIELDS, f"the {BODY_FIELDS} attributes of {where}")[0][0][0]
            joints = src.integer(f"the joint count of {where}")
            if joints != NUM_JOINTS:
                raise src.error(src.pos, f"{where} has {joints} joints, expected {NUM_JOINTS}")
            first = src.pos + 1
            values = src.numbers(NUM_JOINTS, JOINT_FIELDS, f"the {JOINT_FIELDS} values of a joint of {where}")[1]
            finite = np.isfinite(values[:, :3]).all(axis=1)
            if not finite.all():
                line = first + int(np.argmin(finite))
                raise src.error(line, f"{where}: NaN or infinite joint coordinates")
            if any(body_id == other for other, _ in bodies):
                raise src.error(info_line, f"{where}: body id {body_id} appears twice in frame {f + 1}")
            ids.setdefault(body_id, len(ids))
            bodies.append((body_id, values[:, :3]))
        frames.append([(ids[i], v) for i, v in bodies])
    src.rest_is_blank()
    joints = np.zeros((num_frames, len(ids), NUM_JOINTS, 3), np.float32)
    present = np.zeros((num_frames, len(ids)), bool)
    for t, bodies in enumerate(frames):
        for b, values in bodies:
            joints[t, b] = values
            present[t, b] = True
    return SkeletonSequence(path, tuple(ids), joints, present)


def load_ntu_skeleton(path: str | Path, *, max_bodies: int = 4, layout: SkeletonLayout = NTU25) -> np.ndarray:
    """A ``.skeleton`` file as float32 ``(T, 2, 25, 3)`` metres (the two most moving bodies)."""
    if layout.num_joints != NUM_JOINTS:
        raise DataError(f"{path}: .skeleton files hold {NUM_JOINTS} joints, layout {layout.name!r} has "
                        f"{layout.num_joints}")  # fmt: skip
    seq = read_skeleton_file(path, max_bodies=max_bodies)
    if seq.num_frames == 0:
        raise DataError(f"{path}: no frames (frame count 0)")
    return seq.select(KEPT_BODIES)


def load_npy_skeleton(path: str | Path, *, max_bodies: int = 4, layout: SkeletonLayout = NTU25) -> np.ndarray:
    """A ``.npy`` array ``(T, M, V, 3)`` as float32 ``(T, 2, V, 3)``: body slots are selected by
    motion energy like tracked bodies (a slot counts as present where it is not all zero)."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot read a numpy array ({exc})") from None
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{path}: expected a numeric joint array, got dtype {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        hint = " ((C, T, V, M) arrays need arr.transpose(1, 3, 2, 0))" if arr.ndim == 4 and arr.shape[0] == 3 else ""
        raise DataError(f"{path}: expected joints (T, M, V, 3), got shape {arr.shape}{hint}")
    if arr.shape[2] != layout.num_joints:
        raise DataError(f"{path}: {arr.shape[2]} joints per body (shape {arr.shape}), layout {layout.name!r} "
                        f"has {layout.num_joints}")  # fmt: skip
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{path}: empty array of shape {arr.shape}")
    if arr.shape[1] > max_bodies:
        raise DataError(f"{path}: {arr.shape[1]} bodies, more than max_bodies={max_bodies}")
    arr = arr.astype(np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        t = int(np.argwhere(~finite)[0][0])
        raise DataError(f"{path}: NaN or infinite joint coordinates (first in frame {t})")
    out = select_bodies(arr, arr.any(axis=(2, 3)), keep=KEPT_BODIES)
    if not out.any():
        raise DataError(f"{path}: all-zero skeleton sequence")
    return out


@dataclass(frozen=True)
class SkeletonSource:
    """An input format of the importer: the file suffix it looks for and its loader."""

    suffix: str
    load: Callable[..., np.ndarray]


SKELETON_SOURCES: dict[str, SkeletonSource] = {
    "ntu": SkeletonSource(".skeleton", load_ntu_skeleton),
    "npy": SkeletonSource(".npy", load_npy_skeleton),
}


# -------------------------------------------------------------------------------------- importer
@dataclass(frozen=True)
class _Job:
    root: str
    source: str
    clip: str
    fmt: str
    max_bodies: int


def _import_one(job: _Job) -> int:
    arr = SKELETON_SOURCES[job.fmt].load(Path(job.source), max_bodies=job.max_bodies)
    root = Path(job.root)
    with atomic_file(root, root / STREAM / f"{job.clip}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, arr)
    return int(arr.shape[0])


def _read_ignore_list(path: Path) -> set[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"ignore list {path}: cannot read ({exc})") from None
    return {sample_name(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


def _resolve_protocols(protocols: Sequence[str] | str | None, ids: Mapping[str, NtuIds]) -> list[str]:
    if protocols is None or protocols == "auto":
        ntu120 = any(not i.in_ntu60 for i in ids.values())
        return [n for n, p in NTU_PROTOCOLS.items() if ntu120 or not p.ntu120]
    names = [p.strip() for p in protocols.split(",")] if isinstance(protocols, str) else list(protocols)
    unknown = [n for n in names if n not in NTU_PROTOCOLS]
    if unknown:
        raise DataError(f"unknown NTU protocol(s) {unknown}; known: {sorted(NTU_PROTOCOLS)} or 'auto'")
    return list(dict.fromkeys(names))


def import_ntu_skeletons(
    out: str | Path,
    src: str | Path,
    *,
    fmt: str = "ntu",
    protocols: Sequence[str] | str | None = None,
    domain: str = "source",
    name: str | None = None,
    max_bodies: int = 4,
    ignore: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
) -> StageResult:
    """Import every ``<sample>.skeleton`` (``fmt="ntu"``) or ``<sample>.npy`` (``fmt="npy"``) under
    ``src`` into the dataset folder ``out``.

    Writes ``skeleton/<sample>.npy`` (float32 ``(T, 2, 25, 3)``, atomically), ``annotations.csv``
    (one clip per sample: all its frames, class ``A<action>``, the few-shot split of
    :func:`few_shot_split`, domain ``domain``), ``protocols/<name>.csv`` (``clip_id,subset``) for
    ``protocols`` (None / ``"auto"``: the NTU-60 ones, plus the NTU-120 ones when a clip is
    NTU-120-only) and ``meta.json`` (fps 30, the classes, the ``skeleton`` stream, the layout under
    ``"skeleton"``, the protocol files under ``"protocols"``).

    A file that cannot be read is reported in ``problems`` (naming file and line) and skipped;
    its earlier output, if any, is removed. Samples whose output is in place from an earlier run
    with the same settings and unchanged input are ``skipped``. Samples named in ``ignore`` (e.g.
    NTU's ``NTU_RGBD_samples_with_missing_skeletons.txt``) are left out. ``out`` may be new or an
    earlier skeleton import; a dataset with other streams is refused rather than overwritten.
    """
    out, src = Path(out), Path(src)
    source = SKELETON_SOURCES.get(fmt)
    if source is None:
        raise DataError(f"unknown skeleton source format {fmt!r}; known: {sorted(SKELETON_SOURCES)}")
    if not src.is_dir():
        raise DataError(f"skeleton folder not found: {src}")
    if max_bodies < 1:
        raise DataError(f"max_bodies must be at least 1, got {max_bodies}")
    if (out / META_FILE).is_file():
        others = sorted(set(DatasetMeta.load(out).modalities) - {STREAM})
        if others:
            raise DataError(f"{out} already holds a dataset with streams {others}; import the skeletons into "
                            "a new folder (the importer writes annotations.csv and meta.json)")  # fmt: skip
    result = StageResult(STREAM)
    files = sorted(p for p in src.rglob(f"*{source.suffix}") if p.is_file())
    if not files:
        raise DataError(f"{src}: no *{source.suffix} files (searched recursively)")
    skip = _read_ignore_list(Path(ignore)) if ignore else set()
    found: dict[str, Path] = {}
    ids: dict[str, NtuIds] = {}
    ignored = 0
    for p in files:
        clip = sample_name(p)
        try:
            clip_ids = parse_ntu_name(clip)
        except DataError as exc:
            result.problems.append(f"{p}: {exc}")
            continue
        if clip in skip:
            ignored += 1
        elif clip in found:
            result.problems.append(f"{p}: sample {clip} also found at {found[clip]}; kept the first")
        else:
            found[clip], ids[clip] = p, clip_ids
    if ignored:
        result.notes.append(f"{ignored} sample(s) of the ignore list left out")
    protocol_names = _resolve_protocols(protocols, ids)

    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    state = StageState(out, STREAM)
    settings = {"from": fmt, "max_bodies": max_bodies, "bodies": KEPT_BODIES}
    frames: dict[str, int] = {}
    jobs = []
    for clip, p in found.items():
        marker = state.load(clip) or {}
        done = marker.get("settings") == settings and marker.get("source") == signature(p) and "frames" in marker
        if done and (out / STREAM / f"{clip}.npy").is_file():
            frames[clip] = int(marker["frames"])
            result.skipped.append(clip)
        else:
            jobs.append(_Job(str(out), str(p), clip, fmt, max_bodies))
    for job, ok, res in run_jobs(_import_one, jobs, workers=workers, desc="skeleton", progress=progress,
                                 unit="file"):  # fmt: skip
        if ok:
            frames[job.clip] = res
            state.save(job.clip, settings, signature(Path(job.source)), frames=res)
            result.done.append(job.clip)
        else:
            result.problems.append(res if job.source in res else f"{job.source}: {res}")
            stale = out / STREAM / f"{job.clip}.npy"
            if stale.is_file():
                stale.unlink()
                result.notes.append(f"removed the earlier output of {job.clip}, which failed now")
            state.path(job.clip).unlink(missing_ok=True)
    if not frames:
        result.problems.append(
            f"{src}: no sample could be imported; annotations.csv and meta.json were not (re)written"
        )
        return result

    clips = sorted(frames)
    records = [
        ClipRecord(c, class_name(ids[c].action), domain, few_shot_split(ids[c].action), c, 0, frames[c]) for c in clips
    ]
    actions = sorted({ids[c].action for c in clips})
    classes = [ClassInfo(class_name(a), few_shot_split(a)) for a in actions]
    protocol_meta: dict[str, Any] = {}
    for pname in protocol_names:
        subsets = protocol_subsets(pname, clips)
        if not subsets:
            result.notes.append(f"protocol {pname}: no imported clip belongs to it; not written")
            continue
        protocol_meta[pname] = {"file": write_protocol(out, pname, subsets), "description": NTU_PROTOCOLS[pname].description}
        if pname == "ntu120_oneshot":
            novel = {ids[c].action for c in clips} & NTU120_ONESHOT_NOVEL
            missing = sorted(e for e in NTU120_ONESHOT_EXEMPLARS - set(subsets) if parse_ntu_name(e).action in novel)
            if missing:
                result.notes.append(f"ntu120_oneshot: exemplar(s) {missing} not imported; their classes have none")
    for pname in sorted(set(NTU_PROTOCOLS) - set(protocol_meta)):  # files of an earlier import
        (out / PROTOCOL_DIR / f"{pname}.csv").unlink(missing_ok=True)
    save_annotations(out, ANNOTATION_FILE, records)
    meta = DatasetMeta(
        name=name or out.name,
        fps=FPS,
        classes=classes,
        modalities={STREAM: {"format": "npy", "dir": STREAM, "units_per_meter": 1.0}},
        extra={
            STREAM: NTU25.to_meta(),
            "protocols": protocol_meta,
            "prepare": {STREAM: {**settings, "domain": domain}},
        },
    )
    save_meta(out, meta)
    return result


# ------------------------------------------------------------------------------------------- CLI
def _workers(value: str) -> int:
    n = int(value)
    return n if n > 0 else max(1, os.cpu_count() or 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m mmfsar.prepare skeleton OUT SRC --from ntu|npy``."""
    parser.add_argument("out", type=Path, help="dataset folder to write")
    parser.add_argument("src", type=Path, help="folder searched recursively for <sample>.skeleton (--from ntu) "
                        "or <sample>.npy (T, M, 25, 3) arrays (--from npy), named S001C002P003R002A013...")  # fmt: skip
    parser.add_argument("--from", dest="fmt", choices=sorted(SKELETON_SOURCES), default="ntu",
                        help="ntu: the dataset's .skeleton text files (default); npy: joint arrays")  # fmt: skip
    parser.add_argument("--protocols", default="auto",
                        help=f"comma-separated subset of {', '.join(NTU_PROTOCOLS)}; auto (default): the NTU-60 "
                             "protocols, plus the NTU-120 ones when NTU-120 clips are present")  # fmt: skip
    parser.add_argument("--domain", default="source", help="domain of every clip (default source)")
    parser.add_argument("--name", help="dataset name in meta.json (default: OUT's folder name)")
    parser.add_argument(
        "--max-bodies", type=int, default=4, help="a frame with more bodies is an error (default 4); 2 are kept"
    )
    parser.add_argument(
        "--ignore", type=Path, help="sample names to leave out, e.g. NTU_RGBD_samples_with_missing_skeletons.txt"
    )
    parser.add_argument("--workers", type=_workers, default=2, help="worker processes (0: one per CPU)")


def run(args: argparse.Namespace) -> StageResult:
    """Run the ``skeleton`` command from parsed :func:`add_arguments` arguments."""
    return import_ntu_skeletons(
        args.out, args.src, fmt=args.fmt, protocols=args.protocols, domain=args.domain, name=args.name,
        max_bodies=args.max_bodies, ignore=args.ignore, workers=args.workers,
        progress=not getattr(args, "quiet", False),
    )  # fmt: skip

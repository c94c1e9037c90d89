"""Import 2D keypoints from common pose tools into the ``pose`` stream.

Input, per video of the dataset (``SRC`` mirrors the video ids):

``--from coco``
    ``SRC/<video>/<n>.json``: one JSON per frame holding a list of COCO-style detections
    (``{"keypoints": [x1, y1, s1, x2, ...], "score": ...}``) or an object with an
    ``"annotations"`` list; or ``SRC/<video>.json``: one results file for the video whose
    detections carry an ``image_id`` (an integer, or a file name holding the frame number), as
    written by AlphaPose / MMPose / Detectron2 exporters. COCO ground-truth visibility flags
    (0/1/2) become confidence 0/1/1.
``--from openpose``
    ``SRC/<video>/*_<n>_keypoints.json``: OpenPose's ``--write_json`` output
    (``{"people": [{"pose_keypoints_2d": [...]}]}``).
``--from npy``
    ``SRC/<video>.npy``: an array (T, J, 3) (x, y, confidence) or (T, J, 2).

The frame number of a per-frame file is the last number in its name (minus ``--start-index``);
frames without a file, or without a detected person, get confidence 0. When a frame holds several
people, the one with the highest detection score (else mean keypoint confidence) is kept.

Keypoints are assumed to be computed on the **source** videos (``--frames source``,
``--coords source``): when ``prepare videos`` resampled or resized them, its per-video record maps
stored frame ``k`` to its source frame and scales the coordinates. Use ``stored`` for keypoints
computed on the prepared frames. Keypoints are written in pixels of ``meta.json``'s
``frame_size`` (videos stored at another size are rescaled into it), as float32 (T, J, 3).

The joint layout (names, skeleton edges) is a plug-in too: ``coco17``, ``openpose_body25`` and
``openpose_coco18`` are built in and recognised from the number of joints; any other layout is a
JSON file ``{"joints": [...], "edges": [[a, b], ...]}`` given with ``--layout``.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mmfsar.errors import DataError
from mmfsar.data.meta import ANNOTATION_FILE, DatasetMeta, read_annotations
from mmfsar.data.readers import FrameReader
from mmfsar.prepare.common import (
    StageResult,
    StageState,
    atomic_file,
    catalog_records,
    clean_stale_temporaries,
    require_dataset,
    run_jobs,
    save_meta,
)


# ---------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class KeypointLayout:
    """Joint names (``left_*`` / ``right_*`` are swapped by a flip) and skeleton edges."""

    name: str
    joints: tuple[str, ...]
    edges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        n = len(self.joints)
        for a, b in self.edges:
            if not (0 <= a < n and 0 <= b < n):
                raise DataError(f"keypoint layout {self.name!r}: edge ({a}, {b}) outside joints 0..{n - 1}")
        if len(set(self.joints)) != n:
            raise DataError(f"keypoint layout {self.name!r}: joint names must be unique")


LAYOUTS: dict[str, KeypointLayout] = {}


def register_layout(layout: KeypointLayout) -> KeypointLayout:
    LAYOUTS[layout.name] = layout
    return layout


_COCO17 = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
           "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
           "right_knee", "left_ankle", "right_ankle")  # fmt: skip
register_layout(KeypointLayout("coco17", _COCO17, (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
    (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)))  # fmt: skip
register_layout(KeypointLayout("openpose_body25", (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "mid_hip", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear", "left_big_toe", "left_small_toe", "left_heel",
    "right_big_toe", "right_small_toe", "right_heel",
), (
    (1, 8), (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (8, 9), (9, 10), (10, 11), (8, 12), (12, 13),
    (13, 14), (1, 0), (0, 15), (15, 17), (0, 16), (16, 18), (14, 19), (19, 20), (14, 21), (11, 22),
    (22, 23), (11, 24),
)))  # fmt: skip
register_layout(KeypointLayout("openpose_coco18", (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
), (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)))  # fmt: skip


def load_layout_file(path: Path) -> KeypointLayout:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"keypoint layout file {path}: cannot read JSON ({exc})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("joints"), list):
        raise DataError(f"keypoint layout file {path}: expected an object with 'joints' (names) and 'edges' (pairs)")
    try:
        edges = tuple((int(a), int(b)) for a, b in raw.get("edges", []))
    except (TypeError, ValueError) as exc:
        raise DataError(f"keypoint layout file {path}: 'edges' must be pairs of joint indices") from exc
    return KeypointLayout(str(raw.get("name", path.stem)), tuple(str(j) for j in raw["joints"]), edges)


def resolve_layout(spec: str, joints: int, fmt: KeypointFormat, where: Path) -> KeypointLayout:
    """The layout named (or in the file) ``spec``, or the one ``fmt`` implies for ``joints``."""
    if spec == "auto":
        name = fmt.layouts.get(joints)
        if name is None:
            known = ", ".join(f"{n}: {len(LAYOUTS[n].joints)}" for n in sorted(set(fmt.layouts.values())))
            raise DataError(
                f"{where}: {joints} keypoints per person match no known {fmt.name} layout ({known} joints); "
                "pass --layout FILE.json with 'joints' (names; left_*/right_* are swapped by flips) and 'edges'"
            )
        return LAYOUTS[name]
    layout = LAYOUTS.get(spec) or (load_layout_file(Path(spec)) if spec.endswith(".json") else None)
    if layout is None:
        raise DataError(f"unknown keypoint layout {spec!r}; known: {sorted(LAYOUTS)} or a .json layout file")
    if len(layout.joints) != joints:
        raise DataError(
            f"{where}: {joints} keypoints per person, but layout {layout.name!r} has {len(layout.joints)} joints"
        )
    return layout


# ---------------------------------------------------------------------------------------- formats
KEYPOINT_FORMATS: dict[str, type[KeypointFormat]] = {}


class KeypointFormat(ABC):
    """Reads one video's keypoints as float32 (T, J, 3) in the numbering of the input files."""

    name: ClassVar[str] = ""
    layouts: ClassVar[dict[int, str]] = {}  # joints per person -> layout name, for --layout auto

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            KEYPOINT_FORMATS[cls.name] = cls

    def __init__(self, start_index: int = 0) -> None:
        self.start_index = int(start_index)

    @abstractmethod
    def locate(self, src: Path, video: str) -> Path | None:
        """The file or folder holding ``video``'s keypoints, or None."""

    @abstractmethod
    def load(self, path: Path) -> np.ndarray: ...

    def expected(self, src: Path, video: str) -> str:
        return f"{src / video}/ or {src / video}.json"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def frame_number(name: str, where: Path) -> int:
    m = _LAST_NUMBER.search(Path(name).stem if "." in name else name)
    if m is None:
        raise DataError(f"{where}: no frame number in {name!r}")
    return int(m.group(1))


def _triplets(values: Any, where: str) -> np.ndarray:
    """A person's keypoints as (J, 3): flat ``[x, y, s, ...]`` or nested ``[[x, y, s], ...]``."""
    if not isinstance(values, list):
        raise DataError(f"{where}: keypoints must be a list of numbers, got {type(values).__name__}")
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: keypoints must be numbers ({exc})") from exc
    if arr.ndim == 2 and arr.shape[1] in (2, 3):
        if arr.shape[1] == 2:
            arr = np.concatenate([arr, np.ones((len(arr), 1))], axis=1)
        return arr
    if arr.ndim != 1 or arr.size % 3:
        raise DataError(f"{where}: keypoints has {arr.size} values, expected 3 per joint (x, y, score)")
    return arr.reshape(-1, 3)


def _best(people: list[tuple[float | None, np.ndarray]]) -> np.ndarray | None:
    """The person with the highest detection score (else mean keypoint confidence)."""
    if not people:
        return None
    return max(people, key=lambda p: p[0] if p[0] is not None else float(np.nanmean(p[1][:, 2])))[1]


def _assemble(frames: dict[int, np.ndarray | None], where: Path, start_index: int) -> np.ndarray:
    """Frame number -> person (J, 3) or None, into (T, J, 3); missing frames get confidence 0."""
    sizes = {p.shape[0] for p in frames.values() if p is not None}
    if len(sizes) > 1:
        raise DataError(f"{where}: people with different numbers of keypoints {sorted(sizes)}")
    if not sizes:
        raise DataError(f"{where}: no person detected in any frame; cannot tell the keypoint layout")
    below = [n for n in frames if n < start_index]
    if below:
        raise DataError(f"{where}: frame number {min(below)} is below --start-index {start_index}")
    joints = sizes.pop()
    out = np.zeros((max(frames) - start_index + 1, joints, 3), np.float32)
    for n, p in frames.items():
        if p is not None:
            out[n - start_index] = p
    return out


class CocoFormat(KeypointFormat):
    name = "coco"
    layouts = {17: "coco17", 18: "openpose_coco18", 25: "openpose_body25"}

    def locate(self, src: Path, video: str) -> Path | None:
        for p in (src / video, src / f"{video}.json"):
            if p.exists():
                return p
        return None

    def _detections(self, raw: Any, where: Path) -> list[dict[str, Any]]:
        if isinstance(raw, dict) and isinstance(raw.get("annotations"), list):
            raw = raw["annotations"]
        if not isinstance(raw, list):
            raise DataError(
                f"{where}: expected a list of COCO detections (objects with 'keypoints') or an object with "
                f"an 'annotations' list, got {type(raw).__name__}"
                + (" with keys " + str(sorted(raw)[:8]) if isinstance(raw, dict) else "")
            )
        for i, d in enumerate(raw):
            if not isinstance(d, dict) or "keypoints" not in d:
                raise DataError(f"{where}: detection {i} has no 'keypoints'")
        return raw

    def _person(self, d: dict[str, Any], where: str) -> tuple[float | None, np.ndarray]:
        score = d.get("score")
        return (float(score) if isinstance(score, (int, float)) else None), _triplets(d["keypoints"], where)

    def load(self, path: Path) -> np.ndarray:
        frames: dict[int, list] = {}
        if path.is_dir():
            files = sorted(path.glob("*.json"))
            if not files:
                raise DataError(f"{path}: no .json keypoint files")
            for f in files:
                n = frame_number(f.name, f)
                if n in frames:
                    raise DataError(f"{f}: frame number {n} appears in two files of {path}")
                frames[n] = [
                    self._person(d, f"{f}: detection {i}") for i, d in enumerate(self._detections(_read_json(f), f))
                ]
        else:
            raw = _read_json(path)
            images = {}
            if isinstance(raw, dict) and isinstance(raw.get("images"), list):
                images = {im.get("id"): im.get("file_name", "") for im in raw["images"] if isinstance(im, dict)}
            for i, d in enumerate(self._detections(raw, path)):
                if "image_id" not in d:
                    raise DataError(f"{path}: detection {i} has no 'image_id' (needed to know its frame)")
                img = images.get(d["image_id"], d["image_id"])
                n = img if isinstance(img, int) else frame_number(str(img), path)
                frames.setdefault(n, []).append(self._person(d, f"{path}: detection {i}"))
        people = {n: _best(p) for n, p in frames.items()}
        out = _assemble(people, path, self.start_index)
        # ground-truth visibility flags (0 / 1 / 2) -> confidence 0 / 1 / 1
        conf = out[..., 2]
        if conf.size and np.all(np.isin(conf, (0.0, 1.0, 2.0))) and np.any(conf == 2.0):
            out[..., 2] = (conf > 0).astype(np.float32)
        return out


class OpenPoseFormat(KeypointFormat):
    name = "openpose"
    layouts = {25: "openpose_body25", 18: "openpose_coco18"}

    def locate(self, src: Path, video: str) -> Path | None:
        p = src / video
        return p if p.is_dir() else None

    def expected(self, src: Path, video: str) -> str:
        return f"{src / video}/*_keypoints.json"

    def load(self, path: Path) -> np.ndarray:
        files = sorted(path.glob("*.json"))
        if not files:
            raise DataError(f"{path}: no OpenPose .json files")
        frames: dict[int, np.ndarray | None] = {}
        for f in files:
            raw = _read_json(f)
            if not isinstance(raw, dict) or not isinstance(raw.get("people"), list):
                raise DataError(f"{f}: not an OpenPose keypoint file (expected an object with a 'people' list)")
            people = []
            for i, person in enumerate(raw["people"]):
                if not isinstance(person, dict) or "pose_keypoints_2d" not in person:
                    raise DataError(f"{f}: people[{i}] has no 'pose_keypoints_2d'")
                kp = person["pose_keypoints_2d"]
                if isinstance(kp, list) and not kp:
                    continue  # body keypoints not computed for this person
                people.append((None, _triplets(kp, f"{f}: people[{i}].pose_keypoints_2d")))
            n = frame_number(f.name.replace("_keypoints", ""), f)
            if n in frames:
                raise DataError(f"{f}: frame number {n} appears in two files of {path}")
            frames[n] = _best(people)
        return _assemble(frames, path, self.start_index)


class NpyFormat(KeypointFormat):
    name = "npy"
    layouts = {17: "coco17", 18: "openpose_coco18", 25: "openpose_body25"}

    def locate(self, src: Path, video: str) -> Path | None:
        p = src / f"{video}.npy"
        return p if p.is_file() else None

    def expected(self, src: Path, video: str) -> str:
        return f"{src / video}.npy"

    def load(self, path: Path) -> np.ndarray:
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: cannot read a numpy array ({exc})") from exc
        if not np.issubdtype(arr.dtype, np.number):
            raise DataError(f"{path}: expected a numeric keypoint array, got dtype {arr.dtype}")
        if arr.ndim == 4:
            raise DataError(
                f"{path}: got shape {arr.shape}; multi-person arrays (T, M, J, C) are not supported, "
                "keep one person: (T, J, 3) x, y, confidence or (T, J, 2)"
            )
        if arr.ndim != 3 or arr.shape[-1] not in (2, 3) or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise DataError(
                f"{path}: expected keypoints (T, J, 3) (x, y, confidence) or (T, J, 2), got shape {arr.shape}"
            )
        arr = arr.astype(np.float32)
        if arr.shape[-1] == 2:
            arr = np.concatenate([arr, np.ones((*arr.shape[:2], 1), np.float32)], axis=-1)
        return arr


def create_format(name: str, start_index: int = 0) -> KeypointFormat:
    if name not in KEYPOINT_FORMATS:
        raise DataError(f"unknown keypoint format {name!r}; known: {sorted(KEYPOINT_FORMATS)}")
    return KEYPOINT_FORMATS[name](start_index=start_index)


# ----------------------------------------------------------------------------------- to the layout
def to_stored(
    kp: np.ndarray,
    length: int,
    record: dict[str, Any] | None,
    frame_size: tuple[int, int],
    *,
    frames: str = "source",
    coords: str = "source",
) -> tuple[np.ndarray, int]:
    """Map source keypoints (T_src, J, 3) onto the ``length`` stored frames, in ``frame_size`` pixels.

    ``record`` is the video's ``prepare videos`` marker (None: stored == source). Returns the
    array and the number of stored frames for which the input had no keypoints (confidence 0).
    Coordinates use the pixel-centre convention of the image resize: ``x' = (x + 0.5) s - 0.5``.
    """
    kp = np.array(kp, dtype=np.float32)
    bad = ~np.isfinite(kp).all(axis=-1)
    kp[bad] = 0.0
    if frames == "source" and record and record.get("frame_map"):
        idx = np.asarray(record["frame_map"], dtype=np.int64)[:length]
        if len(idx) < length:
            idx = np.concatenate([idx, np.arange(len(idx), length)])
    else:
        idx = np.arange(length)
    out = np.zeros((length, kp.shape[1], 3), np.float32)
    have = idx < kp.shape[0]
    out[have] = kp[idx[have]]
    xy = out[..., :2]
    if coords == "source" and record:
        sy, sx = record.get("scale", (1.0, 1.0))
        xy[..., 0] = (xy[..., 0] + 0.5) * sx - 0.5
        xy[..., 1] = (xy[..., 1] + 0.5) * sy - 0.5
    stored = tuple(record["size"]) if record and record.get("size") else tuple(frame_size)
    if stored != tuple(frame_size):
        xy[..., 0] = (xy[..., 0] + 0.5) * frame_size[1] / stored[1] - 0.5
        xy[..., 1] = (xy[..., 1] + 0.5) * frame_size[0] / stored[0] - 0.5
    return out, int((~have).sum())


# ----------------------------------------------------------------------------------------- command
@dataclass
class PoseJob:
    root: str
    video: str
    source: str
    fmt: str
    start_index: int
    joints: int
    length: int
    record: dict[str, Any] | None
    frame_size: tuple[int, int]
    frames: str
    coords: str


def _pose_job(job: PoseJob) -> dict[str, Any]:
    fmt = create_format(job.fmt, job.start_index)
    path = Path(job.source)
    kp = fmt.load(path)
    if kp.shape[1] != job.joints:
        raise DataError(f"{path}: {kp.shape[1]} keypoints per person, but other videos have {job.joints}")
    out, uncovered = to_stored(kp, job.length, job.record, job.frame_size, frames=job.frames, coords=job.coords)
    root = Path(job.root)
    with atomic_file(root, root / "pose" / f"{job.video}.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, out)
    return {"uncovered": uncovered, "source_frames": int(kp.shape[0])}


def _rgb_reader(root: Path, meta: DatasetMeta) -> FrameReader:
    for name in ("rgb", "rgb_frames"):
        info = meta.modalities.get(name)
        if info:
            return FrameReader.create(info["format"], root / info.get("dir", name), **info.get("reader", {}))
    raise DataError(f"{root}/meta.json has no rgb stream; the number of frames per video is unknown")


def import_pose(
    root: str | Path,
    src: str | Path,
    *,
    fmt: str,
    layout: str = "auto",
    start_index: int = 0,
    frames: str = "source",
    coords: str = "source",
    all_videos: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> StageResult:
    """Write ``pose/<video>.npy`` for every video and the layout into ``meta.json``."""
    root, src = Path(root), Path(src)
    require_dataset(root)
    if frames not in ("source", "stored") or coords not in ("source", "stored"):
        raise DataError("--frames and --coords must be 'source' or 'stored'")
    if not src.is_dir():
        raise DataError(f"keypoint folder not found: {src}")
    reader_fmt = create_format(fmt, start_index)
    meta = DatasetMeta.load(root)
    if not meta.frame_size:
        raise DataError(f"{root}/meta.json has no frame_size; keypoint pixel coordinates need it")
    records = catalog_records(root) if all_videos else read_annotations(root / ANNOTATION_FILE)
    videos = list(dict.fromkeys(r.video for r in records))
    result = StageResult("pose")
    located: list[tuple[str, Path]] = []
    for video in videos:
        p = reader_fmt.locate(src, video)
        if p is None:
            result.problems.append(f"video {video!r}: no keypoints found (expected {reader_fmt.expected(src, video)})")
        else:
            located.append((video, p))
    if not located:
        raise DataError(f"{src}: no keypoint files for any of the {len(videos)} videos of {root}")
    # the first readable video fixes the number of joints (and with --layout auto, the layout)
    chosen = None
    for i, (video, path) in enumerate(located):
        try:
            joints = reader_fmt.load(path).shape[1]
        except DataError as exc:
            result.problems.append(f"video {video!r}: {exc}")
            continue
        chosen = resolve_layout(layout, joints, reader_fmt, path)
        located = located[i:]
        break
    if chosen is None:
        raise DataError("no video's keypoints could be read:\n" + "\n".join(result.problems[:10]))
    state = StageState(root, "videos")
    rgb = _rgb_reader(root, meta)
    clean_stale_temporaries(root)
    jobs = []
    for video, p in located:
        rec = state.load(video)
        try:
            length = int(rec["frames"]) if rec else rgb.length(video)
        except DataError as exc:
            result.problems.append(f"video {video!r}: {exc}")
            continue
        jobs.append(
            PoseJob(str(root), video, str(p), fmt, start_index, len(chosen.joints), length, rec,
                    tuple(meta.frame_size), frames, coords)
        )  # fmt: skip
    uncovered = 0
    for job, ok, res in run_jobs(_pose_job, jobs, workers=workers, desc="pose", progress=progress):
        if ok:
            result.done.append(job.video)
            if res["uncovered"]:
                uncovered += 1
        else:
            result.problems.append(f"video {job.video!r}: {res}")
    if uncovered:
        result.notes.append(
            f"{uncovered} video(s) have stored frames past the end of their keypoints: those frames got confidence 0"
        )
    # a video that failed now must not keep the keypoints of an earlier import
    stale = [root / "pose" / f"{v}.npy" for v in set(videos) - set(result.done)]
    stale = [p for p in stale if p.is_file()]
    for p in stale:
        p.unlink()
    if stale:
        result.notes.append(f"removed the earlier pose files of {len(stale)} video(s) that failed now")
    if result.done:
        meta = DatasetMeta.load(root)
        meta.joints = list(chosen.joints)
        meta.edges = [tuple(e) for e in chosen.edges]
        meta.modalities["pose"] = {
            "format": "npy",
            "dir": "pose",
            "frame_size": list(meta.frame_size),
            "layout": chosen.name,
        }
        meta.extra.setdefault("prepare", {})["pose"] = {
            "from": fmt,
            "layout": chosen.name,
            "frames": frames,
            "coords": coords,
        }
        save_meta(root, meta)
    return result


def layouts_help() -> str:
    return ", ".join(f"{name} ({len(layout.joints)} joints)" for name, layout in sorted(LAYOUTS.items()))

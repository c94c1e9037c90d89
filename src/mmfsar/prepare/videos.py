"""Raw videos -> the RGB stream, the annotation files and ``meta.json``.

Input is a **class-per-folder tree** (``SRC/<class>/<video>.<ext>``, e.g. UCF101's
``UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi``; the class is the folder holding the
file, the video id is its path below ``SRC`` without extension) or a **CSV** (``--csv``) with a
``path`` column and optional ``class``, ``video``, ``clip_id``, ``domain``, ``split`` and a
frame range (``start_frame``/``end_frame`` in stored frames, or ``start_time``/``end_time`` in
seconds) for datasets with several clips per recording.

Each video is decoded with PyAV (FFmpeg's libraries, so any container/codec FFmpeg reads, and no
``ffmpeg`` executable is needed) and, per ``--video``:

``reencode`` (default)
    resampled to a **constant** frame rate (``--fps``; default: the sources' common rate) by
    timestamps, so variable-frame-rate input gets well-defined frame numbers: stored frame ``k``
    shows the source frame nearest in time to ``k / fps``. Optionally resized (``--short-side``
    keeps the aspect ratio, ``--size HxW`` forces one size), turned upright when the container
    has a display rotation, and written as H.264 ``yuv420p`` mp4 (keyframe every second, so
    decord seeks fast). ``yuv420p`` needs even width and height: an odd size is **padded** by
    one replicated row / column at the bottom / right, which keeps pixel coordinates (pose
    keypoints) exact.
``keep``
    the file is hard-linked (or copied) unchanged: no resampling or resizing, so the source must
    be constant-frame-rate, unrotated, and all sources must share one extension.
``none``
    no video; needs ``--frames``.

``--frames`` also writes every stored frame as JPEG (``{:06d}.jpg``), from the same decoded
frames as the video, so both are indexed by the same frame numbers. With a video the frames are
the ``rgb_frames`` stream (``modality.rgb.stream=rgb_frames`` reads them); without one they are
the ``rgb`` stream.

Per video, a resume marker ``.prepare/videos/<video>.json`` records what was done (fps, sizes,
the stored-to-source frame map, the scale), which ``pose`` uses to map keypoints computed on the
source videos onto the stored frames.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections import Counter
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from mmfsar.errors import DataError
from mmfsar.data.meta import ANNOTATION_FILE, SPLITS, ClassInfo, ClipRecord, DatasetMeta
from mmfsar.prepare.common import (
    CATALOG_FILE,
    StageResult,
    StageState,
    atomic_dir,
    atomic_file,
    clean_stale_temporaries,
    most_common,
    run_jobs,
    save_annotations,
    save_meta,
    signature,
)

VIDEO_EXTENSIONS = (
    ".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ts", ".ogv",
)  # fmt: skip
MODES = ("reencode", "keep", "none")
UNLABELLED = "unlabelled"
FRAME_TEMPLATE = "{:06d}.jpg"


@dataclass(frozen=True)
class VideoSettings:
    """How videos are stored. ``fps=None``: the sources' common frame rate."""

    mode: str = "reencode"
    fps: float | None = None
    short_side: int | None = None
    size: tuple[int, int] | None = None
    frames: bool = False
    crf: int = 18
    preset: str = "veryfast"
    jpeg_quality: int = 95

    def check(self) -> None:
        if self.mode not in MODES:
            raise DataError(f"--video must be one of {MODES}, got {self.mode!r}")
        if self.mode == "none" and not self.frames:
            raise DataError("--video none stores no video, so it needs --frames (else nothing is written)")
        if self.mode == "keep" and (self.fps or self.short_side or self.size):
            raise DataError(
                "--video keep stores the videos unchanged; --fps / --short-side / --size need "
                "--video reencode (or --video none --frames)"
            )
        if self.short_side is not None and self.size is not None:
            raise DataError("give --short-side or --size, not both")
        if self.fps is not None and self.fps <= 0:
            raise DataError(f"--fps must be positive, got {self.fps}")
        if self.short_side is not None and self.short_side < 2:
            raise DataError(f"--short-side must be >= 2, got {self.short_side}")
        if self.size is not None and min(self.size) < 2:
            raise DataError(f"--size must be at least 2x2, got {self.size}")
        if not 0 <= self.crf <= 51:
            raise DataError(f"--crf must be in 0..51, got {self.crf}")
        if not 1 <= self.jpeg_quality <= 100:
            raise DataError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")

    @property
    def video_dir(self) -> str | None:
        return None if self.mode == "none" else "rgb"

    @property
    def frames_dir(self) -> str | None:
        if not self.frames:
            return None
        return "rgb" if self.mode == "none" else "rgb_frames"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        return d


@dataclass
class SourceRow:
    """One clip of the input listing (a tree file or a CSV row)."""

    path: Path
    video: str
    label: str
    domain: str
    split: str | None = None
    clip_id: str | None = None
    frames: tuple[int, int] | None = None
    times: tuple[float, float] | None = None
    where: str = ""


# ----------------------------------------------------------------------------------- input lists
def scan_tree(src: Path, domain: str = "source", extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[SourceRow]:
    """Every video file below ``src``; its class is the folder holding it."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"source folder not found: {src}")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    rows, loose = [], []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith(".") or p.suffix.lower() not in exts:
                continue
            rel = p.relative_to(src)
            if len(rel.parts) < 2:
                loose.append(str(rel))
                continue
            rows.append(SourceRow(p, rel.with_suffix("").as_posix(), rel.parent.name, domain, where=str(p)))
    if loose:
        raise DataError(
            f"{src}: {len(loose)} video file(s) directly in the source folder, not in a class folder "
            f"(e.g. {loose[:3]}); move them into SRC/<class>/ or list them in a --csv"
        )
    if not rows:
        raise DataError(f"{src}: no video files ({', '.join(sorted(exts))}) found in class folders")
    return rows


def read_source_csv(path: Path, src: Path | None, domain: str = "source") -> list[SourceRow]:
    """The rows of a source CSV (columns in the module docstring); paths relative to ``src``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"source CSV not found: {path}")
    rows, problems = [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        if "path" not in cols:
            raise DataError(f"{path}: needs a 'path' column (found {sorted(cols)})")
        for line, r in enumerate(reader, start=2):
            where = f"{path}:{line}"
            raw = (r.get("path") or "").strip()
            if not raw:
                problems.append(f"{where}: empty path")
                continue
            p = Path(raw)
            full = p if p.is_absolute() or src is None else Path(src) / p
            video = (r.get("video") or "").strip() or (p.with_suffix("").as_posix() if not p.is_absolute() else p.stem)
            split = (r.get("split") or "").strip() or None
            if split is not None and split not in SPLITS:
                problems.append(f"{where}: split {split!r} is not one of {SPLITS}")
                continue
            row = SourceRow(
                full,
                video,
                (r.get("class") or "").strip() or UNLABELLED,
                (r.get("domain") or "").strip() or domain,
                split,
                (r.get("clip_id") or "").strip() or None,
                where=where,
            )
            try:
                if (r.get("start_frame") or "").strip() or (r.get("end_frame") or "").strip():
                    row.frames = (int(r["start_frame"]), int(r["end_frame"]))
                elif (r.get("start_time") or "").strip() or (r.get("end_time") or "").strip():
                    row.times = (float(r["start_time"]), float(r["end_time"]))
            except (TypeError, ValueError, KeyError):
                problems.append(f"{where}: give both start and end (frames: integers, times: seconds)")
                continue
            rng = row.frames or row.times
            if rng is not None and not (0 <= rng[0] < rng[1]):
                problems.append(f"{where}: empty or negative range {rng}")
                continue
            rows.append(row)
    if problems:
        raise DataError("\n".join(problems))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


# ------------------------------------------------------------------------------------- geometry
def output_size(h: int, w: int, short_side: int | None = None, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Stored (H, W) before even-padding: ``size``, or the short side scaled to ``short_side``."""
    if size is not None:
        return int(size[0]), int(size[1])
    if short_side is not None:
        if h <= w:
            return short_side, max(1, int(w * short_side / h + 0.5))
        return max(1, int(h * short_side / w + 0.5)), short_side
    return h, w


def resample_times(times: Sequence[float], fps: float) -> list[int]:
    """Source frame shown by each stored frame of a constant-``fps`` stream (nearest in time).

    ``times`` are the source presentation times in seconds; stored frame ``k`` sits at
    ``times[0] + k / fps``, and the stream lasts until one median frame interval after the last
    source frame. For a constant-rate source at ``fps`` this is the identity.
    """
    return [i for i, _ in _resample(((t, i) for i, t in enumerate(times)), fps)]


def _resample(items: Iterator[tuple[float | None, Any]], fps: float) -> Iterator[tuple[int, Any]]:
    """Stream version of :func:`resample_times`: yields ``(source index, payload)`` per stored frame."""
    period = 1.0 / fps
    eps = 1e-3 * period
    prev: tuple[int, float, Any] | None = None
    t0: float | None = None
    intervals: list[float] = []
    k = 0
    for i, (t, payload) in enumerate(items):
        if t is None:  # no timestamp: assume the target rate
            t = (prev[1] + period) if prev is not None else 0.0
        elif t0 is None:
            t0 = t
            t = 0.0
        else:
            t = t - t0
        if prev is not None:
            if t <= prev[1]:  # repeated / out-of-order timestamp: keep the stream monotonic
                t = prev[1] + 1e-6
            intervals.append(t - prev[1])
            mid = (prev[1] + t) / 2
            while k * period < mid - eps:
                yield prev[0], prev[2]
                k += 1
        prev = (i, t, payload)
    if prev is None:
        return
    end = prev[1] + (float(np.median(intervals)) if intervals else period)
    while k * period < end - eps:
        yield prev[0], prev[2]
        k += 1


def _rotate_upright(img: np.ndarray, rotation: int) -> np.ndarray:
    """Apply the container's display rotation (counter-clockwise degrees, as PyAV reports it)."""
    k = int(round(rotation / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    if (h, w) == hw:
        return img
    interp = cv2.INTER_AREA if hw[0] <= h and hw[1] <= w else cv2.INTER_LINEAR
    return cv2.resize(img, (hw[1], hw[0]), interpolation=interp)


# -------------------------------------------------------------------------------------- writers
class H264Writer:
    """Constant-frame-rate H.264 ``yuv420p`` mp4 via PyAV (even width/height required)."""

    def __init__(self, path: Path, fps: float, height: int, width: int, crf: int = 18, preset: str = "veryfast"):
        import av

        if height % 2 or width % 2:
            raise ValueError(f"H.264 yuv420p needs an even size, got {height}x{width}")
        self.rate = Fraction(fps).limit_denominator(1001)
        self.container = av.open(str(path), mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=self.rate)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.time_base = 1 / self.rate
        self.stream.codec_context.gop_size = max(1, round(fps))
        self.stream.codec_context.options = {"crf": str(crf), "preset": preset, "threads": "1"}
        self.count = 0

    def write(self, rgb: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.count
        frame.time_base = 1 / self.rate
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.count += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _save_jpeg(path: Path, img: np.ndarray, quality: int) -> None:
    from PIL import Image

    Image.fromarray(img).save(path, quality=quality)


# --------------------------------------------------------------------------------- per-video jobs
@dataclass
class VideoJob:
    root: str
    video: str
    source: str
    settings: dict[str, Any]
    fps: float | None  # target rate (reencode/none); None for keep
    source_sig: dict[str, Any] = field(default_factory=dict)


def probe(path: Path) -> dict[str, Any]:
    """Container facts without decoding: average frame rate, coded size."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise DataError(f"{path}: no video stream")
            s = c.streams.video[0]
            rate = s.average_rate or s.guessed_rate or s.base_rate
            return {"fps": float(rate) if rate else None, "size": [s.height, s.width]}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot open video {path}: {exc}") from exc


def _decode(path: Path) -> Iterator[tuple[float | None, tuple[int, np.ndarray]]]:
    """``(time, (rotation, rgb))`` of every decodable frame, in presentation order."""
    import av

    n = 0
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise DataError(f"{path}: no video stream")
            stream = c.streams.video[0]
            stream.codec_context.thread_count = 1  # parallelism comes from the worker processes
            for frame in c.decode(stream):
                yield frame.time, (frame.rotation, frame.to_ndarray(format="rgb24"))
                n += 1
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot decode video {path} (after {n} frames): {exc}") from exc


def transcode_video(job: VideoJob) -> dict[str, Any]:
    """Decode, resample to constant fps, resize, pad, write mp4 and/or JPEG frames."""
    s = VideoSettings(**{**job.settings, "size": tuple(job.settings["size"]) if job.settings["size"] else None})
    root, src = Path(job.root), Path(job.source)
    fps = float(job.fps)
    frame_map: list[int] = []
    info: dict[str, Any] = {}
    with ExitStack() as stack:
        video_tmp = frames_tmp = None
        if s.video_dir:
            video_tmp = stack.enter_context(atomic_file(root, root / s.video_dir / f"{job.video}.mp4"))
        if s.frames_dir:
            frames_tmp = stack.enter_context(atomic_dir(root, root / s.frames_dir / job.video))
        writer: H264Writer | None = None
        cache: tuple[int, np.ndarray] | None = None
        decoded = [0]

        def counted() -> Iterator[tuple[float | None, tuple[int, np.ndarray]]]:
            for item in _decode(src):
                decoded[0] += 1
                yield item

        for src_index, (rotation, img) in _resample(counted(), fps):
            if cache is None or cache[0] != src_index:
                if not info:
                    up = _rotate_upright(img, rotation)
                    sh, sw = up.shape[:2]
                    oh, ow = output_size(sh, sw, s.short_side, s.size)
                    pad = (oh % 2, ow % 2) if video_tmp is not None else (0, 0)
                    info = {
                        "source_size": [sh, sw],
                        "rotation": int(rotation),
                        "scale": [oh / sh, ow / sw],
                        "pad": list(pad),
                        "size": [oh + pad[0], ow + pad[1]],
                    }
                inner = (info["size"][0] - info["pad"][0], info["size"][1] - info["pad"][1])
                out = _resize(_rotate_upright(img, rotation), inner)
                if any(info["pad"]):
                    out = np.pad(out, ((0, info["pad"][0]), (0, info["pad"][1]), (0, 0)), mode="edge")
                cache = (src_index, out)
            out = cache[1]
            k = len(frame_map)
            if video_tmp is not None:
                if writer is None:
                    writer = H264Writer(video_tmp, fps, out.shape[0], out.shape[1], s.crf, s.preset)
                writer.write(out)
            if frames_tmp is not None:
                _save_jpeg(frames_tmp / FRAME_TEMPLATE.format(k), out, s.jpeg_quality)
            frame_map.append(src_index)
        if not frame_map:
            raise DataError(f"{src}: no decodable video frames")
        if writer is not None:
            writer.close()
            _check_decord(video_tmp, (len(frame_map), *info["size"]), src)
    identity = frame_map == list(range(len(frame_map)))
    return {
        **info,
        "frames": len(frame_map),
        "fps": fps,
        "source_frames": decoded[0],
        "frame_map": None if identity else frame_map,
        "ext": ".mp4",
    }


def _check_decord(path: Path, shape: tuple[int, int, int], src: Path) -> None:
    """decord (the default video backend) mis-reads some small widths (e.g. 16, 24, 48, 72 px with
    decord 0.6): fail here, naming the size, rather than later in a data loader."""
    from mmfsar.data.readers import _decord_available

    if not _decord_available():
        return
    import decord

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    try:
        got = (len(vr), *vr.get_batch([0]).asnumpy().shape[1:])
    except Exception as exc:  # noqa: BLE001 - decord raises its own error types
        got = f"an error ({str(exc).strip().splitlines()[-1][-80:]})"
    if got != (*shape, 3):
        raise DataError(
            f"{src}: decord reads the re-encoded {shape[1]}x{shape[2]} video as {got} instead of "
            f"{(*shape, 3)} (a decord bug with some small frame widths); choose another --short-side / --size"
        )


def _packet_times(path: Path) -> list[float]:
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        tb = float(stream.time_base)
        return sorted(p.pts * tb for p in c.demux(stream) if p.pts is not None)


def is_variable_rate(times: Sequence[float], tolerance: float = 0.25) -> bool:
    """True when frame intervals differ from their median by more than ``tolerance`` of it."""
    d = np.diff(np.asarray(sorted(times), dtype=np.float64))
    if d.size < 2:
        return False
    med = float(np.median(d))
    return med <= 0 or bool(np.any(np.abs(d - med) > tolerance * med))


def keep_video(job: VideoJob) -> dict[str, Any]:
    """Link (or copy) the source unchanged; optionally extract its frames as they are."""
    from mmfsar.data.readers import VideoFileReader

    s = job.settings
    root, src = Path(job.root), Path(job.source)
    facts = probe(src)
    ext = src.suffix.lower()
    times = _packet_times(src)
    if is_variable_rate(times):
        raise DataError(
            f"{src}: variable frame rate; frame numbers would not be well defined for decord: "
            "use --video reencode (it resamples to a constant --fps)"
        )
    with closing(_decode(src)) as frames:
        first = next(frames, None)
    if first is None:
        raise DataError(f"{src}: no decodable video frames")
    rotation = int(first[1][0])
    if rotation % 360:
        raise DataError(
            f"{src}: has a display rotation of {rotation} degrees, which decord ignores: use --video reencode"
        )
    final = root / "rgb" / f"{job.video}{ext}"
    with atomic_file(root, final) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
    n = VideoFileReader(root / "rgb", ext=ext).length(job.video)  # counted as the loader will
    if s["frames"]:
        with atomic_dir(root, root / "rgb_frames" / job.video) as tmp:
            count = 0
            for _, (_, img) in _decode(src):
                _save_jpeg(tmp / FRAME_TEMPLATE.format(count), img, s["jpeg_quality"])
                count += 1
            if count != n:
                raise DataError(f"{src}: decord counts {n} frames but PyAV decodes {count}: use --video reencode")
    h, w = facts["size"]
    return {
        "source_size": [h, w],
        "size": [h, w],
        "rotation": 0,
        "scale": [1.0, 1.0],
        "pad": [0, 0],
        "frames": n,
        "fps": facts["fps"],
        "source_frames": n,
        "frame_map": None,
        "ext": ext,
    }


def _run_job(job: VideoJob) -> dict[str, Any]:
    info = keep_video(job) if job.settings["mode"] == "keep" else transcode_video(job)
    StageState(Path(job.root), "videos").save(job.video, job.settings, job.source_sig, **info)
    return info


# --------------------------------------------------------------------------------------- command
def prepare_videos(
    out: str | Path,
    *,
    src: str | Path | None = None,
    csv_file: str | Path | None = None,
    settings: VideoSettings = VideoSettings(),
    domain: str = "source",
    name: str | None = None,
    workers: int = 2,
    progress: bool = True,
) -> StageResult:
    """Build the RGB stream, ``annotations.csv`` (+ ``annotations.all.csv``) and ``meta.json``."""
    settings.check()
    out = Path(out)
    if csv_file is not None:
        rows = read_source_csv(Path(csv_file), Path(src) if src else None, domain)
    elif src is not None:
        rows = scan_tree(Path(src), domain)
    else:
        raise DataError("give a source folder (class-per-folder tree) and/or --csv")
    result = StageResult("videos")

    sources: dict[str, Path] = {}
    for r in rows:
        if sources.setdefault(r.video, r.path) != r.path:
            raise DataError(f"video id {r.video!r} names two files: {sources[r.video]} and {r.path} ({r.where})")
    missing = [f"{p} (video {v!r})" for v, p in sources.items() if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} source video(s) not found: " + "; ".join(missing[:20]))
    if settings.mode == "keep":
        exts = Counter(p.suffix.lower() for p in sources.values())
        if len(exts) > 1:
            raise DataError(
                f"--video keep needs one container extension for all videos, found {dict(exts)}: use --video reencode"
            )

    fps = settings.fps
    if settings.mode != "keep" and fps is None:
        fps = _common_rate(sources)

    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    state = StageState(out, "videos")
    sdict = settings.to_dict()
    infos: dict[str, dict[str, Any]] = {}
    jobs = []
    for video, path in sources.items():
        sig = signature(path)
        sig.pop("path")  # the same file moved elsewhere is still the same input
        if state.is_done(video, sdict, sig) and _outputs_exist(out, settings, video, state.load(video)):
            infos[video] = state.load(video)
            result.skipped.append(video)
        else:
            jobs.append(VideoJob(str(out), video, str(path), sdict, fps, sig))
    for job, ok, res in run_jobs(_run_job, jobs, workers=workers, desc="videos", progress=progress):
        if ok:
            infos[job.video] = res
            result.done.append(job.video)
        else:
            result.problems.append(f"video {job.video!r} ({job.source}): {res}")
    if not infos:
        result.problems.append("no video could be prepared")
        return result

    records, row_problems, class_split = _records(rows, infos, fps)
    result.problems += row_problems
    meta = _meta(out, settings, infos, class_split, fps, name, result)
    save_annotations(out, CATALOG_FILE, records)
    save_annotations(out, ANNOTATION_FILE, records)
    save_meta(out, meta)  # last: a dataset with meta.json is complete
    result.notes.append(
        f"{len(records)} clips of {len(class_split)} classes; classes without a split are 'base' until "
        "`python -m mmfsar.prepare splits` assigns base / val / novel"
    )
    return result


def _outputs_exist(out: Path, s: VideoSettings, video: str, marker: dict[str, Any] | None) -> bool:
    ext = (marker or {}).get("ext", ".mp4")
    ok = True
    if s.video_dir:
        ok &= (out / s.video_dir / f"{video}{ext}").is_file()
    if s.frames_dir:
        ok &= (out / s.frames_dir / video).is_dir()
    return ok


def _common_rate(sources: dict[str, Path]) -> float:
    """The one frame rate of all sources (unreadable ones are left to their job to report)."""
    rates: dict[float, list[str]] = {}
    for video, path in sources.items():
        try:
            fps = probe(path)["fps"]
        except DataError:
            continue
        if fps is None:
            raise DataError(f"{path}: the container reports no frame rate; pass --fps")
        rates.setdefault(round(fps, 2), []).append(video)
    if not rates:
        raise DataError(f"none of the {len(sources)} videos can be opened (e.g. {next(iter(sources.values()))})")
    if len(rates) > 1:
        desc = ", ".join(f"{r:g} fps: {len(v)} (e.g. {v[0]})" for r, v in sorted(rates.items()))
        raise DataError(f"the videos have different frame rates ({desc}); pass --fps to store them all at one rate")
    return next(iter(rates))


def _records(
    rows: list[SourceRow], infos: dict[str, dict[str, Any]], fps: float | None
) -> tuple[list[ClipRecord], list[str], dict[str, str | None]]:
    problems: list[str] = []
    records: list[ClipRecord] = []
    class_split: dict[str, str | None] = {}
    per_video = Counter(r.video for r in rows)
    seen: Counter[str] = Counter()
    for r in rows:
        info = infos.get(r.video)
        if info is None:
            continue  # failed video, already reported
        n = int(info["frames"])
        if r.frames is not None:
            start, end = r.frames
        elif r.times is not None:
            rate = float(info["fps"] or fps)
            start, end = int(round(r.times[0] * rate)), min(n, int(round(r.times[1] * rate)))
        else:
            start, end = 0, n
        if end > n or start >= end:
            problems.append(f"{r.where}: frames [{start}, {end}) outside the {n} stored frames of {r.video!r}")
            continue
        if class_split.get(r.label) and r.split and class_split[r.label] != r.split:
            problems.append(f"{r.where}: class {r.label!r} is given splits {class_split[r.label]!r} and {r.split!r}")
            continue
        class_split[r.label] = class_split.get(r.label) or r.split
        clip_id = r.clip_id or (r.video if per_video[r.video] == 1 else f"{r.video}#{seen[r.video]:04d}")
        seen[r.video] += 1
        records.append(ClipRecord(clip_id, r.label, r.domain, "", r.video, start, end))
    split_of = {c: (s or "base") for c, s in class_split.items()}
    records = [
        ClipRecord(r.clip_id, r.label_name, r.domain, split_of[r.label_name], r.video, r.start_frame, r.end_frame)
        for r in records
    ]
    return records, problems, split_of


def _meta(
    out: Path,
    s: VideoSettings,
    infos: dict[str, dict[str, Any]],
    class_split: dict[str, str],
    fps: float | None,
    name: str | None,
    result: StageResult,
) -> DatasetMeta:
    sizes = Counter(tuple(i["size"]) for i in infos.values())
    frame_size = sizes.most_common(1)[0][0]
    if len(sizes) > 1:
        desc = ", ".join(f"{h}x{w}: {k}" for (h, w), k in sizes.most_common(5))
        result.notes.append(
            f"stored frame sizes differ ({desc}); meta.json frame_size is the most common one. Crops are "
            "fractions of each frame, so this is fine for rgb/flow; pose keypoints are stored in frame_size "
            "pixels by `prepare pose`. Use --size HxW for one size."
        )
    if fps is None:  # keep mode: the videos' own rate
        rates = Counter(round(float(i["fps"]), 3) for i in infos.values() if i.get("fps"))
        fps = rates.most_common(1)[0][0] if rates else 0.0
        if len(rates) > 1:
            result.notes.append(
                f"kept videos have different frame rates {dict(rates)}; meta.json fps is the most common"
            )
    try:
        meta = DatasetMeta.load(out)
    except DataError:
        meta = DatasetMeta(name=name or out.name, fps=fps, classes=[], modalities={})
    meta.name = name or meta.name
    meta.fps = float(fps)
    meta.frame_size = (int(frame_size[0]), int(frame_size[1]))
    meta.classes = [ClassInfo(c, class_split[c]) for c in sorted(class_split)]
    for key in ("rgb", "rgb_frames"):
        meta.modalities.pop(key, None)
    exts = {i.get("ext", ".mp4") for i in infos.values()}
    if s.video_dir:
        meta.modalities["rgb"] = {"format": "video", "dir": s.video_dir, "reader": {"ext": most_common(exts)}}
    if s.frames_dir:
        meta.modalities[s.frames_dir] = {
            "format": "frames",
            "dir": s.frames_dir,
            "reader": {"template": FRAME_TEMPLATE},
        }
    meta.extra.setdefault("prepare", {})["videos"] = s.to_dict()
    return meta

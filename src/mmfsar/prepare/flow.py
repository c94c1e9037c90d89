"""Optical flow for every video of a dataset, aligned with the RGB frame numbers.

Flow frame ``i`` is the displacement from RGB frame ``i`` to ``i + 1`` in pixels of the stored
flow frame (``flow[..., 0]`` = x, to the right; ``flow[..., 1]`` = y, downwards); the last frame
repeats the one before (DATA_STRUCTURE.md). The RGB stream is read with the dataset's own reader,
so any stored RGB format works. Flow can be computed on smaller frames (``--short-side``): the
displacements are then in pixels of that smaller frame, which the ``flow`` modality expects.

Methods and storage formats are plug-ins: a :class:`FlowMethod` subclass registers itself under
its ``name`` in :data:`FLOW_METHODS`, a :class:`FlowStore` under its ``format`` in
:data:`FLOW_STORES`.

Videos are processed in worker processes, each written atomically and marked done
(``.prepare/flow/<video>.json``), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np

from mmfsar.errors import DataError
from mmfsar.data.meta import ANNOTATION_FILE, DatasetMeta, read_annotations
from mmfsar.data.readers import FrameReader, VideoFileReader, quantize_flow
from mmfsar.prepare.common import (
    StageResult,
    StageState,
    atomic_dir,
    atomic_file,
    catalog_records,
    clean_stale_temporaries,
    require_dataset,
    run_jobs,
    save_meta,
    signature,
)
from mmfsar.prepare.videos import output_size

FLOW_METHODS: dict[str, type[FlowMethod]] = {}
FLOW_STORES: dict[str, type[FlowStore]] = {}


# ---------------------------------------------------------------------------------------- methods
class FlowMethod(ABC):
    """Dense optical flow between two grey uint8 frames -> float32 (H, W, 2) pixels (x, y)."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            FLOW_METHODS[cls.name] = cls

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise DataError(f"flow method {self.name!r}: unknown option(s) {unknown}; known: {self.defaults}")
        self.options = {**self.defaults, **options}

    @classmethod
    def unavailable(cls) -> str | None:
        """Why the method cannot run here (a missing package), or None."""
        return None

    @abstractmethod
    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray: ...


class DISFlow(FlowMethod):
    """OpenCV's Dense Inverse Search (Kroeger et al. 2016): fast, good quality. ``preset``:
    ``ultrafast``, ``fast`` or ``medium``."""

    name = "dis"
    defaults = {"preset": "medium"}

    def __init__(self, **options: Any) -> None:
        import cv2

        super().__init__(**options)
        presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                   "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}  # fmt: skip
        if self.options["preset"] not in presets:
            raise DataError(f"flow method dis: preset must be one of {sorted(presets)}, got {self.options['preset']!r}")
        self.dis = cv2.DISOpticalFlow_create(presets[self.options["preset"]])

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        return self.dis.calc(prev, nxt, None)


class FarnebackFlow(FlowMethod):
    """OpenCV's polynomial-expansion flow (Farneback 2003); options as ``cv2.calcOpticalFlowFarneback``."""

    name = "farneback"
    defaults = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2}

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        import cv2

        o = self.options
        return cv2.calcOpticalFlowFarneback(
            prev, nxt, None, float(o["pyr_scale"]), int(o["levels"]), int(o["winsize"]),
            int(o["iterations"]), int(o["poly_n"]), float(o["poly_sigma"]), 0,
        )  # fmt: skip


class TVL1Flow(FlowMethod):
    """Dual TV-L1 (Zach et al. 2007), the classic two-stream flow; needs ``opencv-contrib``."""

    name = "tvl1"
    defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def unavailable(cls) -> str | None:
        import cv2

        if not hasattr(getattr(cv2, "optflow", None), "DualTVL1OpticalFlow_create"):
            return (
                "tvl1 needs cv2.optflow from opencv-contrib-python-headless (same version as OpenCV "
                f"{cv2.__version__}, installed instead of opencv-python-headless); use --method dis or farneback"
            )
        return None

    def __init__(self, **options: Any) -> None:
        import cv2

        super().__init__(**options)
        self.tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        return self.tvl1.calc(prev, nxt, None)


def create_method(name: str, **options: Any) -> FlowMethod:
    if name not in FLOW_METHODS:
        raise DataError(f"unknown flow method {name!r}; known: {sorted(FLOW_METHODS)}")
    reason = FLOW_METHODS[name].unavailable()
    if reason:
        raise DataError(reason)
    return FLOW_METHODS[name](**options)


def grey(rgb: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    import cv2

    g = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else np.asarray(rgb, np.uint8)
    if size is not None and g.shape != tuple(size):
        g = cv2.resize(g, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return g


def flow_frames(
    frames: Iterator[np.ndarray] | list[np.ndarray], method: FlowMethod, size: tuple[int, int] | None = None
) -> Iterator[np.ndarray]:
    """Flow aligned with ``frames``: item i = flow(i -> i + 1); the last repeats the one before.

    A single frame gives one zero flow field.
    """
    prev = None
    last = None
    for rgb in frames:
        g = grey(rgb, size)
        if prev is not None:
            last = np.asarray(method(prev, g), dtype=np.float32)
            yield last
        prev = g
    if prev is None:
        return
    yield last if last is not None else np.zeros((*prev.shape, 2), np.float32)


# ----------------------------------------------------------------------------------------- stores
class FlowStore(ABC):
    """A storage format of flow: writes one video, describes itself for ``meta.json``."""

    format: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.format:
            FLOW_STORES[cls.format] = cls

    def __init__(self, root: Path, directory: str = "flow", bound: float = 20.0, jpeg_quality: int = 95) -> None:
        self.root = Path(root)
        self.dir = self.root / directory
        self.directory = directory
        self.bound = float(bound)
        self.jpeg_quality = int(jpeg_quality)

    @abstractmethod
    def meta_entry(self) -> dict[str, Any]: ...

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """What changes the written bytes (part of the resume marker)."""

    @abstractmethod
    def final(self, video: str) -> Path: ...

    @abstractmethod
    @contextmanager
    def writer(self, video: str, length: int, height: int, width: int) -> Iterator[Any]:
        """Yield ``write(i, flow)``; the output appears at :meth:`final` only if the block completes."""


class NpyFlowStore(FlowStore):
    """``flow/<video>.npy``: float16 (T, H, W, 2), written through a memory map."""

    format = "npy"

    def meta_entry(self) -> dict[str, Any]:
        return {"format": "npy", "dir": self.directory}

    def settings(self) -> dict[str, Any]:
        return {"format": "npy", "dtype": "float16"}

    def final(self, video: str) -> Path:
        return self.dir / f"{video}.npy"

    @contextmanager
    def writer(self, video: str, length: int, height: int, width: int) -> Iterator[Any]:
        with atomic_file(self.root, self.final(video)) as tmp:
            arrays = [np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(length, height, width, 2))]

            def write(i: int, flow: np.ndarray) -> None:
                arrays[0][i] = flow

            yield write
            arrays[0].flush()
            arrays.clear()  # close the memory map before the file is moved into place


class FlowXYStore(FlowStore):
    """``flow/<video>/x_00000.jpg`` + ``y_00000.jpg``: 8-bit quantised in ``[-bound, bound]``."""

    format = "flow_xy"
    template = "{axis}_{index:05d}.jpg"

    def meta_entry(self) -> dict[str, Any]:
        return {"format": "flow_xy", "dir": self.directory, "reader": {"bound": self.bound}}

    def settings(self) -> dict[str, Any]:
        return {"format": "flow_xy", "bound": self.bound, "jpeg_quality": self.jpeg_quality}

    def final(self, video: str) -> Path:
        return self.dir / video

    @contextmanager
    def writer(self, video: str, length: int, height: int, width: int) -> Iterator[Any]:
        from PIL import Image

        with atomic_dir(self.root, self.final(video)) as tmp:

            def write(i: int, flow: np.ndarray) -> None:
                q = quantize_flow(flow, self.bound)
                for c, axis in enumerate("xy"):
                    Image.fromarray(q[..., c]).save(
                        tmp / self.template.format(axis=axis, index=i), quality=self.jpeg_quality
                    )

            yield write


# ----------------------------------------------------------------------------------------- command
@dataclass
class FlowJob:
    root: str
    video: str
    stream: dict[str, Any]  # the RGB stream's meta.json entry
    method: str
    options: dict[str, Any]
    store: str
    store_args: dict[str, Any]
    short_side: int | None
    settings: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)


def _reader(root: Path, stream: Mapping[str, Any], name: str) -> FrameReader:
    return FrameReader.create(stream["format"], root / stream.get("dir", name), **stream.get("reader", {}))


def iter_frames(reader: FrameReader, video: str, length: int, chunk: int = 32) -> Iterator[np.ndarray]:
    """Frames ``0 .. length-1`` in order, ``chunk`` at a time (long videos need no memory).

    A video file is opened once and decoded forward (PyAV) or read in sequential batches (decord),
    so frame ``i`` is the ``i``-th decoded frame, as the dataset's reader numbers it.
    """
    if isinstance(reader, VideoFileReader):
        path = reader.locate(video)
        if reader.backend == "pyav":
            import av

            with av.open(str(path)) as c:
                for i, frame in enumerate(c.decode(c.streams.video[0])):
                    if i >= length:
                        break
                    yield frame.to_ndarray(format="rgb24")
            return
        import decord

        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        for s in range(0, length, chunk):
            yield from vr.get_batch(list(range(s, min(length, s + chunk)))).asnumpy()
        return
    for s in range(0, length, chunk):
        yield from reader.read(video, np.arange(s, min(length, s + chunk)))


def flow_video(job: FlowJob) -> dict[str, Any]:
    root = Path(job.root)
    reader = _reader(root, job.stream, job.stream.get("_name", "rgb"))
    n = reader.length(job.video)
    if n < 1:
        raise DataError(f"{reader.locate(job.video)}: no frames")
    method = create_method(job.method, **job.options)
    store = FLOW_STORES[job.store](root, **job.store_args)
    frames = iter_frames(reader, job.video, n)
    first = next(frames)
    size = output_size(first.shape[0], first.shape[1], job.short_side) if job.short_side else first.shape[:2]

    def all_frames() -> Iterator[np.ndarray]:
        yield first
        yield from frames

    count = 0
    with store.writer(job.video, n, size[0], size[1]) as write:
        for i, flow in enumerate(flow_frames(all_frames(), method, tuple(size))):
            write(i, flow)
            count += 1
        if count != n:
            raise DataError(f"{reader.locate(job.video)}: {n} frames counted but {count} decoded")
    for other in FLOW_STORES.values():  # flow of this video in another format is now stale
        stale = other(root, **job.store_args).final(job.video)
        if other is not type(store) and stale.exists() and stale != store.final(job.video):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    info = {"frames": n, "size": [int(size[0]), int(size[1])]}
    StageState(root, "flow").save(job.video, job.settings, job.source, **info)
    return info


def prepare_flow(
    root: str | Path,
    *,
    method: str = "dis",
    options: Mapping[str, Any] | None = None,
    store: str = "npy",
    bound: float = 20.0,
    jpeg_quality: int = 95,
    short_side: int | None = None,
    stream: str = "rgb",
    all_videos: bool = False,
    workers: int = 2,
    progress: bool = True,
) -> StageResult:
    """Compute flow for every video of ``annotations.csv`` (``all_videos``: of the catalogue)."""
    root = Path(root)
    require_dataset(root)
    create_method(method, **dict(options or {}))  # fail now, not in every worker
    if store not in FLOW_STORES:
        raise DataError(f"unknown flow format {store!r}; known: {sorted(FLOW_STORES)}")
    if bound <= 0:
        raise DataError(f"--bound must be positive, got {bound}")
    meta = DatasetMeta.load(root)
    if stream not in meta.modalities:
        raise DataError(
            f"{root}/meta.json has no {stream!r} stream to compute flow from; streams: {sorted(meta.modalities)}"
        )
    info = {**meta.modalities[stream], "_name": stream}
    records = catalog_records(root) if all_videos else read_annotations(root / ANNOTATION_FILE)
    videos = list(dict.fromkeys(r.video for r in records))
    store_args = {"directory": "flow", "bound": bound, "jpeg_quality": jpeg_quality}
    store_obj = FLOW_STORES[store](root, **store_args)
    settings = {
        "method": method,
        "options": FLOW_METHODS[method](**dict(options or {})).options,
        "short_side": short_side,
        "stream": stream,
        **store_obj.settings(),
    }
    clean_stale_temporaries(root)
    state = StageState(root, "flow")
    reader = _reader(root, info, stream)
    result = StageResult("flow")
    jobs = []
    for video in videos:
        path = reader.locate(video)
        if not path.exists():
            result.problems.append(f"video {video!r}: {stream} input not found: {path}")
            continue
        src = signature(path)
        src.pop("path")
        if state.is_done(video, settings, src) and store_obj.final(video).exists():
            result.skipped.append(video)
            continue
        jobs.append(
            FlowJob(str(root), video, info, method, dict(options or {}), store, store_args, short_side, settings, src)
        )
    for job, ok, res in run_jobs(flow_video, jobs, workers=workers, desc=f"flow ({method})", progress=progress):
        if ok:
            result.done.append(job.video)
        else:
            result.problems.append(f"video {job.video!r}: {res}")
    meta = DatasetMeta.load(root)  # re-read: nothing else may have changed, but be exact
    meta.modalities["flow"] = {**store_obj.meta_entry(), "method": method, "from": stream}
    meta.extra.setdefault("prepare", {})["flow"] = settings
    save_meta(root, meta)
    return result

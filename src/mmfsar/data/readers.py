"""File-format readers: one source video of one modality -> a numpy array of frames.

A reader knows a storage format, not a modality: the ``video`` reader serves RGB, the ``npy``
reader serves flow, pose keypoints and depth alike. The dataset's ``meta.json`` names the format
of each modality; a reader class registers its format name by subclassing
:class:`FrameReader` (a dotted class path works too, for readers outside this package).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from mmfsar.errors import DataError


class FrameReader(ABC):
    """Reads frames of one source video stored in one format under ``root``."""

    format: ClassVar[str] = ""
    registry: ClassVar[dict[str, type["FrameReader"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.format:
            FrameReader.registry[cls.format] = cls

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def create(cls, format: str, root: str | Path, **options: Any) -> "FrameReader":
        """The reader registered for ``format`` (or the class at a dotted path)."""
        if format in cls.registry:
            reader_cls = cls.registry[format]
        elif "." in format:
            from hydra.utils import get_class

            reader_cls = get_class(format)
        else:
            raise DataError(f"unknown storage format {format!r}; known formats: {sorted(cls.registry)}")
        try:
            return reader_cls(root, **options)
        except TypeError as exc:
            raise DataError(f"format {format!r}: bad reader options {options}: {exc}") from exc

    @abstractmethod
    def locate(self, video: str) -> Path:
        """The file or folder holding ``video``."""

    @abstractmethod
    def length(self, video: str) -> int:
        """Number of frames stored for ``video``."""

    @abstractmethod
    def read(self, video: str, indices: np.ndarray) -> np.ndarray:
        """Frames at ``indices`` (0-based, within the stored video), stacked on axis 0."""

    def _missing(self, video: str) -> DataError:
        return DataError(f"{self.format}: file for video {video!r} not found: {self.locate(video)}")

    def _count_numbered(self, video: str, present: Callable[[set[str], int], bool]) -> int:
        """Frames 0, 1, ... of a folder of numbered files, counted while ``present(names, i)``."""
        folder = self.locate(video)
        if not folder.is_dir():
            raise self._missing(video)
        names = set(os.listdir(folder))
        n = 0
        while present(names, n):
            n += 1
        return n


class VideoFileReader(FrameReader):
    """A video container (mp4, avi, mkv, ...) decoded with decord, or PyAV as the fallback.

    ``backend="auto"`` uses decord when it is installed. Both backends return the same frames:
    PyAV decodes the stream in order and keeps the requested indices, so no seeking is involved.
    """

    format = "video"

    def __init__(self, root: str | Path, ext: str = ".mp4", backend: str = "auto") -> None:
        super().__init__(root)
        if backend not in ("auto", "decord", "pyav"):
            raise DataError(f"video reader: backend must be auto, decord or pyav, got {backend!r}")
        if backend == "auto":
            backend = "decord" if _decord_available() else "pyav"
        self.ext = ext
        self.backend = backend

    def locate(self, video: str) -> Path:
        return self.root / f"{video}{self.ext}"

    def length(self, video: str) -> int:
        path = self.locate(video)
        if not path.is_file():
            raise self._missing(video)
        try:
            if self.backend == "decord":
                return len(_decord_reader(path))
            return _pyav_count(path)
        except DataError:
            raise
        except Exception as exc:  # decoders raise many types
            raise DataError(f"cannot decode video {path}: {exc}") from exc

    def read(self, video: str, indices: np.ndarray) -> np.ndarray:
        path = self.locate(video)
        if not path.is_file():
            raise self._missing(video)
        try:
            if self.backend == "decord":
                vr = _decord_reader(path)
                return vr.get_batch(np.asarray(indices, dtype=np.int64).tolist()).asnumpy()
            return _pyav_frames(path, np.asarray(indices))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot decode frames {np.asarray(indices).tolist()} of video {path}: {exc}") from exc


@lru_cache(maxsize=1)
def _decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def _decord_reader(path: Path):
    import decord

    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)


def _pyav_count(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream))


def _pyav_frames(path: Path, indices: np.ndarray) -> np.ndarray:
    import av

    wanted = set(int(i) for i in indices)
    last = max(wanted)
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            decoded = i + 1
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    missing = sorted(wanted - frames.keys())
    if missing:
        raise DataError(f"video {path} has {decoded} decodable frames, frames {missing[:5]} requested")
    return np.stack([frames[int(i)] for i in indices])


class ImageFramesReader(FrameReader):
    """A folder per video of numbered image files: ``<root>/<video>/<template.format(i)>``.

    ``start_index`` is the number of the first file (EPIC-Kitchens style folders start at 1).
    8-bit images load as uint8 (H, W, 3) or (H, W); 16-bit PNGs (depth) as uint16 (H, W).
    """

    format = "frames"

    def __init__(self, root: str | Path, template: str = "{:06d}.jpg", start_index: int = 0) -> None:
        super().__init__(root)
        self.template = template
        self.start_index = start_index

    def locate(self, video: str) -> Path:
        return self.root / video

    def frame_path(self, video: str, index: int) -> Path:
        return self.root / video / self.template.format(index + self.start_index)

    def length(self, video: str) -> int:
        return self._count_numbered(video, lambda names, i: self.template.format(i + self.start_index) in names)

    def read(self, video: str, indices: np.ndarray) -> np.ndarray:
        return np.stack([self._load(self.frame_path(video, int(i))) for i in indices])

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as img:
                if img.mode in ("I;16", "I;16B", "I"):
                    return np.asarray(img, dtype=np.uint16)
                if img.mode not in ("RGB", "L"):
                    img = img.convert("RGB")
                return np.asarray(img)
        except FileNotFoundError:
            raise DataError(f"frame file not found: {path}") from None
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc


class NpyReader(FrameReader):
    """One ``<root>/<video>.npy`` array per video, frames on axis 0, memory-mapped."""

    format = "npy"

    def locate(self, video: str) -> Path:
        return self.root / f"{video}.npy"

    def _open(self, video: str) -> np.ndarray:
        path = self.locate(video)
        if not path.is_file():
            raise self._missing(video)
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot read array {path}: {exc}") from exc

    def length(self, video: str) -> int:
        arr = self._open(video)
        if arr.ndim == 0:
            raise DataError(f"{self.locate(video)}: expected frames on axis 0, got a scalar")
        return arr.shape[0]

    def shape(self, video: str) -> tuple[int, ...]:
        return tuple(self._open(video).shape)

    def read(self, video: str, indices: np.ndarray) -> np.ndarray:
        arr = self._open(video)
        indices = np.asarray(indices)
        if arr.ndim == 0:
            raise DataError(f"{self.locate(video)}: expected frames on axis 0, got a scalar")
        bad = indices[(indices < 0) | (indices >= arr.shape[0])]
        if bad.size:
            raise DataError(
                f"{self.locate(video)} has {arr.shape[0]} frames, frames {sorted(set(bad.tolist()))[:5]} requested"
            )
        return np.ascontiguousarray(arr[indices])


class FlowXYReader(FrameReader):
    """Optical flow as pairs of 8-bit grey images ``x_<i>.jpg`` / ``y_<i>.jpg`` per frame.

    A pixel value ``v`` encodes the displacement ``(v / 255 * 2 - 1) * bound`` pixels: the usual
    TV-L1 export with displacements clipped to ``[-bound, bound]`` (``bound=20`` by default).
    Returns float32 (T, H, W, 2).
    """

    format = "flow_xy"

    def __init__(
        self, root: str | Path, template: str = "{axis}_{index:05d}.jpg", start_index: int = 0, bound: float = 20.0
    ) -> None:
        super().__init__(root)
        self.template = template
        self.start_index = start_index
        self.bound = float(bound)

    def locate(self, video: str) -> Path:
        return self.root / video

    def frame_path(self, video: str, axis: str, index: int) -> Path:
        return self.root / video / self.template.format(axis=axis, index=index + self.start_index)

    def length(self, video: str) -> int:
        return self._count_numbered(
            video, lambda names, i: all(self.template.format(axis=a, index=i + self.start_index) in names for a in "xy")
        )

    def read(self, video: str, indices: np.ndarray) -> np.ndarray:
        frames = []
        for i in indices:
            xy = [ImageFramesReader._load(self.frame_path(video, axis, int(i))) for axis in ("x", "y")]
            frames.append(np.stack(xy, axis=-1))
        return dequantize_flow(np.stack(frames), self.bound)


def quantize_flow(flow: np.ndarray, bound: float) -> np.ndarray:
    """Displacements in pixels -> uint8, clipped to ``[-bound, bound]`` (inverse of dequantize)."""
    v = (np.clip(flow, -bound, bound) + bound) / (2 * bound) * 255.0
    return np.round(v).astype(np.uint8)


def dequantize_flow(values: np.ndarray, bound: float) -> np.ndarray:
    return (values.astype(np.float32) / 255.0 * 2.0 - 1.0) * bound

"""Writing the synthetic dataset to disk in the layout of DATA_STRUCTURE.md.

Generation is deterministic from ``seed`` (clip *i* draws from its own RNG, so the result does
not depend on the number of worker processes) and atomic: everything is written into a hidden
``.<name>.partial-<pid>`` folder next to ``root`` that is renamed to ``root`` only when complete,
so an interrupted run never leaves a dataset that looks complete.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm.auto import tqdm

from mmfsar.errors import ConfigError, DataError
from mmfsar.data.meta import ClassInfo, ClipRecord, DatasetMeta, write_annotations, write_protocol
from mmfsar.data.readers import quantize_flow
from mmfsar.data.synthetic.actions import ACTIONS, EDGES, JOINTS, SPLIT_OF_ACTION, animate
from mmfsar.data.synthetic.render import AUX, DOMAINS, FRAME, render_clip

GENERATOR_VERSION = 3  # 3: the skeleton stream by default, clip-level protocols, class text
STORAGE = {
    "rgb": {"video": {"format": "video", "reader": {"ext": ".mp4"}}, "frames": {"format": "frames", "reader": {"template": "{:06d}.jpg"}}},
    "flow": {"npy": {"format": "npy"}, "flow_xy": {"format": "flow_xy", "reader": {"bound": 8.0}}},
    "pose": {"npy": {"format": "npy"}},
    "depth": {"npy": {"format": "npy"}, "png16": {"format": "frames", "reader": {"template": "{:06d}.png"}}},
    "skeleton": {"npy": {"format": "npy"}},
}  # fmt: skip


@dataclass
class SyntheticConfig:
    """Settings of the generator; the defaults are the documented default dataset.

    ``classes_per_split`` keeps the first n classes of each split (smaller datasets for tests);
    ``clips_per_class`` counts clips per class *and* domain. Each clip is one video whose action
    occupies frames ``[start, end)``; the figure holds still in the ``margin`` frames around it.
    ``formats`` names the streams written and their storage (a stream set to ``null`` is not
    written).
    """

    seed: int = 0
    clips_per_class: int = 20
    domains: tuple[str, ...] = ("source", "target")
    classes_per_split: dict[str, int] = field(default_factory=lambda: {"base": 18, "val": 7, "novel": 10})
    min_frames: int = 16
    max_frames: int = 24
    margin: tuple[int, int] = (0, 3)
    fps: float = 12.0
    formats: dict[str, str] = field(
        default_factory=lambda: {"rgb": "video", "flow": "npy", "pose": "npy", "depth": "npy", "skeleton": "npy"}
    )

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "SyntheticConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"data.generator: unknown keys {unknown}; known: {sorted(known)}")
        kw = dict(cfg)
        for k in ("domains", "margin"):
            if k in kw:
                kw[k] = tuple(kw[k])
        for k in ("classes_per_split", "formats"):
            if k in kw:
                kw[k] = {**getattr(cls(), k), **dict(kw[k])}
        if "formats" in kw:
            kw["formats"] = {m: f for m, f in kw["formats"].items() if f is not None}
        out = cls(**kw)
        out.check()
        return out

    def check(self) -> None:
        for d in self.domains:
            if d not in DOMAINS:
                raise ConfigError(f"data.generator.domains: unknown domain {d!r}, known {sorted(DOMAINS)}")
        for m, f in self.formats.items():
            if m not in STORAGE or f not in STORAGE[m]:
                choices = {k: sorted(v) for k, v in STORAGE.items()}
                raise ConfigError(f"data.generator.formats.{m}={f!r} is not supported; choices: {choices}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ConfigError("data.generator: need 1 <= min_frames <= max_frames")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["domains"], d["margin"] = list(self.domains), list(self.margin)
        return d

    def classes(self) -> list[ClassInfo]:
        out = []
        for split in ("base", "val", "novel"):
            names = [a for a in ACTIONS if SPLIT_OF_ACTION[a] == split]
            n = self.classes_per_split.get(split, len(names))
            if n > len(names):
                raise ConfigError(f"data.generator.classes_per_split.{split}={n}: only {len(names)} available")
            out += [ClassInfo(a, split) for a in names[:n]]
        return out


def _clip_plan(cfg: SyntheticConfig) -> list[tuple[int, ClipRecord, int]]:
    """(clip number, record, video length) of every clip, drawn from the clip's own RNG."""
    plan = []
    for c in cfg.classes():
        for domain in cfg.domains:
            for k in range(cfg.clips_per_class):
                n = len(plan)
                rng = np.random.default_rng([cfg.seed, n, 0])
                length = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
                pre, post = (int(v) for v in rng.integers(cfg.margin[0], cfg.margin[1] + 1, size=2))
                clip_id = f"{domain}_{c.name}_{k:03d}"
                rec = ClipRecord(clip_id, c.name, domain, c.split, clip_id, pre, pre + length)
                plan.append((n, rec, pre + length + post))
    return plan


def _render_and_write(args: tuple[SyntheticConfig, Path, int, ClipRecord, int]) -> None:
    cfg, root, number, rec, total = args
    rng = np.random.default_rng([cfg.seed, number, 1])
    joints, props = animate(rng, rec.label_name, rec.num_frames, cfg.fps)
    # the figure holds still before and after the annotated range
    idx = np.clip(np.arange(total) - rec.start_frame, 0, rec.num_frames - 1)
    props = [replace(p, ends=p.ends[idx]) for p in props]
    # the skeleton's noise has its own generator: the other streams are the same with or without it
    skeleton_rng = np.random.default_rng([cfg.seed, number, 2]) if "skeleton" in cfg.formats else None
    out = render_clip(rng, joints[idx], rec.domain, props, skeleton_rng=skeleton_rng)
    for modality, array in out.items():
        if modality in cfg.formats:
            _write(root / modality, rec.video, array, cfg.formats[modality], cfg.fps)


def _write(directory: Path, video: str, array: np.ndarray, fmt: str, fps: float) -> None:
    from PIL import Image

    if fmt == "npy":
        np.save(directory / f"{video}.npy", array)
    elif fmt == "video":
        write_video(directory / f"{video}.mp4", array, fps)
    elif fmt in ("frames", "png16"):
        folder = directory / video
        folder.mkdir()
        ext = "png" if array.dtype == np.uint16 else "jpg"
        for i, frame in enumerate(array):
            img = Image.fromarray(frame)
            img.save(folder / f"{i:06d}.{ext}", **({"quality": 92} if ext == "jpg" else {}))
    elif fmt == "flow_xy":
        folder = directory / video
        folder.mkdir()
        q = quantize_flow(array.astype(np.float32), STORAGE["flow"]["flow_xy"]["reader"]["bound"])
        for i, frame in enumerate(q):
            for axis, channel in (("x", 0), ("y", 1)):
                Image.fromarray(frame[..., channel]).save(folder / f"{axis}_{i:05d}.jpg", quality=95)
    else:  # guarded by SyntheticConfig.check
        raise DataError(f"unknown format {fmt!r}")


def write_video(path: Path, frames: np.ndarray, fps: float, crf: int = 18) -> None:
    """H.264 (yuv420p) mp4 with PyAV, deterministic bytes: single-threaded, and without x264's
    macroblock-tree rate control, which made the encoding differ from run to run (seen with the
    x264 in PyAV's wheels, more often under CPU load; ~1.5x larger files without it)."""
    import av
    from fractions import Fraction

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def dataset_meta(cfg: SyntheticConfig) -> DatasetMeta:
    modalities = {}
    for m, fmt in cfg.formats.items():
        info = {"dir": m, **json.loads(json.dumps(STORAGE[m][fmt]))}
        if m == "depth":
            info["units_per_meter"] = 1000.0
        if m == "pose":
            info["frame_size"] = [FRAME, FRAME]
        if m == "skeleton":
            info["units_per_meter"] = 1.0
        modalities[m] = info
    extra: dict[str, Any] = {"generator": {"version": GENERATOR_VERSION, **cfg.to_dict()}, "aux_resolution": AUX}
    if "skeleton" in cfg.formats:
        from mmfsar.data.skeleton import SYNTHETIC15  # imports this package: not at module level

        extra["skeleton"] = SYNTHETIC15.to_meta()
    return DatasetMeta(
        name="synthetic",
        fps=cfg.fps,
        classes=cfg.classes(),
        modalities=modalities,
        frame_size=(FRAME, FRAME),
        joints=list(JOINTS),
        edges=[tuple(e) for e in EDGES],
        extra=extra,
    )


def generate(cfg: SyntheticConfig, root: str | Path, workers: int = 2, progress: bool = True) -> Path:
    """Render the dataset into ``root`` (which must not exist yet). Returns ``root``."""
    cfg.check()
    root = Path(root)
    if root.exists():
        raise DataError(f"{root} already exists; delete it or choose another data.root")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for m in cfg.formats:
            (tmp / m).mkdir()
        plan = _clip_plan(cfg)
        jobs = [(cfg, tmp, n, rec, total) for n, rec, total in plan]
        bar = tqdm(total=len(jobs), desc=f"generating {root.name}", unit="clip", disable=not progress)
        if workers > 1:
            # forkserver: forking a process whose thread pools (torch, OpenCV) already run can deadlock
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
                for _ in pool.map(_render_and_write, jobs, chunksize=8):
                    bar.update()
        else:
            for job in jobs:
                _render_and_write(job)
                bar.update()
        bar.close()
        records = [rec for _, rec, _ in plan]
        write_annotations(tmp / "annotations.csv", records)
        _write_class_text(tmp, cfg)
        meta = dataset_meta(cfg)
        meta.extra["protocols"] = {
            name: {"file": write_protocol(tmp, name, subsets), "description": PROTOCOLS[name]}
            for name, subsets in protocol_subsets(records, cfg).items()
        }
        meta.save(tmp)  # written last: its presence marks a complete dataset
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


XSUB_TEST_FRACTION = 0.3  # the last 30% of each class's clips per domain: performers 7-9 of 10 at 20 clips
PROTOCOLS = {
    "xsub": "cross-performer (as NTU cross-subject): the first 70% of each class's clips per domain train "
    "(clip k is performed by performer k // 2 at 20 clips: performers 0-6), the rest test; every class and domain",
    "xdomain": "cross-domain (as NTU cross-view): the source domain trains, the target domain tests, every class",
    "oneshot": "one-shot (as NTU-120's): the base and val classes train (both domains); each novel class has "
    "one exemplar, its first target clip, and its other target clips test",
}


def protocol_subsets(records: list[ClipRecord], cfg: SyntheticConfig) -> dict[str, dict[str, str]]:
    """The clip-level protocols of the synthetic dataset (:data:`PROTOCOLS`): clip id -> subset."""
    number = lambda r: int(r.clip_id.rsplit("_", 1)[1])  # noqa: E731 - k of "<domain>_<class>_<k>"
    target = cfg.domains[-1]
    oneshot = {}
    for r in records:
        if r.split != "novel":
            oneshot[r.clip_id] = "train"
        elif r.domain == target:
            oneshot[r.clip_id] = "exemplar" if number(r) == 0 else "test"
    protocols = {
        "xsub": {r.clip_id: "train" if number(r) < round((1 - XSUB_TEST_FRACTION) * cfg.clips_per_class) else "test" for r in records},
        "xdomain": {r.clip_id: "train" if r.domain == cfg.domains[0] else "test" for r in records},
        "oneshot": oneshot,
    }
    if len(cfg.domains) < 2:
        del protocols["xdomain"]
    return protocols


def _write_class_text(root: Path, cfg: SyntheticConfig) -> None:
    """``text/``: each class's description (:data:`~mmfsar.data.text.ACTION_DESCRIPTIONS`) and its
    bag-of-words features, the class text of MMCL and CLIP-MDMF (DATA_STRUCTURE.md)."""
    from mmfsar.data.text import BagOfWordsTextEncoder, describe_action, write_class_text

    names = [c.name for c in cfg.classes()]
    descriptions = {n: describe_action(n) for n in names}
    encoder = BagOfWordsTextEncoder()
    features = encoder.encode([descriptions[n] for n in names])
    write_class_text(root, descriptions=descriptions, features=features, classes=names, encoder=encoder.settings())


def _remove_stale_partials(root: Path) -> None:
    """Delete partial folders left by killed generators (whose process no longer exists)."""
    for p in root.parent.glob(f".{root.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


def ensure_synthetic(root: str | Path, generator: Mapping[str, Any] | SyntheticConfig, workers: int = 2) -> Path:
    """Generate the dataset at ``root`` unless an identical one (same settings) is already there."""
    cfg = generator if isinstance(generator, SyntheticConfig) else SyntheticConfig.from_mapping(generator)
    root = Path(root)
    meta_path = root / "meta.json"
    if meta_path.is_file():
        found = json.loads(meta_path.read_text()).get("generator")
        wanted = {"version": GENERATOR_VERSION, **cfg.to_dict()}
        if found != wanted:
            found = found or {}
            diff = {k: (found.get(k), wanted[k]) for k in wanted if found.get(k) != wanted[k]}
            raise DataError(
                f"{root} holds a synthetic dataset generated with other settings "
                f"(data.generator key: (found, requested) = {diff}). "
                "Delete the folder or set data.root elsewhere."
            )
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root} exists but has no meta.json: not a complete dataset; delete it first")
    if root.exists():
        root.rmdir()
    return generate(cfg, root, workers=workers)

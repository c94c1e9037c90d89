"""Data-loading throughput: clips/s per modality reader and for full multimodal clips.

    python benchmarks/bench_data.py [--root data/synthetic] [--clips 300] [--workers 2] [--tiny]

On the default synthetic dataset (generated on first use with the settings of
``configs/data/synthetic.yaml``, or any dataset given by ``--root``) it measures, after a warm-up:

* each stream alone, for the frames evaluation samples from a clip (``--num-frames``):
  ``read`` = the storage reader only (file -> numpy), ``tensor`` = reader + the modality's
  transform to the model input (crop / resize / normalise; pose: heatmap rendering);
  rgb is measured with decord and with PyAV;
* full clips with every modality (rgb, flow, pose heatmaps, depth) through ``ClipDataset`` in a
  ``DataLoader`` with training augmentation, with 0 and with ``--workers`` worker processes.

It prints one JSON object: clips/s per item and ratios (workers vs none, decord vs PyAV, tensor
vs read), so later issues can compare a training step's clips/s with what loading delivers.
Files are read from the OS page cache after the warm-up (a freshly generated dataset is cached
anyway); the numbers are for a warm cache. The main process runs torch with ``--torch-threads``
(1, as in a DataLoader worker): on small per-clip tensors intra-op threads cost more than they
give, badly so when the other cores are busy. The load average is reported with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MMFSAR_ROOT", str(REPO))

from mmfsar.data.dataset import ClipDataset  # noqa: E402
from mmfsar.data.meta import DatasetFolder  # noqa: E402
from mmfsar.data.modalities import build_modalities  # noqa: E402
from mmfsar.data.synthetic import ensure_synthetic  # noqa: E402
from mmfsar.data.transforms import ClipAugmentation, UniformSegments  # noqa: E402

MODALITIES = ("rgb", "flow", "pose", "depth")


def modality_configs(names, **overrides) -> dict:
    """configs/modality/<name>.yaml as a composed config resolves them (sizes from the default
    ``input`` group), with ``overrides`` per modality."""
    cfgs = {}
    for name in names:
        cfg = OmegaConf.load(REPO / "configs" / "modality" / f"{name}.yaml")
        cfgs[name] = OmegaConf.merge(cfg, overrides.get(name, {}))
    composed = OmegaConf.create({"input": OmegaConf.load(REPO / "configs" / "input" / "synthetic.yaml"), "modalities": cfgs})
    return OmegaConf.to_container(composed, resolve=True)["modalities"]


def rate(fn: Callable[[int], None], n: int, warmup: int, repeats: int) -> dict:
    """Call fn(i) for warm-up items, then time n items ``repeats`` times: the best run's clips/s
    (the least disturbed by other processes) and the median's."""
    for i in range(warmup):
        fn(i)
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        for i in range(n):
            fn(warmup + r * n + i)
        times.append(time.perf_counter() - t)
    best, median = min(times), float(np.median(times))
    return {"clips_per_s": round(n / best, 1), "median_clips_per_s": round(n / median, 1),
            "ms_per_clip": round(1000 * best / n, 3), "clips": n, "repeats": repeats}  # fmt: skip


def bench_streams(folder: DatasetFolder, records, frames: UniformSegments, n: int, warmup: int, repeats: int) -> dict:
    """Each stream alone: raw read, and read + transform to the model input tensor."""
    params = ClipAugmentation().sample(
        folder.meta.frame_size[1] / folder.meta.frame_size[0] if folder.meta.frame_size else 1.0, train=False
    )
    idx = [frames(r.start_frame, r.end_frame, jitter=False, clip_id=r.clip_id) for r in records]
    variants = {
        "rgb_decord": ("rgb", {"rgb": {"reader_options": {"backend": "decord"}}}),
        "rgb_pyav": ("rgb", {"rgb": {"reader_options": {"backend": "pyav"}}}),
        "flow": ("flow", {}),
        "pose_heatmaps": ("pose", {}),
        "depth": ("depth", {}),
    }
    out = {}
    for key, (name, overrides) in variants.items():
        if name not in folder.meta.modalities:
            continue
        if key == "rgb_decord":
            try:
                import decord  # noqa: F401
            except ImportError:
                out[key] = {"skipped": "decord not installed"}
                continue
        m = build_modalities(modality_configs([name], **overrides))[name].bind(folder)
        n_items = len(records)

        def read(i: int, m=m) -> None:
            r = records[i % n_items]
            m.load(r, idx[i % n_items])

        def tensor(i: int, m=m) -> None:
            r = records[i % n_items]
            m(r, idx[i % n_items], params)

        out[key] = {
            "format": folder.meta.modalities[name]["format"],
            "read": rate(read, n, warmup, repeats),
            "tensor": rate(tensor, n, warmup, repeats),
        }
        out[key]["tensor_shape"] = "x".join(map(str, m(records[0], idx[0], params).shape))
    return out


def bench_loader(folder: DatasetFolder, records, frames: UniformSegments, workers: int, batch_size: int,
                 n: int, warmup_batches: int, repeats: int) -> dict:  # fmt: skip
    """Full multimodal training clips through ClipDataset + DataLoader (best of ``repeats``
    passes over ``n`` clips, after ``warmup_batches`` untimed batches that include starting the
    workers)."""
    names = [m for m in MODALITIES if m in folder.meta.modalities]
    mods = {k: m.bind(folder) for k, m in build_modalities(modality_configs(names)).items()}
    size = folder.meta.frame_size
    labels = {c.name: i for i, c in enumerate(folder.meta.classes)}
    ds = ClipDataset(records, mods, frames, train=True, labels=labels, augmentation=ClipAugmentation(),
                     aspect=size[1] / size[0] if size else 1.0)  # fmt: skip
    batches = max(1, n // batch_size)
    needed = (warmup_batches + repeats * batches) * batch_size
    if needed > len(ds):
        raise SystemExit(f"--loader-clips x --repeats needs {needed} clips, the dataset has {len(ds)}")
    torch.manual_seed(0)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)
    t0 = time.perf_counter()
    it = iter(loader)
    shapes = mb_per_clip = None
    for _ in range(warmup_batches):
        b = next(it)
        shapes = {k: "x".join(map(str, b[k].shape)) for k in names}
        mb_per_clip = {k: round(b[k][0].numel() * b[k].element_size() / 2**20, 3) for k in names}
    startup = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        times.append(time.perf_counter() - t)
    del it
    clips = batches * batch_size
    best, median = min(times), float(np.median(times))
    return {
        "workers": workers,
        "clips_per_s": round(clips / best, 1),
        "median_clips_per_s": round(clips / median, 1),
        "ms_per_clip": round(1000 * best / clips, 3),
        "clips": clips,
        "repeats": repeats,
        "batch_size": batch_size,
        "startup_and_warmup_s": round(startup, 2),
        "batch_shapes": shapes,
        "mb_per_clip": mb_per_clip,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="dataset folder (default: the synthetic dataset)")
    ap.add_argument("--clips", type=int, default=200, help="timed clips per stream measurement")
    ap.add_argument("--loader-clips", type=int, default=256, help="timed clips per DataLoader measurement")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best one is reported")
    ap.add_argument("--warmup", type=int, default=30, help="untimed clips before each stream measurement")
    ap.add_argument("--num-frames", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads of the main process")
    ap.add_argument("--tiny", action="store_true", help="a few clips, one repeat: checks that the script runs")
    args = ap.parse_args(argv)
    if args.tiny:
        args.clips, args.loader_clips, args.repeats, args.warmup, args.batch_size = 4, 8, 1, 1, 4
    torch.set_num_threads(args.torch_threads)

    data_cfg = OmegaConf.load(REPO / "configs" / "data" / "synthetic.yaml")
    generated_s = None
    if args.root is None:
        root = Path(os.environ["MMFSAR_ROOT"]) / "data" / "synthetic"
        t = time.perf_counter()
        existed = (root / "meta.json").is_file()
        ensure_synthetic(root, OmegaConf.to_container(data_cfg.generator), workers=2)
        generated_s = None if existed else round(time.perf_counter() - t, 1)
    else:
        root = args.root
    folder = DatasetFolder.open(root)
    frames = UniformSegments(args.num_frames)
    # a fixed, class-balanced mix of clips of every split and domain, in a shuffled order
    rng = np.random.default_rng(0)
    records = [folder.records[i] for i in rng.permutation(len(folder.records))]

    result = {
        "dataset": str(root),
        "clips_in_dataset": len(folder.records),
        "generated_in_s": generated_s,
        "num_frames": args.num_frames,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
        },
        "streams": bench_streams(folder, records, frames, args.clips, args.warmup, args.repeats),
    }
    loaders = {}
    for w in sorted({0, args.workers}):
        loaders[f"workers_{w}"] = bench_loader(folder, records, frames, w, args.batch_size, args.loader_clips,
                                               warmup_batches=2, repeats=args.repeats)  # fmt: skip
    result["multimodal_clip"] = {"modalities": [m for m in MODALITIES if m in folder.meta.modalities],
                                 "augmentation": "train", **loaders}  # fmt: skip
    s = result["streams"]
    ratios = {}
    if args.workers and f"workers_{args.workers}" in loaders:
        ratios[f"loader_workers_{args.workers}_vs_0"] = round(
            loaders[f"workers_{args.workers}"]["clips_per_s"] / loaders["workers_0"]["clips_per_s"], 2
        )
    if "read" in s.get("rgb_decord", {}) and "read" in s.get("rgb_pyav", {}):
        ratios["rgb_read_decord_vs_pyav"] = round(s["rgb_decord"]["read"]["clips_per_s"] / s["rgb_pyav"]["read"]["clips_per_s"], 2)
    for k, v in s.items():
        if "read" in v:
            ratios[f"{k}_tensor_vs_read_time"] = round(v["tensor"]["ms_per_clip"] / v["read"]["ms_per_clip"], 2)
    sum_ms = sum(s[k]["tensor"]["ms_per_clip"] for k in ("rgb_decord", "flow", "pose_heatmaps", "depth") if "tensor" in s.get(k, {}))
    ratios["multimodal_workers_0_vs_sum_of_streams_time"] = round(loaders["workers_0"]["ms_per_clip"] / sum_ms, 2)
    result["ratios"] = ratios
    result["machine"]["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())

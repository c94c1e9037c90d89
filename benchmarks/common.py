"""What the step benchmarks (bench_distill, bench_contrastive, bench_mmcl) share: the process
setup, the machine they ran on (reported with every result) and the interleaved timing."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def start_step_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Set up the process (``--threads`` torch threads, seed 0, no warning from ``self.log()``
    called outside a Trainer) and return the report's header: machine, warm-up and repeats."""
    warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": load_average(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "warmup": args.warmup,
        "repeats": args.repeats,
    }


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(variants: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each variant, rounds interleaving the variants (so a burst of
    other load on a shared machine hits every variant)."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}

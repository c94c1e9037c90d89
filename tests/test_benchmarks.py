"""Every script in benchmarks/ runs (in its ``--tiny`` mode: few clips or episodes, one repeat)
and prints the JSON report its docstring describes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"


def run_benchmark(name: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), "--tiny", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def test_every_benchmark_has_a_test():
    names = {p.name for p in BENCHMARKS.glob("bench_*.py")}
    names -= {"bench_mmcl.py"}  # run in tests/test_mmcl_training.py::test_bench_mmcl_runs
    names -= {"bench_clip_mdmf.py"}  # run in tests/test_clip_mdmf_training.py::test_bench_clip_mdmf_runs
    names -= {"bench_contrastive.py"}  # run in tests/test_ikem.py::test_bench_contrastive_runs
    assert names == {"bench_data.py", "bench_distill.py", "bench_episodic.py", "bench_eval.py", "bench_logreg.py"}


def test_bench_logreg_runs():
    report = run_benchmark("bench_logreg.py", "--shots", "1")
    (result,) = report["results"]
    assert result["episodes"] == 20 and result["newton_seconds"] > 0 and result["sklearn_seconds"] > 0
    assert set(report["targets"]) == {"newton >= 20x faster than sklearn", "accuracy within 0.5 points"}


def test_bench_data_runs(tiny_dataset: Path):
    report = run_benchmark("bench_data.py", "--root", str(tiny_dataset), "--workers", "0")
    assert report["streams"]["flow"]["read"]["clips_per_s"] > 0 and "workers_0" in report["multimodal_clip"]


def test_bench_eval_runs(episode_dataset: Path):
    report = run_benchmark(
        "bench_eval.py", "--data", str(episode_dataset), "--workers", "0", "--shots", "1", "--queries", "2", "--logreg-shots", "1", "3"
    )
    assert report["b_over_a"] > 0 and report["c_reencode_episodes_timed"] == 2
    assert [r["setting"] for r in report["d_logreg"]] == ["5-way 1-shot 2 queries", "5-way 3-shot 2 queries"]


def test_bench_eval_runs_with_a_matching_head(episode_dataset: Path):
    report = run_benchmark(
        "bench_eval.py", "--data", str(episode_dataset), "--workers", "0", "--classifier", "trx", "--set", "proj_dim=8",
        "--queries", "1",
    )  # fmt: skip
    assert report["classifier"] == "trx proj_dim=8" and "b_over_a <= 1.5" in report["targets"] and "d_logreg" not in report


@pytest.mark.filterwarnings("ignore")
def test_bench_distill_runs(episode_dataset: Path):
    report = run_benchmark("bench_distill.py", "--root", str(episode_dataset))
    for recipe in ("mm_cdfsl", "lite_mkd"):
        assert report[recipe]["distill_step_ms"] > 0 and report[recipe]["teacher_cache_s"] >= 0


def test_bench_episodic_runs(episode_dataset: Path):
    report = run_benchmark("bench_episodic.py", "--root", str(episode_dataset), "--workers", "0")
    for head in ("otam", "trx"):
        assert report[head]["clips_per_task"] == 12 and report[head]["episodic_step_ms"] > 0

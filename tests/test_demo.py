"""``make demo`` at a reduced size: every stage runs through the real entry points, and the table
has every model and both settings (slow: a few minutes on 2 cores)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MODELS = [
    "RGB only (baseline)",
    "flow only",
    "pose only",
    "multimodal teacher (MM-CDFSL: the three encoders)",
    "multimodal teacher (Lite-MKD: MFM + TRX)",
    "RGB student, MM-CDFSL",
    "RGB student, Lite-MKD (its head)",
    "RGB student, Lite-MKD (its encoder)",
]


@pytest.mark.slow
def test_demo_pipeline_reduced(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "scripts/demo.py",
        "--out", str(out),
        "--episodes", "20",
        "--data-root", str(tmp_path / "data"),
        "--generator", "classes_per_split={base: 5, val: 5, novel: 5}",
        "--override", "trainer.max_epochs=1",
        "--override", "trainer.check_val_every_n_epoch=1",
        "--override", "data.num_workers=0",
        "--tasks", "4",
        "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert str(out) in proc.stdout  # the output folder is printed

    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["model"], r["setting"]) for r in rows) == sorted(
        (m, s) for m in MODELS for s in ("5-way 1-shot", "5-way 5-shot")
    )
    for r in rows:
        assert 0 <= float(r["mean"]) <= 100 and float(r["ci95"]) >= 0
        assert int(r["episodes"]) == 20
    # one episode file per setting, shared by every model
    for s in ("5-way 1-shot", "5-way 5-shot"):
        assert len({r["episode_sha256"] for r in rows if r["setting"] == s}) == 1

    table = (out / "results.md").read_text()
    assert all(m in table for m in MODELS)
    assert (out / "results.png").stat().st_size > 0
    timings = json.loads((out / "timings.json").read_text())
    stages = ["generate data", "pretrain rgb", "pretrain flow", "pretrain pose", "combine MM-CDFSL teachers", "Lite-MKD teacher"]
    stages += ["distill MM-CDFSL", "distill Lite-MKD"]
    stages += [f"evaluate 5-way {k}-shot, {kind}" for k in (1, 5) for kind in ("logreg", "head")] + ["total"]
    assert list(timings) == stages and all(v > 0 for v in timings.values())


SKELETON_ROWS = [
    "sup_joint", "sup_bone", "sup_motion", "sup_3s", "ikem_joint", "ikem_teacher",
    "ikem_student_joint", "ikem_student_motion", "ikem_student_bone", "ikem_students", "mmcl_joint",
]  # fmt: skip


@pytest.mark.slow
def test_skeleton_demo_reduced(tmp_path):
    """scripts/demo_skeleton.py end to end on a small dataset, one epoch per stage: every row has
    its linear-evaluation and both few-shot cells, and the rows share one episode file per setting."""
    out = tmp_path / "skeleton_demo"
    cmd = [
        sys.executable,
        "scripts/demo_skeleton.py",
        "--out", str(out),
        "--episodes", "20",
        "--data-root", str(tmp_path / "data"),
        "--generator", "classes_per_split={base: 5, val: 5, novel: 5}",  # MMCL's RGB encoder validates on 5-way val episodes
        "--override", "trainer.max_epochs=1",
        "--override", "trainer.check_val_every_n_epoch=1",
        "--override", "data.num_workers=0",
        "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    cells = {(r["row"], r["metric"]) for r in rows}
    metrics = {r["metric"] for r in rows}
    assert metrics == {"linear top-1 (xsub)", "5-way 1-shot", "5-way 5-shot"}, metrics
    assert cells == {(row, m) for row in SKELETON_ROWS for m in metrics}
    assert all(0 <= float(r["mean"]) <= 100 for r in rows)
    timings = json.loads((out / "timings.json").read_text())
    assert "MMCL joint" in timings and "RGB encoder (MMCL's frozen teacher)" in timings and timings["total"] > 0

"""The whole pipeline on the embedded synthetic dataset (``make demo``).

A composition of the three entry points, nothing else: every stage below is one printed command
that can be copied and changed with overrides.

1. generate (or reuse) the synthetic dataset;
2. pretrain one encoder per modality (rgb, flow, pose) with the MM-CDFSL recipe;
3. train the fusion teacher (Lite-MKD's MFM) on the frozen per-modality encoders;
4. distil an RGB student with the MM-CDFSL recipe and one with the Lite-MKD recipe;
5. evaluate every encoder on the same saved episodes of the target domain's novel classes,
   5-way 1-shot and 5-way 5-shot, 600 episodes each;
6. write the results table (markdown, CSV, PNG bar chart with 95% CIs) and the wall time of each
   stage (timings.json) into one output folder, whose path is printed.

    python scripts/demo.py [--out DIR] [--episodes 600] [--split novel|val] [--data-root DIR]
                           [--generator KEY=VALUE ...] [--override KEY=VALUE ...] [--quiet]

Training lengths and every other setting come from the tiny experiment presets
(``configs/experiment/{mm_cdfsl_tiny,lite_mkd_tiny}``); ``--override`` adds an override to every
training stage (the slow test runs ``--override trainer.max_epochs=1`` on a small dataset made
with ``--generator clips_per_class=...``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mmfsar.fewshot.stats import format_mean_ci  # noqa: E402

MODALITIES = ("rgb", "flow", "pose")
SETTINGS = (1, 5)  # k_shot, 5-way, 15 queries


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        self.out = Path(args.out or ROOT / "logs" / "demo" / stamp).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        previous = self.out / "timings.json"
        self.previous = json.loads(previous.read_text()) if previous.is_file() else {}
        self.data = [f"data.root={args.data_root}"] if args.data_root else []
        self.data += [f"data.generator.{kv}" for kv in args.generator]
        self.common = self.data + ["print_config=false", "callbacks.model_summary=null"] + list(args.override)

    def run(self, stage: str, argv: list[str], produces: Path | None = None) -> None:
        """Run one entry point, streaming its output, and record the stage's wall time.

        With ``--reuse``, a stage whose output (``produces``) exists in the output folder is
        skipped and keeps the wall time recorded when it ran."""
        if self.args.reuse and produces is not None and produces.is_file() and stage in self.previous:
            self.timings[stage] = self.previous[stage]
            print(f"\n=== {stage} === reusing {produces}", flush=True)
            return
        cmd = [sys.executable, *argv]
        print(f"\n=== {stage} ===\n$ {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        out = subprocess.DEVNULL if self.args.quiet else None
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        self.timings[stage] = round(time.perf_counter() - start, 1)
        if proc.returncode != 0:
            self.save_timings()
            raise SystemExit(f"stage {stage!r} failed (exit {proc.returncode}); command above")
        print(f"--- {stage}: {self.timings[stage]:.0f} s", flush=True)

    def save_timings(self) -> None:
        total = round(sum(v for k, v in self.timings.items() if k != "total"), 1)
        self.timings["total"] = total
        (self.out / "timings.json").write_text(json.dumps({**self.timings, "total": total}, indent=1))

    def encoder(self, name: str) -> Path:
        return self.out / name / "encoder.pt"

    def main(self) -> None:
        print(f"mmfsar demo: output folder {self.out}")
        self.run("generate data", ["-m", "mmfsar.data.synthetic", *self.data], produces=None)
        for m in MODALITIES:
            self.run(
                f"pretrain {m}",
                [
                    "lit_main_pretrain.py",
                    "experiment=mm_cdfsl_tiny/pretrain",
                    f"modality={m}",
                    f"hydra.run.dir={self.out / m}",
                    *self.common,
                ],
                produces=self.encoder(m),
            )
        teachers = [f"model.encoders.{m}={self.encoder(m)}" for m in MODALITIES]
        self.run(
            "fusion teacher",
            [
                "lit_main_pretrain.py",
                "experiment=lite_mkd_tiny/fusion",
                *teachers,
                f"hydra.run.dir={self.out / 'fusion'}",
                *self.common,
            ],
            produces=self.encoder("fusion"),
        )
        self.run(
            "distill mm_cdfsl",
            [
                "lit_main_distill.py",
                "experiment=mm_cdfsl_tiny/distill",
                f"model.init_from={self.encoder('rgb')}",
                *[f"model.teachers.{m}={self.encoder(m)}" for m in MODALITIES],
                f"hydra.run.dir={self.out / 'student_mm_cdfsl'}",
                *self.common,
            ],
            produces=self.encoder("student_mm_cdfsl"),
        )
        self.run(
            "distill lite_mkd",
            [
                "lit_main_distill.py",
                "experiment=lite_mkd_tiny/distill",
                f"model.init_from={self.encoder('rgb')}",
                f"model.teachers.fusion={self.encoder('fusion')}",
                f"hydra.run.dir={self.out / 'student_lite_mkd'}",
                *self.common,
            ],
            produces=self.encoder("student_lite_mkd"),
        )
        self.report(self.evaluate())

    def evaluate(self) -> list[dict]:
        names = {
            "rgb": "RGB only (baseline)",
            "flow": "flow only",
            "pose": "pose only",
            "fusion": "fusion teacher (rgb+flow+pose)",
            "student_mm_cdfsl": "RGB student, MM-CDFSL",
            "student_lite_mkd": "RGB student, Lite-MKD",
        }
        encoders = ",".join(str(self.encoder(n)) for n in names)
        rows = []
        for k in SETTINGS:
            sweep = self.out / f"eval_{k}shot"
            self.run(
                f"evaluate 5-way {k}-shot",
                [
                    "lit_main_eval.py",
                    "-m",
                    "experiment=demo/eval",
                    f"encoder={encoders}",
                    f"fewshot.k_shot={k}",
                    f"fewshot.episodes={self.args.episodes}",
                    f"fewshot.split={self.args.split}",
                    f"hydra.sweep.dir={sweep}",
                    *self.data,
                ],
            )
            for res in sorted(sweep.glob("*/results.json"), key=lambda p: int(p.parent.name)):
                r = json.loads(res.read_text())
                r["model"] = names[Path(r["encoder"]).parent.name]
                rows.append(r)
        hashes = {}
        for r in rows:
            hashes.setdefault(r["setting"], set()).add(r["episode_sha256"])
        assert all(len(h) == 1 for h in hashes.values()), f"models saw different episodes: {hashes}"
        return rows

    def report(self, rows: list[dict]) -> None:
        models = list(dict.fromkeys(r["model"] for r in rows))
        settings = list(dict.fromkeys(r["setting"] for r in rows))
        cell = {(r["model"], r["setting"]): r for r in rows}
        lines = [
            "| model | " + " | ".join(settings) + " |",
            "|---|" + "---|" * len(settings),
        ]
        for m in models:
            lines.append(f"| {m} | " + " | ".join(format_mean_ci(cell[m, s]["mean"], cell[m, s]["ci95"]) for s in settings) + " |")
        first = rows[0]
        caption = (
            f"Accuracy (%) ± 95% CI, {first['n_query']} queries, {first['episodes']} episodes, "
            f"{first['classifier']}, {first['split']} classes of the {first['domain']} domain"
        )
        table = "\n".join(lines)
        (self.out / "results.md").write_text(f"{caption}\n\n{table}\n")
        with (self.out / "results.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "setting", "mean", "ci95", "episodes", "n_query", "classifier", "episode_sha256", "encoder"])
            for r in rows:
                w.writerow([r["model"], r["setting"], r["mean"], r["ci95"], r["episodes"], r["n_query"], r["classifier"], r["episode_sha256"], r["encoder"]])
        self.plot(models, settings, cell, self.out / "results.png")
        self.save_timings()
        print(f"\n{caption}\n\n{table}\n")
        print("stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items()))
        print(f"\nresults: {self.out}/results.md, results.csv, results.png, timings.json")

    @staticmethod
    def plot(models: list[str], settings: list[str], cell: dict, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(settings)
        for j, s in enumerate(settings):
            xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(models))]
            ax.bar(xs, [cell[m, s]["mean"] for m in models], width, yerr=[cell[m, s]["ci95"] for m in models], capsize=3, label=s)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.axhline(100 / 5, color="grey", lw=0.8, ls="--")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (default logs/demo/<time>)")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument(
        "--split", default="novel", choices=["novel", "val"], help="evaluate on val classes to develop recipes without touching the test classes"
    )
    p.add_argument("--data-root", help="dataset folder (default: data/synthetic)")
    p.add_argument("--generator", action="append", default=[], help="data.generator override, e.g. clips_per_class=8")
    p.add_argument("--override", action="append", default=[], help="extra override for every training stage")
    p.add_argument("--reuse", action="store_true", help="skip training stages whose encoder.pt is already in --out")
    p.add_argument("--quiet", action="store_true", help="hide the stages' own output")
    return p.parse_args()


if __name__ == "__main__":
    Demo(parse()).main()

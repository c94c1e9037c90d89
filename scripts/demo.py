"""The whole pipeline on the embedded synthetic dataset (``make demo``).

A composition of the three entry points, nothing else: every stage below is one printed command
that can be copied and changed with overrides.

1. generate (or reuse) the synthetic dataset;
2. pretrain one encoder per modality (rgb, flow, pose) with the tiny MM-CDFSL recipe; the three
   together are MM-CDFSL's multimodal teacher (one export, features normalised and concatenated);
3. train Lite-MKD's teacher: the MFM fusion of the frozen encoders with a TRX head, on tasks;
4. distil an RGB student with the MM-CDFSL recipe and one with the Lite-MKD recipe (on tasks; with
   MM-CDFSL's translation on unlabelled target clips added, as Lite-MKD has one domain);
5. evaluate every model on the same saved episodes of the target domain's novel classes, 5-way
   1-shot and 5-way 5-shot, 15 queries, 600 episodes: logistic regression on frozen features (the
   MM-CDFSL protocol) for the encoders, and the matching head a model was trained with for the
   episodic ones (Lite-MKD's teacher and student; the student's encoder also with logistic
   regression, as the RGB baseline is evaluated);
6. write the results table (markdown, CSV, PNG bar chart with 95% CIs) and the wall time of each
   stage (timings.json) into one output folder, whose path is printed.

    python scripts/demo.py [--out DIR] [--episodes 600] [--split novel|val] [--seeds 0,1,2]
                           [--data-root DIR] [--generator KEY=VALUE ...] [--override KEY=VALUE ...]

``--seeds 0,1,2`` trains everything once per seed (``seed=<s>``, into ``<out>/seed<s>``) and
reports each row's mean ± standard deviation over the seeds: develop recipes on the val classes
(``--split val --episodes 300``), measure the novel classes once. Training lengths and every
other setting come from the tiny experiment presets (``configs/experiment/{mm_cdfsl_tiny,
lite_mkd_tiny}``); ``--override`` adds an override to every training stage (the slow test runs
``--override trainer.max_epochs=1`` on a small dataset made with ``--generator clips_per_class=...``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
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
# (model folder, evaluation: "logreg" on frozen features or "head" = the exported matching head) -> row
MODELS = {
    ("rgb", "logreg"): "RGB only (baseline)",
    ("flow", "logreg"): "flow only",
    ("pose", "logreg"): "pose only",
    ("teachers", "logreg"): "multimodal teacher (MM-CDFSL: the three encoders)",
    ("fusion", "head"): "multimodal teacher (Lite-MKD: MFM + TRX)",
    ("student_mm_cdfsl", "logreg"): "RGB student, MM-CDFSL",
    ("student_lite_mkd", "head"): "RGB student, Lite-MKD (its head)",
    ("student_lite_mkd", "logreg"): "RGB student, Lite-MKD (its encoder)",
}
# Lite-MKD trains in one domain; across domains its student also translates its feature into the
# fusion teacher's per-modality features on unlabelled target clips (16 per task)
LITE_MKD_CROSS_DOMAIN = ["distill=lite_mkd_translate", "data.batch_size=16"]


class Demo:
    """Runs the stages, records their wall times (``timings.json``) and resumes with ``--reuse``;
    ``scripts/demo_skeleton.py`` runs its own stages through the same machinery."""

    logs = "demo"  # default output folder: logs/<logs>/<time>

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        self.out = Path(args.out or ROOT / "logs" / self.logs / stamp).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        previous = self.out / "timings.json"
        self.previous = json.loads(previous.read_text()) if previous.is_file() else {}
        self.data = [f"data.root={args.data_root}"] if args.data_root else []
        self.data += [f"data.generator.{kv}" for kv in args.generator]
        self.common = self.data + ["print_config=false", "callbacks.model_summary=null"] + list(args.override)
        self.seeds = [int(s) for s in args.seeds.split(",")]

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
        self.save_timings()  # after every stage: an interrupted run resumes with --reuse
        print(f"--- {stage}: {self.timings[stage]:.0f} s", flush=True)

    def save_timings(self) -> None:
        self.timings.pop("total", None)
        self.timings["total"] = round(sum(self.timings.values()), 1)
        (self.out / "timings.json").write_text(json.dumps(self.timings, indent=1))

    def folder(self, seed: int) -> Path:
        return self.out if len(self.seeds) == 1 else self.out / f"seed{seed}"

    def main(self) -> None:
        print(f"mmfsar demo: output folder {self.out}")
        self.run("generate data", ["-m", "mmfsar.data.synthetic", *self.data], produces=None)
        rows = []
        for seed in self.seeds:
            self.train(seed)
            rows += self.evaluate(seed)
        self.report(rows)

    def train(self, seed: int) -> None:
        out = self.folder(seed)
        tag = f" (seed {seed})" if len(self.seeds) > 1 else ""
        common = [f"seed={seed}", *self.common]
        episodic = [*common, *([f"model.episodes.episodes={self.args.tasks}"] if self.args.tasks else [])]
        encoder = lambda name: out / name / "encoder.pt"  # noqa: E731
        for m in MODALITIES:
            self.run(
                f"pretrain {m}{tag}",
                ["lit_main_pretrain.py", "experiment=mm_cdfsl_tiny/pretrain", f"modality={m}", f"hydra.run.dir={out / m}", *common],
                produces=encoder(m),
            )
        self.run(  # MM-CDFSL's teachers as one model: t = normalize(concat of the normalised encoders' features)
            f"combine MM-CDFSL teachers{tag}",
            ["-m", "mmfsar.models.multistream", str(encoder("teachers")), *(f"{m}={encoder(m)}" for m in MODALITIES)],
            produces=encoder("teachers"),
        )
        self.run(
            f"Lite-MKD teacher{tag}",
            [
                "lit_main_pretrain.py",
                "experiment=lite_mkd_tiny/fusion",
                *[f"model.encoders.{m}={encoder(m)}" for m in MODALITIES],
                f"hydra.run.dir={out / 'fusion'}",
                *episodic,
            ],
            produces=encoder("fusion"),
        )
        self.run(
            f"distill MM-CDFSL{tag}",
            [
                "lit_main_distill.py",
                "experiment=mm_cdfsl_tiny/distill",
                f"model.init_from={encoder('rgb')}",
                *[f"model.teachers.{m}={encoder(m)}" for m in MODALITIES],
                f"hydra.run.dir={out / 'student_mm_cdfsl'}",
                *common,
            ],
            produces=encoder("student_mm_cdfsl"),
        )
        self.run(
            f"distill Lite-MKD{tag}",
            [
                "lit_main_distill.py",
                "experiment=lite_mkd_tiny/distill",
                f"model.init_from={encoder('rgb')}",
                f"model.teacher={encoder('fusion')}",
                *LITE_MKD_CROSS_DOMAIN,
                f"hydra.run.dir={out / 'student_lite_mkd'}",
                *episodic,
            ],
            produces=encoder("student_lite_mkd"),
        )

    def evaluate(self, seed: int) -> list[dict]:
        """Every model on the same saved episodes: one sweep per setting and evaluation kind."""
        out, rows = self.folder(seed), []
        tag = f" (seed {seed})" if len(self.seeds) > 1 else ""
        for k in SETTINGS:
            episode_file = None
            for kind, classifier in (("logreg", ["fewshot/classifier=logreg"]), ("head", [])):
                names = [n for n, how in MODELS if how == kind]
                sweep = out / f"eval_{k}shot_{kind}"
                episodes = [f"fewshot.episode_file={episode_file}"] if episode_file else []
                self.run(
                    f"evaluate 5-way {k}-shot, {kind}{tag}",
                    [
                        "lit_main_eval.py",
                        "-m",
                        "experiment=demo/eval",
                        *classifier,
                        f"encoder={','.join(str(out / n / 'encoder.pt') for n in names)}",
                        f"fewshot.k_shot={k}",
                        f"fewshot.episodes={self.args.episodes}",
                        f"fewshot.split={self.args.split}",
                        *episodes,
                        f"hydra.sweep.dir={sweep}",
                        *self.data,
                    ],
                )
                for res in sorted(sweep.glob("*/results.json"), key=lambda p: int(p.parent.name)):
                    r = json.loads(res.read_text())
                    r["model"], r["seed"] = MODELS[Path(r["encoder"]).parent.name, kind], seed
                    episode_file = episode_file or r["episode_file"]
                    rows.append(r)
        hashes: dict[str, set] = {}
        for r in rows:
            hashes.setdefault(r["setting"], set()).add(r["episode_sha256"])
        assert all(len(h) == 1 for h in hashes.values()), f"models saw different episodes: {hashes}"
        return rows

    def report(self, rows: list[dict]) -> None:
        models = list(dict.fromkeys(r["model"] for r in rows))
        settings = list(dict.fromkeys(r["setting"] for r in rows))
        by_cell: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            by_cell.setdefault((r["model"], r["setting"]), []).append(r)
        classifier = {m: by_cell[m, settings[0]][0]["classifier"] for m in models}

        def cell(m: str, s: str) -> str:
            runs = by_cell[m, s]
            if len(runs) == 1:
                return format_mean_ci(runs[0]["mean"], runs[0]["ci95"])
            means = [r["mean"] for r in runs]
            return f"{statistics.mean(means):.2f} ± {statistics.stdev(means):.2f} (sd over {len(runs)} seeds)"

        lines = ["| model | classifier | " + " | ".join(settings) + " |", "|---|---|" + "---|" * len(settings)]
        lines += [f"| {m} | {classifier[m]} | " + " | ".join(cell(m, s) for s in settings) + " |" for m in models]
        first = rows[0]
        spread = "mean ± 95% CI" if len(self.seeds) == 1 else f"mean ± standard deviation over seeds {self.args.seeds}"
        caption = (
            f"Accuracy (%), {spread}; {first['n_query']} queries, {first['episodes']} episodes, "
            f"{first['split']} classes of the {first['domain']} domain, the same episodes for every model"
        )
        table = "\n".join(lines)
        (self.out / "results.md").write_text(f"{caption}\n\n{table}\n")
        with (self.out / "results.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "seed", "setting", "mean", "ci95", "episodes", "n_query", "classifier", "episode_sha256", "encoder"])
            for r in rows:
                w.writerow([r["model"], r["seed"], r["setting"], r["mean"], r["ci95"], r["episodes"], r["n_query"], r["classifier"], r["episode_sha256"], r["encoder"]])  # fmt: skip
        self.plot(models, settings, by_cell, self.out / "results.png")
        self.save_timings()
        print(f"\n{caption}\n\n{table}\n")
        print("stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items()))
        print(f"\nresults: {self.out}/results.md, results.csv, results.png, timings.json")

    @staticmethod
    def plot(models: list[str], settings: list[str], by_cell: dict, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(settings)
        for j, s in enumerate(settings):
            xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(models))]
            means = [statistics.mean(r["mean"] for r in by_cell[m, s]) for m in models]
            errors = [
                by_cell[m, s][0]["ci95"] if len(by_cell[m, s]) == 1 else statistics.stdev(r["mean"] for r in by_cell[m, s])
                for m in models
            ]
            ax.bar(xs, means, width, yerr=errors, capsize=3, label=s)
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
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated: each row's mean and spread over them")
    p.add_argument("--data-root", help="dataset folder (default: data/synthetic)")
    p.add_argument("--generator", action="append", default=[], help="data.generator override, e.g. clips_per_class=8")
    p.add_argument("--override", action="append", default=[], help="extra override for every training stage")
    p.add_argument("--tasks", type=int, help="training tasks per epoch of the episodic stages (default: the presets')")
    p.add_argument("--reuse", action="store_true", help="skip training stages whose encoder.pt is already in --out")
    p.add_argument("--quiet", action="store_true", help="hide the stages' own output")
    return p.parse_args()


if __name__ == "__main__":
    Demo(parse()).main()

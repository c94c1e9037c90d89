"""The skeleton demo on the embedded synthetic dataset: supervised baselines and IKEM (issue #17).

A composition of the three entry points, nothing else: every stage below is one printed command
that can be copied and changed with overrides.

1. generate (or reuse) the synthetic dataset;
2. train every model the rows need (``TRAININGS``): the supervised ST-GCN baselines on the joint,
   bone and motion streams (``experiment=skeleton_tiny/...``, cross-entropy on the xsub train
   clips), IKEM's joint-stream self-supervised baseline (MoCo v2), its six-modality teacher, and
   the joint / motion / bone students distilled from it (``experiment=ikem_tiny/...``), and MMCL's
   joint model (``experiment=mmcl_tiny/train``: the supervised joint recipe plus alignment with a
   frozen RGB encoder's features and class-text refinement; ``--encoder rgb=<main demo>/rgb/encoder.pt``
   reuses the main demo's RGB encoder instead of training it);
3. join the three-stream rows' exports into one multi-stream ``encoder.pt``
   (``python -m mmfsar.models.multistream``: normalised concatenation of the streams' features);
4. evaluate every row: linear evaluation top-1 on the xsub test clips (``--config-name
   eval_protocol``, several encoders = scores averaged; one multirun, job i = row i), and 5-way 1-shot / 5-shot episodes on
   the novel classes of the target domain (15 queries, ``--episodes``, logistic regression on the
   frozen features, the same saved episodes for every row; the main demo's setting, so the
   tables compare);
5. write the results table (markdown, CSV) and the wall time of each stage (timings.json) into one
   output folder, whose path is printed.

    python scripts/demo_skeleton.py [--out DIR] [--episodes 600] [--split novel|val] [--seeds 0,1,2]
                                    [--rows sup_joint,ikem_students,...] [--data-root DIR]
                                    [--generator KEY=VALUE ...] [--override KEY=VALUE ...]
                                    [--encoder NAME=PATH ...]

A row is one entry of ``ROWS`` (its encoders: folders of ``TRAININGS``); a model is one entry of
``TRAININGS`` (its entry point and overrides; ``{folder}`` in an override is that model's
``encoder.pt``, which makes it a dependency): adding a method's row is one entry in each.
Caveat: the xsub train clips (performers 0-6) cover all 35 classes, so the supervised baselines
have seen the novel classes' labels and the self-supervised models their clips; the few-shot
columns measure the frozen features on classes a model was not *fitted to as a task*, not unseen
classes.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from demo import Demo  # noqa: E402  (scripts/demo.py: stages, timings, --reuse)
from mmfsar.fewshot.stats import format_mean_ci  # noqa: E402

SETTINGS = (1, 5)  # k_shot, 5-way, 15 queries


@dataclass(frozen=True)
class Training:
    """One trained model: ``lit_main_<entry>.py`` with ``overrides`` (``{folder}``: that model's
    exported encoder, trained first)."""

    stage: str
    entry: str
    overrides: tuple[str, ...]

    def needs(self) -> list[str]:
        return [name for o in self.overrides for name in re.findall(r"\{(\w+)\}", o)]


TRAININGS: dict[str, Training] = {
    "sup_joint": Training("supervised joint", "pretrain", ("experiment=skeleton_tiny/joint",)),
    "sup_bone": Training("supervised bone", "pretrain", ("experiment=skeleton_tiny/bone",)),
    "sup_motion": Training("supervised motion", "pretrain", ("experiment=skeleton_tiny/motion",)),
    "ikem_joint": Training("IKEM joint self-supervised", "pretrain", ("experiment=ikem_tiny/pretrain",)),
    "ikem_teacher": Training("IKEM six-modality teacher", "pretrain", ("experiment=ikem_tiny/teacher",)),
    **{
        f"ikem_student_{stream}": Training(
            f"IKEM {stream} student",
            "distill",
            (
                "experiment=ikem_tiny/distill",
                "model.teachers.ikem={ikem_teacher}",
                f"model.student_modality={modality}",
            ),
        )
        for stream, modality in (("joint", "skeleton"), ("motion", "skeleton_motion"), ("bone", "skeleton_bone"))
    },
    "rgb": Training("RGB encoder (MMCL's frozen teacher)", "pretrain", ("experiment=mmcl_tiny/rgb",)),
    "mmcl_joint": Training("MMCL joint", "pretrain", ("experiment=mmcl_tiny/train", "model.teacher={rgb}")),
}

# row key -> (row name, the TRAININGS whose encoders it evaluates: several = multi-stream)
ROWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sup_joint": ("supervised joint (ST-GCN, CE)", ("sup_joint",)),
    "sup_bone": ("supervised bone", ("sup_bone",)),
    "sup_motion": ("supervised motion", ("sup_motion",)),
    "sup_3s": ("supervised three-stream (J+M+B)", ("sup_joint", "sup_motion", "sup_bone")),
    "ikem_joint": ("IKEM joint, self-supervised (MoCo v2)", ("ikem_joint",)),
    "ikem_teacher": ("IKEM six-modality teacher", ("ikem_teacher",)),
    "ikem_student_joint": ("IKEM joint student", ("ikem_student_joint",)),
    "ikem_student_motion": ("IKEM motion student", ("ikem_student_motion",)),
    "ikem_student_bone": ("IKEM bone student", ("ikem_student_bone",)),
    "ikem_students": (
        "IKEM students three-stream (J+M+B)",
        ("ikem_student_joint", "ikem_student_motion", "ikem_student_bone"),
    ),
    "mmcl_joint": ("MMCL joint (CE + RGB alignment + text refinement)", ("mmcl_joint",)),
}


class SkeletonDemo(Demo):
    logs = "demo_skeleton"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.rows = args.rows.split(",") if args.rows else list(ROWS)
        self.given = dict(kv.split("=", 1) for kv in args.encoder)
        unknown = [name for name in self.given if name not in TRAININGS]
        if unknown or any(not Path(p).is_file() for p in self.given.values()):
            raise SystemExit(f"--encoder NAME=PATH: NAME one of {', '.join(TRAININGS)} and PATH an encoder.pt; got {args.encoder}")
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown:
            raise SystemExit(f"--rows: unknown rows {unknown}; known: {', '.join(ROWS)}")

    def main(self) -> None:
        print(f"mmfsar skeleton demo: output folder {self.out}")
        self.run("generate data", ["-m", "mmfsar.data.synthetic", *self.data])
        results = []
        for seed in self.seeds:
            self.train(seed)
            results += self.evaluate(seed)
        self.report(results)

    def trainings_needed(self) -> list[str]:
        """The rows' models and what they are trained from, dependencies first."""
        order: list[str] = []

        def visit(name: str) -> None:
            if name not in order:
                for dep in TRAININGS[name].needs():
                    visit(dep)
                order.append(name)

        for row in self.rows:
            for name in ROWS[row][1]:
                visit(name)
        return order

    def train(self, seed: int) -> None:
        out = self.folder(seed)
        tag = f" (seed {seed})" if len(self.seeds) > 1 else ""
        encoders = self.encoders(out)
        for name in self.trainings_needed():
            if name in self.given:
                print(f"\n=== {TRAININGS[name].stage}{tag} === given: {encoders[name]}", flush=True)
                continue
            t = TRAININGS[name]
            overrides = [o.format(**encoders) for o in t.overrides]
            argv = [f"lit_main_{t.entry}.py", *overrides, f"hydra.run.dir={out / name}", f"seed={seed}", *self.common]
            self.run(f"{t.stage}{tag}", argv, produces=encoders[name])
        for row in self.rows:
            parts = ROWS[row][1]
            if len(parts) > 1:
                combined = out / f"{row}.pt"
                self.run(
                    f"combine {row}{tag}",
                    ["-m", "mmfsar.models.multistream", str(combined), *(f"{p}={encoders[p]}" for p in parts)],
                )

    def encoders(self, out: Path) -> dict[str, Path]:
        """Each model's encoder.pt: trained into ``out``, or given with ``--encoder NAME=PATH``."""
        return {name: Path(self.given[name]).resolve() if name in self.given else out / name / "encoder.pt" for name in TRAININGS}

    def row_encoder(self, out: Path, row: str) -> Path:
        """The one encoder.pt of a row (multi-stream rows: the combined export)."""
        parts = ROWS[row][1]
        return out / f"{row}.pt" if len(parts) > 1 else self.encoders(out)[parts[0]]

    def evaluate(self, seed: int) -> list[dict]:
        out, results = self.folder(seed), []
        tag = f" (seed {seed})" if len(self.seeds) > 1 else ""
        sweep = out / "linear"  # one process for every row: job i evaluates self.rows[i]
        self.run(
            f"linear evaluation{tag}",
            [
                "lit_main_eval.py",
                "--config-name",
                "eval_protocol",
                "-m",
                "encoder=" + ",".join("[" + ",".join(str(self.encoders(out)[p]) for p in ROWS[row][1]) + "]" for row in self.rows),
                f"hydra.sweep.dir={sweep}",
                *self.data,
            ],
        )
        for job, row in enumerate(self.rows):
            r = json.loads((sweep / str(job) / "results.json").read_text())
            expected = ", ".join(str(self.encoders(out)[p]) for p in ROWS[row][1])
            assert r["encoder"] == expected, f"linear evaluation job {job} evaluated {r['encoder']}, not row {row}"
            results.append(
                {"row": row, "seed": seed, "metric": f"linear top-1 ({r['protocol']})", "mean": r["top1"], "ci95": None}
            )
        encoders = {str(self.row_encoder(out, row)): row for row in self.rows}
        episode_file = None
        for k in SETTINGS:
            sweep = out / f"fewshot_{k}shot"
            episodes = [f"fewshot.episode_file={episode_file}"] if episode_file else []
            self.run(
                f"5-way {k}-shot episodes{tag}",
                [
                    "lit_main_eval.py",
                    "-m",
                    "experiment=ikem_tiny/eval",
                    f"encoder={','.join(encoders)}",
                    f"fewshot.k_shot={k}",
                    f"fewshot.episodes={self.args.episodes}",
                    f"fewshot.split={self.args.split}",
                    *episodes,
                    f"hydra.sweep.dir={sweep}",
                    *self.data,
                ],
            )
            hashes = set()
            for res in sorted(sweep.glob("*/results.json"), key=lambda p: int(p.parent.name)):
                r = json.loads(res.read_text())
                hashes.add(r["episode_sha256"])
                results.append(
                    {
                        "row": encoders[r["encoder"]],
                        "seed": seed,
                        "metric": r["setting"],
                        "mean": r["mean"],
                        "ci95": r["ci95"],
                        "domain": r["domain"],
                        "split": r["split"],
                        "episodes": r["episodes"],
                    }
                )
            assert len(hashes) == 1, f"rows saw different episodes for {k}-shot: {hashes}"
        return results

    def report(self, results: list[dict]) -> None:
        metrics = list(dict.fromkeys(r["metric"] for r in results))
        cells: dict[tuple[str, str], list[dict]] = {}
        for r in results:
            cells.setdefault((r["row"], r["metric"]), []).append(r)

        def cell(row: str, metric: str) -> str:
            runs = cells.get((row, metric), [])
            if not runs:
                return "-"
            if len(runs) == 1:
                return (
                    f"{runs[0]['mean']:.2f}"
                    if runs[0]["ci95"] is None
                    else format_mean_ci(runs[0]["mean"], runs[0]["ci95"])
                )
            means = [x["mean"] for x in runs]
            return f"{statistics.mean(means):.2f} ± {statistics.stdev(means):.2f} (sd, {len(runs)} seeds)"

        lines = ["| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        lines += [f"| {ROWS[row][0]} | " + " | ".join(cell(row, m) for m in metrics) + " |" for row in self.rows]
        shot = next(r for r in results if "ci95" in r and r["ci95"] is not None)
        spread = "" if len(self.seeds) == 1 else f"; mean ± standard deviation over seeds {self.args.seeds}"
        caption = (
            f"Accuracy (%){spread}. Linear evaluation: xsub test clips. Few-shot: 5-way, 15 queries, "
            f"{shot['episodes']} episodes on the {shot['split']} classes of the {shot['domain']} domain "
            "(mean ± 95% CI), the same episodes for every row."
        )
        table = "\n".join(lines)
        (self.out / "results.md").write_text(f"{caption}\n\n{table}\n")
        with (self.out / "results.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row", "model", "seed", "metric", "mean", "ci95"])
            for r in results:
                w.writerow(
                    [
                        r["row"],
                        ROWS[r["row"]][0],
                        r["seed"],
                        r["metric"],
                        r["mean"],
                        "" if r["ci95"] is None else r["ci95"],
                    ]
                )
        self.save_timings()
        print(f"\n{caption}\n\n{table}\n")
        print("stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items()))
        print(f"\nresults: {self.out}/results.md, results.csv, timings.json")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (default logs/demo_skeleton/<time>)")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--split", default="novel", choices=["novel", "val"], help="few-shot classes (val: develop recipes)")
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated: each row's mean and spread over them")
    p.add_argument("--rows", help=f"comma-separated rows (default all): {', '.join(ROWS)}")
    p.add_argument("--data-root", help="dataset folder (default: data/synthetic)")
    p.add_argument("--generator", action="append", default=[], help="data.generator override, e.g. clips_per_class=8")
    p.add_argument("--override", action="append", default=[], help="extra override for every training stage")
    p.add_argument(
        "--encoder",
        action="append",
        default=[],
        help="NAME=PATH: use this exported encoder for model NAME instead of training it "
        "(rgb=logs/demo/<time>/rgb/encoder.pt: the main demo's RGB encoder as MMCL's teacher)",
    )
    p.add_argument("--reuse", action="store_true", help="skip training stages whose encoder.pt is already in --out")
    p.add_argument("--quiet", action="store_true", help="hide the stages' own output")
    return p.parse_args()


if __name__ == "__main__":
    SkeletonDemo(parse()).main()

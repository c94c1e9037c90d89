"""Hydra callbacks: the combined results table of an evaluation sweep."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mmfsar.fewshot.stats import format_mean_ci

log = logging.getLogger(__name__)

COLUMNS = [
    "encoder",
    "setting",
    "n_way",
    "k_shot",
    "n_query",
    "episodes",
    "seed",
    "classifier",
    "views",
    "mask_ratio",
    "split",
    "domain",
    "dataset",
    "mean",
    "ci95",
    "episode_sha256",
    "job",
]


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of evaluation records (``mean ± ci95`` per encoder and setting)."""
    head = "| encoder | setting | queries | episodes | classifier | accuracy (%) |\n|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['encoder']} | {r['setting']} | {r['n_query']} | {r['episodes']} | {r['classifier']} | "
        f"{format_mean_ci(r['mean'], r['ci95'])} |\n"
        for r in rows
    )
    return head + body


def collect_results(sweep: Path) -> list[dict[str, Any]]:
    """Every job's ``results.json`` of a sweep folder, in job order, with its job folder name."""
    paths = sorted(
        sweep.glob("*/results.json"),
        key=lambda p: (0, int(p.parent.name), "") if p.parent.name.isdigit() else (1, 0, p.parent.name),
    )
    rows = []
    for path in paths:
        row = json.loads(path.read_text())
        row.pop("per_episode", None)
        rows.append({**row, "job": path.parent.name})
    return rows


class SweepResultsTable(Callback):
    """After ``lit_main_eval.py -m ...``: collect every job's ``results.json`` into
    ``results_table.md`` / ``results_table.csv`` and an accuracy-vs-shots plot
    (``accuracy_vs_shots.png``) in the sweep folder. When the sweep logs to W&B
    (``logger=wandb``, offline by default), one more run, ``<task>-sweep`` in the sweep folder,
    holds the table, the plot and a native accuracy-vs-shots line chart."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        rows = collect_results(sweep)
        if not rows:
            return
        table = results_table(rows)
        (sweep / "results_table.md").write_text(table)
        with (sweep / "results_table.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        plot = sweep / "accuracy_vs_shots.png"
        _plot_vs_shots(rows, plot)
        print(f"\n{table}\nwritten: {sweep / 'results_table.md'}, {sweep / 'results_table.csv'}, {plot}")
        wandb_cfg = _wandb_config(config)
        if wandb_cfg is not None:
            try:
                log_sweep_to_wandb(rows, plot, sweep, wandb_cfg, task=str(OmegaConf.select(config, "task_name", default="eval")))
            except Exception as exc:  # the tables are written; W&B trouble must not fail the sweep
                log.warning(f"could not log the sweep summary to W&B: {exc}")


def _wandb_config(config: DictConfig) -> dict[str, Any] | None:
    """The sweep's W&B logger settings (``logger=wandb`` or ``many_loggers``), else None."""
    loggers = OmegaConf.select(config, "logger", default=None)
    if not isinstance(loggers, DictConfig):
        return None
    for node in loggers.values():
        if isinstance(node, DictConfig) and "WandbLogger" in str(node.get("_target_", "")):
            out = {}
            for key in ("project", "offline", "entity", "tags"):
                try:  # save_dir & co. point at a job's folder (hydra:runtime), not resolvable here
                    value = OmegaConf.select(node, key, default=None, throw_on_resolution_failure=True)
                except Exception:
                    value = None
                out[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig,)) else value
            if out.get("tags") is not None and not isinstance(out["tags"], list):
                out["tags"] = list(out["tags"])
            return out
    return None


def log_sweep_to_wandb(rows: list[dict[str, Any]], plot: Path, sweep: Path, settings: dict[str, Any], task: str) -> None:
    """One W&B run for the whole sweep: the results table, the plot image, and a line chart of
    accuracy against shots (one series per encoder and n_way)."""
    import wandb

    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    table = wandb.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in rows])
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(_series_name(r), []).append((r["k_shot"], r["mean"]))
    shots = sorted({k for pts in series.values() for k, _ in pts})
    keys = sorted(series)
    ys = [[dict(series[s]).get(k, float("nan")) for k in shots] for s in keys]
    run = wandb.init(
        project=settings.get("project") or "mmfsar",
        entity=settings.get("entity"),
        dir=str(sweep),
        mode="offline" if settings.get("offline", True) else "online",
        name=f"{task}-sweep",
        group=task,
        job_type=f"{task}-sweep",
        tags=settings.get("tags"),
        config={"sweep_dir": str(sweep), "jobs": len(rows)},
        reinit=True,
    )
    try:
        run.log(
            {
                "results": table,
                "accuracy_vs_shots": wandb.Image(str(plot)),
                "accuracy_vs_shots_chart": wandb.plot.line_series(
                    xs=shots, ys=ys, keys=keys, title="accuracy vs shots", xname="shots (K)"
                ),
            }
        )
        run.summary.update({f"acc/{_series_name(r)}/{r['k_shot']}-shot": r["mean"] for r in rows})
    finally:
        run.finish()


def _series_name(row: dict[str, Any]) -> str:
    return f"{Path(row['encoder']).parent.name or row['encoder']} ({row['n_way']}-way)"


def _cell(value: Any) -> Any:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def _plot_vs_shots(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        series.setdefault(_series_name(r), []).append((r["k_shot"], r["mean"], r["ci95"]))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=name)
    ax.set_xlabel("shots (K)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(sorted({r["k_shot"] for r in rows}))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

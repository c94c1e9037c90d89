"""Hydra callbacks: the combined results table of an evaluation sweep."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

COLUMNS = ["encoder", "setting", "n_query", "episodes", "classifier", "views", "mask_ratio", "split", "domain", "mean", "ci95", "episode_sha256"]


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of evaluation records (``mean ± ci95`` per encoder and setting)."""
    head = "| encoder | setting | queries | episodes | classifier | accuracy (%) |\n|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['encoder']} | {r['setting']} | {r['n_query']} | {r['episodes']} | {r['classifier']} | "
        f"{r['mean']:.2f} ± {r['ci95']:.2f} |\n"
        for r in rows
    )
    return head + body


class SweepResultsTable(Callback):
    """After ``lit_main_eval.py -m ...``: collect every job's ``results.json`` into
    ``results_table.md`` / ``results_table.csv`` (and an accuracy-vs-shots plot) in the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        rows = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)]
        if not rows:
            return
        table = results_table(rows)
        (sweep / "results_table.md").write_text(table)
        with (sweep / "results_table.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        _plot_vs_shots(rows, sweep / "accuracy_vs_shots.png")
        print(f"\n{table}\nwritten: {sweep / 'results_table.md'}, {sweep / 'results_table.csv'}")


def _plot_vs_shots(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, int], list[tuple[int, float, float]]] = {}
    for r in rows:
        series.setdefault((Path(r["encoder"]).parent.name or r["encoder"], r["n_way"]), []).append((r["k_shot"], r["mean"], r["ci95"]))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (enc, n_way), pts in sorted(series.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=f"{enc} ({n_way}-way)")
    ax.set_xlabel("shots (K)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

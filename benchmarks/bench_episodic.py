"""Cost of episodic training: a task step vs a plain cross-entropy step on the same clips, and
whether the data loader keeps up.

    python benchmarks/bench_episodic.py [--root DIR] [--classifiers otam,trx] [--repeats 7] [--tiny]

The episodic module is built as ``lit_main_pretrain.py model=episodic`` builds it (Hydra composes
the config, ``build_training`` makes the module and the data module): a 3D CNN on RGB
(``model/encoder=c3d_tiny input=native``, the tiny presets' encoder, random weights) with a
matching head, on 5-way 5-shot 4-query tasks (45 clips: the Lite-MKD tiny presets' tasks). For each
head, on one task of real clips:

* ``episodic_step_ms``: ``training_step`` (encode the 45 clips, split the task, the head's query
  logits, cross-entropy) + backward + gradient clipping + AdamW step;
* ``plain_step_ms``: the same encoder trained with plain cross-entropy on a linear head
  (``model=supervised``'s step) on the same 45 clips; ``episodic_over_plain`` is their ratio, what
  the matching head adds to a step;
* ``loader_ms_per_task``: the task loader with ``--workers`` worker processes (clips decoded,
  transformed, collated into a task), measured over ``--loader-tasks`` tasks after its workers
  start; ``loader_over_step`` < 1 means the loader is not the bottleneck (its workers run beside
  the training process, so a task costs the step ``loader_over_step`` of its time).

torch runs single-threaded by default (``--threads``), as in ``bench_distill.py``; the output is
one JSON object with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distill import compose_cfg, interleaved, optimizer_step  # noqa: E402

from mmfsar.tasks.pipelines import build_training  # noqa: E402

TASK = "{n_way: 5, k_shot: 5, n_query: 4, episodes: 1000, seed: 0}"
ENCODER = ["modality=rgb", "input=native", "model/encoder=c3d_tiny", "+input.encoder_args.rgb.widths=[16,32,64,128]"]
HEAD_SETTINGS = {"trx": ["model.classifier.proj_dim=64", "model.classifier.cardinalities=[2]"]}


def bench_head(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    common = [*args.data, "data.num_workers=0", "data.val_episodes.episodes=4"]
    cfg = compose_cfg(
        "pretrain",
        ["model=episodic", f"fewshot/classifier@model.classifier={name}", *HEAD_SETTINGS.get(name, []), f"model.episodes={args.tasks}", *ENCODER, *common],
        tmp / name,
    )
    run = build_training(cfg)
    episodic, dm = run.module, run.datamodule
    plain = build_training(compose_cfg("pretrain", ["model=supervised", *ENCODER, *common], tmp / "plain")).module
    task = next(iter(dm.train_dataloader()["source"]))
    clips = task["rgb"]
    labels = torch.randint(0, plain.encoder.head.out_features, (clips.shape[0],))
    episodic.train()
    plain.train()
    step_e, step_p = optimizer_step(episodic), optimizer_step(plain)
    times = interleaved(
        {
            "episodic_step": lambda: step_e(lambda: episodic.training_step({"source": task}, 0)),
            "plain_step": lambda: step_p(lambda: F.cross_entropy(plain.encoder({"rgb": clips}).logits, labels)),
        },
        args.warmup,
        args.repeats,
    )
    dm.num_workers = args.workers
    loader = iter(dm.train_dataloader()["source"])
    next(loader)  # the workers start
    start = time.perf_counter()
    for _ in range(args.loader_tasks):
        next(loader)
    loader_s = (time.perf_counter() - start) / args.loader_tasks
    return {
        "clips_per_task": int(clips.shape[0]),
        "classifier": type(episodic.classifier).__name__,
        "episodic_step_ms": round(1000 * times["episodic_step"], 1),
        "plain_step_ms": round(1000 * times["plain_step"], 1),
        "episodic_over_plain": round(times["episodic_step"] / times["plain_step"], 3),
        "loader_workers": args.workers,
        "loader_ms_per_task": round(1000 * loader_s, 1),
        "loader_over_step": round(loader_s / times["episodic_step"], 3),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="a dataset folder (default: the synthetic one, generated if missing)")
    ap.add_argument("--classifiers", default="otam,trx")
    ap.add_argument("--tasks", default=TASK, help="model.episodes")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loader-tasks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--tiny", action="store_true", help="small tasks, one repeat: checks that the script runs")
    args = ap.parse_args(argv)
    args.data = [] if args.root is None else ["data=folder", f"data.root={args.root}"]
    if args.tiny:
        args.tasks, args.warmup, args.repeats, args.loader_tasks = "{n_way: 3, k_shot: 2, n_query: 2, episodes: 8, seed: 0}", 0, 1, 2
    warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {"torch_threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="bench_episodic_") as tmp:
        for name in args.classifiers.split(","):
            print(f"[bench_episodic] {name} ...", file=sys.stderr, flush=True)
            results[name] = bench_head(name, args, Path(tmp))
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = {f"{n}: loader not the bottleneck": results[n]["loader_over_step"] < 1 for n in args.classifiers.split(",")}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

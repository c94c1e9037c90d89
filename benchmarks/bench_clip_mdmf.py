"""CLIP-MDMF's costs with frozen CLIP towers: a training step with and without the feature cache, and
the evaluation of 10,000 episodes against one encoder pass, in one process.

    python benchmarks/bench_clip_mdmf.py [--root DIR] [--episodes 10000] [--repeats 7] [--tiny]

The module is built as ``lit_main_pretrain.py experiment=clip_mdmf_tiny/clip_mdmf`` builds it
(tiny CLIP, random weights written to a temporary checkpoint and read through
``model.clip.pretrained``, frozen towers, 5-way 2-shot 5-query tasks: 35 clips), on the default
synthetic dataset (``data/synthetic``, generated if missing) or ``--root``:

* ``step.uncached_ms``: ``training_step`` on a loaded task as without ``cache=frozen``: the frozen
  image tower encodes the task's 280 frames, then the head (views, prompt fusion, OTAM, mutual
  distillation), backward and AdamW step;
* ``step.cached_ms``: the same step with the frame features looked up in the frozen-output cache
  (what ``cache=frozen`` gives): only the head's work; ``uncached_over_cached`` is the saving;
  ``cache_build_s`` the one-off encoding of every training clip (data loading included);
* ``eval.encode_s``: one encoder pass over the evaluated split (novel classes, target domain:
  loading and encoding every clip, as ``lit_main_eval.py``'s test loop);
  ``eval.solve_s``: solving ``--episodes`` 5-way 1-shot 1-query episodes (the TRX / CLIP-FSAR
  protocol) with the head on those features: each clip embedded once under every novel class's
  prompt, then per episode a gather, a mean over shots and OTAM; ``solve_over_encode`` is its cost
  in encoder passes (DESIGN.md's target for matching heads: <= 1.5). ``per_episode_s`` solves
  ``--per-episode`` episodes with the head run per episode (``precompute=false``), scaled to
  ``--episodes``: what the per-clip table saves. Both give the same accuracy.

torch runs single-threaded by default (``--threads``), as the other benchmarks; one JSON object
with the load average is printed.
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

ROOT = Path(__file__).resolve().parents[1]
try:
    import mmfsar  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_distill import compose_cfg, interleaved, optimizer_step  # noqa: E402

from mmfsar.data.datamodules import FewShotDataModule  # noqa: E402
from mmfsar.fewshot import mean_confidence_interval, solve_episodes  # noqa: E402
from mmfsar.fewshot.engine import FeatureBank, encode_views, episode_positions  # noqa: E402
from mmfsar.models.encoders.clip import TINY_CLIP_MODEL, load_open_clip  # noqa: E402
from mmfsar.tasks.frozen_cache import FrozenOutputCache  # noqa: E402
from mmfsar.tasks.pipelines import build_training  # noqa: E402

TASK = "{n_way: 5, k_shot: 2, n_query: 5, episodes: 100, seed: 0}"


def build(args: argparse.Namespace, tmp: Path):
    weights = tmp / "tiny_clip.pt"
    torch.save(load_open_clip(TINY_CLIP_MODEL, None).state_dict(), weights)
    overrides = [
        "experiment=clip_mdmf_tiny/clip_mdmf",
        f"model.clip.pretrained={weights}",
        f"model.episodes={args.tasks}",
        "data.num_workers=0",
        "data.val_episodes.episodes=4",
        *args.data,
    ]
    return build_training(compose_cfg("pretrain", overrides, tmp / "run"))


def bench_step(run, args: argparse.Namespace) -> dict:
    module, dm = run.module, run.datamodule
    task = next(iter(dm.train_dataloader()["source"]))  # before the cache: the task carries its video
    module.log = module.log_dict = lambda *a, **k: None
    module.train()
    step = optimizer_step(module)

    def uncached() -> None:
        module.frozen_cache = None
        step(lambda: module.training_step({"source": task}, 0))

    cache = FrozenOutputCache(views=0)
    start = time.perf_counter()
    cache.build(module.frozen_models(), dm, torch.device("cpu"))
    cache_s = time.perf_counter() - start

    def cached() -> None:
        module.frozen_cache = cache
        step(lambda: module.training_step({"source": task}, 0))

    times = interleaved({"uncached": uncached, "cached": cached}, args.warmup, args.repeats)
    return {
        "clips_per_task": int(task["rgb"].shape[0]),
        "frames_per_clip": int(task["rgb"].shape[2]),
        "uncached_ms": round(1000 * times["uncached"], 1),
        "cached_ms": round(1000 * times["cached"], 1),
        "uncached_over_cached": round(times["uncached"] / times["cached"], 2),
        "cache_build_s": round(cache_s, 2),
        "training_clips_cached": len(dm.train_sets["source"]),
    }


def bench_eval(run, args: argparse.Namespace) -> dict:
    towers, classifier = run.module.towers.eval(), run.module.classifier.eval()
    settings = {"n_way": 5, "k_shot": 1, "n_query": 1, "episodes": args.episodes, "seed": 0}
    dm = FewShotDataModule(
        root=run.datamodule.root, modalities=run.datamodule.modalities, frames=run.datamodule.frames, episodes=settings,
        eval_batch_size=32, num_workers=0,
    )  # fmt: skip
    dm.setup("test")
    classifier.bind_classes(dm.episodes.class_names, root=dm.root, encoder=towers)
    start = time.perf_counter()
    bank = FeatureBank(len(dm.clips), 1)
    for batch in dm.test_dataloader():
        bank.add(batch["index"], encode_views(towers, {"rgb": batch["rgb"]}, batch["index"], frames=True))
    features = bank.gather(lambda t: t, 1)
    encode_s = time.perf_counter() - start

    positions = episode_positions(dm.episodes, [r.clip_id for r in dm.clips.records])
    classes = dm.episodes.classes
    start = time.perf_counter()
    accuracy = solve_episodes(classifier, features, positions, 1, classes=classes, chunk=2000)
    solve_s = time.perf_counter() - start

    few = min(args.per_episode, args.episodes)
    classifier.precompute = False
    start = time.perf_counter()
    per_episode = solve_episodes(classifier, features, positions[:few], 1, classes=classes[:few], chunk=100)
    per_episode_s = (time.perf_counter() - start) * args.episodes / few
    classifier.precompute = True
    mean, ci = mean_confidence_interval(accuracy)
    return {
        "episodes": args.episodes,
        "setting": "5-way 1-shot 1 query",
        "clips": len(dm.clips),
        "classes": len(dm.episodes.class_names),
        "encode_s": round(encode_s, 3),
        "solve_s": round(solve_s, 3),
        "solve_over_encode": round(solve_s / encode_s, 3),
        "per_episode_s": round(per_episode_s, 2),
        "per_episode_over_solve": round(per_episode_s / solve_s, 1),
        "per_episode_same_predictions": bool(torch.equal(per_episode, accuracy[:few])),
        "accuracy": f"{mean:.2f} ± {ci:.2f} (random weights)",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="a dataset folder (default: the synthetic one, generated if missing)")
    ap.add_argument("--tasks", default=TASK, help="model.episodes of the training step")
    ap.add_argument("--episodes", type=int, default=10000)
    ap.add_argument("--per-episode", type=int, default=500, help="episodes timed with the head run per episode")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument(
        "--tiny", action="store_true", help="small tasks, 200 episodes, one repeat: checks that the script runs"
    )
    args = ap.parse_args(argv)
    args.data = [] if args.root is None else ["data=folder", f"data.root={args.root}"]
    if args.tiny:
        args.tasks, args.episodes, args.per_episode = "{n_way: 3, k_shot: 1, n_query: 2, episodes: 4, seed: 0}", 200, 20
        args.warmup, args.repeats = 0, 1
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = {"torch_threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="bench_clip_mdmf_") as tmp:
        run = build(args, Path(tmp))
        print("[bench_clip_mdmf] training step ...", file=sys.stderr, flush=True)
        report["step"] = bench_step(run, args)
        print("[bench_clip_mdmf] evaluation ...", file=sys.stderr, flush=True)
        report["eval"] = bench_eval(run, args)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["targets"] = {
        "cached step cheaper than uncached": report["step"]["uncached_over_cached"] > 1,
        "solve_over_encode <= 1.5": report["eval"]["solve_over_encode"] <= 1.5,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

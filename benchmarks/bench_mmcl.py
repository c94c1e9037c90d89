"""Cost of MMCL: an MMCL training step vs a plain cross-entropy step of the same skeleton model.

    python benchmarks/bench_mmcl.py [--root data/synthetic] [--batch-size 32] [--repeats 7] [--threads 1] [--tiny]

Both modules are built in process exactly as ``lit_main_pretrain.py`` builds them, from the presets
(random weights: timing does not depend on them):

* ``plain``: ``experiment=skeleton_tiny/joint``, ST-GCN + linear head, CE on the xsub train clips;
* ``mmcl``: ``experiment=mmcl_tiny/train``, the same ST-GCN and head, plus the feature alignment
  with a frozen RGB encoder (the ``mm_cdfsl_tiny/pretrain`` RGB 3D CNN, written with
  ``export_encoder`` and read back as ``model.teacher``) and the text refinement. The RGB encoder's
  outputs come from the frozen-output cache (``cache=frozen``): it encodes every training clip once
  before training, and a step looks its features up.

On one batch of real clips (``--batch-size``, default the preset's 32), each step being
``training_step`` + backward + gradient clipping + AdamW step:

* ``mmcl_step_ms`` / ``plain_step_ms`` and ``mmcl_over_plain``: the ratio the issue targets
  (<= 1.3);
* ``mmcl_online_step_ms`` / ``mmcl_online_over_plain``: the MMCL step with the RGB encoder run on
  the batch (no cache), for comparison;
* ``rgb_cache_s``: the one-off caching (reading and decoding the RGB clips, encoding them), and
  ``mmcl_over_plain_with_cache``: the ratio over the preset's whole run (``run_steps``) with all of
  it charged to MMCL.

Warm-up, then ``--repeats`` rounds interleaving the variants (a load change on a shared machine hits
all of them alike); medians are reported, with the load average. torch runs single-threaded by
default (``--threads``), as in ``bench_distill.py``, for stable figures on shared cores. ``--tiny``:
batches of 4, one repeat, to check that the script runs. The output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MMFSAR_ROOT", str(REPO))

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from mmfsar.tasks.pipelines import build_training, export_trained
from common import interleaved, load_average, start_step_benchmark

TARGET = 1.3


def compose_cfg(overrides: list[str], out_dir: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def optimizer_step(module: torch.nn.Module) -> Callable[[Callable[[], torch.Tensor]], None]:
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)

    def step(loss_fn: Callable[[], torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # trainer.gradient_clip_val
        opt.step()

    return step


def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    common = [*args.data, "data.num_workers=0"]
    if args.batch_size:
        common.append(f"data.batch_size={args.batch_size}")
    rgb_cfg = compose_cfg(
        ["experiment=mm_cdfsl_tiny/pretrain", "modality=rgb", *common, "data.val_episodes.episodes=10"], tmp / "rgb"
    )
    rgb = export_trained(rgb_cfg, build_training(rgb_cfg))  # the frozen RGB encoder, random weights
    mmcl_cfg = compose_cfg(["experiment=mmcl_tiny/train", f"model.teacher={rgb}", *common], tmp / "mmcl")
    run = build_training(mmcl_cfg)
    mmcl, dm = run.module, run.datamodule
    plain = build_training(compose_cfg(["experiment=skeleton_tiny/joint", *common], tmp / "plain")).module
    assert type(plain.encoder.backbone) is type(mmcl.encoder.backbone)
    assert plain.encoder.head.out_features == mmcl.encoder.head.out_features
    plain.encoder.load_state_dict(mmcl.encoder.state_dict())  # the same model, the same weights

    online_batch = {"source": next(iter(dm.train_dataloader()["source"]))}  # skeleton + rgb
    (cache,) = run.callbacks  # cache=frozen, set up as on fit start: every training clip encoded once
    trainer = SimpleNamespace(datamodule=dm, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    t = time.perf_counter()
    cache.setup(trainer, mmcl, "fit")
    cache_s = time.perf_counter() - t
    batch = {"source": next(iter(dm.train_dataloader()["source"]))}  # now the skeleton stream only
    assert set(batch["source"]) >= {"skeleton", "index"} and "rgb" not in batch["source"]
    plain_batch = {"source": {"skeleton": batch["source"]["skeleton"], "label": batch["source"]["label"]}}

    def online() -> torch.Tensor:
        mmcl.frozen_cache = None  # the RGB encoder runs on the batch, as without a cache
        try:
            return mmcl.training_step(online_batch, 0)
        finally:
            mmcl.frozen_cache = cache

    mmcl.train()
    plain.train()
    step_m, step_p = optimizer_step(mmcl), optimizer_step(plain)
    steps = interleaved(
        {
            "mmcl_step": lambda: step_m(lambda: mmcl.training_step(batch, 0)),
            "plain_step": lambda: step_p(lambda: plain.training_step(plain_batch, 0)),
            "mmcl_online_step": lambda: step_m(online),
        },
        args.warmup,
        args.repeats,
    )
    run_steps = mmcl_cfg.trainer.max_epochs * len(dm.train_dataloader()["source"])
    return {
        "batch_size": int(batch["source"]["skeleton"].shape[0]),
        "skeleton_model": type(mmcl.encoder.backbone).__name__,
        "skeleton_channels": mmcl.encoder_config["backbone"]["channels"],
        "frames": dm.frames.num_frames,
        "rgb_encoder": type(mmcl.frozen_models()["rgb"]).__name__,
        "training_clips": len(dm.train_sets["source"]),
        "mmcl_step_ms": round(1000 * steps["mmcl_step"], 1),
        "plain_step_ms": round(1000 * steps["plain_step"], 1),
        "mmcl_over_plain": round(steps["mmcl_step"] / steps["plain_step"], 3),
        "mmcl_online_step_ms": round(1000 * steps["mmcl_online_step"], 1),
        "mmcl_online_over_plain": round(steps["mmcl_online_step"] / steps["plain_step"], 3),
        "rgb_cache_s": round(cache_s, 2),
        "run_steps": run_steps,
        "mmcl_over_plain_with_cache": round(
            (run_steps * steps["mmcl_step"] + cache_s) / (run_steps * steps["plain_step"]), 3
        ),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="a dataset folder (default: the synthetic one, generated if missing)")
    ap.add_argument(
        "--batch-size", type=int, default=None, help="clips per step (default: the preset's data.batch_size)"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--tiny", action="store_true", help="batches of 4, one repeat: checks that the script runs")
    args = ap.parse_args(argv)
    args.data = [] if args.root is None else ["data=folder", f"data.root={args.root}"]
    if args.tiny:
        args.batch_size, args.warmup, args.repeats = 4, 0, 1
    results = start_step_benchmark(args)
    print("[bench_mmcl] building and caching ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_mmcl_") as tmp:
        results["mmcl"] = bench(args, Path(tmp))
    results["machine"]["load_average_end"] = load_average()
    results["targets"] = {
        "mmcl_over_plain <=": TARGET,
        "mmcl_over_plain_ok": results["mmcl"]["mmcl_over_plain"] <= TARGET,
    }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

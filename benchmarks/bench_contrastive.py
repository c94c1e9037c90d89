"""Cost of IKEM's contrastive step (issue #17): a MoCo v2 step vs a plain supervised step of the
same encoder on the same clips.

    python benchmarks/bench_contrastive.py [--root data/synthetic] [--batch-size 64] [--repeats 7] [--threads 1]

Both modules are built in process as the entry points build them (Hydra composes the presets,
the modules' ``build`` makes them), with random weights:

* ``contrastive_step_ms``: ``ContrastivePretrainModule.training_step`` of ``experiment=ikem_tiny/
  pretrain`` (joint stream, quarter-width ST-GCN + projection head; the momentum update and the
  key encoder's forward on view 1 without gradients, the query forward on view 0, InfoNCE against
  the queue, the enqueue) + backward + an AdamW step;
* ``plain_step_ms``: ``PretrainModule.training_step`` of ``experiment=skeleton_tiny/joint`` with the
  same ST-GCN (same widths, one body) and a linear head, cross-entropy on view 0 of the same clips;
  ``contrastive_over_plain`` is the ratio the issue targets (<= 2: one extra forward without
  gradients, a query forward + backward as the plain step);
* ``six``: the same for the six-modality teacher in its cross-modal stage (CrosSCLR mining + the
  knowledge exchange, ``experiment=ikem_tiny/teacher model.warmup_epochs=0``) against six plain
  steps, one per modality (``six_plain_steps_ms``; ``cross_modal_over_six_plain``).

Warm-up, then ``--repeats`` rounds interleaving the variants (a load change on the shared machine
hits them alike); medians. torch runs single-threaded by default (``--threads``), as
``bench_distill.py``. The output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MMFSAR_ROOT", str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from mmfsar.tasks.pipelines import build_training  # noqa: E402
from common import interleaved, load_average, start_step_benchmark  # noqa: E402

SIX = [
    "skeleton",
    "skeleton_motion",
    "skeleton_bone",
    "skeleton_acceleration",
    "skeleton_rotation_axis",
    "skeleton_angular_velocity",
]


def compose_cfg(name: str, overrides: list[str], out_dir: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def optimizer_step(module: torch.nn.Module) -> Callable[[Callable[[], torch.Tensor]], None]:
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(loss_fn: Callable[[], torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def plain_module(modality: str, common: list[str], tmp: Path) -> Any:
    """The supervised skeleton baseline's module with the contrastive preset's encoder and input."""
    overrides = [
        "experiment=skeleton_tiny/supervised", f"modality={modality}", f"modalities.{modality}.persons=1",
        "model.encoder.channels=[16,32,64]", *common,
    ]  # fmt: skip
    return build_training(compose_cfg("pretrain", overrides, tmp / f"plain_{modality}")).module


def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    common = [*args.data, "data.num_workers=0", "data.frames.num_frames=16"]
    if args.batch_size:
        common.append(f"data.batch_size={args.batch_size}")
    joint = build_training(compose_cfg("pretrain", ["experiment=ikem_tiny/pretrain", *common], tmp / "joint"))
    six = build_training(
        compose_cfg("pretrain", ["experiment=ikem_tiny/teacher", "model.warmup_epochs=0", *common], tmp / "six")
    )
    batch = {"source": next(iter(six.datamodule.train_dataloader()["source"]))}  # (B, 2, ...) per modality
    bsz = batch["source"]["skeleton"].shape[0]
    labels = torch.randint(0, 10, (bsz,))
    plains = {m: plain_module(m, common, tmp) for m in (SIX if args.six else ["skeleton"])}
    plain_batches = {m: {"source": {m: batch["source"][m][:, 0], "label": labels}} for m in plains}

    modules = {"contrastive": joint.module, "cross_modal": six.module, **{f"plain:{m}": p for m, p in plains.items()}}
    steps = {name: optimizer_step(mod.train()) for name, mod in modules.items()}
    variants = {
        "contrastive": lambda: steps["contrastive"](lambda: joint.module.training_step(batch, 0)),
        **{
            f"plain:{m}": (lambda m=m: steps[f"plain:{m}"](lambda: plains[m].training_step(plain_batches[m], 0)))
            for m in plains
        },
    }
    if args.six:
        variants["cross_modal"] = lambda: steps["cross_modal"](lambda: six.module.training_step(batch, 0))
    times = interleaved(variants, args.warmup, args.repeats)
    assert six.module.cross_modal and six.module.exchange is not None  # the cross-modal stage was timed
    out: dict[str, Any] = {
        "batch_size": bsz,
        "encoder": "STGCN channels [16, 32, 64], 1 body, 16 frames",
        "queue_size": int(joint.module.queues["skeleton"].keys.shape[0]),
        "contrastive_step_ms": round(1000 * times["contrastive"], 1),
        "plain_step_ms": round(1000 * times["plain:skeleton"], 1),
        "contrastive_over_plain": round(times["contrastive"] / times["plain:skeleton"], 3),
    }
    if args.six:
        six_plain = sum(times[f"plain:{m}"] for m in SIX)
        out["six"] = {
            "cross_modal_step_ms": round(1000 * times["cross_modal"], 1),
            "six_plain_steps_ms": round(1000 * six_plain, 1),
            "cross_modal_over_six_plain": round(times["cross_modal"] / six_plain, 3),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="a dataset folder (default: the synthetic one, generated if missing)")
    ap.add_argument(
        "--batch-size", type=int, default=None, help="clips per step (default: the presets' data.batch_size, 64)"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--no-six", dest="six", action="store_false", help="skip the six-modality cross-modal step")
    ap.add_argument("--tiny", action="store_true", help="batches of 4, one repeat: checks that the script runs")
    args = ap.parse_args(argv)
    args.data = [] if args.root is None else ["data=folder", f"data.root={args.root}"]
    if args.tiny:
        args.batch_size, args.warmup, args.repeats = 4, 0, 1
    results = start_step_benchmark(args)
    with tempfile.TemporaryDirectory(prefix="bench_contrastive_") as tmp:
        print("[bench_contrastive] building ...", file=sys.stderr, flush=True)
        results |= bench(args, Path(tmp))
    results["machine"]["load_average_end"] = load_average()
    results["targets"] = {"contrastive_over_plain <=": 2.0, "ok": results["contrastive_over_plain"] <= 2.0}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

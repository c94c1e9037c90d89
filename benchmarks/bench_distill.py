"""Cost of distillation: a distillation step vs a plain supervised step of the student, and the
student's vs the teacher's inference time per clip.

    python benchmarks/bench_distill.py [--root data/synthetic] [--batch-size 32] [--repeats 7]
                                       [--recipes mm_cdfsl,mm_cdfsl_vit,lite_mkd] [--threads 1] [--profile]

Both published recipes are built in process exactly as the entry points build them (Hydra
composes the tiny presets' configs, the training modules' ``build`` makes the modules; teachers
are written with ``export_encoder`` and read back by the distillation module), with random
weights: timing does not depend on what the weights are.

* ``mm_cdfsl`` (``experiment=mm_cdfsl_tiny/...``): 3D-CNN RGB student initialised from the RGB
  encoder, three 3D-CNN teachers (rgb, flow, pose), translation MSE on unlabelled target clips;
  the teachers encode 8 seeded augmented views of every training clip before training
  (``cache=frozen cache.views=8``) and the student trains on those same views, so a step looks the
  teachers' outputs up.
* ``mm_cdfsl_vit`` (``experiment=mm_cdfsl/...`` with ``model/encoder=vit_tiny input=synthetic
  data.frames.num_frames=8``): the published recipe, ViT student and teachers sharing a tube
  mask of ratio 0.75, so the teachers, run at every step, see a quarter of the tokens; the
  plain step is the student's unmasked supervised step (``plain_masked_step_ms``: masked).
* ``lite_mkd`` (``experiment=lite_mkd_tiny/...``): 3D-CNN RGB student, the MFM fusion teacher over
  3D-CNN rgb / flow / pose encoders, logit KD + relation + CE on source + target clips; the
  teacher's outputs on the un-augmented clips are cached before training
  (``cache=frozen``), so a step looks them up.

Per recipe, on one batch of real clips (``--batch-size``, default the presets' 32):

* ``distill_step_ms``: ``DistillModule.training_step`` + backward + gradient clipping + AdamW
  step (the teachers' forward included when they run at every step; a look-up when cached);
* ``plain_step_ms``: the same student architecture trained with plain cross-entropy
  (the preset's stage-1 ``PretrainModule.training_step``, unmasked) on the same clips, same
  optimiser; ``distill_over_plain`` is the ratio the design targets (<= 1.5);
* for a recipe with cached teachers also ``teacher_cache_s``, the one-off caching (loading, in
  this process, and encoding every cached view of every training clip);
  ``distill_over_plain_with_cache``, the ratio over the preset's whole run (``run_steps``
  steps) with all of it charged to the distillation, and ``..._with_cache_compute`` with only
  the teachers' compute charged (``teacher_cache_compute_s``: cached views x clips x the
  teachers' inference time per clip; a plain step's timing has no data loading either, and
  training with the teachers at every step loads all their modalities every epoch);
  ``distill_online_step_ms`` / ``distill_online_over_plain``: the same step with the teachers
  run on the batch (no cache), for comparison;
* for a masked recipe also ``plain_masked_step_ms`` (CE on the student with the same tube mask)
  and ``distill_over_plain_masked``: what the teachers and the translation heads add to the
  student's own masked pass;
* ``student_ms_per_clip`` / ``teacher_ms_per_clip``: inference (``eval()``,
  ``torch.inference_mode()``, unmasked) per clip, the teacher being the sum of the per-modality
  teachers (mm_cdfsl) or the fusion teacher (lite_mkd); ``teacher_over_student`` is the speed-up.
  Teacher timings exclude computing flow and pose, which the student does not need
  (``student_modalities``); ``flow_extraction_ms_per_clip`` is what the flow alone costs before a
  teacher can run (DIS, ``python -m mmfsar.prepare flow``'s default, on the clip's own sampled
  RGB frames), and ``teacher_with_flow_over_student`` adds it. Pose needs an external detector
  and is not timed. For the masked recipe also the student's cost with MM-CDFSL's
  ensemble masked inference (two views at the mask ratio, the ``mm_cdfsl_tiny/eval`` setting,
  through the evaluation engine's ``encode_views``).

Warm-up, then ``--repeats`` rounds that interleave the variants (so a load change on a shared
machine hits all of them alike); medians are reported. torch runs single-threaded by default
(``--threads``): with other jobs on the cores, two intra-op threads made the steps up to 3x
slower and the ratios erratic (threads waiting for a descheduled sibling), while one thread gives
stable figures; the load average is reported with them. ``--profile`` adds a breakdown of the
distillation step with the teachers run on the batch (teachers' forward, student forward +
loss, backward, optimiser).
The output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MMFSAR_ROOT", str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from mmfsar.models.base import load_export  # noqa: E402
from mmfsar.tasks.common import frozen_module_outputs  # noqa: E402
from mmfsar.tasks.pipelines import build_training, export_trained  # noqa: E402
from common import interleaved, load_average, timed, start_step_benchmark  # noqa: E402

MODALITIES = ("rgb", "flow", "pose")
VIT_ON_SYNTHETIC = ["model/encoder=vit_tiny", "input=synthetic", "data.frames.num_frames=8"]
RECIPES = {
    "mm_cdfsl": {
        "pretrain": ["experiment=mm_cdfsl_tiny/pretrain"],
        "distill": ["experiment=mm_cdfsl_tiny/distill"],
        "init_student_from_rgb": True,
        "fusion": None,
        "plain": ["experiment=mm_cdfsl_tiny/pretrain"],
    },
    # The published MM-CDFSL recipe on the synthetic data's geometry (see the module docstring).
    "mm_cdfsl_vit": {
        "pretrain": ["experiment=mm_cdfsl/pretrain", *VIT_ON_SYNTHETIC],
        "distill": ["experiment=mm_cdfsl/distill", *VIT_ON_SYNTHETIC],
        "init_student_from_rgb": True,
        "fusion": None,
        "plain": ["experiment=mm_cdfsl/pretrain", "model.decoder=null", *VIT_ON_SYNTHETIC],
    },
    "lite_mkd": {
        "pretrain": ["experiment=lite_mkd_tiny/pretrain"],
        "distill": ["experiment=lite_mkd_tiny/distill"],
        "init_student_from_rgb": True,
        "fusion": ["experiment=lite_mkd_tiny/fusion"],
        "plain": ["experiment=lite_mkd_tiny/pretrain"],
        "episodic": True,  # one task per step; the teacher is one export with its matching head
    },
}


# --------------------------------------------------------------------------- building, as the entry points do


def compose_cfg(name: str, overrides: list[str], out_dir: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def export(cfg: DictConfig) -> Path:
    """Build a stage-1 module (random weights) and export its encoder as a run would."""
    return export_trained(cfg, build_training(cfg))


def first_batch(datamodule: Any) -> dict[str, Any]:
    """One training batch ``{"source"|"target": clips}`` of the data module."""
    return {k: next(iter(loader)) for k, loader in datamodule.train_dataloader().items()}


def describe(encoder_cfg: dict[str, Any]) -> str:
    bb = encoder_cfg["backbone"]
    name = bb["_target_"].rsplit(".", 1)[-1]
    if "model_name" in bb:
        return f"{name}({bb['model_name']})"
    if "widths" in bb:
        return f"{name}(widths {bb['widths']})"
    return f"{name}(dim {bb.get('embed_dim')}, depth {bb.get('depth')})"


# --------------------------------------------------------------------------- timing


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


def profile_distill(module: Any, batch: dict[str, Any], warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of the parts of a distillation step (mirrors ``DistillModule.training_step``)."""
    from mmfsar.losses.distill import DistillBatch
    from mmfsar.models.encoders.vit import tube_mask

    parts = [batch[k] for k in ("source", "target") if k in batch]
    teacher_modalities = {m for t in module.frozen_models().values() for m in t.modalities}
    inputs = {m: torch.cat([p[m] for p in parts]) for m in teacher_modalities | set(module.student.modalities)}
    labels = torch.cat([p["label"] for p in parts])
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    out: dict[str, list[float]] = {"teachers_forward": [], "student_forward_and_loss": [], "backward": [], "clip_and_optimizer": []}
    for i in range(warmup + repeats):
        kwargs = {}
        if module.grid is not None:
            kwargs["mask"] = tube_mask(labels.shape[0], module.grid, module.mask_ratio, device=labels.device)
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        teachers = frozen_module_outputs(module.frozen_models(), inputs, **kwargs)
        t1 = time.perf_counter()
        student = module.student(inputs, **kwargs)
        db = DistillBatch(student=student, teachers=teachers, labels=labels)
        loss = sum(term.weight * term(db) for term in module.terms.values())
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t4 = time.perf_counter()
        if i >= warmup:
            for key, seconds in zip(out, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                out[key].append(1000 * seconds)
    return {k: round(statistics.median(v), 2) for k, v in out.items()}


# --------------------------------------------------------------------------- one recipe


def bench_recipe(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    recipe = RECIPES[name]
    common = [*args.data, "data.num_workers=0", "data.val_episodes.episodes=10"]
    if args.batch_size:
        common.append(f"data.batch_size={args.batch_size}")
    exports = {m: export(compose_cfg("pretrain", [*recipe["pretrain"], f"modality={m}", *common], tmp / name / m)) for m in MODALITIES}
    encoders = [f"model.encoders.{m}={exports[m]}" for m in MODALITIES]
    tasks = [f"model.episodes={args.tasks}"] if recipe.get("episodic") and args.tasks else []
    if recipe["fusion"]:
        teachers = {"fusion": export(compose_cfg("pretrain", [*recipe["fusion"], *encoders, *common, *tasks], tmp / name / "fusion"))}
    else:
        teachers = exports
    if recipe.get("episodic"):
        distill_over = [*recipe["distill"], f"model.teacher={teachers['fusion']}", *common, *tasks]
    else:
        distill_over = [*recipe["distill"], *[f"model.teachers.{t}={p}" for t, p in teachers.items()], *common]
    if recipe["init_student_from_rgb"]:
        distill_over.append(f"model.init_from={exports['rgb']}")
    distill_cfg = compose_cfg("distill", distill_over, tmp)
    run = build_training(distill_cfg)
    distill, dm = run.module, run.datamodule
    plain = build_training(compose_cfg("pretrain", [*recipe["plain"], "modality=rgb", *common], tmp)).module
    student = distill.student if hasattr(distill, "student") else distill.encoder  # episodic modules: encoder
    grid = getattr(distill, "grid", None)
    assert plain.decoder is None and type(plain.encoder.backbone) is type(student.backbone)

    batch = first_batch(dm)  # the recipe's own clips: target (mm_cdfsl) or source + target (lite_mkd)
    clips = next(iter(batch.values()))  # every modality: for the inference timings
    cache_s, online_batch = None, batch
    cache = run.callbacks[0] if run.callbacks else None  # cache=frozen
    if cache is not None:  # as on fit start: teachers encode every training clip once per cached view
        trainer = SimpleNamespace(datamodule=dm, strategy=SimpleNamespace(root_device=torch.device("cpu")))
        cache_s = timed(lambda: cache.setup(trainer, distill, "fit"))
        batch = first_batch(dm)  # now the student's modality only (and each clip's view)
    run_steps = distill_cfg.trainer.max_epochs * max(len(loader) for loader in dm.train_dataloader().values())
    cached_clips = sum(len(ds) for ds in dm.train_sets.values())
    bsz = clips["rgb"].shape[0]
    step_clips = torch.cat([part["rgb"] for part in batch.values()])  # the student sees every part
    labels = torch.randint(0, plain.encoder.head.out_features, (step_clips.shape[0],))
    plain_batch = {"source": {"rgb": step_clips, "label": labels}}
    distill.train()
    plain.train()
    step_d, step_p = optimizer_step(distill), optimizer_step(plain)
    variants = {
        "distill_step": lambda: step_d(lambda: distill.training_step(batch, 0)),
        "plain_step": lambda: step_p(lambda: plain.training_step(plain_batch, 0)),
    }
    if cache is not None:

        def online_step() -> torch.Tensor:
            distill.frozen_cache = None  # teachers run on the batch, as without a cache
            try:
                return distill.training_step(online_batch, 0)
            finally:
                distill.frozen_cache = cache

        variants["distill_online_step"] = lambda: step_d(online_step)
    if grid is not None:
        from mmfsar.models.encoders.vit import tube_mask

        def masked_ce() -> torch.Tensor:
            mask = tube_mask(step_clips.shape[0], grid, distill.mask_ratio, device=labels.device)
            return F.cross_entropy(plain.encoder({"rgb": step_clips}, mask=mask).logits, labels)

        variants["plain_masked_step"] = lambda: step_p(masked_ce)

    teacher_models = distill.frozen_models()
    teacher_modalities = sorted({m for t in teacher_models.values() for m in t.modalities})
    teacher_cfgs = {n: load_export(p)["encoder"] for n, p in teachers.items()}

    def student_infer() -> None:
        student.eval()
        with torch.inference_mode():
            student({m: clips[m] for m in student.modalities})
        student.train()

    def teacher_infer(t: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                t.eval()({m: clips[m] for m in t.modalities})

        return run

    inference = {"student": student_infer, **{f"teacher:{n}": teacher_infer(t) for n, t in teacher_models.items()}}
    if grid is not None:  # MM-CDFSL's ensemble masked inference (eval preset: 2 query views at 0.75)
        from mmfsar.fewshot.engine import encode_views

        def student_masked_views() -> None:
            student.eval()
            encode_views(student, {"rgb": clips["rgb"]}, clips["index"], views=2, mask_ratio=distill.mask_ratio)
            student.train()

        inference["student_2_masked_views"] = student_masked_views

    if "flow" in teacher_modalities:
        from mmfsar.prepare.flow import create_method, flow_frames

        rgb = dm.modalities["rgb"]  # (3, 1, 1, 1) normalisation, undone to get the frames back
        frames = ((clips["rgb"] * rgb.std + rgb.mean) * 255).round().clamp(0, 255).to(torch.uint8)
        frames = frames.permute(0, 2, 3, 4, 1).contiguous().numpy()  # (B, T, H, W, 3)
        dis = create_method("dis")

        def flow_extraction() -> None:
            for clip in frames:
                for _ in flow_frames(list(clip), dis):
                    pass

        inference["flow_extraction"] = flow_extraction

    steps = interleaved(variants, args.warmup, args.repeats)
    infer = interleaved(inference, args.warmup, args.repeats)
    infer["teacher"] = sum(v for k, v in infer.items() if k.startswith("teacher:"))
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    out = {
        "batch_size": bsz,
        "clips_per_step": step_clips.shape[0],
        "student": describe(getattr(distill, "student_config", None) or distill.encoder_config),
        "student_params_M": round(n_params(student) / 1e6, 2),
        "teachers": {n: describe(cfg) if "backbone" in cfg else cfg["_target_"].rsplit(".", 1)[-1] for n, cfg in teacher_cfgs.items()},
        "teacher_params_M": round(sum(n_params(t) for t in teacher_models.values()) / 1e6, 2),
        "loss_terms": sorted(distill.terms),
        "mask_ratio": getattr(distill, "mask_ratio", 0.0),
        "distill_step_ms": round(1000 * steps["distill_step"], 1),
        "plain_step_ms": round(1000 * steps["plain_step"], 1),
        "distill_over_plain": round(steps["distill_step"] / steps["plain_step"], 3),
    }
    if cache_s is not None:
        out["teacher_cache_s"] = round(cache_s, 1)  # once per run, before the first step
        out["cache_views"] = cache.views
        out["run_steps"] = run_steps
        out["distill_over_plain_with_cache"] = round(
            (run_steps * steps["distill_step"] + cache_s) / (run_steps * steps["plain_step"]), 3
        )
        compute_s = max(cache.views, 1) * cached_clips * infer["teacher"] / bsz
        out["teacher_cache_compute_s"] = round(compute_s, 1)
        out["distill_over_plain_with_cache_compute"] = round(
            (run_steps * steps["distill_step"] + compute_s) / (run_steps * steps["plain_step"]), 3
        )
        out["distill_online_step_ms"] = round(1000 * steps["distill_online_step"], 1)
        out["distill_online_over_plain"] = round(steps["distill_online_step"] / steps["plain_step"], 3)
    if "plain_masked_step" in steps:
        out["plain_masked_step_ms"] = round(1000 * steps["plain_masked_step"], 1)
        out["distill_over_plain_masked"] = round(steps["distill_step"] / steps["plain_masked_step"], 3)
    out.update(
        {
            "student_ms_per_clip": round(1000 * infer["student"] / bsz, 3),
            "teacher_ms_per_clip": round(1000 * infer["teacher"] / bsz, 3),
            "teacher_ms_per_clip_each": {n: round(1000 * infer[f"teacher:{n}"] / bsz, 3) for n in teacher_models},
            "teacher_over_student": round(infer["teacher"] / infer["student"], 2),
            **(
                {
                    "flow_extraction_ms_per_clip": round(1000 * infer["flow_extraction"] / bsz, 3),
                    "teacher_with_flow_over_student": round(
                        (infer["teacher"] + infer["flow_extraction"]) / infer["student"], 2
                    ),
                }
                if "flow_extraction" in infer
                else {}
            ),
            **(
                {
                    "student_2_masked_views_ms_per_clip": round(1000 * infer["student_2_masked_views"] / bsz, 3),
                    "teacher_over_student_2_masked_views": round(infer["teacher"] / infer["student_2_masked_views"], 2),
                }
                if "student_2_masked_views" in infer
                else {}
            ),
            "student_modalities": list(student.modalities),
            "teacher_modalities": teacher_modalities,
        }
    )
    if args.profile and not recipe.get("episodic"):  # of the step with the teachers run on the batch
        distill.frozen_cache = None
        out["distill_online_step_breakdown_ms"] = profile_distill(distill, online_batch, args.warmup, args.repeats)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="a dataset folder (default: the synthetic one, generated if missing)")
    ap.add_argument("--batch-size", type=int, default=None, help="clips per step (default: the presets' data.batch_size)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--recipes", default="mm_cdfsl,mm_cdfsl_vit,lite_mkd")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="break the distillation step down")
    ap.add_argument("--tiny", action="store_true", help="batches of 4, one repeat, no ViT: checks that the script runs")
    ap.add_argument("--tasks", default=None, help="episodic recipes: model.episodes override, e.g. '{n_way: 3, k_shot: 2, n_query: 2, episodes: 2}'")
    args = ap.parse_args(argv)
    args.data = [] if args.root is None else ["data=folder", f"data.root={args.root}"]
    if args.tiny:
        args.batch_size, args.warmup, args.repeats, args.recipes = 4, 0, 1, "mm_cdfsl,lite_mkd"
        args.tasks = args.tasks or "{n_way: 3, k_shot: 2, n_query: 2, episodes: 2, seed: 0}"
    results = start_step_benchmark(args)
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        for name in args.recipes.split(","):
            print(f"[bench_distill] {name} ...", file=sys.stderr, flush=True)
            results[name] = bench_recipe(name, args, Path(tmp))
    results["machine"]["load_average_end"] = load_average()
    results["targets"] = {
        "distill_over_plain <=": 1.5,
        **{f"{n}.distill_over_plain_ok": results[n]["distill_over_plain"] <= 1.5 for n in args.recipes.split(",")},
    }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Stage 1 end to end, through ``lit_main_pretrain.py`` as a user runs it: a ``-m`` sweep over
rgb / flow / pose (MM-CDFSL's tiny preset), the exported encoders, the CSV / TensorBoard /
offline W&B loggers of every job, resuming from ``last.ckpt``, and DDP on two CPU processes.

The sweep is trained once per session (``mm_cdfsl_pretrained`` in ``conftest_training.py``) and
its exports are reused by ``test_distill.py``. Each job trains 2 steps of 4 clips on
``episode_dataset`` and validates on its 30 val clips (20 five-way one-shot episodes).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate

from helpers import MODALITIES, REPO_ROOT, checkpoint, read_wandb_run, run_ddp, run_entry, tiny, val_batch
from mmfsar.models.base import build_encoder, load_export

pytest_plugins = ["conftest_training"]


def csv_metric(run: Path, key: str) -> list[float]:
    with (run / "csv" / "metrics.csv").open() as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


# --------------------------------------------------------------------------- the sweep


def test_sweep_trains_and_exports_every_modality(mm_cdfsl_pretrained, episode_dataset):
    """One ``-m`` command, three jobs: each trained its own modality and wrote a resumable
    ``last.ckpt`` and an ``encoder.pt`` that loads weights-only and rebuilds (with
    ``build_encoder``) into a module computing exactly what the best checkpoint's weights compute,
    on clips read with the input settings stored in the export."""
    sweep = mm_cdfsl_pretrained
    assert sorted(sweep.runs) == sorted(MODALITIES), f"jobs of {sweep.sweep_dir}: {sorted(sweep.runs)}"
    assert (sweep.sweep_dir / "multirun.yaml").is_file()
    for modality, run in sweep.runs.items():
        assert (run / ".hydra" / "config.yaml").is_file()
        composed = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        assert list(composed["modalities"]) == [modality]

        last = checkpoint(run / "checkpoints" / "last.ckpt")
        assert last["global_step"] == 2 and last["epoch"] == 0

        payload = torch.load(run / "encoder.pt", map_location="cpu", weights_only=True)
        assert payload["encoder"]["modality"] == modality
        assert list(payload["modalities"]) == [modality]
        assert payload["encoder"]["backbone"]["_target_"].endswith("Conv3DEncoder")
        assert payload["encoder"]["num_classes"] == 3  # the base classes of episode_dataset
        assert payload["frames"]["num_frames"] == 8
        info = payload["info"]
        best = Path(info["checkpoint"])
        assert best.parent == run / "checkpoints" and best.is_file()
        best_ckpt = checkpoint(best)
        (ckpt_state,) = [v for k, v in best_ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
        assert info["val_acc"] == pytest.approx(float(ckpt_state["best_model_score"]))

        rebuilt = build_encoder(run / "encoder.pt").eval()
        reference = instantiate(payload["encoder"], _convert_="all").eval()
        weights = {k.removeprefix("encoder."): v for k, v in best_ckpt["state_dict"].items() if k.startswith("encoder.")}
        reference.load_state_dict(weights)
        for k, v in reference.state_dict().items():
            assert torch.equal(v, payload["state_dict"][k]), f"{modality}: exported {k} differs from the checkpoint"

        clips = val_batch(episode_dataset, payload)["batch"]
        with torch.no_grad():
            a, b = rebuilt({modality: clips[modality]}), reference({modality: clips[modality]})
        assert a.pooled.shape == (30, rebuilt.feature_dim)
        assert torch.equal(a.pooled, b.pooled) and torch.equal(a.logits, b.logits)
        assert torch.isfinite(a.pooled).all()


def test_sweep_jobs_log_to_csv_tensorboard_and_offline_wandb(mm_cdfsl_pretrained):
    """``logger=many_loggers``: every job of the sweep has its own CSV metrics, TensorBoard events
    and offline W&B run (so ``wandb.finish()`` ended each job's run before the next job started);
    the W&B run holds the resolved config, the same ``val/acc`` as the CSV log, the training
    losses, and the exported encoder as a model artifact."""
    run_ids = set()
    for modality, run in mm_cdfsl_pretrained.runs.items():
        composed = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        assert composed["logger"]["wandb"]["offline"] is True, "W&B must be offline unless the user says otherwise"

        val_acc = csv_metric(run, "val/acc")
        assert len(val_acc) == 1 and 0 <= val_acc[0] <= 100
        assert csv_metric(run, "train/loss"), "training losses missing from the CSV log"
        assert list((run / "tensorboard").glob("events.out.tfevents.*")), f"no TensorBoard events in {run}"

        offline = list((run / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, f"{run}: expected one offline W&B run, found {offline}"
        (log_file,) = offline[0].glob("run-*.wandb")
        wb = read_wandb_run(log_file)
        run_ids.add(wb.run_id)
        assert wb.exited, f"{modality}: the W&B run was not finished (no exit record)"
        assert wb.config["task_name"] == "pretrain"
        assert list(wb.config["modalities"]) == [modality]
        assert wb.config["model"]["uses_unlabelled_target"] is True
        assert wb.series("val/acc") == pytest.approx(val_acc)
        assert len(wb.series("train/loss")) == 2  # trainer.log_every_n_steps=1, 2 steps
        assert (f"pretrain-{modality}-encoder", "model", ["encoder.pt"]) in wb.artifacts
    assert len(run_ids) == len(MODALITIES), "the jobs of the sweep shared a W&B run"


# --------------------------------------------------------------------------- resume


def test_resume_from_last_ckpt_continues_the_step_count(mm_cdfsl_pretrained, episode_dataset, tmp_path, wandb_home):
    """``ckpt_path=<run>/checkpoints/last.ckpt trainer.max_epochs=2``: training goes on from step 2
    to step 4 (one more epoch of 2 batches), with the optimiser and schedule state restored,
    instead of starting over."""
    first = mm_cdfsl_pretrained.runs["rgb"] / "checkpoints" / "last.ckpt"
    before = checkpoint(first)
    out = tmp_path / "resumed"
    run_entry(
        "lit_main_pretrain.py",
        "experiment=mm_cdfsl_tiny/pretrain",
        "modality=rgb",
        f"ckpt_path={first}",
        f"hydra.run.dir={out}",
        *tiny(episode_dataset, epochs=2),
        home=wandb_home,
    )
    after = checkpoint(out / "checkpoints" / "last.ckpt")
    assert before["global_step"] == 2
    assert after["global_step"] == before["global_step"] + 2 and after["epoch"] == 1
    adam_steps = {float(s["step"]) for s in after["optimizer_states"][0]["state"].values()}
    assert adam_steps == {4.0}, "the optimiser state was not restored from last.ckpt"
    schedule = after["lr_schedulers"][0]  # timm's cosine schedule, stepped by the global step
    assert schedule == {**before["lr_schedulers"][0], **{k: v for k, v in schedule.items() if k == "metric"}}
    from timm.scheduler import CosineLRScheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    replay = CosineLRScheduler(optimizer, t_initial=1)
    replay.load_state_dict(schedule)
    lrs = {g["lr"] for g in after["optimizer_states"][0]["param_groups"]}
    assert len(lrs) == 1 and lrs.pop() == pytest.approx(replay._get_lr(4)[0]), "the lr is the schedule's value at step 4"
    assert set(csv_metric(out, "epoch")) == {1.0}, "the resumed run trained epoch 0 again"
    changed = [k for k, v in after["state_dict"].items() if not torch.equal(v, before["state_dict"][k])]
    assert changed, "resuming did not train"
    assert load_export(out / "encoder.pt")["info"]["checkpoint"].startswith(str(out))


# --------------------------------------------------------------------------- DDP


def _ddp_case(name: str) -> list[str]:
    return {
        # MM-CDFSL pretraining: labelled source + unlabelled target loaders, ViT
        "videomae": ["experiment=mm_cdfsl_tiny/pretrain"],
        # Lite-MKD teacher pretraining: a BatchNorm CNN (trainer=ddp asks for SyncBatchNorm, GPU-only)
        "frame_cnn": ["experiment=lite_mkd_tiny/pretrain", "model/encoder=frame_cnn", "model.encoder.model_name=mobilenetv3_small_050"],
    }[name]


@pytest.mark.parametrize(
    "case", ["videomae", pytest.param("frame_cnn", marks=pytest.mark.slow)]
)
def test_ddp_on_two_cpu_processes(case, episode_dataset, tmp_path, wandb_home):
    """``trainer=ddp trainer.accelerator=cpu trainer.devices=2`` through the real entry point
    (:func:`helpers.run_ddp`: sharded training, one export, validation as one process)."""
    run_ddp(
        "lit_main_pretrain.py",
        *_ddp_case(case),
        "modality=rgb",
        run=tmp_path / "ddp",
        root=episode_dataset,
        home=wandb_home,
        train_domain="source",
    )


def test_lightning_smoke_test_switches_run_or_are_refused_up_front(episode_dataset, tmp_path, wandb_home):
    """``+trainer.fast_dev_run=true`` validates on part of the val clips: the episode metric is
    skipped with one warning instead of failing after training. ``limit_val_batches`` with the
    checkpoint monitoring val/acc is refused before any training step, saying why; without the
    monitor it runs with the warning."""
    common = ["experiment=mm_cdfsl_tiny/pretrain", "modality=flow", *tiny(episode_dataset)]
    output = run_entry("lit_main_pretrain.py", *common, "+trainer.fast_dev_run=true", f"hydra.run.dir={tmp_path / 'fast'}", home=wandb_home)
    assert "val/acc needs every val clip encoded and is not computed in this run" in output, output[-3000:]
    assert (tmp_path / "fast" / "encoder.pt").is_file()
    output = run_entry(
        "lit_main_pretrain.py", *common, "++trainer.limit_val_batches=1", "callbacks.model_checkpoint.monitor=null",
        f"hydra.run.dir={tmp_path / 'unmonitored'}", home=wandb_home,
    )  # fmt: skip
    assert "is not computed in this run" in output and (tmp_path / "unmonitored" / "encoder.pt").is_file()
    proc = subprocess.run(
        [sys.executable, "lit_main_pretrain.py", *common, "++trainer.limit_val_batches=1", f"hydra.run.dir={tmp_path / 'refused'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )  # fmt: skip
    assert proc.returncode != 0 and "the checkpoint callback monitors it" in proc.stdout + proc.stderr
    assert "Epoch 0" not in proc.stdout + proc.stderr, "refused before any training step"

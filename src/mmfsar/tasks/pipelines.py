"""What the entry points run: ``train`` (pretraining, fusion teacher, distillation) and
``evaluate`` (few-shot episodes). Each composes data, model, trainer and loggers from the config,
runs, and writes its artefacts into the run directory."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

import mmfsar
from mmfsar.data.modalities import build_modalities
from mmfsar.models.base import build_encoder, export_encoder, load_export
from mmfsar.utils import RankedLogger, instantiate_callbacks, instantiate_loggers, print_config_tree, task_wrapper
from mmfsar.utils.paths import PROJECT_ROOT

log = RankedLogger(__name__)


def _trainer(cfg: DictConfig) -> tuple[L.Trainer, list[Logger]]:
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=instantiate_callbacks(cfg.get("callbacks")), logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer, loggers


def _prepare(cfg: DictConfig) -> None:
    if cfg.get("print_config", True):
        print_config_tree(cfg, ("data", "modalities", "model", "trainer"), save_to=Path(cfg.paths.output_dir) / "config_tree.log")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)


@task_wrapper
def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the ``model`` (a training module with a ``build(model_cfg, datamodule)`` classmethod)
    on the ``data`` module, then export the best checkpoint's encoder to ``encoder.pt``."""
    _prepare(cfg)
    module_cls = get_class(cfg.model._target_)
    modality_cfgs = module_cls.modality_configs(cfg.model, cfg.modalities)
    modalities = build_modalities(modality_cfgs)
    datamodule = instantiate(cfg.data, modalities=modalities)
    datamodule.prepare_data()  # generates the synthetic data on first use (before DDP ranks start)
    datamodule.setup("fit")  # every file check and the episode draw happen before training
    module = module_cls.build(cfg.model, datamodule)
    trainer, loggers = _trainer(cfg)
    log.info("training")
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if not trainer.is_global_zero:
        return metrics
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
        log.info(f"exporting the best checkpoint ({best}, val/acc {float(trainer.checkpoint_callback.best_model_score):.2f})")
    encoder, encoder_cfg = module.exported_encoder()
    path = export_encoder(
        Path(cfg.paths.output_dir) / "encoder.pt",
        encoder,
        encoder_config=encoder_cfg,
        modalities={m: modality_cfgs[m] for m in encoder.modalities},
        frames=OmegaConf.to_container(cfg.data.frames, resolve=True),
        info={
            "task": cfg.task_name,
            "dataset": str(cfg.data.root),
            "checkpoint": best,
            "val_acc": float(trainer.checkpoint_callback.best_model_score) if best else None,
            "code_version": code_version(),
        },
    )
    log.info(f"exported encoder: {path}")
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            artifact = wandb.Artifact(f"{cfg.task_name}-encoder", type="model", metadata={"modalities": encoder.modalities})
            artifact.add_file(str(path))
            lg.experiment.log_artifact(artifact)
    metrics["encoder"] = str(path)
    return metrics


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """N-way K-shot episodes of an exported encoder; writes results.json / results.csv."""
    from mmfsar.tasks.evaluate import FewShotEvalModule

    payload = load_export(cfg.encoder)  # a missing or foreign file fails here, before any work
    _prepare(cfg)
    encoder = build_encoder(payload)
    modalities = build_modalities(payload["modalities"])
    datamodule = instantiate(cfg.data, modalities=modalities, frames=instantiate(payload["frames"]))
    datamodule.prepare_data()
    datamodule.setup("test")
    out_dir = Path(cfg.paths.output_dir)
    episodes = datamodule.episodes
    episode_file = out_dir / f"episodes_{episodes.settings.name}.json"
    module = FewShotEvalModule(
        encoder=encoder,
        classifier=instantiate(cfg.fewshot.classifier),
        views=cfg.fewshot.views,
        mask_ratio=cfg.fewshot.mask_ratio,
        mask_seed=cfg.fewshot.seed,
    )
    trainer, loggers = _trainer(cfg)
    log.info(f"encoding {len(datamodule.clips)} clips once, then solving {len(episodes)} episodes")
    trainer.test(module, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return {}
    episode_hash = episodes.save(episode_file)
    acc = module.episode_accuracy
    from mmfsar.fewshot import mean_confidence_interval

    mean, ci = mean_confidence_interval(acc)
    s = episodes.settings
    record = {
        "setting": f"{s.n_way}-way {s.k_shot}-shot",
        "n_way": s.n_way,
        "k_shot": s.k_shot,
        "n_query": s.n_query,
        "episodes": s.episodes,
        "seed": s.seed,
        "split": cfg.fewshot.split,
        "domain": cfg.fewshot.domain,
        "classifier": cfg.fewshot.classifier._target_.rsplit(".", 1)[-1],
        "views": cfg.fewshot.views,
        "mask_ratio": cfg.fewshot.mask_ratio,
        "encoder": str(cfg.encoder),
        "encoder_sha256": file_sha256(cfg.encoder),
        "modalities": list(encoder.modalities),
        "dataset": str(cfg.data.root),
        "episode_file": str(episode_file),
        "episode_sha256": episode_hash,
        "mean": round(float(mean), 4),
        "ci95": round(float(ci), 4),
        "code_version": code_version(),
    }
    (out_dir / "results.json").write_text(json.dumps({**record, "per_episode": acc.tolist()}, indent=1))
    with (out_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(record))
        w.writeheader()
        w.writerow(record)
    print(
        f"{record['setting']} ({s.n_query} queries, {s.episodes} episodes, {record['classifier']}) "
        f"on {cfg.fewshot.split}/{cfg.fewshot.domain}: {mean:.2f} ± {ci:.2f}  [{cfg.encoder}]"
    )
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            run = lg.experiment
            run.summary.update({"acc": mean, "ci95": ci, "episode_sha256": episode_hash})
            run.log(
                {
                    "settings": wandb.Table(columns=list(record), data=[list(record.values())]),
                    "per_episode_accuracy": wandb.Histogram(acc.numpy()),
                }
            )
    return record


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    """The package version and, in a git checkout, the commit (with ``+dirty`` if modified)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return f"{mmfsar.__version__}+{sha}{'.dirty' if dirty else ''}" if sha else mmfsar.__version__

"""What the entry points run: ``train`` (pretraining, fusion teacher, distillation) and
``evaluate`` (few-shot episodes). Each composes data, model, trainer and loggers from the config,
runs, and writes its artefacts into the run directory."""

from __future__ import annotations

import csv
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

import mmfsar
from mmfsar.data.modalities import build_modalities
from mmfsar.errors import ConfigError, DataError
from mmfsar.fewshot.engine import file_sha256
from mmfsar.models.base import build_encoder, export_encoder, load_export
from mmfsar.utils import RankedLogger, instantiate_callbacks, instantiate_loggers, print_config_tree, task_wrapper
from mmfsar.utils.paths import PROJECT_ROOT
from mmfsar.utils.sweeps import check_sweep_objective

log = RankedLogger(__name__)


def _trainer(cfg: DictConfig, callbacks: list[L.Callback] = ()) -> tuple[L.Trainer, list[Logger]]:
    loggers = instantiate_loggers(cfg.get("logger"))
    extra = {}
    accelerator = cfg.trainer.get("accelerator")
    if cfg.trainer.get("sync_batchnorm") and (accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())):
        # torch's SyncBatchNorm is GPU-only: DDP would refuse any BatchNorm model (frame CNNs)
        log.warning("trainer.sync_batchnorm ignored on CPU (SyncBatchNorm needs GPUs); BatchNorm statistics stay per process")
        extra["sync_batchnorm"] = False
    trainer = instantiate(
        cfg.trainer, callbacks=instantiate_callbacks(cfg.get("callbacks")) + list(callbacks), logger=loggers or False, **extra
    )
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer, loggers


def _prepare(cfg: DictConfig) -> None:
    if cfg.get("print_config", True):
        print_config_tree(cfg, ("data", "modalities", "model", "trainer"), save_to=Path(cfg.paths.output_dir) / "config_tree.log")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)


@dataclass
class Training:
    """What a training run is made of, built from the config before anything is trained."""

    datamodule: L.LightningDataModule
    module: L.LightningModule
    modalities: dict[str, dict[str, Any]]  # the modality configs the data is read with
    callbacks: list[L.Callback]  # beyond the ``callbacks`` group (the frozen-output cache)


def build_training(cfg: DictConfig) -> Training:
    """Data and training module from the config (the ``model`` target's ``build(model_cfg,
    datamodule)``); every file check and the episode draw happen here, before training."""
    module_cls = get_class(cfg.model._target_)
    modality_cfgs = module_cls.modality_configs(cfg.model, cfg.modalities)
    datamodule = instantiate(cfg.data, modalities=build_modalities(modality_cfgs))
    datamodule.prepare_data()  # generates the synthetic data on first use (before DDP ranks start)
    datamodule.setup("fit")
    module = module_cls.build(cfg.model, datamodule)
    callbacks = [instantiate(cfg.cache)] if cfg.get("cache") else []
    return Training(datamodule, module, modality_cfgs, callbacks)


@task_wrapper
def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the ``model`` on the ``data`` module, then export the best checkpoint's encoder to
    ``encoder.pt``."""
    _prepare(cfg)
    run = build_training(cfg)
    trainer, loggers = _trainer(cfg, run.callbacks)
    log.info("training")
    trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if not trainer.is_global_zero:
        return metrics
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    score = trainer.checkpoint_callback.best_model_score if best else None
    val_acc = float(score) if score is not None else None
    if best:
        run.module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
        log.info(f"exporting the checkpoint {best} (val/acc {val_acc})")
    path = export_trained(cfg, run, best_checkpoint=best, val_acc=val_acc)
    log.info(f"exported encoder: {path}")
    if val_acc is not None:
        metrics["val/acc"] = val_acc  # the exported checkpoint's (a sweeper's objective), not the last epoch's
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            modalities = run.module.exported_encoder()[0].modalities
            name = f"{cfg.task_name}-{'-'.join(modalities)}-encoder"  # one artifact per modality of a sweep
            artifact = wandb.Artifact(name, type="model", metadata={"modalities": modalities})
            artifact.add_file(str(path))
            lg.experiment.log_artifact(artifact)
    metrics["encoder"] = str(path)
    return metrics


def export_trained(cfg: DictConfig, run: Training, *, best_checkpoint: str = "", val_acc: float | None = None) -> Path:
    """``encoder.pt`` of a training run: the module's exported encoder, the configs that rebuild
    and feed it, and where it came from."""
    encoder, encoder_cfg = run.module.exported_encoder()
    classifier, classifier_cfg = run.module.exported_classifier() or (None, None)
    return export_encoder(
        Path(cfg.paths.output_dir) / "encoder.pt",
        encoder,
        encoder_config=encoder_cfg,
        classifier=classifier,
        classifier_config=classifier_cfg,
        modalities={m: run.modalities[m] for m in encoder.modalities},
        frames=OmegaConf.to_container(cfg.data.frames, resolve=True),
        info={
            "task": cfg.task_name,
            "dataset": str(cfg.data.root),
            "checkpoint": best_checkpoint,
            "val_acc": val_acc,
            "code_version": code_version(),
        },
    )


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """N-way K-shot episodes of an exported encoder; writes results.json / results.csv.

    Everything that can be wrong with the inputs fails before any clip is encoded: the encoder
    file (missing, not an mmfsar export, weights that do not fit its config), the dataset (a
    modality the encoder needs and the dataset lacks, missing files) and the episodes (n_way
    larger than the number of classes, too few clips per class, an episode file of other clips).
    With ``fewshot.cache_dir`` the encoded features are kept on disk and a later run with the
    same encoder, data and view settings skips the encoder.
    """
    from mmfsar.fewshot import mean_confidence_interval

    check_sweep_objective(cfg)  # a searching sweeper may not optimise the accuracy on novel classes
    load_export(cfg.encoder)  # a missing or foreign file fails here, before any work
    _prepare(cfg)
    payload, datamodule, module = build_evaluation(cfg)
    episodes = datamodule.episodes
    encoder_sha256 = file_sha256(cfg.encoder)
    outcome = _solve(cfg, module, datamodule, payload, encoder_sha256)
    if outcome is None:  # a rank other than 0 of a distributed run
        return {}
    accuracy, loggers, features_file = outcome
    out_dir = Path(cfg.paths.output_dir)
    episode_file = out_dir / f"episodes_{episodes.settings.name}.json"
    mean, ci = mean_confidence_interval(accuracy)
    record = _record(cfg, module, episodes, mean, ci, encoder_sha256, episode_file, episodes.save(episode_file), features_file)
    _write_results(out_dir, record, accuracy)
    _log_results_wandb(loggers, record, accuracy)
    return record


def build_evaluation(cfg: DictConfig) -> tuple[dict[str, Any], L.LightningDataModule, Any]:
    """The export's payload, the few-shot data module (set up: files checked, episodes drawn)
    and the evaluation module of an ``eval`` config."""
    from mmfsar.tasks.evaluate import FewShotEvalModule, default_chunk

    payload = load_export(cfg.encoder)
    modalities = build_modalities(payload["modalities"])
    datamodule = instantiate(cfg.data, modalities=modalities, frames=instantiate(payload["frames"]))
    datamodule.prepare_data()
    _check_modalities(cfg.encoder, modalities, Path(cfg.data.root))
    datamodule.setup("test")  # missing files, impossible episodes, an episode file of other clips
    fs = cfg.fewshot
    encoder = build_encoder(payload)
    classifier = _eval_classifier(fs, payload, encoder, datamodule)
    if hasattr(classifier, "bind_classes"):  # a text-conditioned head (CLIP-MDMF): the evaluated classes' texts
        classifier.bind_classes(datamodule.episodes.class_names, root=cfg.data.root, encoder=encoder)
    module = FewShotEvalModule(
        encoder=encoder,
        classifier=classifier,
        views=fs.views,
        mask_ratio=fs.mask_ratio,
        mask_seed=fs.seed,
        chunk=fs.get("chunk") or default_chunk(len(datamodule.episodes)),
        progress=bool(cfg.trainer.get("enable_progress_bar", True)),
    )
    return payload, datamodule, module


def _eval_classifier(fs: DictConfig, payload: dict[str, Any], encoder: Any, datamodule: Any) -> Any:
    """``fewshot.classifier`` when one is chosen, else the classifier the export carries (an
    episodic run's matching head), else nearest centroid."""
    from mmfsar.fewshot import PrototypeClassifier, build_classifier
    from mmfsar.models.base import build_exported_classifier
    from mmfsar.tasks.common import probe_frames

    if fs.get("classifier") is not None:
        frames = probe_frames(encoder, datamodule.clips[0])
        return build_classifier(instantiate(fs.classifier), dim=encoder.feature_dim, num_frames=frames)
    return build_exported_classifier(payload) or PrototypeClassifier()


def _solve(
    cfg: DictConfig, module: Any, datamodule: Any, payload: dict[str, Any], encoder_sha256: str
) -> tuple[torch.Tensor, list[Logger], str | None] | None:
    """Per-episode accuracies, the loggers and the feature-cache file: features from the on-disk
    cache when ``fewshot.cache_dir`` has them (no encoder pass, this process solves every
    episode), else encoded by a ``trainer.test`` run (sharded under DDP; None on ranks > 0)."""
    from mmfsar.fewshot.engine import FeatureCache, feature_cache_key

    fs, episodes = cfg.fewshot, datamodule.episodes
    clip_ids = [r.clip_id for r in datamodule.clips.records]
    views = f" x {fs.views} masked views" if fs.views > 1 else ""
    cache, key, info = None, None, None
    if fs.get("cache_dir"):
        cache = FeatureCache(fs.cache_dir)
        key, info = feature_cache_key(
            encoder_file=cfg.encoder,
            encoder_sha256=encoder_sha256,
            dataset_root=cfg.data.root,
            annotation_file=cfg.data.get("annotation_file", "annotations.csv"),
            clip_ids=clip_ids,
            modalities=payload["modalities"],
            frames=payload["frames"],
            views=fs.views,
            mask_ratio=fs.mask_ratio,
            mask_seed=fs.seed,
            per_frame=module.per_frame,
            precision=str(cfg.trainer.get("precision", "32-true")),
        )
        cached = cache.load(key, info)
        if cached is not None:
            log.info(f"features of {len(clip_ids)} clips{views} read from {cache.path(key)}; solving {len(episodes)} episodes")
            loggers = instantiate_loggers(cfg.get("logger"))
            for lg in loggers:
                lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            return module.solve(cached, episodes, clip_ids), loggers, str(cache.path(key))
    trainer, loggers = _trainer(cfg)
    log.info(f"encoding {len(clip_ids)} clips{views} once, then solving {len(episodes)} episodes")
    trainer.test(module, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return None
    if cache is not None:
        log.info(f"features cached: {cache.save(key, info, module.features, clip_ids)}")
    return module.episode_accuracy, loggers, str(cache.path(key)) if cache is not None else None


@task_wrapper
def evaluate_protocol(cfg: DictConfig) -> dict[str, Any]:
    """A clip-level protocol (``eval_protocol.yaml``): linear evaluation or the one-shot protocol
    of one exported encoder, or of several (``encoder=[a.pt,b.pt]``: each stream's result and the
    multi-stream one, scores averaged); top-1 / top-5 on the test clips, results.json / .csv.

    The exports, their agreement (one temporal sampler, one definition per modality), the dataset's
    files and the protocol's classes are checked before any clip is encoded."""
    from mmfsar.tasks.protocol import ProtocolEncodeModule, check_protocol, protocol_scores, topk_accuracy

    files = [cfg.encoder] if isinstance(cfg.encoder, str) else list(cfg.encoder)
    if not files:
        raise ConfigError("encoder: give one exported encoder.pt or a list of them")
    payloads = [load_export(f) for f in files]
    _prepare(cfg)
    modality_cfgs: dict[str, Any] = {}
    for f, p in zip(files, payloads):
        if p["frames"] != payloads[0]["frames"]:
            raise ConfigError(f"{f} samples frames as {p['frames']}, {files[0]} as {payloads[0]['frames']}: "
                              "the streams of a multi-stream evaluation must read the same frames")  # fmt: skip
        for name, m in p["modalities"].items():
            if modality_cfgs.setdefault(name, m) != m:
                raise ConfigError(f"{f} reads modality {name!r} with other settings than an earlier encoder: {m} vs {modality_cfgs[name]}")
    modalities = build_modalities(modality_cfgs)
    datamodule = instantiate(cfg.data, modalities=modalities, frames=instantiate(payloads[0]["frames"]))
    datamodule.prepare_data()
    for f, p in zip(files, payloads):
        _check_modalities(f, {m: modalities[m] for m in p["modalities"]}, Path(cfg.data.root))
    datamodule.setup("test")
    classifier = instantiate(cfg.protocol.classifier)
    classes = datamodule.classes
    labels = torch.tensor([datamodule.clips.labels[r.label_name] for r in datamodule.clips.records])
    check_protocol(classifier, labels, datamodule.positions, classes, datamodule.protocol)
    module = ProtocolEncodeModule(encoders=[build_encoder(p) for p in payloads], reads=classifier.reads)
    trainer, loggers = _trainer(cfg)
    log.info(f"encoding {len(datamodule.clips)} clips of protocol {datamodule.protocol!r} with {len(files)} encoder(s)")
    trainer.test(module, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return {}
    test_labels = labels[datamodule.positions["test"]]
    streams, all_scores = [], []
    for f, p, feats in zip(files, payloads, module.features):
        scores = protocol_scores(classifier, feats, labels, datamodule.positions, len(classes))
        all_scores.append(scores)
        streams.append({"encoder": str(f), "modalities": list(p["modalities"]),
                        "top1": round(topk_accuracy(scores, test_labels, 1), 4), "top5": round(topk_accuracy(scores, test_labels, 5), 4)})  # fmt: skip
    combined = torch.stack(all_scores).mean(0)
    record = {
        "protocol": datamodule.protocol,
        "classifier": type(classifier).__name__,
        "streams": len(files),
        "top1": round(topk_accuracy(combined, test_labels, 1), 4),
        "top5": round(topk_accuracy(combined, test_labels, 5), 4),
        "test_clips": len(test_labels),
        "support_clips": len(datamodule.positions[classifier.support_subset]),
        "classes": len(set(test_labels.tolist())),
        "encoder": ", ".join(map(str, files)),
        "dataset": str(cfg.data.root),
        "code_version": code_version(),
    }
    out_dir = Path(cfg.paths.output_dir)
    (out_dir / "results.json").write_text(json.dumps({**record, "per_stream": streams}, indent=1))
    with (out_dir / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(record))
        w.writeheader()
        w.writerow(record)
    for st in streams if len(streams) > 1 else []:
        print(f"  {'+'.join(st['modalities'])}: top-1 {st['top1']:.2f}  top-5 {st['top5']:.2f}  [{st['encoder']}]")
    what = f"{len(files)} streams, averaged scores" if len(files) > 1 else "+".join(streams[0]["modalities"])
    print(f"protocol {record['protocol']} ({record['classifier']}, {what}): top-1 {record['top1']:.2f}  top-5 {record['top5']:.2f} "
          f"on {record['test_clips']} test clips of {record['classes']} classes")  # fmt: skip
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.experiment.summary.update({"top1": record["top1"], "top5": record["top5"]})
    return record


def _record(
    cfg: DictConfig,
    module: Any,
    episodes: Any,
    mean: float,
    ci: float,
    encoder_sha256: str,
    episode_file: Path,
    episode_sha256: str,
    features_file: str | None,
) -> dict[str, Any]:
    """The one-row summary of an evaluation (results.json / .csv, W&B, the sweep table)."""
    fs, settings = cfg.fewshot, episodes.settings
    return {
        "setting": f"{settings.n_way}-way {settings.k_shot}-shot",
        "n_way": settings.n_way,
        "k_shot": settings.k_shot,
        "n_query": settings.n_query,
        "episodes": settings.episodes,
        "seed": settings.seed,
        "split": fs.split,
        "domain": fs.domain,
        "classifier": type(module.classifier).__name__,
        "views": fs.views,
        "mask_ratio": fs.mask_ratio,
        "encoder": str(cfg.encoder),
        "encoder_sha256": encoder_sha256,
        "modalities": list(module.encoder.modalities),
        "dataset": str(cfg.data.root),
        "episode_file": str(episode_file),
        "episode_sha256": episode_sha256,
        "mean": round(float(mean), 4),
        "ci95": round(float(ci), 4),
        "features_cache": features_file,
        "code_version": code_version(),
    }


def _write_results(out_dir: Path, record: dict[str, Any], accuracy: torch.Tensor) -> None:
    """results.json (with the per-episode accuracies), results.csv, and the one-line summary."""
    from mmfsar.fewshot import format_mean_ci

    (out_dir / "results.json").write_text(json.dumps({**record, "per_episode": accuracy.tolist()}, indent=1))
    with (out_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(record))
        w.writeheader()
        w.writerow(record)
    views = f" x {record['views']} masked views" if record["views"] > 1 else ""
    print(
        f"{record['setting']} ({record['n_query']} queries, {record['episodes']} episodes, {record['classifier']}{views}) "
        f"on {record['split']}/{record['domain']}: {format_mean_ci(record['mean'], record['ci95'])}  [{record['encoder']}]"
    )


def _check_modalities(encoder_file: str, modalities: dict[str, Any], root: Path) -> None:
    """Every stream the encoder reads is in the dataset's ``meta.json`` (else a clear error)."""
    from mmfsar.data.meta import DatasetMeta

    meta = DatasetMeta.load(root)
    missing = [
        f"{name!r}" + (f" (stored as {m.stream!r})" if m.stream != name else "")
        for name, m in modalities.items()
        if m.stream not in meta.modalities
    ]
    if missing:
        raise DataError(
            f"the encoder {encoder_file} reads modality {', '.join(missing)} but the dataset {root} has no such "
            f"stream (meta.json lists {sorted(meta.modalities)}); evaluate an encoder of a modality the dataset has"
        )


def _log_results_wandb(loggers: list[Logger], record: dict[str, Any], accuracy: torch.Tensor) -> None:
    """W&B (``logger=wandb``): summary metrics, the setting as a one-row table, and a histogram
    of the per-episode accuracies (percent)."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            run = lg.experiment
            summary = {k: record[k] for k in ("setting", "episode_sha256")} | {"acc": record["mean"], "ci95": record["ci95"]}
            run.summary.update(summary)
            table = wandb.Table(columns=list(record), data=[[_cell(v) for v in record.values()]])
            run.log(
                {
                    "settings": table,
                    "per_episode_accuracy": wandb.Histogram((100 * accuracy).numpy(), num_bins=20),
                    "acc": record["mean"],
                    "ci95": record["ci95"],
                }
            )


def _cell(value: Any) -> Any:
    """A W&B table cell: lists (modalities) as text."""
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value


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

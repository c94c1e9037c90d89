"""Pieces every training module shares: building encoders from configs, episodic validation on
val classes, and the optimisation (``configs/model/optim``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from mmfsar.errors import ConfigError
from mmfsar.fewshot import PrototypeClassifier, mean_confidence_interval
from mmfsar.fewshot.engine import FeatureBank, episode_positions, solve_episodes
from mmfsar.models.base import EncoderOutput, plain_config


def modality_encoder_config(
    backbone: Mapping[str, Any],
    modality: str,
    inputs: Mapping[str, Any],
    num_classes: int = 0,
    head: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config of a :class:`~mmfsar.models.base.ModalityEncoder` on ``modality``: the
    backbone preset plus the ``inputs`` the data determines (``datamodule.encoder_inputs``:
    channels, size, frames, joints), and the classifier head (a ``_partial_`` config) when
    ``num_classes`` > 0. It is what the encoder is instantiated from *and* what its export
    stores, so the two cannot differ."""
    cfg = {
        "_target_": "mmfsar.models.base.ModalityEncoder",
        "modality": modality,
        "num_classes": num_classes,
        "backbone": {**{k: v for k, v in plain_config(backbone).items() if k != "_partial_"}, **inputs},
    }
    if num_classes and head is not None:
        cfg["head"] = plain_config(head)
    return cfg


def probe_frames(encoder: nn.Module, clip: Mapping[str, Any]) -> int:
    """Number of per-frame features T' the encoder produces on a clip (a dataset item)."""
    was = encoder.training
    encoder.eval()
    with torch.no_grad():
        t = encoder({m: clip[m][None] for m in encoder.modalities}).frames.shape[1]
    encoder.train(was)
    return t


@dataclass
class Optimization:
    """The optimiser and its per-step schedule (``configs/model/optim/*.yaml``).

    ``optimizer``: a partial optimiser (AdamW...) that receives the parameter groups; its
    ``weight_decay`` applies to weights, not to norms, biases and embeddings (timm's grouping).
    ``scheduler``: a partial of timm's ``CosineLRScheduler`` (or any timm scheduler), given the
    run's length: ``warmup_fraction`` of the steps of linear warm-up from lr / warm-up steps, then
    a cosine to ``min_lr_ratio`` · lr. ``scale_lr``: lr × total batch / 256 (MAE's rule).
    """

    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[..., Any] | None = None
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.01
    scale_lr: bool = False

    def build(self, module: L.LightningModule) -> dict[str, Any]:
        """``configure_optimizers``'s answer for the trainable parameters of ``module``."""
        from timm.optim import param_groups_weight_decay

        weight_decay = getattr(self.optimizer, "keywords", {}).get("weight_decay", 0.0)
        optimizer = self.optimizer(param_groups_weight_decay(module, weight_decay=weight_decay))
        trainer = module.trainer
        if self.scale_lr:
            batch = getattr(trainer.datamodule, "batch_size", 1) * trainer.world_size * trainer.accumulate_grad_batches
            for group in optimizer.param_groups:
                group["lr"] *= batch / 256
        if self.scheduler is None:
            return {"optimizer": optimizer}
        total = max(1, int(trainer.estimated_stepping_batches))
        warmup = min(total - 1, max(1, round(total * self.warmup_fraction))) if total > 1 else 0
        lr = optimizer.param_groups[0]["lr"]
        scheduler = self.scheduler(
            optimizer,
            t_initial=max(1, total - warmup),
            warmup_t=warmup,
            warmup_lr_init=lr / max(1, warmup),
            lr_min=lr * self.min_lr_ratio,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TrainingModule(L.LightningModule):
    """Base of the training stages.

    Validation encodes every val-class clip once with :meth:`validation_features` and solves the
    data module's fixed val episodes with :attr:`val_classifier` (a prototype classifier unless a
    subclass trains its own): ``val/acc`` (percent) and ``val/ci``. On a clip-level protocol
    (:class:`~mmfsar.data.datamodules.ProtocolDataModule`, no val episodes) ``val/acc`` is instead
    the top-1 accuracy of the module's classifier head on the protocol's test clips. A partial
    validation pass (``limit_val_batches``, ``fast_dev_run``) leaves clips unencoded: the episode
    metric is then skipped with a warning. Optimisation: :class:`Optimization`, stepped every
    optimiser step.
    """

    def __init__(self, *, optim: Optimization) -> None:
        super().__init__()
        self.optim = optim
        self._bank: FeatureBank | None = None

    def log_training(
        self,
        loss: Tensor,
        *,
        batch_size: int,
        terms: Mapping[str, Tensor] | None = None,
        accuracy: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """A training step's ``train/<term>`` values, ``train/loss`` (progress bar) and, given
        ``accuracy=(logits, labels)``, ``train/acc`` through the module's ``train_acc`` metric."""
        if accuracy is not None:
            self.train_acc(accuracy[0].detach(), accuracy[1])
        if terms:
            self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=batch_size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        if accuracy is not None:
            self.log("train/acc", self.train_acc, batch_size=batch_size)

    @property
    def val_classifier(self) -> nn.Module:
        """The few-shot classifier of validation: nearest centroid, unless the module trains one."""
        return PrototypeClassifier()

    @classmethod
    def modality_configs(cls, model_cfg: DictConfig, modalities: DictConfig) -> dict[str, dict[str, Any]]:
        """The modality configs the data module must load (default: the configured ones).

        Modules built on exported encoders override this to add the modalities those were
        trained on, with the exact input pipeline stored in the export."""
        return plain_config(modalities) or {}

    def exported_encoder(self) -> tuple[nn.Module, dict[str, Any]]:
        """The clip encoder this stage trains and the config that rebuilds it (for ``encoder.pt``)."""
        raise NotImplementedError

    def exported_classifier(self) -> tuple[nn.Module, dict[str, Any]] | None:
        """A few-shot classifier trained with the encoder (a matching head) and its config, if any."""
        return None

    # --- frozen models (cached by mmfsar.tasks.frozen_cache.FrozenOutputCache) ----------------
    def frozen_models(self) -> dict[str, nn.Module]:
        """Frozen clip encoders whose outputs the training step needs (teachers...); none here."""
        return {}

    @property
    def trained_modalities(self) -> list[str]:
        """Input streams the trained part reads at each step (the rest can come from a cache)."""
        raise NotImplementedError

    # --- validation: encode once, then episodes --------------------------------------------------
    def setup(self, stage: str) -> None:
        """Refuse, before training, a partial validation whose missing ``val/acc`` a checkpoint
        callback would need after the first validation (``fast_dev_run`` disables checkpoints)."""
        trainer = self.trainer
        if stage != "fit" or trainer.fast_dev_run or not _partial_validation(
            trainer, len(trainer.datamodule.val_set), trainer.datamodule.eval_batch_size
        ):
            return
        monitors = [c.monitor for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == "val/acc"]
        if monitors:
            raise ConfigError(
                f"trainer.limit_val_batches={trainer.limit_val_batches} validates on part of the val clips, but val/acc "
                "needs every val clip encoded and the checkpoint callback monitors it: use +trainer.fast_dev_run=true "
                "for a smoke test, validate less often with trainer.check_val_every_n_epoch, or drop the monitor with "
                "callbacks.model_checkpoint.monitor=null"
            )

    def validation_features(self, batch: dict[str, Any]) -> EncoderOutput:
        raise NotImplementedError

    def on_validation_epoch_start(self) -> None:
        self._bank = FeatureBank(len(self.trainer.datamodule.val_set))
        self._correct = torch.zeros(2, device=self.device)  # (top-1 hits, clips) of a clip-level protocol

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.validation_features(batch)
        if self.trainer.datamodule.val_episodes is None:  # a clip-level protocol: the module's own classifier
            if out.logits is None:
                raise ConfigError(f"{type(self).__name__} has no classifier head to score a clip-level protocol's test clips")
            self._correct += torch.stack([(out.logits.argmax(-1) == batch["label"]).sum(), self._correct.new_tensor(len(batch["label"]))])
            return
        features = out.frames if getattr(self.val_classifier, "uses_frames", False) else out.pooled[:, None]
        self._bank.add(batch["index"], features[:, None])

    def on_validation_epoch_end(self) -> None:
        bank, self._bank = self._bank, None
        dm = self.trainer.datamodule
        if self.trainer.sanity_checking:
            return
        if dm.val_episodes is None:
            hits, clips = self.all_gather(self._correct).reshape(-1, 2).sum(0).tolist()
            self.log("val/acc", 100.0 * hits / max(clips, 1), prog_bar=True, sync_dist=False)
            return
        if _partial_validation(self.trainer, len(dm.val_set), dm.eval_batch_size):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                "validation ran on part of the val clips (limit_val_batches / fast_dev_run): val/acc needs "
                "every val clip encoded and is not computed in this run"
            )
            return
        feats = bank.gather(self.all_gather, self.trainer.world_size)
        episodes = dm.val_episodes
        positions = episode_positions(episodes, [r.clip_id for r in dm.val_set.records]).to(feats.device)
        acc = solve_episodes(self.val_classifier, feats, positions, episodes.settings.k_shot, classes=episodes.classes)
        mean, ci = mean_confidence_interval(acc)
        self.log_dict({"val/acc": mean, "val/ci": ci}, prog_bar=True, sync_dist=False)

    # --- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        return self.optim.build(self)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)


def _partial_validation(trainer: L.Trainer, clips: int, batch_size: int) -> bool:
    """Whether Lightning was told to run only part of the validation loader."""
    limit = trainer.limit_val_batches
    if isinstance(limit, float):
        return limit < 1.0 or bool(trainer.fast_dev_run)
    return bool(trainer.fast_dev_run) or limit * batch_size * trainer.world_size < clips


def frozen_module_outputs(
    models: Mapping[str, nn.Module], inputs: dict[str, torch.Tensor], **kwargs: Any
) -> dict[str, EncoderOutput]:
    """Outputs of frozen clip encoders: ``eval()``, ``inference_mode``, bf16 on GPU, returned as
    ordinary float tensors (inference tensors cannot enter an autograd graph)."""
    from dataclasses import fields

    device = next(iter(inputs.values())).device
    out = {}
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for name, model in models.items():
            out[name] = model.eval()(inputs, **kwargs)
    copied = {}
    for name, o in out.items():
        values = {f.name: getattr(o, f.name) for f in fields(o)}
        copied[name] = EncoderOutput(**{k: v.float().clone() if torch.is_tensor(v) else v for k, v in values.items()})
    return copied

"""Pieces every training module shares: building encoders from configs, episodic validation on
val classes, and the optimiser / schedule."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mmfsar.fewshot import PrototypeClassifier, mean_confidence_interval, solve_episodes
from mmfsar.fewshot.engine import FeatureBank, episode_positions
from mmfsar.models.base import EncoderOutput


def to_plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def modality_encoder_config(
    backbone: Mapping[str, Any],
    modality: str,
    inputs: Mapping[str, Any],
    num_classes: int = 0,
    head: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Hydra config of a :class:`ModalityEncoder` on ``modality``: the backbone preset plus the
    input-dependent arguments (channels, size, frames, joints) that the data determines, and the
    classifier head (a ``_partial_`` config) when ``num_classes`` > 0."""
    backbone = {k: v for k, v in to_plain(backbone).items() if k != "_partial_"}
    cfg = {
        "_target_": "mmfsar.models.base.ModalityEncoder",
        "modality": modality,
        "num_classes": num_classes,
        "backbone": {**backbone, **inputs},
    }
    if num_classes and head is not None:
        cfg["head"] = to_plain(head)
    return cfg


def encoder_inputs(datamodule: Any, modality: str) -> dict[str, Any]:
    """Keyword arguments for an encoder of ``modality`` on this data module's clips."""
    datamodule.channels  # opens the dataset and binds the modalities
    return {"num_frames": datamodule.frames.num_frames, **datamodule.modalities[modality].encoder_inputs()}


def probe_frames(encoder: nn.Module, datamodule: Any) -> int:
    """Number of per-frame features T' the encoder produces on this data (one dummy clip)."""
    ds = datamodule.val_set
    item = ds[0]
    inputs = {m: item[m][None] for m in encoder.modalities}
    with torch.no_grad():
        was = encoder.training
        encoder.eval()
        t = encoder(inputs).frames.shape[1]
        encoder.train(was)
    return t


class WarmupCosine:
    """Linear warm-up then cosine decay to ``min_lr_ratio``, as a LambdaLR multiplier per step."""

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
        self.total, self.warmup, self.floor = max(1, total_steps), warmup_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_fraction: float = 0.1, min_lr_ratio: float = 0.01
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, int(round(total_steps * warmup_fraction)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup, min_lr_ratio))


class TrainingModule(L.LightningModule):
    """Base of the training stages.

    Validation encodes every val-class clip once with :meth:`validation_features` and solves the
    data module's fixed val episodes with a prototype classifier: ``val/acc`` (percent) and
    ``val/ci``. Optimiser: the ``optimizer`` partial (AdamW by default) on the trainable
    parameters, no weight decay on norms, biases and embeddings (timm's grouping), lr scaled by
    ``total batch / 256`` when ``scale_lr``, then the ``scheduler`` partial per step.
    """

    def __init__(
        self,
        *,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scale_lr: bool = False,
        weight_decay: float = 0.05,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scale_lr = scale_lr
        self.weight_decay = weight_decay
        self.val_classifier = PrototypeClassifier()
        self._bank: FeatureBank | None = None

    @classmethod
    def modality_configs(cls, model_cfg: DictConfig, modalities: DictConfig) -> dict[str, dict[str, Any]]:
        """The modality configs the data module must load (default: the configured ones).

        Modules built on exported encoders override this to add the modalities those were
        trained on, with the exact input pipeline stored in the export."""
        return to_plain(modalities) or {}

    # --- validation: encode once, then episodes --------------------------------------------------
    def validation_features(self, batch: dict[str, Any]) -> EncoderOutput:
        raise NotImplementedError

    def on_validation_epoch_start(self) -> None:
        self._bank = FeatureBank(len(self.trainer.datamodule.val_set))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._bank.add(batch["index"], self.validation_features(batch).pooled[:, None])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        dm = self.trainer.datamodule
        feats = self._bank.gather(self.all_gather, self.trainer.world_size)[:, 0]
        episodes = dm.val_episodes
        positions = episode_positions(episodes, [r.clip_id for r in dm.val_set.records])
        acc = solve_episodes(self.val_classifier, feats, positions.to(feats.device), episodes.settings.k_shot)
        mean, ci = mean_confidence_interval(acc)
        self.log_dict({"val/acc": mean, "val/ci": ci}, prog_bar=True, sync_dist=False)
        self._bank = None

    # --- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        from timm.optim import param_groups_weight_decay

        groups = param_groups_weight_decay(self, weight_decay=self.weight_decay)
        optimizer = self.optimizer_factory(groups)
        if self.scale_lr:
            t = self.trainer
            total_batch = t.datamodule.batch_size * t.world_size * t.accumulate_grad_batches
            for g in optimizer.param_groups:
                g["lr"] *= total_batch / 256
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class OutputCache:
    """Outputs (pooled, frames, logits) of a frozen encoder for every clip of a training set,
    computed once and looked up by dataset index; with several passes (augmented views), a
    lookup takes the given pass of each clip, or one at random."""

    def __init__(self, pooled: torch.Tensor, frames: torch.Tensor, logits: torch.Tensor | None) -> None:
        self.pooled, self.frames, self.logits = pooled, frames, logits  # (passes, N, ...)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        encode: Callable[[dict[str, torch.Tensor]], dict[str, EncoderOutput]],
        loaders: Sequence[Any],
        modalities: list[str],
        device: torch.device,
        *,
        desc: str = "caching encoder outputs",
    ) -> dict[str, "OutputCache"]:
        """Run ``encode`` (inputs -> outputs by name) over loaders of the same clips. A batch's
        rows belong to the pass in its ``"view"`` entry if it has one (a loader of every view,
        :meth:`~mmfsar.data.datamodules.TrainingDataModule.training_views`), else to the
        loader's number; every pass must cover every clip once."""
        from tqdm.auto import tqdm

        size = len(loaders[0].dataset)
        chunks: dict[str, list[tuple[torch.Tensor, torch.Tensor, EncoderOutput]]] = {}
        with tqdm(total=sum(len(loader) for loader in loaders), desc=desc, leave=False) as bar:
            for number, loader in enumerate(loaders):
                for batch in loader:
                    index = batch["index"]
                    passes = batch["view"] if "view" in batch else torch.full_like(index, number)
                    for name, out in encode({m: batch[m].to(device) for m in modalities}).items():
                        chunks.setdefault(name, []).append((passes, index, out))
                    bar.update()
        out = {}
        for name, parts in chunks.items():
            count = int(max(p.max() for p, _, _ in parts)) + 1
            fields = [_stack_pass([(i[p == n], _rows(o, p == n)) for p, i, o in parts], size) for n in range(count)]
            out[name] = cls(*(None if f[0] is None else torch.stack(f) for f in zip(*fields)))
        return out

    @property
    def passes(self) -> int:
        return self.pooled.shape[0]

    def lookup(self, index: torch.Tensor, passes: torch.Tensor | None = None) -> EncoderOutput:
        """Outputs of the clips at ``index``, from the given passes (default: random ones)."""
        i = index.cpu()
        p = torch.randint(0, self.passes, i.shape) if passes is None else passes.cpu()
        pick = lambda t: None if t is None else t[p, i]  # noqa: E731
        return EncoderOutput(pooled=pick(self.pooled), frames=pick(self.frames), logits=pick(self.logits))


def _rows(out: EncoderOutput, keep: torch.Tensor) -> EncoderOutput:
    keep = keep.to(out.pooled.device)
    pick = lambda t: None if t is None else t[keep]  # noqa: E731
    return EncoderOutput(pooled=pick(out.pooled), frames=pick(out.frames), logits=pick(out.logits))


def _stack_pass(batches: list[tuple[torch.Tensor, EncoderOutput]], size: int) -> tuple:
    index = torch.cat([i for i, _ in batches])
    if len(index) != size or len(index.unique()) != size:
        raise RuntimeError(f"output cache: {len(index.unique())} of {size} clips encoded")
    order = index.argsort()

    def stack(field: str) -> torch.Tensor | None:
        values = [getattr(o, field) for _, o in batches]
        return None if values[0] is None else torch.cat([v.float().cpu() for v in values])[order]

    return stack("pooled"), stack("frames"), stack("logits")


def concat_outputs(outputs: list[EncoderOutput], device: torch.device) -> EncoderOutput:
    """Concatenate outputs of several batch parts along the batch."""

    def cat(field: str) -> torch.Tensor | None:
        values = [getattr(o, field) for o in outputs]
        return None if values[0] is None else torch.cat(values).to(device)

    return EncoderOutput(pooled=cat("pooled"), frames=cat("frames"), logits=cat("logits"))


def build_partial(cfg: Any) -> Any:
    """Instantiate a ``_partial_: true`` config node (or pass None through)."""
    return None if cfg is None else instantiate(cfg)

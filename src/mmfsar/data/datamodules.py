"""LightningDataModules of the three stages.

* :class:`TrainingDataModule` (aliases :class:`PretrainDataModule`, :class:`DistillDataModule`):
  labelled **source** clips and/or unlabelled **target** clips of the **base** classes for
  training, and all clips of the **val** classes (one domain) with a fixed episode set for
  validation. It has no way to reach novel classes.
* :class:`FewShotDataModule`: the clips of the **novel** (or, on request, val) classes of one
  domain, plus the episode set over them; used by evaluation only.

Both check, in ``setup``, that every file the selected clips need exists and opens (each video
container and ``.npy`` header is read for the stored frame count), that each clip's frame range
lies within it, and that the episodes can be drawn: before any training step, naming each clip and
file at fault.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmfsar.data.dataset import ClipDataset, ClipViews
from mmfsar.data.episodes import EpisodeSampler, EpisodeSet, EpisodeSettings, TaskDataset, TaskSampler
from mmfsar.errors import ConfigError, DataError
from mmfsar.data.meta import ANNOTATION_FILE, PROTOCOL_SUBSETS, ClipRecord, DatasetFolder, read_protocol
from mmfsar.data.modalities import Modality
from mmfsar.data.transforms import ClipAugmentation, UniformSegments
from mmfsar.data.validate import clip_problems

log = logging.getLogger(__name__)


class ClipDataModule(L.LightningDataModule):
    """Shared machinery: dataset folder, synthetic generation on first use, modalities, loaders.

    Args:
        root: dataset folder (see DATA_STRUCTURE.md).
        modalities: modality plug-ins by name (bound to the dataset in ``setup``).
        frames: temporal sampler; augmentation: spatial augmentation for training clips.
        generator: synthetic-generator settings; when given, the dataset is generated at ``root``
            on first use (``prepare_data``, rank 0 only).
        batch_size / eval_batch_size / num_workers: loader settings.
        pin_memory: pin the loaders' batches (None: when the trainer runs on a CUDA device).
    """

    def __init__(
        self,
        *,
        root: str | Path,
        modalities: Mapping[str, Modality],
        frames: UniformSegments | None = None,
        augmentation: ClipAugmentation | None = None,
        annotation_file: str = ANNOTATION_FILE,
        generator: Mapping[str, Any] | None = None,
        source_domain: str = "source",
        target_domain: str = "target",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if not modalities:
            raise ConfigError("no modality selected (config key `modality`)")
        self.root = Path(root)
        self.modalities = dict(modalities)
        self.frames = frames or UniformSegments()
        self.augmentation = augmentation or ClipAugmentation()
        self.annotation_file = annotation_file
        self.generator = dict(generator) if generator else None
        self.source_domain = source_domain
        self.target_domain = target_domain
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.folder: DatasetFolder | None = None

    def prepare_data(self) -> None:
        if self.generator is not None:
            from mmfsar.data.synthetic import ensure_synthetic

            ensure_synthetic(self.root, self.generator)

    def _open(self) -> DatasetFolder:
        if self.folder is None:
            self.folder = DatasetFolder.open(self.root, self.annotation_file)
            for m in self.modalities.values():
                m.bind(self.folder)
        return self.folder

    @property
    def channels(self) -> dict[str, int]:
        """Input channels per modality (known once the dataset is open)."""
        self._open()
        return {k: m.channels for k, m in self.modalities.items()}

    def encoder_inputs(self, modality: str) -> dict[str, Any]:
        """Keyword arguments a new encoder of ``modality`` needs to read this data's clips."""
        self._open()
        return {"num_frames": self.frames.num_frames, **self.modalities[modality].encoder_inputs()}

    def _dataset(self, records: list[ClipRecord], *, train: bool, labels: Mapping[str, int] | None) -> ClipDataset:
        problems = clip_problems(records, self.modalities, limit=20)
        if problems:
            raise DataError(f"{self.root}: {len(problems)}{'+' if len(problems) == 20 else ''} problems with the files:\n" + "\n".join(problems))
        size = self.folder.meta.frame_size
        return ClipDataset(
            records,
            self.modalities,
            self.frames,
            train=train,
            labels=labels,
            augmentation=self.augmentation,
            aspect=size[1] / size[0] if size else 1.0,
        )

    def _pinned(self) -> bool:
        if self.pin_memory is not None:
            return self.pin_memory
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def _loader(self, dataset: ClipDataset, *, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train and len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._pinned(),
        )

    def _episodes(self, records: list[ClipRecord], settings: EpisodeSettings, split: str, domain: str, key: str) -> EpisodeSet:
        """The episode set over ``records`` (the clips of ``split`` in ``domain``); errors name the
        classes at fault and the config node ``key`` of the settings."""
        try:
            sampler = EpisodeSampler(
                [r.clip_id for r in records],
                [r.label_name for r in records],
                settings,
                classes=self.folder.meta.classes_of(split),
                key=key,
            )
        except DataError as exc:
            raise DataError(f"{split} episodes, domain {domain!r} ({self.root}): {exc}") from None
        return sampler.sample()


class TrainingDataModule(ClipDataModule):
    """Base-class clips for training, val-class episodes for validation.

    Args:
        labelled_source: train on labelled source-domain clips of the base classes.
        unlabelled_target: train on target-domain clips of the base classes, without labels.
        val_domain: domain of the validation clips (val classes).
        val_episodes: episode settings for validation (n_way, k_shot, n_query, episodes, seed).
        train_episodes: episodic training (``model.episodes``): each training batch is one N-way
            K-shot Q-query task (n_way, k_shot, n_query, ``episodes`` = tasks per epoch, seed) of
            labelled source clips of the base classes (:class:`~mmfsar.data.episodes.TaskDataset`),
            sharded over DDP ranks by task; None: batches of clips.

    The train loader yields ``{"source": batch, "target": batch}`` (whichever are enabled,
    cycling the shorter one). In episodic training ``"source"`` is one task and ``"target"`` (with
    ``unlabelled_target``) a batch of unlabelled target clips.
    """

    def __init__(
        self,
        *,
        labelled_source: bool = True,
        unlabelled_target: bool = False,
        val_domain: str = "target",
        val_episodes: Mapping[str, int] | None = None,
        train_episodes: Mapping[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if train_episodes is not None and not labelled_source:
            raise ConfigError("episodic training (model.episodes) draws tasks from labelled source clips: "
                              "set data.labelled_source=true")  # fmt: skip
        if not (labelled_source or unlabelled_target):
            raise ConfigError("data: enable labelled_source and/or unlabelled_target, or there is nothing to train on")
        self.labelled_source = labelled_source
        self.unlabelled_target = unlabelled_target
        self.val_domain = val_domain
        self.val_settings = EpisodeSettings(**(val_episodes or {"n_way": 5, "k_shot": 1, "n_query": 5, "episodes": 200}))
        self.task_settings = EpisodeSettings(**train_episodes) if train_episodes is not None else None
        self.train_sets: dict[str, ClipDataset] = {}
        self.tasks: TaskDataset | None = None
        self.val_set: ClipDataset | None = None
        self.val_episodes: EpisodeSet | None = None

    @property
    def base_classes(self) -> list[str]:
        return self._open().meta.classes_of("base")

    def setup(self, stage: str | None = None) -> None:
        if self.train_sets:
            return
        folder = self._open()
        labels = {c: i for i, c in enumerate(self.base_classes)}
        if self.labelled_source:
            recs = folder.select(splits=["base"], domains=[self.source_domain])
            if not recs:
                raise DataError(f"{self.root}: no base-class clips in domain {self.source_domain!r}")
            self.train_sets["source"] = self._dataset(recs, train=True, labels=labels)
            if self.task_settings is not None:  # a class too small for the tasks fails here, named
                try:
                    self.tasks = TaskDataset(self.train_sets["source"], [r.label_name for r in recs], self.task_settings)
                except DataError as exc:
                    raise DataError(f"training tasks, base classes of domain {self.source_domain!r} ({self.root}): {exc}") from None
        if self.unlabelled_target:
            recs = folder.select(splits=["base"], domains=[self.target_domain])
            if not recs:
                raise DataError(f"{self.root}: no base-class clips in domain {self.target_domain!r}")
            self.train_sets["target"] = self._dataset(recs, train=True, labels=None)
        val = folder.select(splits=["val"], domains=[self.val_domain])
        self.val_episodes = self._episodes(val, self.val_settings, "val", self.val_domain, "data.val_episodes")
        self.val_set = self._dataset(val, train=False, labels={c: i for i, c in enumerate(folder.meta.classes_of("val"))})
        log.info(
            "training clips: %s; validation: %d clips of %d val classes, %d episodes",
            {k: len(v) for k, v in self.train_sets.items()},
            len(val),
            len(self.val_episodes.class_names),
            len(self.val_episodes),
        )

    def frozen_loader(self, key: str, modalities: list[str], *, views: int, seed: int) -> DataLoader:
        """The training clips of ``key`` ("source" / "target") with the given modalities, in
        dataset order, for encoding them once with frozen models: each clip's deterministic
        evaluation view (``views=0``), or every one of its ``views`` seeded augmented views, a
        clip's views together (each stream read once for all of them), batches carrying ``"view"``."""
        ds = self.train_sets[key]
        if not views:
            return self._loader(self._subset(ds, modalities, train=False), train=False)
        clip_views = ClipViews(self._subset(ds, modalities, train=True, views=views, seed=seed))
        return DataLoader(
            clip_views,
            batch_size=max(1, self.eval_batch_size // views),
            collate_fn=ClipViews.collate,
            num_workers=self.num_workers,
            pin_memory=self._pinned(),
        )

    def configure_training(self, *, views: int, seed: int, modalities: list[str]) -> None:
        """From now on, training batches carry only ``modalities`` (the others come from a cache)
        and, with ``views > 0``, each clip is drawn from its ``views`` fixed seeded views (the
        batch says which in ``"view"``). Call it before the training loaders are built (their
        persistent workers keep a copy of the training sets)."""
        for ds in self.train_sets.values():
            ds.modalities = {m: self.modalities[m] for m in modalities}
            ds.views, ds.view_seed = views, seed

    def _subset(self, ds: ClipDataset, modalities: list[str], *, train: bool, views: int = 0, seed: int = 0) -> ClipDataset:
        return ClipDataset(
            ds.records,
            {m: self.modalities[m] for m in modalities},
            self.frames,
            train=train,
            labels=ds.labels,
            augmentation=self.augmentation,
            aspect=ds.aspect,
            views=views,
            view_seed=seed,
        )

    def train_dataloader(self) -> dict[str, DataLoader]:
        if self.tasks is None:
            return {k: self._loader(ds, train=True) for k, ds in self.train_sets.items()}
        trainer = self.trainer
        sampler = TaskSampler(
            self.task_settings.episodes,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )
        loader = DataLoader(
            self.tasks,
            sampler=sampler,
            batch_size=None,  # an item is a whole task
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._pinned(),
        )
        loaders = {"source": loader}
        if "target" in self.train_sets:
            loaders["target"] = self._loader(self.train_sets["target"], train=True)
        return loaders

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)


class PretrainDataModule(TrainingDataModule):
    """Stage 1: labelled source clips (+ unlabelled target clips for target reconstruction)."""


class DistillDataModule(TrainingDataModule):
    """Stage 2: unlabelled target clips (MM-CDFSL) and/or labelled source clips (Lite-MKD)."""

    def __init__(self, *, labelled_source: bool = False, unlabelled_target: bool = True, **kwargs: Any) -> None:
        super().__init__(labelled_source=labelled_source, unlabelled_target=unlabelled_target, **kwargs)


class FewShotDataModule(ClipDataModule):
    """Clips of the novel (or val) classes of one domain, and the episodes over them.

    ``episode_file``: load the episodes from this file instead of drawing them (its clips must
    belong to the split). The test loader lists every clip of the split once, in clip-id order.
    """

    def __init__(
        self,
        *,
        split: str = "novel",
        domain: str = "target",
        episodes: Mapping[str, int] | None = None,
        episode_file: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if split not in ("novel", "val"):
            raise ConfigError(f"fewshot.split must be 'novel' or 'val', got {split!r}")
        self.split = split
        self.domain = domain
        self.settings = EpisodeSettings(**(episodes or {}))
        self.episode_file = Path(episode_file) if episode_file else None
        self.clips: ClipDataset | None = None
        self.episodes: EpisodeSet | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.clips is not None:
            return
        folder = self._open()
        recs = folder.select(splits=[self.split], domains=[self.domain])
        if not recs:
            raise DataError(f"{self.root}: no clips of split {self.split!r} in domain {self.domain!r}")
        if self.episode_file is not None:
            self.episodes = EpisodeSet.load(self.episode_file)
            self.episodes.check_clips([r.clip_id for r in recs])
        else:
            self.episodes = self._episodes(recs, self.settings, self.split, self.domain, "fewshot")
        wanted = set(self.episodes.clip_ids)
        recs = [r for r in recs if r.clip_id in wanted]
        labels = {c: i for i, c in enumerate(folder.meta.classes_of(self.split))}
        self.clips = self._dataset(recs, train=False, labels=labels)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.clips, train=False)


class ProtocolDataModule(TrainingDataModule):
    """The clips of a clip-level protocol (:func:`~mmfsar.data.meta.read_protocol`: NTU
    cross-subject / cross-view / cross-setup, NTU-120 one-shot, the synthetic dataset's ``xsub`` /
    ``xdomain`` / ``oneshot``), for supervised training and its evaluation.

    Training: the protocol's ``train`` clips, labelled by class (every class of the protocol's
    clips, in ``meta.json`` order, whatever its few-shot split); validation: its ``test`` clips,
    scored by the training module's classifier head (``val/acc`` = top-1, no episodes).
    Evaluation (``lit_main_eval.py --config-name eval_protocol``): :attr:`clips` lists every clip
    of the protocol once, unaugmented, in clip-id order, and :attr:`positions` says which of them
    belong to each subset (``train``, ``test``, ``exemplar``).

    Args:
        protocol: the protocol's name in ``meta.json`` ``protocols``.
        val_episodes / train_episodes / unlabelled_target: not applicable to a clip-level protocol
            (set them null / false; an error says so otherwise). ``val_domain`` is unused.
    """

    def __init__(self, *, protocol: str, **kwargs: Any) -> None:
        for key, off in (("val_episodes", None), ("train_episodes", None), ("unlabelled_target", False)):
            if kwargs.get(key, off) not in (off,):
                raise ConfigError(
                    f"data.{key}={kwargs[key]!r}: a clip-level protocol ({protocol!r}) trains on labelled clips and "
                    f"validates on its test clips; set data.{key}={'null' if off is None else 'false'}"
                )
        kwargs["val_episodes"] = {"n_way": 1, "k_shot": 1, "n_query": 1, "episodes": 1}  # unused: no val episodes
        super().__init__(**kwargs)
        self.protocol = protocol
        self.classes: list[str] = []
        self.clips: ClipDataset | None = None
        self.positions: dict[str, torch.Tensor] = {}

    @property
    def base_classes(self) -> list[str]:
        if not self.classes:
            self.setup()
        return self.classes

    def setup(self, stage: str | None = None) -> None:
        if self.clips is not None:
            return
        folder = self._open()
        subsets = read_protocol(self.root, folder.meta, self.protocol)
        records = {r.clip_id: r for r in folder.records}
        unknown = sorted(c for c in subsets if c not in records)
        if unknown:
            raise DataError(
                f"protocol {self.protocol!r} of {self.root}: {len(unknown)} clips not in {self.annotation_file}, e.g. {unknown[:5]}"
            )
        for needed in ("train", "test"):
            if needed not in subsets.values():
                raise DataError(f"protocol {self.protocol!r} of {self.root} has no {needed} clips")
        recs = sorted((records[c] for c in subsets), key=lambda r: r.clip_id)
        present = {r.label_name for r in recs}
        self.classes = [c for c in folder.meta.classes_of_all() if c in present]
        labels = {c: i for i, c in enumerate(self.classes)}
        self.clips = self._dataset(recs, train=False, labels=labels)  # checks every file once
        subset_of = [subsets[r.clip_id] for r in recs]
        self.positions = {
            s: torch.tensor([i for i, x in enumerate(subset_of) if x == s]) for s in PROTOCOL_SUBSETS if s in subset_of
        }
        train = [r for r, s in zip(recs, subset_of) if s == "train"]
        self.train_sets = {"source": ClipDataset(train, self.modalities, self.frames, train=True, labels=labels,
                                                 augmentation=self.augmentation, aspect=self.clips.aspect)}  # fmt: skip
        self.val_set = ClipDataset([r for r, s in zip(recs, subset_of) if s == "test"], self.modalities, self.frames,
                                   train=False, labels=labels, aspect=self.clips.aspect)  # fmt: skip
        self.val_episodes = None
        log.info("protocol %s: %s clips, %d classes", self.protocol, {k: len(v) for k, v in self.positions.items()}, len(self.classes))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.clips, train=False)

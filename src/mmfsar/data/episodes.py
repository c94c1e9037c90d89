"""N-way K-shot Q-query episodes: generated from a seed, saved as a file, sharded across ranks.

An episode set is a pure function of ``(clips and their classes, n_way, k_shot, n_query,
episodes, seed)``. Episode *e* draws from its own RNG seeded with ``(seed, e)``, so it is the same
whatever else runs and however the list is sharded. Clips are referred to by clip id in the saved
file, so the file stays valid whatever order a loader lists the clips in.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, default_collate

from mmfsar.errors import ConfigError, DataError

EPISODE_FORMAT = 1


@dataclass(frozen=True)
class EpisodeSettings:
    n_way: int = 5
    k_shot: int = 1
    n_query: int = 15
    episodes: int = 600
    seed: int = 0

    def check(self, key: str = "fewshot") -> None:
        """``key``: the config node these settings come from, named in the error."""
        for name in ("n_way", "k_shot", "n_query", "episodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def name(self) -> str:
        return f"{self.n_way}way_{self.k_shot}shot_{self.n_query}query_{self.episodes}ep_seed{self.seed}"


class EpisodeSet:
    """Episodes over a fixed list of clips.

    ``clip_ids[i]`` / ``class_names[c]`` name the clips and classes; ``tensor`` is an int64 tensor
    (E, N, K + Q) of clip positions: for each episode and way, K support then Q query clips.
    ``classes`` (E, N) holds the class position of each way.
    """

    def __init__(
        self,
        settings: EpisodeSettings,
        clip_ids: Sequence[str],
        class_names: Sequence[str],
        tensor: torch.Tensor,
        classes: torch.Tensor,
    ) -> None:
        self.settings = settings
        self.clip_ids = list(clip_ids)
        self.class_names = list(class_names)
        self.tensor = tensor
        self.classes = classes

    def __len__(self) -> int:
        return self.tensor.shape[0]

    @property
    def support(self) -> torch.Tensor:
        """(E, N, K) clip positions."""
        return self.tensor[..., : self.settings.k_shot]

    @property
    def query(self) -> torch.Tensor:
        """(E, N, Q) clip positions."""
        return self.tensor[..., self.settings.k_shot :]

    def shard(self, rank: int, world_size: int) -> torch.Tensor:
        """Episode numbers of ``rank``: e = rank, rank + W, ... (the union over ranks is all)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        return torch.arange(rank, len(self), world_size)

    def to_dict(self) -> dict:
        return {
            "format": EPISODE_FORMAT,
            "settings": vars(self.settings),
            "clip_ids": self.clip_ids,
            "class_names": self.class_names,
            "episodes": self.tensor.tolist(),
            "classes": self.classes.tolist(),
        }

    @property
    def hash(self) -> str:
        """sha256 of the canonical content: two files with the same hash hold the same episodes."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def save(self, path: str | Path) -> str:
        """Write the episode file (atomically); returns its content hash."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        data["sha256"] = self.hash
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        tmp.replace(path)
        return data["sha256"]

    @classmethod
    def load(cls, path: str | Path) -> "EpisodeSet":
        path = Path(path)
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DataError(f"episode file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"episode file {path} is not valid JSON: {exc}") from exc
        if data.get("format") != EPISODE_FORMAT:
            raise DataError(f"episode file {path}: unsupported format {data.get('format')!r}")
        out = cls(
            EpisodeSettings(**data["settings"]),
            data["clip_ids"],
            data["class_names"],
            torch.tensor(data["episodes"], dtype=torch.long),
            torch.tensor(data["classes"], dtype=torch.long),
        )
        if data.get("sha256") != out.hash:
            raise DataError(f"episode file {path}: content does not match its sha256 (edited or truncated)")
        return out

    def check_clips(self, clip_ids: Sequence[str]) -> torch.Tensor:
        """Map this set's clip positions to positions in ``clip_ids`` (a loader's order).

        Raises naming the first clips the loader does not have.
        """
        where = {c: i for i, c in enumerate(clip_ids)}
        missing = [c for c in self.clip_ids if c not in where]
        if missing:
            raise DataError(
                f"{len(missing)} clips of the episode file are not in the evaluated split, e.g. {missing[:5]}"
            )
        return torch.tensor([where[c] for c in self.clip_ids], dtype=torch.long)


class EpisodeSampler:
    """Draws N-way K-shot Q-query episodes over clips with class names.

    Classes are sorted by name and clips by id before drawing, so the episodes depend only on
    the set of (clip id, class) pairs. Raises, naming the classes, when a class has fewer than
    ``k_shot + n_query`` clips or ``n_way`` exceeds the number of classes. ``classes``: every
    class the split should have (those without any clip are reported too); ``key``: the config
    node of the settings, named in the errors (``fewshot``, ``data.val_episodes``).
    """

    def __init__(
        self,
        clip_ids: Sequence[str],
        class_of_clip: Sequence[str],
        settings: EpisodeSettings,
        *,
        classes: Sequence[str] = (),
        key: str = "fewshot",
    ) -> None:
        settings.check(key)
        if len(clip_ids) != len(class_of_clip):
            raise ValueError("clip_ids and class_of_clip differ in length")
        self.settings = settings
        order = sorted(range(len(clip_ids)), key=lambda i: clip_ids[i])
        self.clip_ids = [clip_ids[i] for i in order]
        by_class: dict[str, list[int]] = defaultdict(list)
        for pos, i in enumerate(order):
            by_class[class_of_clip[i]].append(pos)
        self.class_names = sorted(by_class)
        self.members = [np.array(by_class[c]) for c in self.class_names]
        counts = {c: 0 for c in classes} | {c: len(m) for c, m in zip(self.class_names, self.members)}
        problems = episode_problems(counts, settings, key)
        if problems:
            raise DataError("cannot draw episodes:\n" + "\n".join(problems))

    def episode(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(classes (N,), clips (N, K+Q)) of episode ``e``."""
        return self.draw(np.random.default_rng([self.settings.seed, e]))

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(classes (N,), clips (N, K+Q)) of one episode drawn from ``rng``: N distinct classes in
        sorted order, K + Q distinct clips of each (positions in the sorted clip ids)."""
        s = self.settings
        classes = np.sort(rng.choice(len(self.class_names), size=s.n_way, replace=False))
        clips = np.stack([rng.choice(self.members[c], size=s.k_shot + s.n_query, replace=False) for c in classes])
        return classes, clips

    def sample(self) -> EpisodeSet:
        cls, clips = zip(*(self.episode(e) for e in range(self.settings.episodes)))
        return EpisodeSet(
            self.settings,
            self.clip_ids,
            self.class_names,
            torch.from_numpy(np.stack(clips)).long(),
            torch.from_numpy(np.stack(cls)).long(),
        )


def episode_problems(clips_per_class: dict[str, int], settings: EpisodeSettings, key: str = "fewshot") -> list[str]:
    """Why these classes cannot give the requested episodes (empty if they can); ``key`` is the
    config node of the settings."""
    problems = []
    usable = sum(n >= settings.k_shot + settings.n_query for n in clips_per_class.values())
    if settings.n_way > usable:
        problems.append(
            f"{key}.n_way={settings.n_way} but the split has only {usable} classes with at least "
            f"{key}.k_shot + {key}.n_query = {settings.k_shot + settings.n_query} clips ({len(clips_per_class)} classes in all)"
        )
    need = settings.k_shot + settings.n_query
    for name, n in sorted(clips_per_class.items()):
        if n < need:
            problems.append(
                f"class {name!r} has {n} clips, fewer than k_shot + n_query = "
                f"{settings.k_shot} + {settings.n_query} = {need}"
            )
    return problems


class TaskSampler(DistributedSampler):
    """The training tasks of one epoch on one rank, as ``(epoch, task number)`` keys of a
    :class:`TaskDataset`: numbers ``rank, rank + W, ...`` of ``tasks`` per epoch (rounded down to
    a multiple of the world size, so every rank takes as many steps). A task is a function of
    ``(seed, epoch, number)`` alone: the same tasks whatever the number of processes or workers,
    and a run resumed at an epoch draws that epoch's tasks again. Lightning calls
    :meth:`set_epoch` every epoch. It is a ``DistributedSampler`` so that Lightning keeps it
    instead of wrapping the loader in one (it shards by itself)."""

    def __init__(self, tasks: int, *, rank: int = 0, world_size: int = 1) -> None:  # noqa: D107 - no super().__init__
        if tasks < world_size:
            raise ValueError(f"{tasks} tasks per epoch cannot be shared by {world_size} processes")
        self.tasks, self.rank, self.world_size, self.epoch = tasks, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        count = self.tasks - self.tasks % self.world_size
        return iter([(self.epoch, number) for number in range(self.rank, count, self.world_size)])

    def __len__(self) -> int:
        return self.tasks // self.world_size


class TaskDataset(Dataset):
    """N-way K-shot Q-query training tasks over the clips of a dataset (``clips``, a
    :class:`~mmfsar.data.dataset.ClipDataset`): item ``(epoch, number)`` is one task, every clip
    loaded and stacked way by way, each way's K support clips then its Q queries (the layout of
    :attr:`EpisodeSet.tensor`), drawn from ``(settings.seed, epoch, number)``."""

    def __init__(self, clips: Dataset, class_of_clip: Sequence[str], settings: EpisodeSettings) -> None:
        clip_ids = [r.clip_id for r in clips.records]
        self.clips = clips
        self.sampler = EpisodeSampler(clip_ids, class_of_clip, settings, key="model.episodes")
        where = {c: i for i, c in enumerate(clip_ids)}
        self.rows = np.array([where[c] for c in self.sampler.clip_ids])  # sampler positions -> dataset rows

    def positions(self, epoch: int, number: int) -> np.ndarray:
        """(N, K+Q) dataset rows of a task."""
        _, clips = self.sampler.draw(np.random.default_rng([self.sampler.settings.seed, epoch, number]))
        return self.rows[clips]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return default_collate([self.clips[int(i)] for i in self.positions(*key).reshape(-1)])


def split_task(features: torch.Tensor, settings: EpisodeSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A task's clips (N·(K+Q), ...) in :class:`TaskDataset`'s layout -> support (1, N, K, ...),
    query (1, N·Q, ...) and each query's way (N·Q,): the inputs of a few-shot classifier."""
    n, k, q = settings.n_way, settings.k_shot, settings.n_query
    if features.shape[0] != n * (k + q):
        raise ValueError(f"a {n}-way {k}-shot {q}-query task has {n * (k + q)} clips, got {features.shape[0]}")
    per_way = features.reshape(n, k + q, *features.shape[1:])
    target = torch.arange(n, device=features.device).repeat_interleave(q)
    return per_way[:, :k][None], per_way[:, k:].reshape(n * q, *features.shape[1:])[None], target

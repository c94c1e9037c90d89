"""Encode once, then solve episodes.

A clip's features do not depend on the episode, so evaluation (and validation during training)
encodes every clip of the split once, into a :class:`FeatureBank`, and solves all episodes on the
bank with one few-shot classifier (:func:`solve_episodes`). Under DDP each rank encodes its share
of the clips; the banks are gathered, each rank solves its share of the episodes (e = rank,
rank + W, ...), and the accuracies are gathered, so the numbers are the same for any number of
processes.

A bank holds ``(clips, views, time, dim)`` features: pooled clip features (time = 1), or per-frame
features for classifiers that compare clips frame by frame (``uses_frames``). Per clip that is
``views · time · dim · 4`` bytes: 0.5 KiB for one pooled 128-d view, 16 KiB for 8 frames of 512-d
(ResNet-18), 64 KiB for 8 frames of 2048-d (ResNet-50).

Masked views (MM-CDFSL's ensemble masked inference) draw each clip's tube masks from
``(seed, clip position, view)`` alone (:func:`view_masks`), so features do not depend on the
batch size or the number of processes. :class:`FeatureCache` keeps a split's features on disk,
keyed by everything they depend on (:func:`feature_cache_key`), so a second evaluation of the
same encoder on the same data (another classifier, shots or episode file) skips the encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mmfsar.data.episodes import EpisodeSet
from mmfsar.models.base import masking_grid, plain_config


class FeatureBank:
    """Features ``(num_clips, views, time, dim)`` of every clip of a split, filled batch by batch."""

    def __init__(self, num_clips: int, views: int = 1) -> None:
        self.num_clips = num_clips
        self.views = views
        self.features: Tensor | None = None
        self.filled = torch.zeros(num_clips, dtype=torch.bool)

    def add(self, index: Tensor, features: Tensor) -> None:
        """``features``: (B, views, time, D) of the clips at dataset positions ``index`` (B,)."""
        if features.ndim != 4 or features.shape[1] != self.views:
            raise ValueError(f"expected features (B, {self.views}, time, D), got {tuple(features.shape)}")
        if self.features is None:
            self.features = features.new_zeros(self.num_clips, *features.shape[1:], dtype=torch.float32)
            self.filled = self.filled.to(features.device)
        self.features[index] = features.detach().float()
        self.filled[index] = True

    def gather(self, all_gather: Callable[[Tensor], Tensor], world_size: int) -> Tensor:
        """All clips' features on every rank (``all_gather`` = ``LightningModule.all_gather``).

        Clips encoded by several ranks (a distributed sampler pads the last batch with repeats)
        are averaged. Raises if some clip was encoded by no rank.
        """
        if self.features is None:
            raise RuntimeError("no features were added to the bank")
        if world_size > 1:
            feats = all_gather(self.features)  # (W, N, V, T, D)
            filled = all_gather(self.filled.to(feats.dtype))  # (W, N)
            count = filled.sum(0)
            merged = (feats * filled[..., None, None, None]).sum(0) / count.clamp(min=1)[:, None, None, None]
            missing = int((count == 0).sum())
        else:
            merged, missing = self.features, int((~self.filled).sum())
        if missing:
            raise RuntimeError(f"{missing} of {self.num_clips} clips were never encoded")
        return merged


def episode_positions(episodes: EpisodeSet, clip_ids: list[str]) -> Tensor:
    """The episode tensor (E, N, K+Q) re-expressed as positions in ``clip_ids`` (a dataset's order)."""
    return episodes.check_clips(clip_ids)[episodes.tensor]


def view_masks(index: Tensor, grid: tuple[int, int, int], ratio: float, view: int, seed: int, device: torch.device) -> Tensor:
    """Tube masks (B, N) that depend only on (seed, clip position, view), never on the batch,
    so masked views are identical whatever the batch size or number of processes."""
    from mmfsar.models.encoders.vit import tube_mask

    masks = []
    for i in index.tolist():
        digest = hashlib.blake2b(f"{seed}/{i}/{view}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        masks.append(tube_mask(1, grid, ratio, generator=g))
    return torch.cat(masks).to(device)


@torch.no_grad()
def encode_views(
    encoder: nn.Module,
    inputs: dict[str, Tensor],
    index: Tensor,
    *,
    views: int = 1,
    mask_ratio: float = 0.0,
    seed: int = 0,
    frames: bool = False,
) -> Tensor:
    """(B, views, time, D) features: one unmasked view, or ``views`` masked views (MM-CDFSL's
    ensemble masked inference); pooled clip features (time = 1) or, with ``frames``, per-frame ones."""

    def features(**kwargs: Any) -> Tensor:
        out = encoder(inputs, **kwargs)
        return out.frames if frames else out.pooled[:, None]

    if mask_ratio <= 0:
        if views != 1:
            raise ValueError("fewshot.views > 1 needs fewshot.mask_ratio > 0 (unmasked views are identical)")
        return features()[:, None]
    grid = masking_grid(encoder)
    device = next(iter(inputs.values())).device
    return torch.stack([features(mask=view_masks(index, grid, mask_ratio, v, seed, device)) for v in range(views)], 1)


def _check_bank(features: Tensor, episodes: Tensor, k_shot: int) -> None:
    if features.dim() != 4 or not features.is_floating_point():
        raise ValueError(f"features must be a float tensor (clips, views, time, dim), got {features.dtype} {tuple(features.shape)}")
    if episodes.dim() != 3 or episodes.is_floating_point() or episodes.dtype == torch.bool:
        raise ValueError(f"episodes must be integer clip positions (episodes, n_way, k_shot + n_query), got {episodes.dtype} {tuple(episodes.shape)}")
    if isinstance(k_shot, bool) or not isinstance(k_shot, int) or not 1 <= k_shot < episodes.shape[2]:
        raise ValueError(
            f"k_shot={k_shot!r} must be an integer in [1, {episodes.shape[2] - 1}] for episodes with "
            f"{episodes.shape[2]} clips per way (k_shot support + at least one query)"
        )
    if episodes.numel() and (int(episodes.min()) < 0 or int(episodes.max()) >= features.shape[0]):
        raise ValueError(
            f"episodes refer to clip positions in [{int(episodes.min())}, {int(episodes.max())}] "
            f"but the feature cache has {features.shape[0]} clips"
        )
    if not torch.isfinite(features.sum()) and not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or inf")


def episode_probabilities(
    classifier: nn.Module,
    features: Tensor,
    episodes: Tensor,
    k_shot: int,
    *,
    chunk: int = 1000,
    progress: Callable[[int], None] | None = None,
    classes: Tensor | None = None,
) -> Tensor:
    """Class probabilities of every query of every episode, averaged over query views.

    features: (clips, views, time, D), indexed by the clip positions of ``episodes`` (E, N, K + Q)
    (``EpisodeSet.tensor``: per way, K support clips then Q queries; a query's label is its way).
    The support uses view 0 and each query the average of the class probabilities of its views
    (MM-CDFSL's ensemble masked inference). A classifier's per-clip part
    (:meth:`~mmfsar.fewshot.EpisodeClassifier.embed`) runs once per clip, then ``chunk`` episodes
    are matched per call (memory); ``progress`` is called with the number of episodes done after each.
    A classifier with a pairwise form (:meth:`~mmfsar.fewshot.EpisodeClassifier.pair_width`: OTAM,
    TRX) is solved from its table of (query, support clip) terms instead, built once when it fits
    ``PAIR_TABLE_BUDGET``: the same logits, without recomputing a pair in every episode it meets.
    ``classes`` (E, N): each way's class position (``EpisodeSet.classes``), passed to the ``match`` of
    classifiers that declare ``needs_classes`` (CLIP-MDMF prompts with the episode's class texts).
    Returns (E, N, Q, N): episode, way of the query, query within the way, class probabilities.
    """
    _check_bank(features, episodes, k_shot)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    episodes = episodes.to(features.device)
    total, n_way, per_way = episodes.shape
    n_query, views = per_way - k_shot, features.shape[1]
    if classes is not None:
        if tuple(classes.shape) != (total, n_way):
            raise ValueError(f"classes must be (episodes, n_way) = {(total, n_way)}, got {tuple(classes.shape)}")
        classes = classes.to(features.device)
    needs_classes = bool(getattr(classifier, "needs_classes", False))
    out = features.new_empty(total, n_way, n_query, n_way)
    with torch.no_grad():
        if hasattr(classifier, "check"):  # an EpisodeClassifier: its per-clip part once per clip
            classifier.check(features[None, :1, None, 0], features[None, :1, 0])
            features = torch.cat([classifier.embed(part) for part in features.split(1024)])
        time, dim = features.shape[2:]
        support_bank, query_bank = features[:, 0], features.flatten(0, 1)  # query rows: clip · views + view
        uses = total * n_way * n_query * views * n_way * k_shot
        table = None if needs_classes else _pair_table(classifier, query_bank, support_bank, uses)
        match = getattr(classifier, "match", classifier)
        for start in range(0, total, chunk):
            block = episodes[start : start + chunk]
            e = block.shape[0]
            query_rows = (block[:, :, k_shot:, None] * views + torch.arange(views, device=block.device)).view(e, -1)
            query = query_bank.index_select(0, query_rows.reshape(-1)).view(e, -1, time, dim)
            if table is not None:
                logits = _match_pairs(classifier, table, query_rows, block[:, :, :k_shot], query)
            else:
                support = support_bank.index_select(0, block[:, :, :k_shot].reshape(-1)).view(e, n_way, k_shot, time, dim)
                extra = {"classes": None if classes is None else classes[start : start + e]} if needs_classes else {}
                logits = match(support, query, **extra)
            probs = torch.softmax(logits.float(), -1)
            out[start : start + e] = probs.view(e, n_way, n_query, views, n_way).mean(3)
            if progress is not None:
                progress(e)
    return out


PAIR_TABLE_BUDGET = 1 << 26  # floats (256 MB in float32): the largest (query, support clip) table evaluation builds
PAIR_BLOCK = 1 << 23  # floats: the pairs of one pair_table call, the pair rows one match_pairs call reads


def _pair_table(classifier: nn.Module, queries: Tensor, supports: Tensor, uses: int) -> list[Tensor] | None:
    """The classifier's :meth:`~mmfsar.fewshot.EpisodeClassifier.pair_table` of every query row
    (clip, view) with every support clip, when it has a pairwise form, the table fits
    ``PAIR_TABLE_BUDGET`` and the episodes use its pairs at least twice on average; else None."""
    width = classifier.pair_width() if hasattr(classifier, "pair_width") else None
    if width is None:
        return None
    pairs = queries.shape[0] * supports.shape[0]
    if pairs * width > PAIR_TABLE_BUDGET or uses < 2 * pairs:
        return None
    step = max(1, PAIR_BLOCK // (supports.shape[0] * width))
    blocks = [classifier.pair_table(part, supports) for part in queries.split(step)]
    return [torch.cat(parts) for parts in zip(*blocks)]


def _match_pairs(classifier: nn.Module, table: list[Tensor], query_rows: Tensor, support_clips: Tensor, query: Tensor) -> Tensor:
    """Logits (E, Q, N) of episodes with query rows (E, Q) and support clips (E, N, K), from the
    pair ``table`` of every query row with every support clip, ``PAIR_BLOCK`` floats of pairs at a time."""
    index = query_rows[:, :, None, None] * table[0].shape[1] + support_clips[:, None]  # (E, Q, N, K)
    step = max(1, PAIR_BLOCK // (index[0].numel() * classifier.pair_width()))
    return torch.cat(
        [classifier.match_pairs(table, part, query[start : start + step]) for start, part in zip(range(0, len(index), step), index.split(step))]
    )


def solve_episodes(classifier: nn.Module, features: Tensor, episodes: Tensor, k_shot: int, **options: Any) -> Tensor:
    """Per-episode accuracy (E,) in [0, 1]; the arguments of :func:`episode_probabilities`."""
    probs = episode_probabilities(classifier, features, episodes, k_shot, **options)
    truth = torch.arange(episodes.shape[1], device=probs.device).view(1, -1, 1)
    return (probs.argmax(-1) == truth).float().mean((1, 2))


# --------------------------------------------------------------------------- on-disk feature cache

CACHE_FORMAT = 2


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def feature_cache_key(
    *,
    encoder_file: str | Path,
    dataset_root: str | Path,
    clip_ids: Sequence[str],
    modalities: Mapping[str, Any],
    frames: Mapping[str, Any],
    views: int,
    mask_ratio: float,
    mask_seed: int,
    per_frame: bool = False,
    precision: str = "32-true",
    annotation_file: str = "annotations.csv",
    encoder_sha256: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """(key, description) of the features of ``clip_ids`` under an encoder and input settings.

    The key hashes everything the features depend on: the encoder file's content (weights and
    the configs that rebuild it), the dataset (its resolved path and the content of its
    ``meta.json`` and annotation file, so a regenerated dataset misses), the encoded clips in
    order, the modality and frame-sampling configs, the views / mask ratio / mask seed of masked
    ensemble inference, pooled or per-frame features, and the numeric precision of the encoder
    pass. The frames of the clips themselves are not hashed: edit them in place and the cache
    must be deleted by hand.
    """
    root = Path(dataset_root).resolve()
    info = {
        "format": CACHE_FORMAT,
        "encoder_sha256": encoder_sha256 or file_sha256(encoder_file),
        "dataset": str(root),
        "dataset_meta_sha256": file_sha256(root / "meta.json") if (root / "meta.json").is_file() else None,
        "annotations_sha256": file_sha256(root / annotation_file) if (root / annotation_file).is_file() else None,
        "clips": len(clip_ids),
        "clips_sha256": hashlib.sha256("\n".join(clip_ids).encode()).hexdigest(),
        "modalities": plain_config(modalities),
        "frames": plain_config(frames),
        "views": int(views),
        "mask_ratio": float(mask_ratio),
        "mask_seed": int(mask_seed),
        "per_frame": bool(per_frame),
        "precision": str(precision),
    }
    blob = json.dumps(info, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32], info


class FeatureCache:
    """Encoded features on disk, one file per :func:`feature_cache_key`: ``features_<key>.pt``.

    A file holds the features (num_clips, views, time, D) float32, the clip ids and the key's
    description, and is read with ``torch.load(weights_only=True)``; a file whose description or
    shape does not match is ignored (and overwritten by the next save). Writes are atomic.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"features_{key}.pt"

    def load(self, key: str, info: Mapping[str, Any]) -> Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file is a miss, not an error
            return None
        features = payload.get("features") if isinstance(payload, dict) else None
        if (
            payload.get("info") != dict(info)
            or not isinstance(features, Tensor)
            or features.ndim != 4
            or features.shape[:2] != (info["clips"], info["views"])
        ):
            return None
        return features.float()

    def save(self, key: str, info: Mapping[str, Any], features: Tensor, clip_ids: Sequence[str]) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"info": dict(info), "clip_ids": list(clip_ids), "features": features.detach().float().cpu()}, tmp)
        tmp.replace(path)
        return path

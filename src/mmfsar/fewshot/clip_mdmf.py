"""CLIP-MDMF's matching head as a few-shot classifier plug-in (``configs/fewshot/classifier/clip_mdmf.yaml``).

CLIP-MDMF (METHODS.md section 5) conditions its matching on text: a support clip is prompted with
its class's text, a query with the text of the class whose text its frames resemble most. So the
classifier needs, beyond the frame features every matching head gets, the *classes* of each
episode and their text features. :class:`ClipMDMFClassifier` takes them in two steps:

* ``bind_classes(class_names, root=..., encoder=...)`` once per evaluated split: the text of every
  class of the split (the episode file's ``class_names``) encoded by the exported CLIP's text tower
  (:meth:`~mmfsar.models.clip_towers.ClipTowers.encode_classes`); training binds the val classes;
* ``match(support, query, classes=...)`` per batch of episodes, ``classes (E, N)`` the position of
  each way's class among the bound ones (``EpisodeSet.classes``); the engine passes it to
  classifiers that declare ``needs_classes``.

**Encode once, then episodes.** At test time a query's prompt is one of the bound classes and a
support clip's is its own class, so everything a clip contributes can be computed once per clip
and class (:meth:`ClipMDMFClassifier.embed`): its prompt scores against every class text, and its
fused frames under every class prompt in both views (the temporal views, the cross-attention).
An episode is then a gather of rows, a mean over shots and OTAM: evaluating 10,000 episodes costs
about what 10,000 OTAM episodes cost, not 10,000 × (clips per episode) attention passes
(``benchmarks/bench_clip_mdmf.py``). That per-clip table holds ``2·C·(T + 1)`` rows of D per clip
(C bound classes): 18 KiB for the synthetic data's 10 novel classes (D = 128, T = 8), 0.9 MiB per
clip for 24 classes of 512-d features; ``precompute=False`` keeps one row per frame and runs the
head per episode instead (same logits).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfsar.errors import ConfigError
from mmfsar.fewshot.classifiers import EpisodeClassifier
from mmfsar.fewshot.matching import otam_distance
from mmfsar.models.clip_mdmf import ClipMDMFHead, select_prompts

VIEWS = ("local", "global")


class ClipMDMFClassifier(EpisodeClassifier):
    """:class:`~mmfsar.models.clip_mdmf.ClipMDMFHead` as an episode classifier conditioned on class text.

    Args:
        dim, num_frames: the frame features' size and count (filled in from the encoder).
        heads, topk, prompt_temperature, text_temperature, otam_smoothing, mlp_ratio, dropout,
            kd_teachers: the head's (``ClipMDMFHead``; paper: top-4 frames, temperature 200).
        precompute: evaluation computes every clip's fused frames under every bound class prompt
            once (:meth:`embed`); False: the head runs per episode (memory: one row per frame).

    ``logits = -(D_local + D_global)`` with the query prompted by its best-scoring class among the
    episode's (eval) or a class drawn from softmax(200·s) (training, the head's ``forward``). The
    text features are not weights of the classifier (not in its state dict): they are bound to
    the classes being evaluated.
    """

    uses_frames = True
    needs_classes = True

    def __init__(
        self,
        *,
        dim: int,
        num_frames: int,
        heads: int = 8,
        topk: int = 4,
        prompt_temperature: float = 200.0,
        text_temperature: float = 1.0,
        otam_smoothing: float = 0.1,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        kd_teachers: str = "both",
        precompute: bool = True,
    ) -> None:
        if dim is None or num_frames is None:
            raise ConfigError("ClipMDMFClassifier needs dim and num_frames (filled in from the encoder)")
        super().__init__(dim=dim, num_frames=num_frames)
        if not 1 <= topk <= num_frames:
            raise ConfigError(f"topk={topk} must be in [1, {num_frames}] (frames per clip)")
        self.head = ClipMDMFHead(
            dim=dim,
            heads=heads,
            topk=topk,
            prompt_temperature=prompt_temperature,
            text_temperature=text_temperature,
            otam_smoothing=otam_smoothing,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            kd_teachers=kd_teachers,
        )
        self.precompute = bool(precompute)
        self.class_names: list[str] = []
        self.register_buffer("class_text", torch.zeros(0, dim), persistent=False)

    # --- the classes' text -------------------------------------------------------------------------
    def set_class_text(self, features: Tensor, class_names: Sequence[str] | None = None) -> None:
        """Bind text features ``(C, D)``: row c is the class at position c of later ``classes``."""
        if features.ndim != 2 or features.shape[1] != self.dim or features.shape[0] < 1:
            raise ValueError(f"class text features must be (C >= 1, {self.dim}), got {tuple(features.shape)}")
        if class_names is not None and len(class_names) != features.shape[0]:
            raise ValueError(f"{len(class_names)} class names for {features.shape[0]} text features")
        self.class_text = features.detach().to(self.class_text.device, torch.float32)
        self.class_names = list(class_names) if class_names is not None else []

    def bind_classes(self, class_names: Sequence[str], *, root: str | Path, encoder: Any) -> None:
        """The text features of ``class_names`` (an episode set's ``class_names``), encoded by the
        CLIP text tower that travels with ``encoder`` (a :class:`~mmfsar.models.clip_towers.ClipTowers`)."""
        encode = getattr(encoder, "encode_classes", None)
        if encode is None:
            raise ConfigError(
                f"ClipMDMFClassifier prompts with class texts encoded by a CLIP text tower, but the encoder "
                f"{type(encoder).__name__} has none: evaluate an encoder exported by the CLIP pretraining or "
                "CLIP-MDMF stage (experiment=clip_mdmf_tiny/* or clip_mdmf/*), or choose another fewshot.classifier"
            )
        self.set_class_text(encode(root, list(class_names)), class_names)

    @property
    def num_classes(self) -> int:
        return int(self.class_text.shape[0])

    def _require_classes(self, classes: Tensor | None, ways: int, episodes: int) -> Tensor:
        if self.num_classes == 0:
            raise RuntimeError("ClipMDMFClassifier has no class texts: call bind_classes (or set_class_text) first")
        if classes is None:
            raise ValueError(
                "ClipMDMFClassifier needs each episode's classes (classes=(E, N) positions among the bound classes): "
                "the evaluation engine passes EpisodeSet.classes to classifiers with needs_classes"
            )
        if classes.shape != (episodes, ways):
            raise ValueError(f"classes must be ({episodes}, {ways}), got {tuple(classes.shape)}")
        if int(classes.min()) < 0 or int(classes.max()) >= self.num_classes:
            raise ValueError(
                f"classes refer to positions up to {int(classes.max())}, {self.num_classes} classes are bound"
            )
        return classes.long()

    # --- the per-clip part -----------------------------------------------------------------------
    @property
    def _score_rows(self) -> int:
        return math.ceil(self.num_classes / self.dim)

    @property
    def embedded_rows(self) -> int:
        """Rows of a precomputed clip: its prompt scores (packed in rows of D), then per view and
        class the fused prompt token and T fused frames."""
        return self._score_rows + len(VIEWS) * self.num_classes * (1 + self.num_frames)

    @torch.no_grad()
    def embed(self, clips: Tensor) -> Tensor:
        """``(..., T, D)`` -> ``(..., R, D)``: every bound class's prompt score and fused frames
        (both views) of each clip, or the clips unchanged when ``precompute`` is off."""
        if not self.precompute:
            return clips
        if self.num_classes == 0:
            raise RuntimeError("ClipMDMFClassifier.embed needs the class texts: call bind_classes first")
        lead, (frames, dim) = clips.shape[:-2], clips.shape[-2:]
        x = clips.reshape(-1, frames, dim).float()
        text = self.class_text
        classes = text.shape[0]
        _, scores = select_prompts(x[None], text, topk=self.head.topk, sample=False)  # (1, B, C)
        packed = F.pad(scores[0], (0, self._score_rows * dim - classes)).view(-1, self._score_rows, dim)
        parts = [packed]
        views = ((self.head.local_view, self.head.local_fusion), (self.head.global_view, self.head.global_fusion))
        for view, fusion in views:
            context = view(x)
            fused = []
            step = max(1, 4096 // classes)  # clips per fusion call: 4096 (clip, prompt) pairs
            for start in range(0, x.shape[0], step):
                b = x[start : start + step].shape[0]
                prompts = text.repeat(b, 1)
                out = fusion(
                    prompts,
                    x[start : start + step].repeat_interleave(classes, dim=0),
                    context[start : start + step].repeat_interleave(classes, dim=0),
                )
                fused.append(out.view(b, classes * (1 + frames), dim))
            parts.append(torch.cat(fused))
        return torch.cat(parts, dim=1).view(*lead, self.embedded_rows, dim)

    # --- per episode -----------------------------------------------------------------------------
    def forward(self, support: Tensor, query: Tensor, *, classes: Tensor | None = None) -> Tensor:
        self.check(support, query)
        return self.match(self.embed(support), self.embed(query), classes=classes)

    def match(self, support: Tensor, query: Tensor, *, classes: Tensor | None = None) -> Tensor:
        """Logits (E, Q, N) from embedded (or raw, ``precompute=False``) support and query."""
        episodes, ways = support.shape[:2]
        classes = self._require_classes(classes, ways, episodes)
        if support.shape[-2] == self.num_frames:  # raw frames: the head itself
            return self.head(support, query, support_text=self.class_text[classes])["logits"]
        for name, clips in (("support", support), ("query", query)):
            if clips.shape[-2] != self.embedded_rows:
                raise ValueError(
                    f"embedded {name} clips must have {self.embedded_rows} rows ({self.num_classes} bound classes), "
                    "got "
                    f"{clips.shape[-2]}: were they embedded with other class texts?"
                )
        return self._match_embedded(support, query, classes)

    def _match_embedded(self, support: Tensor, query: Tensor, classes: Tensor) -> Tensor:
        episodes, ways, shots, _, dim = support.shape
        queries, frames, bound, rows = query.shape[1], self.num_frames, self.num_classes, self._score_rows
        tokens = 1 + frames
        scores = query[..., :rows, :].flatten(-2)[..., :bound]  # (E, Q, C)
        episode_scores = scores.gather(-1, classes[:, None].expand(episodes, queries, ways))
        prompt = classes.gather(1, episode_scores.argmax(-1))  # (E, Q): the query's best class
        fused_query = query[..., rows:, :].reshape(episodes, queries, len(VIEWS), bound, tokens, dim)
        index = prompt.view(episodes, queries, 1, 1, 1, 1).expand(episodes, queries, len(VIEWS), 1, tokens, dim)
        fused_query = fused_query.gather(3, index).squeeze(3)  # (E, Q, V, 1 + T, D)
        fused_support = support[..., rows:, :].reshape(episodes, ways, shots, len(VIEWS), bound, tokens, dim)
        index = classes.view(episodes, ways, 1, 1, 1, 1, 1).expand(episodes, ways, shots, len(VIEWS), 1, tokens, dim)
        prototypes = fused_support.gather(4, index).squeeze(4).mean(2)  # (E, N, V, 1 + T, D)
        logits = 0
        for v in range(len(VIEWS)):
            q = F.normalize(fused_query[:, :, v, 1:], dim=-1)  # (E, Q, T, D)
            s = F.normalize(prototypes[:, :, v, 1:], dim=-1)  # (E, N, T, D)
            cost = 1 - torch.einsum("eqtd,ensd->eqnts", q, s)
            forward = otam_distance(cost, smoothing=self.head.otam_smoothing)
            backward = otam_distance(cost.transpose(-1, -2), smoothing=self.head.otam_smoothing)
            logits = logits - 0.5 * (forward + backward)
        return logits

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_frames={self.num_frames}, precompute={self.precompute}, "
            f"bound_classes={self.num_classes}"
        )

"""CLIP-MDMF's matching head and its pieces (Guo et al., Knowledge-Based Systems 2024; METHODS.md section 5).

CLIP-MDMF compares a query clip with the support classes of an episode through two *views* of the
same CLIP frame features, a local and a global temporal context, each fused with a text prompt,
matched with bidirectional OTAM, and the two views distil into each other:

1. :func:`select_prompts`: the query's prompt is the text of a class chosen from its frame-text
   similarities (sampled from softmax(200·s) in training, the best class at test); a support
   clip's prompt is its own class text.
2. :class:`LocalTemporalView` (two kernel-3 convolutions, 5 frames seen) and
   :class:`GlobalTemporalView` (dilated TCN, 15 frames seen) turn the frames into context.
3. :class:`PromptFrameFusion` per view: the view's context, led by the prompt token, attends to
   the prompt and the raw frames (cross-attention).
4. :class:`ClipMDMFHead`: support prototypes (mean over shots), bidirectional OTAM on 1 − cosine per
   view, logits = −(D_local + D_global), and :func:`mutual_distillation_loss` between the views.

Everything is batched over episodes: support ``(E, N, K, T, D)``, query ``(E, Q, T, D)``, text
``(E, N, D)``, in CLIP's joint space (``ClipFrameEncoder`` frames, ``ClipTextEncoder`` features).
Where this follows the released code (``cofly2014/CLIP-MDMF``) and where it departs from it is
said at each piece.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

KD_TEACHERS = ("both", "local", "global")


def select_prompts(
    frame_feats: torch.Tensor,
    text_feats: torch.Tensor,
    *,
    topk: int = 4,
    temperature: float = 200.0,
    sample: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-MDMF's probability prompt selector: which class text a clip is prompted with.

    For clip q and class text e_c, ``s_qc`` = mean of the ``topk`` largest cosine similarities
    between e_c and q's frames (the frames that show the class, ignoring the others). With
    ``sample`` (training) the class is drawn from softmax(temperature·s_q), so the query sees
    plausible wrong prompts too and the matching cannot lean on the prompt alone; without
    (test) it is argmax_c s_qc. The released code samples at test as well; a deterministic
    evaluation is preferred here.

    Args:
        frame_feats: ``(..., Q, T, D)`` frame features of Q clips.
        text_feats: ``(..., C, D)`` class texts per leading index (e.g. episode), or ``(C, D)``
            shared by all.
        generator: makes the sampling reproducible.

    Returns:
        ``(index (..., Q) long, scores (..., Q, C))``.
    """
    if frame_feats.ndim < 3:
        raise ValueError(f"frame_feats must be (..., Q, T, D), got {tuple(frame_feats.shape)}")
    lead = frame_feats.shape[:-3]
    if text_feats.ndim != 2 and (text_feats.ndim != frame_feats.ndim - 1 or text_feats.shape[:-2] != lead):
        raise ValueError(
            f"text_feats must be (C, D) or {(*lead, 'C', 'D')} for frame_feats {tuple(frame_feats.shape)}, "
            f"got {tuple(text_feats.shape)}"
        )
    if text_feats.shape[-1] != frame_feats.shape[-1]:
        raise ValueError(f"text dim {text_feats.shape[-1]} != frame dim {frame_feats.shape[-1]}")
    frames = frame_feats.shape[-2]
    if not 1 <= topk <= frames:
        raise ValueError(f"topk must be in [1, {frames}] (frames per clip), got {topk}")
    frame_unit = F.normalize(frame_feats, dim=-1)
    text_unit = F.normalize(text_feats, dim=-1).unsqueeze(-3)  # (..., 1, C, D)
    similarity = text_unit @ frame_unit.transpose(-1, -2)  # (..., Q, C, T)
    scores = similarity.topk(topk, dim=-1).values.mean(dim=-1)
    if not sample:
        return scores.argmax(dim=-1), scores
    probs = torch.softmax(temperature * scores, dim=-1)
    drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return drawn.reshape(scores.shape[:-1]), scores


def _check_sequence(x: torch.Tensor, dim: int, name: str) -> None:
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} expects (B, T, {dim}), got {tuple(x.shape)}")


class LocalTemporalView(nn.Module):
    """Local temporal context: ``x + conv(GELU(conv(x)))`` with two kernel-3 Conv1d over time.

    Receptive field: each output frame sees its input frame ±2 (5 frames). The released code
    stacks the two convolutions with neither activation nor residual, which makes them one linear
    kernel-5 filter; the GELU makes the two layers count, and the residual keeps each frame's own
    feature (the context is added to it), as the released code's global view does, so that OTAM
    still aligns frames that look alike.
    """

    receptive_field = 5

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.conv1 = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` -> ``(B, T, D)``."""
        _check_sequence(x, self.dim, type(self).__name__)
        h = x.transpose(1, 2)
        return x + self.conv2(F.gelu(self.conv1(h))).transpose(1, 2)


class GlobalTemporalView(nn.Module):
    """Global temporal context: a dilated TCN, one kernel-3 Conv1d per dilation (1, 2, 4).

    Each level is ``h + GELU(conv_d(h))`` (residual, as in a TCN block), centred (padding d).
    Receptive field: 1 + 2·(1 + 2 + 4) = 15 frames (±7), the whole clip for 8 frames. The
    released code uses a causal TCN (two convolutions per level) and broadcasts its last time step
    (which sees the whole clip) to every frame; the centred version gives each frame its own
    clip-wide context without favouring the end of the clip.
    """

    def __init__(self, dim: int, *, dilations: tuple[int, ...] = (1, 2, 4), kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1 or not dilations or min(dilations) < 1:
            raise ValueError(f"need an odd kernel_size and positive dilations, got {kernel_size}, {dilations}")
        self.dim = dim
        self.receptive_field = 1 + (kernel_size - 1) * sum(dilations)
        self.levels = nn.ModuleList(
            nn.Conv1d(dim, dim, kernel_size, padding=d * (kernel_size // 2), dilation=d) for d in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` -> ``(B, T, D)``."""
        _check_sequence(x, self.dim, type(self).__name__)
        h = x.transpose(1, 2)
        for conv in self.levels:
            h = h + F.gelu(conv(h))
        return h.transpose(1, 2)


class PromptFrameFusion(nn.Module):
    """Cross-attention fusing a text prompt, a temporal view and the frames (one pre-norm block).

    Queries are ``[prompt; context]`` (the prompt token followed by the view's T context
    features); keys and values are ``[prompt; frames]`` (the prompt followed by the raw frame
    features). So the view decides where to look, the frames and the prompt supply what is
    taken, and every output token is its query plus what it gathered (residual), then an MLP
    block. This is the released code's direction (its cross-transformer takes the view as query
    and the prompted frames as keys / values); it uses one LayerNorm for both sides and no norm
    before the MLP, here each side and the MLP have their own LayerNorm.

    ``forward`` returns ``(B, 1 + T, D)``: token 0 is the fused prompt (a clip summary conditioned
    on the text), tokens 1..T the fused frames that OTAM aligns.
    """

    def __init__(self, dim: int, heads: int, *, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads={heads}")
        self.dim = dim
        self.norm_query = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, prompt: torch.Tensor, frames: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """prompt ``(B, D)``, frames and context ``(B, T, D)`` -> ``(B, 1 + T, D)``."""
        _check_sequence(frames, self.dim, "PromptFrameFusion frames")
        if context.shape != frames.shape:
            raise ValueError(f"context {tuple(context.shape)} must have the frames' shape {tuple(frames.shape)}")
        if prompt.shape != (frames.shape[0], self.dim):
            raise ValueError(f"prompt must be ({frames.shape[0]}, {self.dim}), got {tuple(prompt.shape)}")
        query = torch.cat([prompt[:, None], context], dim=1)
        memory = self.norm_memory(torch.cat([prompt[:, None], frames], dim=1))
        x = query + self.attention(self.norm_query(query), memory, memory, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class MutualDistillation(NamedTuple):
    """Result of :func:`mutual_distillation_loss` (all but ``loss`` detached, per query)."""

    loss: torch.Tensor
    local_is_teacher: torch.Tensor
    weight: torch.Tensor
    kl: torch.Tensor


def mutual_distillation_loss(
    p_local: torch.Tensor,
    p_global: torch.Tensor,
    text_agreement_local: torch.Tensor,
    text_agreement_global: torch.Tensor,
    *,
    teachers: str = "both",
) -> MutualDistillation:
    """CLIP-MDMF's mutual distillation: per query, the view that agrees more with the text teaches.

    For query i: the teacher is the local view when ``a_local,i >= a_global,i`` (ties: local, as
    in the released code), else the global view; then

        L_KD = Σ_i w_i · KL(p_teacher,i ‖ p_student,i) / Σ_i w_i,
        w_i = max_c p_teacher,i(c) + a_teacher,i,

    the teacher's confidence in its matching prediction plus its text agreement (the released
    code's reliability coefficient ``cv + ct``). The teacher's probabilities and the weights are
    detached: the student moves towards the teacher, not the reverse.

    "Text agreement" a_v,i (what :class:`ClipMDMFHead` passes) is the confidence of view v's
    *text-conditioned* prediction: max_c softmax_c(cos(g_i, g_c)) with g the fused prompt tokens
    of the query and of class c's support prototype in that view (the released code's
    ``t_judgements``): the view whose prompt token singles out one class more clearly is trusted.

    Args:
        p_local, p_global: ``(..., N)`` class probabilities of the two views (softmax(−D_v)).
        text_agreement_local, text_agreement_global: ``(...)``.
        teachers: ``"both"`` (mutual, METHODS.md) or ``"local"`` / ``"global"``: only queries
            where that view teaches count (the released code's ``dist_direction`` option; its
            default distils the global view into the local one only).

    Returns:
        :class:`MutualDistillation` (loss; per query: teacher mask, weight, KL).
    """
    if teachers not in KD_TEACHERS:
        raise ValueError(f"teachers must be one of {KD_TEACHERS}, got {teachers!r}")
    if p_local.shape != p_global.shape or p_local.ndim < 1 or p_local.shape[-1] < 2:
        raise ValueError(
            f"p_local and p_global must have one shape (..., N >= 2), got {tuple(p_local.shape)}, "
            f"{tuple(p_global.shape)}"
        )
    agreements = {"text_agreement_local": text_agreement_local, "text_agreement_global": text_agreement_global}
    for name, agreement in agreements.items():
        if agreement.shape != p_local.shape[:-1]:
            raise ValueError(f"{name} must be {tuple(p_local.shape[:-1])}, got {tuple(agreement.shape)}")
    local_is_teacher = (text_agreement_local >= text_agreement_global).detach()
    teacher_mask = local_is_teacher[..., None]
    p_teacher = torch.where(teacher_mask, p_local, p_global).detach()
    p_student = torch.where(teacher_mask, p_global, p_local)
    agreement = torch.where(local_is_teacher, text_agreement_local, text_agreement_global).detach()
    weight = p_teacher.amax(dim=-1) + agreement
    if teachers == "local":
        weight = weight * local_is_teacher
    elif teachers == "global":
        weight = weight * ~local_is_teacher
    log_student = p_student.clamp_min(torch.finfo(p_student.dtype).tiny).log()
    kl = (torch.xlogy(p_teacher, p_teacher) - p_teacher * log_student).sum(dim=-1)
    loss = (weight * kl).sum() / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)  # 0 when no query counts
    return MutualDistillation(loss=loss, local_is_teacher=local_is_teacher, weight=weight, kl=kl.detach())


def _otam_one_way(dist: torch.Tensor, smoothing: float) -> torch.Tensor:
    """OTAM's cumulative cost of aligning rows (query frames) to columns (support frames), ``dist (..., L, M)``.

    The shared implementation (:func:`mmfsar.fewshot.matching.otam_distance`, the OTAM paper's
    recursion, METHODS.md section 6), so CLIP-MDMF's training head and its evaluation classifier
    (:class:`~mmfsar.fewshot.clip_mdmf.ClipMDMFClassifier`) match with the same OTAM as the rest.
    """
    from mmfsar.fewshot.matching import otam_distance

    return otam_distance(dist, smoothing=smoothing)


def _otam_distance(
    q: torch.Tensor, s: torch.Tensor, *, smoothing: float = 0.1, bidirectional: bool = True
) -> torch.Tensor:
    """OTAM distance (Cao et al., CVPR 2020) on D = 1 − cos between frames of ``q`` and ``s``.

    ``q (..., Tq, D)`` and ``s (..., Ts, D)`` broadcast over ``...``; returns ``(...)``.
    Bidirectional: the mean of the query→support and support→query alignments (METHODS.md; the
    released CLIP-FSAR / CLIP-MDMF code sums them, i.e. twice these logits).
    """
    if smoothing <= 0:
        raise ValueError(f"OTAM smoothing must be positive, got {smoothing}")
    dist = 1 - F.normalize(q, dim=-1) @ F.normalize(s, dim=-1).transpose(-1, -2)
    forward = _otam_one_way(dist, smoothing)
    if not bidirectional:
        return forward
    return 0.5 * (forward + _otam_one_way(dist.transpose(-1, -2), smoothing))


class ClipMDMFHead(nn.Module):
    """CLIP-MDMF's matching head: prompts, two temporal views, fusion, OTAM, mutual distillation.

    ``forward(support (E, N, K, T, D), query (E, Q, T, D), *, support_text (E, N, D))``:

    * prompts (:func:`select_prompts`): a support clip is prompted with its own class text; a
      query with the text of a class drawn from softmax(prompt_temperature·s) in training, the
      best-scoring class in eval mode (the released code: its support prompts are the clips'
      own class texts too);
    * per view (local, global): context = view(frames); fused = fusion([prompt; context] attends
      to [prompt; frames]); support prototypes = mean over the K shots of the fused support clips
      (frames and prompt token); D_v = bidirectional OTAM on 1 − cos between the query's and each
      prototype's fused frames;
    * ``logits = −(D_local + D_global)``;
    * ``kd_loss`` = :func:`mutual_distillation_loss` of p_v = softmax(−D_v), with text agreement
      a_v = max_c softmax_c(cos(query prompt token, prototype prompt token of c) / text_temperature)
      (text_temperature 1 as in the released code).

    The training loss is CE(logits, labels) + kd_loss (METHODS.md; the optional video–text CE of
    the paper can use ``prompt_scores``). Returns a dict with ``logits``, ``kd_loss``,
    ``distance_local`` / ``distance_global`` (E, Q, N), ``prompt_index`` (E, Q),
    ``prompt_scores`` (E, Q, N), ``text_agreement`` (E, Q, 2), ``local_is_teacher`` and
    ``kd_weight`` (E, Q).
    """

    def __init__(
        self,
        *,
        dim: int,
        heads: int = 8,
        topk: int = 4,
        prompt_temperature: float = 200.0,
        text_temperature: float = 1.0,
        otam_smoothing: float = 0.1,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        kd_teachers: str = "both",
    ) -> None:
        super().__init__()
        if kd_teachers not in KD_TEACHERS:
            raise ValueError(f"kd_teachers must be one of {KD_TEACHERS}, got {kd_teachers!r}")
        if text_temperature <= 0 or prompt_temperature <= 0 or otam_smoothing <= 0:
            raise ValueError("prompt_temperature, text_temperature and otam_smoothing must be positive")
        self.dim, self.topk = dim, topk
        self.prompt_temperature, self.text_temperature = prompt_temperature, text_temperature
        self.otam_smoothing, self.kd_teachers = otam_smoothing, kd_teachers
        self.local_view = LocalTemporalView(dim)
        self.global_view = GlobalTemporalView(dim)
        self.local_fusion = PromptFrameFusion(dim, heads, mlp_ratio=mlp_ratio, dropout=dropout)
        self.global_fusion = PromptFrameFusion(dim, heads, mlp_ratio=mlp_ratio, dropout=dropout)

    def forward(
        self,
        support: torch.Tensor,
        query: torch.Tensor,
        *,
        support_text: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        self._check_inputs(support, query, support_text)
        episodes, ways, shots, frames, dim = support.shape
        queries = query.shape[1]
        prompt_index, prompt_scores = select_prompts(
            query,
            support_text,
            topk=self.topk,
            temperature=self.prompt_temperature,
            sample=self.training,
            generator=generator,
        )
        query_prompt = support_text.gather(1, prompt_index[..., None].expand(episodes, queries, dim))
        support_prompt = support_text[:, :, None].expand(episodes, ways, shots, dim)
        clips = torch.cat([support.reshape(-1, frames, dim), query.reshape(-1, frames, dim)])
        prompts = torch.cat([support_prompt.reshape(-1, dim), query_prompt.reshape(-1, dim)])
        n_support = episodes * ways * shots

        distances, agreements = [], []
        for view, fusion in ((self.local_view, self.local_fusion), (self.global_view, self.global_fusion)):
            fused = fusion(prompts, clips, view(clips))
            token, fused_frames = fused[:, 0], fused[:, 1:]
            proto_frames = fused_frames[:n_support].reshape(episodes, ways, shots, frames, dim).mean(dim=2)
            proto_token = token[:n_support].reshape(episodes, ways, shots, dim).mean(dim=2)
            query_frames = fused_frames[n_support:].reshape(episodes, queries, frames, dim)
            query_token = token[n_support:].reshape(episodes, queries, dim)
            distances.append(
                _otam_distance(query_frames[:, :, None], proto_frames[:, None], smoothing=self.otam_smoothing)
            )
            text_cos = F.normalize(query_token, dim=-1) @ F.normalize(proto_token, dim=-1).transpose(1, 2)
            agreements.append(torch.softmax(text_cos / self.text_temperature, dim=-1).amax(dim=-1))

        distance_local, distance_global = distances
        kd = mutual_distillation_loss(
            torch.softmax(-distance_local, dim=-1),
            torch.softmax(-distance_global, dim=-1),
            agreements[0],
            agreements[1],
            teachers=self.kd_teachers,
        )
        return {
            "logits": -(distance_local + distance_global),
            "kd_loss": kd.loss,
            "distance_local": distance_local,
            "distance_global": distance_global,
            "prompt_index": prompt_index,
            "prompt_scores": prompt_scores,
            "text_agreement": torch.stack(agreements, dim=-1).detach(),
            "local_is_teacher": kd.local_is_teacher,
            "kd_weight": kd.weight,
        }

    def _check_inputs(self, support: torch.Tensor, query: torch.Tensor, support_text: torch.Tensor) -> None:
        if support.ndim != 5 or support.shape[-1] != self.dim:
            raise ValueError(f"support must be (E, N, K, T, {self.dim}), got {tuple(support.shape)}")
        episodes, ways, _, frames, dim = support.shape
        if query.ndim != 4 or query.shape[0] != episodes or query.shape[2:] != (frames, dim):
            raise ValueError(f"query must be ({episodes}, Q, {frames}, {dim}), got {tuple(query.shape)}")
        if support_text.shape != (episodes, ways, dim):
            raise ValueError(f"support_text must be ({episodes}, {ways}, {dim}), got {tuple(support_text.shape)}")

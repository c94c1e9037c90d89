"""Matching heads: few-shot classifiers that compare support and query clips frame by frame.

Episodic methods (OTAM, TRX, HyRSM, CLIP-FSAR; Lite-MKD's teacher and student; CLIP-MDMF) score a
query against each class by comparing clips frame by frame. A *matching head* is that comparison
as a few-shot classifier plug-in (:class:`~mmfsar.fewshot.classifiers.EpisodeClassifier`): one
differentiable ``nn.Module`` that maps

    support (E, N, K, T, D), query (E, Q, T, D)  ->  logits (E, Q, N)

for E episodes at once (N ways, K shots, Q queries in any order, T time steps, D feature dim). The
same object trains the encoder with cross-entropy over query logits, validates, and is solved on
cached frame features by the evaluation (``configs/fewshot/classifier/*.yaml``).

Heads: :class:`FrameCosineHead` (cosine to the class mean of frame means), :class:`OTAM` (Cao et
al., CVPR 2020) and :class:`TRX` (Perrett et al., CVPR 2021); METHODS.md section 6 describes the
last two.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfsar.fewshot.classifiers import EpisodeClassifier, PrototypeClassifier, _positive_float, _positive_int



class FrameCosineHead(PrototypeClassifier):
    """Cosine between a query's frame mean and its class prototype (mean over shots of frame means).

    The cheapest baseline *on frame features*: ``uses_frames = True`` on purpose, so the caller
    feeds it the very per-frame features OTAM and TRX see, and a comparison with them isolates
    temporal matching from the features. (On pooled features it would be
    ``PrototypeClassifier(metric="cosine")``, and an encoder's pooled feature need not be its frame
    mean: a LayerNorm after pooling, attention pooling.) The default temperature 0.1 (logits in
    [-10, 10]) lets cross-entropy training reach confident predictions, as the cosine classifier's scale 10.
    """

    uses_frames = True

    def __init__(self, *, temperature: float = 0.1, dim: int | None = None, num_frames: int | None = None) -> None:
        super().__init__(metric="cosine", temperature=temperature, dim=dim, num_frames=num_frames)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


def _log_add_exp(a: Tensor, b: Tensor) -> Tensor:
    """log(exp(a) + exp(b)) from vectorised exp / log (torch.logaddexp is several times slower on
    CPU); the shift is detached because the result does not depend on it."""
    top = torch.maximum(a, b).detach()
    return top + torch.log(torch.exp(a - top) + torch.exp(b - top))


def _first_column_with_vertical_moves(gain: Tensor, hard: bool) -> Tensor:
    """R[:, 1] when the first support frame also allows vertical moves (the released code), in the
    units of :func:`otam_distance`: Γ[l, 1] = D[l, 1] + min_γ(Γ[l-1, 0], Γ[l, 0], Γ[l-1, 1]) with
    the zero column Γ[·, 0] = 0, whose two terms add exp(0) + exp(0) = 2."""
    rows = [gain[..., 0]]
    log_two = gain.new_tensor(math.log(2.0))
    for row in range(1, gain.shape[-1]):
        previous = rows[-1]
        reached = previous.clamp(min=0) if hard else _log_add_exp(previous, log_two)
        rows.append(gain[..., row] + reached)
    return torch.stack(rows, dim=-1)


def otam_distance(cost: Tensor, *, smoothing: float = 0.1, vertical_in_first_column: bool = False) -> Tensor:
    """OTAM's soft alignment distance (Cao et al., CVPR 2020) of frame-cost matrices.

    cost (..., L, M): cost[l, m] between query frame l and support frame m (OTAM: 1 - cosine).
    Returns (...,). With D the cost padded by a zero column before the first and after the last
    support frame (columns 0 and M + 1), the cumulative cost is

        Γ[0, m] = D[0, m] + Γ[0, m - 1]                                  (first row: from the left)
        Γ[l, m] = D[l, m] + min_γ(Γ[l - 1, m - 1], Γ[l, m - 1])          (real columns)
        Γ[l, m] = D[l, m] + min_γ(Γ[l - 1, m - 1], Γ[l, m - 1], Γ[l - 1, m])   (padded columns)

    with min_γ(a_1..a_n) = -γ log Σ exp(-a_i / γ) (γ = ``smoothing``; 0 gives the hard minimum) and
    the distance Γ[L - 1, M + 1]. Every support frame is matched exactly once, monotonically; the
    zero columns let an alignment start and end at any query frame. That is the paper's recursion,
    and the released OTAM code shared by TRX's OTAM baseline, TA2N, HyRSM and CLIP-FSAR implements
    the same, with one difference: it also allows vertical moves in the first *real* column (an
    off-by-one in its "first column" case). ``vertical_in_first_column=True`` reproduces it; the
    two agree for γ = 0 (costs are >= 0, so waiting in the zero column is never worse).

    Vectorised over all leading dimensions at once; the loop runs over the M support frames only
    (each step updates a whole column), in units R = -Γ/γ where min_γ is a log-sum-exp. The leading
    padded column is all zeros, and the trailing one has a closed form: min_γ is associative over
    flattened multisets, so unrolling its recursion gives Γ[L - 1, M + 1] = min_γ over l of Γ[l, M],
    each counted twice except l = L - 1 (once).
    """
    if not isinstance(cost, Tensor) or cost.dim() < 2 or 0 in cost.shape[-2:]:
        shape = tuple(cost.shape) if isinstance(cost, Tensor) else type(cost).__name__
        raise ValueError(f"cost must be (..., query frames, support frames) with both >= 1, got {shape}")
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing!r}")
    hard = smoothing == 0
    # (M, ..., L): one contiguous slab -D/γ per support frame
    gain = cost.movedim(-1, 0).contiguous().mul(-1.0 if hard else -1.0 / smoothing)
    column = gain.new_zeros(gain.shape[1:])  # R of the leading zero column
    for m, frame_gain in enumerate(gain):
        if m == 0 and vertical_in_first_column:
            column = _first_column_with_vertical_moves(frame_gain, hard)
            continue
        diagonal, horizontal = column[..., :-1], column[..., 1:]
        reached = torch.maximum(diagonal, horizontal) if hard else _log_add_exp(diagonal, horizontal)
        column = frame_gain + torch.cat([column[..., :1], reached], dim=-1)
    if hard:
        return -column.amax(dim=-1)
    path_counts = column.new_full((cost.shape[-2],), math.log(2.0))
    path_counts[-1] = 0.0
    return -float(smoothing) * torch.logsumexp(column + path_counts, dim=-1)


class OTAM(EpisodeClassifier):
    """Ordered Temporal Alignment Module (Cao et al., "Few-Shot Video Classification via Temporal
    Alignment", CVPR 2020): the distance of a query to a class is a soft, order-preserving (DTW-like)
    alignment of their frames, on frame costs 1 - cos; see :func:`otam_distance` for the recursion.

    ``smoothing``: γ of the smooth minimum (0 = hard alignment; the distance is differentiable for
    any γ, so it trains the encoder end to end). ``bidirectional``: the mean of the query→support
    and support→query alignments, as TA2N / HyRSM / CLIP-FSAR / CLIP-MDMF (their released code sums
    the two: the same logits at half the temperature). ``shots``: with K shots, ``"mean_distance"``
    averages the distances to the K clips of the class (the released OTAM code) and
    ``"mean_frames"`` aligns with the class's mean frame sequence (CLIP-MDMF's prototypes, K times
    cheaper). Logits = -distance / ``temperature``. ``vertical_in_first_column``: see
    :func:`otam_distance` (True matches the released implementations exactly).

    Cosines are exact (the released code adds 0.01 to the norm product). All (episode, query, class,
    shot) alignments run together: the (E, Q, N, K, T, T) costs plus a few (E, Q, N, K, T) per DP column.
    """

    uses_frames = True

    def __init__(
        self,
        *,
        smoothing: float = 0.1,
        bidirectional: bool = False,
        shots: Literal["mean_distance", "mean_frames"] = "mean_distance",
        temperature: float = 1.0,
        vertical_in_first_column: bool = False,
        dim: int | None = None,
        num_frames: int | None = None,
    ) -> None:
        super().__init__(dim=dim, num_frames=num_frames)
        if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing!r}")
        if shots not in ("mean_distance", "mean_frames"):
            raise ValueError(f"shots must be 'mean_distance' or 'mean_frames', got {shots!r}")
        self.smoothing = float(smoothing)
        self.bidirectional = bool(bidirectional)
        self.shots = shots
        self.temperature = _positive_float(temperature, "temperature")
        self.vertical_in_first_column = bool(vertical_in_first_column)

    def match(self, support: Tensor, query: Tensor) -> Tensor:
        if self.shots == "mean_frames":
            support = support.mean(dim=2, keepdim=True)
        return -self._distances(support, query).mean(dim=-1) / self.temperature

    def _distances(self, support: Tensor, query: Tensor) -> Tensor:
        """Alignment distances (E, Q, N, K) of each query to each support clip."""
        episodes, ways, shots, frames, dim = support.shape
        queries = query.shape[1]
        # cosines from raw dot products and norms: no normalised copy of the features
        dots = torch.bmm(
            query.reshape(episodes, queries * frames, dim),
            support.reshape(episodes, ways * shots * frames, dim).transpose(1, 2),
        )
        query_norms = torch.linalg.vector_norm(query, dim=-1).clamp_min(1e-12).view(episodes, -1, 1)
        support_norms = torch.linalg.vector_norm(support, dim=-1).clamp_min(1e-12).view(episodes, 1, -1)
        cost = 1 - dots / (query_norms * support_norms)
        cost = cost.view(episodes, queries, frames, ways, shots, frames).permute(0, 1, 3, 4, 2, 5)
        options = dict(smoothing=self.smoothing, vertical_in_first_column=self.vertical_in_first_column)
        distance = otam_distance(cost, **options)  # (E, Q, N, K): query frames are the rows
        if self.bidirectional:
            distance = 0.5 * (distance + otam_distance(cost.transpose(-1, -2), **options))
        return distance

    def pair_width(self) -> int | None:
        """``"mean_distance"``: a class's logit is the mean of per-shot logits, one float per pair."""
        return 1 if self.shots == "mean_distance" else None

    def pair_table(self, query: Tensor, support: Tensor) -> list[Tensor]:
        if self.pair_width() is None:
            return super().pair_table(query, support)
        # every support clip as a one-shot class of one episode holding all the queries
        return [-self._distances(support[None, :, None], query[None])[0, :, :, 0] / self.temperature]

    def match_pairs(self, table: Sequence[Tensor], pairs: Tensor, query: Tensor) -> Tensor:
        if self.pair_width() is None:
            return super().match_pairs(table, pairs, query)
        return table[0].flatten()[pairs].mean(dim=-1)

    def extra_repr(self) -> str:
        return (
            f"smoothing={self.smoothing}, bidirectional={self.bidirectional}, shots={self.shots!r}, "
            f"temperature={self.temperature}, vertical_in_first_column={self.vertical_in_first_column}"
        )


def _sinusoidal_positions(num_frames: int, dim: int, scale: float) -> Tensor:
    """(num_frames, dim) sine / cosine position codes of "Attention is all you need", times ``scale``."""
    position = torch.arange(num_frames, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    codes = torch.zeros(num_frames, dim)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]
    return codes * scale


class _CrossTransformer(nn.Module):
    """TRX's temporal CrossTransformer for one cardinality ω: support (E, N, K, T, D), query
    (E, Q, T, D) -> distances (E, Q, N), averaged over the query's P = C(T, ω) tuples.

    A tuple's representation is the concatenation of its ω frame features, and a linear map of a
    concatenation is the sum of per-position blocks applied to each frame: W·[x_t1; …; x_tω] =
    Σ_i W_i·x_ti. So each frame is projected once per position ("slot", T·ω rows per clip) and a
    tuple's projection is the sum of its ω slot rows: T·ω·D·d instead of P·ω·D·d per clip.

    The prototype of class c for query tuple p is t = Σ_j a_pj·Λs_j, a mix of the class's slot rows
    (mixing weights = attention @ ``selection``). When the (E, N, Q, P, d) prototypes fit
    ``PROTOTYPE_BUDGET`` they are formed and Σ_p ‖t_p - Λp_p‖² taken directly (fewest operations);
    beyond it (many tuples, d_k 1152) the distance is expanded into Gram matrices of slot rows, so
    no prototype tensor is built and the largest tensors are the clips' tuple keys (E, N, K, P, d)
    and the attention (E, Q, P, N, K, P). :meth:`embed` is the per-clip part (keys, value slot
    rows), which evaluation computes once per clip.
    """

    PROTOTYPE_BUDGET = 1 << 25  # floats of the (E, N, Q, P, d) prototypes; beyond it the Gram-matrix form

    def __init__(
        self,
        *,
        dim: int,
        num_frames: int,
        cardinality: int,
        proj_dim: int,
        shared_key_query: bool,
    ) -> None:
        super().__init__()
        self.cardinality, self.proj_dim = cardinality, proj_dim
        tuples = torch.tensor(list(itertools.combinations(range(num_frames), cardinality)), dtype=torch.long)
        slots = tuples * cardinality + torch.arange(cardinality)  # slot row of frame t at position i: t·ω + i
        selection = torch.zeros(len(tuples), num_frames * cardinality).scatter_(1, slots, 1.0)
        self.register_buffer("tuples", tuples, persistent=False)  # (P, ω), t_1 < … < t_ω
        self.register_buffer("selection", selection, persistent=False)  # (P, T·ω): the slot rows of each tuple
        self.key = nn.Linear(cardinality * dim, proj_dim)
        self.key_norm = nn.LayerNorm(proj_dim)
        self.query = None if shared_key_query else nn.Linear(cardinality * dim, proj_dim)
        self.query_norm = None if shared_key_query else nn.LayerNorm(proj_dim)
        # A value bias would cancel in t_p - Λp_p (attention weights sum to 1): none, so no dead parameter.
        self.value = nn.Linear(cardinality * dim, proj_dim, bias=False)

    def _position_blocks(self, linear: nn.Linear) -> Tensor:
        """A map of concatenated tuples as ω per-position maps stacked: (ω·d, D), row block i = W_i."""
        dim = linear.in_features // self.cardinality
        return linear.weight.view(self.proj_dim, self.cardinality, dim).transpose(0, 1).reshape(-1, dim)

    def _slot_rows(self, frames: Tensor, blocks: Tensor, bias: Tensor | None = None) -> Tensor:
        """(..., T, D) -> (..., T·ω, d): each frame through each position's map, row t·ω + i = W_i·x_t.
        A bias goes to the position-0 rows only, so every tuple's sum of rows holds it once."""
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros((self.cardinality - 1) * self.proj_dim)])
        rows = F.linear(frames, blocks, bias)
        return rows.view(*frames.shape[:-2], frames.shape[-2] * self.cardinality, self.proj_dim)

    def _tuple_rows(self, slot_rows: Tensor) -> Tensor:
        """(..., T·ω, d) -> (..., P, d): each tuple's sum of slot rows (its projection); a product
        with the 0/1 ``selection``, several times faster than gathering and summing."""
        return torch.matmul(self.selection.to(slot_rows.dtype), slot_rows)

    def _keys(self, frames: Tensor, linear: nn.Linear, norm: nn.LayerNorm) -> Tensor:
        return norm(self._tuple_rows(self._slot_rows(frames, self._position_blocks(linear), linear.bias)))

    @property
    def rows(self) -> int:
        """Rows of a clip's :meth:`embed`: its tuple keys (P, and P query keys when Υ is its own
        map) and value slot rows (T·ω)."""
        tuples = self.tuples.shape[0]
        return tuples * (1 if self.query is None else 2) + self.selection.shape[1]

    def embed(self, frames: Tensor) -> Tensor:
        """(..., T, D) position-encoded frames -> (..., rows, d): what the distances need of one
        clip, as a support clip (keys, value slot rows) and as a query (query keys, the same
        value slot rows)."""
        parts = [self._keys(frames, self.key, self.key_norm)]
        if self.query is not None:
            parts.append(self._keys(frames, self.query, self.query_norm))
        parts.append(self._slot_rows(frames, self._position_blocks(self.value)))
        return torch.cat(parts, dim=-2)

    def forward(self, support: Tensor, query: Tensor) -> Tensor:
        """Distances (E, Q, N) of embedded support (E, N, K, rows, d) and query (E, Q, rows, d)."""
        episodes, ways, shots = support.shape[:3]
        queries, tuples, d = query.shape[1], self.tuples.shape[0], self.proj_dim
        slots = self.selection.shape[1]
        support_keys = support[..., :tuples, :]  # (E, N, K, P, d)
        query_keys = query[..., :tuples, :] if self.query is None else query[..., tuples : 2 * tuples, :]  # (E, Q, P, d)
        support_slots = support[..., -slots:, :].reshape(episodes, ways, shots * slots, d)
        query_slots = query[..., -slots:, :]  # (E, Q, T·ω, d)
        scores = torch.bmm(
            query_keys.reshape(episodes, queries * tuples, d),
            support_keys.reshape(episodes, ways * shots * tuples, d).transpose(1, 2),
        )
        # one softmax per (query tuple, class) over all K·P tuples of the class's shots
        attention = torch.softmax(scores.view(episodes, queries, tuples, ways, shots * tuples) / math.sqrt(d), dim=-1)
        mix = attention.view(episodes, queries, tuples, ways, shots, tuples) @ self.selection.to(attention.dtype)
        mix = mix.view(episodes, queries, tuples, ways, shots * slots)  # (E, Q, P, N, K·T·ω)
        query_values = self._tuple_rows(query_slots)  # (E, Q, P, d): Λp, no bias
        if episodes * ways * queries * tuples * d <= self.PROTOTYPE_BUDGET:
            # the query-specific prototypes t_p themselves, then ‖t_p - Λp_p‖²: the fewest operations
            mix_by_class = mix.permute(0, 3, 1, 2, 4).reshape(episodes, ways, queries * tuples, shots * slots)
            difference = (mix_by_class @ support_slots).view(episodes, ways, queries, tuples, d)
            difference = difference.sub_(query_values.unsqueeze(1)).view(-1, 1, d)  # t_p - Λp_p, in place
            squared = torch.bmm(difference, difference.transpose(1, 2)).view(episodes, ways, queries, tuples)
            return squared.sum(dim=-1).transpose(1, 2) / tuples  # the reference divides by the number of tuples

        # ‖t_p‖² = mix_p · G · mix_p with G the Gram matrix of the class's slot rows
        mix_by_class = mix.permute(0, 3, 1, 2, 4).reshape(episodes, ways, queries * tuples, shots * slots)
        gram = support_slots @ support_slots.transpose(-1, -2)  # (E, N, K·T·ω, K·T·ω)
        prototype_sq = ((mix_by_class @ gram) * mix_by_class).sum(-1)
        prototype_sq = prototype_sq.view(episodes, ways, queries, tuples).permute(0, 2, 3, 1)  # (E, Q, P, N)
        # t_p · Λp_p = mix_p · (Λp_p · slot rows), from the Gram of query and support slot rows
        cross = torch.bmm(
            query_slots.reshape(episodes, queries * slots, d),
            support_slots.reshape(episodes, ways * shots * slots, d).transpose(1, 2),
        ).view(episodes, queries, slots, ways * shots * slots)
        cross = (self.selection.to(cross.dtype) @ cross).view(episodes, queries, tuples, ways, shots * slots)
        prototype_dot_query = (mix * cross).sum(-1)  # (E, Q, P, N)
        query_sq = query_values.square().sum(-1).unsqueeze(-1)  # (E, Q, P, 1)
        squared = prototype_sq - 2 * prototype_dot_query + query_sq
        return squared.sum(dim=2).clamp_min(0) / tuples  # the reference divides by the number of tuples

    def pair_width(self) -> int:
        """Floats of :meth:`pair_table` per (query, support clip) pair: per tuple, a prototype and a log-normaliser."""
        return self.tuples.shape[0] * (self.proj_dim + 1)

    def pair_table(self, query: Tensor, support: Tensor) -> Tensor:
        """Embedded query clips (A, rows, d), support clips (B, rows, d) -> (A, B, P, d + 1).

        The attention of query tuple p over a class's K·P support tuples factors by shot: with
        ℓ_kp = logsumexp_j(score_kpj) and u_kp = Σ_j softmax_j(score_kpj)·Λs_kj (the prototype shot k
        alone would give), the class prototype is t_p = Σ_k softmax_k(ℓ_kp)·u_kp. Per pair and
        query tuple: [u_p, ℓ_p]."""
        tuples, d, slots = self.tuples.shape[0], self.proj_dim, self.selection.shape[1]
        support_keys = support[:, :tuples]
        query_keys = query[:, :tuples] if self.query is None else query[:, tuples : 2 * tuples]
        scores = torch.einsum("apd,bjd->abpj", query_keys, support_keys) / math.sqrt(d)  # (A, B, P, P)
        normaliser = torch.logsumexp(scores, dim=-1, keepdim=True)
        values = self._tuple_rows(support[:, -slots:])  # (B, P, d): Λs
        prototypes = torch.einsum("abpj,bjd->abpd", torch.exp(scores - normaliser), values)
        return torch.cat([prototypes, normaliser], dim=-1)

    def pair_distances(self, table: Tensor, pairs: Tensor, query: Tensor) -> Tensor:
        """Distances (E, Q, N), equal to :meth:`forward`'s, from this transformer's
        :meth:`pair_table` (A, B, P, d + 1), the pair positions (E, Q, N, K) and the embedded
        queries (E, Q, rows, d). The shot mixture is one fused gather and weighted sum
        (``embedding_bag``): the (E, Q, N, K, P, d) rows are never copied out of the table."""
        tuples, d, slots = self.tuples.shape[0], self.proj_dim, self.selection.shape[1]
        rows = table.reshape(-1, d + 1)  # one row per (pair, query tuple)
        weights = torch.softmax(rows[:, d].view(-1, tuples)[pairs], dim=3)  # (E, Q, N, K, P): over shots
        bags = (pairs.unsqueeze(-1) * tuples + torch.arange(tuples, device=pairs.device)).transpose(-1, -2)
        prototype = F.embedding_bag(
            bags.reshape(-1, pairs.shape[-1]), rows, per_sample_weights=weights.transpose(-1, -2).reshape(-1, pairs.shape[-1]), mode="sum"
        )[:, :d].view(*pairs.shape[:-1], tuples, d)  # (E, Q, N, P, d)
        query_values = self._tuple_rows(query[..., -slots:, :])  # (E, Q, P, d)
        return (prototype - query_values.unsqueeze(2)).square().sum((-1, -2)) / tuples


class TRX(EpisodeClassifier):
    """Temporal-Relational CrossTransformers (Perrett et al., CVPR 2021), as Lite-MKD's teacher and
    student use it: a query is compared with a class through ordered frame tuples.

    Per-frame features plus a sinusoidal position encoding (scaled by 0.1, then dropout: as the
    reference implementation ``tobyperrett/trx``) form, for each cardinality ω in
    ``cardinalities``, every ordered tuple t_1 < … < t_ω (C(T, ω): 28 pairs and 56 triples for
    T = 8), represented by the concatenation of its frame features. For class c and query tuple p,
    attention over all support tuples of c (all K shots), softmax of LayerNorm(Γs)·LayerNorm(Υp) /
    √proj_dim, gives a query-specific prototype t_c^p = Σ a·Λs; the distance to c is
    Σ_p ‖t_c^p - Λp‖² / P (divided by the number of tuples P as the reference implementation does,
    which also weighs 28 pairs and 56 triples equally), and the cardinalities' distances are combined
    into logits = -distance.

    Where paper and reference differ: ``shared_key_query=True`` (default, as the reference) maps
    query tuples with the key map Γ and its LayerNorm (Υ = Γ); False gives the query map Υ its own
    Linear and LayerNorm. ``combine="sum"`` adds the cardinalities' distances (as the method is
    described); ``"norm"`` takes their L2 norm, as the reference code does. Values Λ have no
    LayerNorm (reference) and no bias (it cancels exactly). One :class:`_CrossTransformer` per
    cardinality, with its tuple index buffers built once.
    """

    uses_frames = True
    POSITION_SCALE = 0.1  # the reference implementation scales its sinusoidal codes by 0.1

    def __init__(
        self,
        *,
        dim: int,
        num_frames: int,
        cardinalities: Sequence[int] = (2, 3),
        proj_dim: int = 1152,
        dropout: float = 0.1,
        position_encoding: bool = True,
        shared_key_query: bool = True,
        combine: Literal["sum", "norm"] = "sum",
    ) -> None:
        super().__init__(dim=_positive_int(dim, "dim"), num_frames=_positive_int(num_frames, "num_frames"))
        cardinalities = tuple(cardinalities) if isinstance(cardinalities, Sequence) else (cardinalities,)
        if not cardinalities or len(set(cardinalities)) != len(cardinalities):
            raise ValueError(f"cardinalities must be distinct tuple sizes, got {cardinalities!r}")
        for size in cardinalities:
            if _positive_int(size, "each cardinality") > num_frames:
                raise ValueError(f"cardinality {size} needs at least {size} frames, but num_frames={num_frames}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if combine not in ("sum", "norm"):
            raise ValueError(f"combine must be 'sum' or 'norm', got {combine!r}")
        self.cardinalities = tuple(int(size) for size in cardinalities)
        self.proj_dim = _positive_int(proj_dim, "proj_dim")
        self.combine = combine
        self.transformers = nn.ModuleList(
            _CrossTransformer(
                dim=self.dim,
                num_frames=self.num_frames,
                cardinality=size,
                proj_dim=self.proj_dim,
                shared_key_query=bool(shared_key_query),
            )
            for size in self.cardinalities
        )
        positions = _sinusoidal_positions(self.num_frames, self.dim, self.POSITION_SCALE) if position_encoding else None
        self.register_buffer("positions", positions, persistent=False)
        self.dropout = nn.Dropout(float(dropout))

    def embed(self, clips: Tensor) -> Tensor:
        """(..., T, D) -> (..., R, proj_dim): the position-encoded frames (dropout in training)
        projected once per clip, the rows of every cardinality's CrossTransformer stacked."""
        self.check_frames(clips)
        if self.positions is not None:
            clips = clips + self.positions.to(clips.dtype)
        clips = self.dropout(clips)
        return torch.cat([transformer.embed(clips) for transformer in self.transformers], dim=-2)

    def check_frames(self, clips: Tensor) -> None:
        if clips.shape[-2:] != (self.num_frames, self.dim):
            raise ValueError(f"TRX was built for clips ({self.num_frames}, {self.dim}), got {tuple(clips.shape)}")

    def _row_slices(self) -> list[slice]:
        """Each CrossTransformer's rows of an embedded clip."""
        ends = list(itertools.accumulate(transformer.rows for transformer in self.transformers))
        return [slice(end - transformer.rows, end) for transformer, end in zip(self.transformers, ends)]

    def match(self, support: Tensor, query: Tensor) -> Tensor:
        return self._combine(
            [t(support[..., rows, :], query[..., rows, :]) for t, rows in zip(self.transformers, self._row_slices())]
        )

    def pair_width(self) -> int:
        return sum(transformer.pair_width() for transformer in self.transformers)

    def pair_table(self, query: Tensor, support: Tensor) -> list[Tensor]:
        return [t.pair_table(query[:, rows], support[:, rows]) for t, rows in zip(self.transformers, self._row_slices())]

    def match_pairs(self, table: Sequence[Tensor], pairs: Tensor, query: Tensor) -> Tensor:
        return self._combine(
            [
                t.pair_distances(part, pairs, query[..., rows, :])
                for t, part, rows in zip(self.transformers, table, self._row_slices())
            ]
        )

    def _combine(self, distances: list[Tensor]) -> Tensor:
        """The cardinalities' distances (E, Q, N) each -> logits."""
        distances = torch.stack(distances, dim=-1)
        if self.combine == "sum":
            return -distances.sum(dim=-1)
        return -torch.linalg.vector_norm(distances, dim=-1)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_frames={self.num_frames}, cardinalities={self.cardinalities}, "
            f"proj_dim={self.proj_dim}, combine={self.combine!r}"
        )


class TwoBranchHead(EpisodeClassifier):
    """Lite-MKD's student head: two linear projections h1, h2 of the student's frame features
    into the teacher's feature space, and one matching head shared by both branches.

    ``z_kl = head(h1(support), h1(query))`` learns from the teacher's logits, ``z_ce = head(h2(s),
    h2(q))`` from the labels (and the teacher's support relations, on h2's features); at inference
    the logits are ``z_kl + z_ce`` (:meth:`forward`). As the released code (``resnet18_2fc`` +
    ``TRX_2fcsup``): h1, h2 are per-frame ``Linear(dim, out_dim)`` and the same TRX scores both.

    Args:
        dim, num_frames: the student's features.
        out_dim: the projections' size (the teacher's feature size).
        head: builds the matching head: ``head(dim=out_dim, num_frames=num_frames)``.
    """

    def __init__(self, *, dim: int, num_frames: int, out_dim: int, head: Callable[..., EpisodeClassifier]) -> None:
        super().__init__(dim=_positive_int(dim, "dim"), num_frames=_positive_int(num_frames, "num_frames"))
        self.out_dim = _positive_int(out_dim, "out_dim")
        self.h1 = nn.Linear(self.dim, self.out_dim)
        self.h2 = nn.Linear(self.dim, self.out_dim)
        self.head = head(dim=self.out_dim, num_frames=self.num_frames)
        self.uses_frames = self.head.uses_frames

    def branches(self, support: Tensor, query: Tensor) -> dict[str, Tensor]:
        """``kl`` / ``ce``: (E, Q, N) logits of the two branches; ``support_ce``: h2's support
        features (E, N, K, T, out_dim), which the relation distillation compares."""
        support_ce = self.h2(support)
        return {
            "kl": self.head(self.h1(support), self.h1(query)),
            "ce": self.head(support_ce, self.h2(query)),
            "support_ce": support_ce,
        }

    def teacher_space(self, features: Tensor) -> Tensor:
        """h1: the student's (per-frame) features in the teacher's feature space, as the ``kl``
        branch scores them."""
        return self.h1(features)

    def match(self, support: Tensor, query: Tensor) -> Tensor:
        out = self.branches(support, query)
        return out["kl"] + out["ce"]

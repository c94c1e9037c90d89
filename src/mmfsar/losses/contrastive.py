"""Contrastive machinery of MoCo v2, CrosSCLR and IKEM (METHODS.md sections 3 and 6).

* :class:`MoCoQueue`, :func:`momentum_update`, :func:`make_momentum_copy`, :func:`moco_logits`:
  MoCo v2 (He et al. 2020; Chen et al. 2020). A queue of the last ``K`` keys of a momentum
  encoder gives many negatives at the cost of one batch; the keys of all DDP ranks enter it.
* :func:`cross_modal_positives`, :func:`multi_positive_nce`, :func:`crossclr_logits`,
  :func:`crossclr_losses`: CrosSCLR (Li et al., CVPR 2021) cross-view positive mining.
* :class:`KnowledgeExchange`: IKEM's Implicit Knowledge Exchange Module (Wei et al. 2023).
* :func:`relational_kd_logits`, :func:`relational_kd_loss`, :class:`RelationalDistillation`:
  IKEM's relational cross-modality distillation.

Conventions shared by every function here:

* Similarities are cosines. Queries, keys, students and teachers are L2-normalised *inside*
  (``F.normalize`` is idempotent, so normalised inputs pass unchanged). Queues are *required*
  to hold unit rows and are not re-normalised (that would be an ``O(K·D)`` pass per call);
  :class:`MoCoQueue` normalises what it stores, so its ``keys`` always qualify.
* Queues never receive a gradient (they are detached), keys and frozen teachers neither.
* Positive mining assumes *aligned* queues: row ``j`` of every queue holds the same clip. This
  holds when all queues are enqueued in lock-step, once per step with the keys of the same
  batch (the references rely on it too); :func:`check_aligned` verifies sizes and pointers.

The multi-positive loss follows the CrosSCLR / IKEM code (``processor/pretrain_crossclr.py``):
``−(1/|P|) Σ_{p∈P} log softmax(logits)_p``, the *mean of per-positive terms*, each against the
full denominator, not ``−log(Σ_P exp / Σ_all exp)``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KnowledgeExchange",
    "MoCoQueue",
    "RelationalDistillation",
    "all_gather_concat",
    "check_aligned",
    "concat_normalized",
    "cross_modal_positives",
    "crossclr_logits",
    "crossclr_losses",
    "make_momentum_copy",
    "moco_logits",
    "momentum_update",
    "multi_positive_nce",
    "positive_mask",
    "relational_kd_logits",
    "relational_kd_loss",
    "topk_mask",
]


# --------------------------------------------------------------------------- MoCo queue


def all_gather_concat(tensor: Tensor) -> Tensor:
    """The rows of ``tensor`` from every DDP rank, concatenated in rank order (MoCo's
    ``concat_all_gather``), detached. Without an initialised process group: ``tensor`` itself.

    Unlike MoCo's, ranks may hold different numbers of rows (an uneven last batch): the row
    counts are gathered first and every rank's rows are padded to the largest count for the
    ``all_gather``. A collective: every rank must call it, the same number of times.
    """
    tensor = tensor.detach()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    count = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[:n] for rows, n in zip(gathered, sizes, strict=True)])


class MoCoQueue(nn.Module):
    """A ring buffer of the last ``size`` keys: MoCo's dictionary of negatives.

    Buffers: ``keys`` (size, dim), initialised with random unit rows (MoCo), and ``ptr`` (),
    the slot the next key goes to. Order: the key enqueued ``g``-th since construction lives in
    row ``g mod size``, so ``ptr`` points at the *oldest* key, and reading from the pointer
    with wrap-around (:meth:`ordered`) gives the keys oldest → newest: after enqueuing batches
    ``b1, b2, ...`` of ``n ≥ size`` keys in all, ``ordered()`` equals the last ``size`` rows of
    ``cat(b1, b2, ...)``. Any batch size works (the write wraps around; a batch larger than
    the queue keeps its last ``size`` keys), unlike MoCo, which asserts ``size % batch == 0``.

    :meth:`enqueue` first gathers the keys of every DDP rank (:func:`all_gather_concat`), so
    all ranks hold the same queue. It writes *out of place* (``keys`` becomes a new tensor):
    logits computed from the old ``keys`` before the enqueue still back-propagate (an in-place
    write would trip autograd's version check, which is why MoCo clones the queue on every
    read). Hold ``queue.keys`` only for the current step; read it again after an enqueue.

    No label or clip index is stored: CrosSCLR and IKEM mine positives by similarity only.

    Args:
        dim: key size.
        size: number of keys kept (MoCo / CrosSCLR / IKEM on NTU: 32768).
        normalize: L2-normalise keys as they enter (the loss functions require unit rows).
    """

    keys: Tensor
    ptr: Tensor

    def __init__(self, dim: int, size: int, *, normalize: bool = True) -> None:
        super().__init__()
        if int(dim) < 1 or int(size) < 1:
            raise ValueError(f"MoCoQueue needs a positive dim and size, got dim={dim}, size={size}")
        self.dim = int(dim)
        self.size = int(size)
        self.normalize = bool(normalize)
        self.register_buffer("keys", F.normalize(torch.randn(self.size, self.dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, normalize={self.normalize}"

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Add a batch of keys (B, dim), after gathering every rank's; keys are detached."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"MoCoQueue.enqueue expects keys of shape (B, {self.dim}), got {tuple(keys.shape)}")
        rows = all_gather_concat(keys).to(device=self.keys.device, dtype=self.keys.dtype)
        if self.normalize:
            rows = F.normalize(rows, dim=1)
        n = rows.shape[0]
        if n == 0:
            return
        kept = min(n, self.size)
        # on-device slot arithmetic: no host sync for the pointer
        slots = (self.ptr + (n - kept) + torch.arange(kept, device=self.keys.device)) % self.size
        self.keys = self.keys.index_copy(0, slots, rows[n - kept :])
        self.ptr.add_(n).remainder_(self.size)

    def ordered(self) -> Tensor:
        """The keys oldest → newest (a copy): ``keys`` rolled so the pointer's row comes first."""
        return torch.roll(self.keys, shifts=-int(self.ptr), dims=0)


def check_aligned(queues: Mapping[str, MoCoQueue] | Sequence[MoCoQueue]) -> None:
    """Raise ``ValueError`` unless the queues have the same size and pointer (they were
    enqueued in lock-step), which cross-queue positive mining and concatenation assume."""
    named = dict(queues) if isinstance(queues, Mapping) else {str(i): q for i, q in enumerate(queues)}
    state = {name: (q.size, int(q.ptr)) for name, q in named.items()}
    if len(set(state.values())) > 1:
        raise ValueError(f"queues are not aligned (name: (size, ptr)): {state}; enqueue them in lock-step")


# --------------------------------------------------------------------------- momentum encoder


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """MoCo's key-encoder update ``θ_k ← m·θ_k + (1 − m)·θ_q`` for every parameter of
    ``target`` (``θ_k``) from the same-named parameter of ``online`` (``θ_q``); buffers (batch
    norm statistics) are copied. ``m = 0.999`` in MoCo / CrosSCLR / IKEM: the keys change
    slowly, so the queue's older keys stay comparable with the new ones."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    online_params = dict(online.named_parameters())
    target_params = dict(target.named_parameters())
    online_buffers = dict(online.named_buffers())
    target_buffers = dict(target.named_buffers())
    if online_params.keys() != target_params.keys() or online_buffers.keys() != target_buffers.keys():
        online_names = online_params.keys() | online_buffers.keys()
        missing = sorted(online_names ^ (target_params.keys() | target_buffers.keys()))
        raise ValueError(f"momentum_update: online and target modules differ in parameters / buffers {missing}")
    for name, param_k in target_params.items():
        param_q = online_params[name]
        if param_q.shape != param_k.shape:
            raise ValueError(
                f"momentum_update: parameter {name!r} has shape {tuple(param_q.shape)} online "
                f"and {tuple(param_k.shape)} in the target"
            )
        param_k.mul_(momentum).add_(param_q.detach(), alpha=1.0 - momentum)
    for name, buffer_k in target_buffers.items():
        buffer_k.copy_(online_buffers[name])


def make_momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` for the momentum (key) encoder: same weights, no gradients
    (``requires_grad_(False)``, ``.grad`` cleared), updated only by :func:`momentum_update`."""
    copied = copy.deepcopy(module)
    for param in copied.parameters():
        param.grad = None
    return copied.requires_grad_(False)


# --------------------------------------------------------------------------- logits and masks


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return float(temperature)


def _check_rows(name: str, tensor: Tensor, dim: int | None = None, rows: int | None = None) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(tensor.shape)}")
    if dim is not None and tensor.shape[1] != dim:
        raise ValueError(f"{name} has feature dim {tensor.shape[1]}, expected {dim} (shape {tuple(tensor.shape)})")
    if rows is not None and tensor.shape[0] != rows:
        raise ValueError(f"{name} has {tensor.shape[0]} rows, expected {rows} (shape {tuple(tensor.shape)})")


def _similarities(query: Tensor, queue: Tensor, *, query_name: str, queue_name: str) -> Tensor:
    """Cosines (B, K) of normalised ``query`` rows with the (unit, detached) ``queue`` rows."""
    _check_rows(query_name, query)
    _check_rows(queue_name, queue, dim=query.shape[1])
    return F.normalize(query.float(), dim=1) @ queue.detach().float().t()


def _paired_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine of row i of ``a`` with row i of ``b`` (B,)."""
    return (F.normalize(a.float(), dim=1) * F.normalize(b.float(), dim=1)).sum(dim=1)


def moco_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """MoCo's logits ``[q·k ; q·queue] / T`` (B, 1 + K) and labels (B,) zeros: the positive
    key is column 0. ``q`` and ``k`` are normalised here, ``k`` and ``queue`` detached;
    ``queue`` (K, D) must hold unit rows (as :class:`MoCoQueue` stores them)."""
    temperature = _check_temperature(temperature)
    _check_rows("q", q)
    _check_rows("k", k, dim=q.shape[1], rows=q.shape[0])
    positive = _paired_cosine(q, k.detach()).unsqueeze(1)
    negative = _similarities(q, queue, query_name="q", queue_name="queue")
    logits = torch.cat([positive, negative], dim=1) / temperature
    return logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device)


def concat_normalized(parts: Sequence[Tensor]) -> Tensor:
    """``normalize(cat(normalize(p) for p in parts))`` along features: IKEM's teacher feature
    ``t`` from the six modalities' features (and its concatenated keys / queues). Each part is
    normalised first so every modality weighs the same; with unit parts the result is the
    concatenation divided by ``sqrt(len(parts))``."""
    if not parts:
        raise ValueError("concat_normalized needs at least one tensor")
    rows = {tuple(p.shape[:-1]) for p in parts}
    if len(rows) != 1:
        shapes = [tuple(p.shape) for p in parts]
        raise ValueError(f"concat_normalized needs parts with the same leading shape, got {shapes}")
    return F.normalize(torch.cat([F.normalize(p.float(), dim=-1) for p in parts], dim=-1), dim=-1)


@torch.no_grad()
def topk_mask(similarities: Tensor, topk: int) -> Tensor:
    """(B, K) bool, True at the ``topk`` largest entries of each row (ties broken by
    ``torch.topk``)."""
    if similarities.dim() != 2:
        raise ValueError(f"similarities must be (B, K), got shape {tuple(similarities.shape)}")
    if not 1 <= topk <= similarities.shape[1]:
        raise ValueError(f"topk must lie in [1, K={similarities.shape[1]}], got {topk}")
    index = similarities.topk(topk, dim=1).indices
    return torch.zeros_like(similarities, dtype=torch.bool).scatter_(1, index, True)


def cross_modal_positives(q_other: Tensor, queue_other: Tensor, topk: int) -> Tensor:
    """CrosSCLR's mined positives (B, K) bool: the ``topk`` entries of ``queue_other`` most
    similar to the sample's query ``q_other`` in *another* view's embedding. Used as positives
    in this view's queue, which must be aligned with ``queue_other`` (row j = the same clip).
    CrosSCLR mines with the other view's *query* (not its momentum key); top-k of a row does
    not depend on the query's norm."""
    return topk_mask(_similarities(q_other, queue_other, query_name="q_other", queue_name="queue_other"), topk)


def positive_mask(mined: Tensor, *, context: bool) -> Tensor:
    """The full positive mask of CrosSCLR / IKEM logits from the mined queue positives (B, K):
    ``[True, mined]`` for ``[pos ; queue]`` logits, ``[True, mined, mined]`` for
    ``[pos ; queue ; context]`` logits (the context column j is clip j too)."""
    if mined.dim() != 2:
        raise ValueError(f"mined positives must be (B, K), got shape {tuple(mined.shape)}")
    mined = mined.bool()
    key = torch.ones(mined.shape[0], 1, dtype=torch.bool, device=mined.device)
    return torch.cat([key, mined, mined] if context else [key, mined], dim=1)


def multi_positive_nce(logits: Tensor, positive_mask: Tensor) -> Tensor:
    """CrosSCLR's multi-positive InfoNCE, as its code computes it:
    ``mean_i [ −(1/|P_i|) Σ_{p∈P_i} log( exp(l_ip) / Σ_j exp(l_ij) ) ]``: the mean over the
    positives of the per-positive cross-entropies, averaged over the batch. With only column 0
    positive it is MoCo's cross-entropy. Every row needs at least one positive."""
    if logits.dim() != 2 or positive_mask.shape != logits.shape:
        raise ValueError(
            f"multi_positive_nce needs logits (B, N) and a mask of the same shape, "
            f"got {tuple(logits.shape)} and {tuple(positive_mask.shape)}"
        )
    mask = positive_mask.bool()
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError(f"multi_positive_nce: rows {torch.nonzero(counts == 0).flatten().tolist()} have no positive")
    log_prob = F.log_softmax(logits.float(), dim=1)
    per_row = -torch.where(mask, log_prob, torch.zeros_like(log_prob)).sum(dim=1) / counts
    return per_row.mean()


def _context_logits(positive: Tensor, sim: Tensor, sim_other: Tensor | None, temperature: float) -> Tensor:
    """``[positive, sim, sim ⊙ sim_other] / T`` (the last block only with ``sim_other``)."""
    blocks = [positive.unsqueeze(1), sim] + ([sim * sim_other] if sim_other is not None else [])
    return torch.cat(blocks, dim=1) / temperature


def crossclr_logits(
    q: Tensor,
    k: Tensor,
    queue: Tensor,
    q_other: Tensor,
    queue_other: Tensor,
    *,
    temperature: float,
    topk: int = 1,
    context: bool = True,
) -> tuple[Tensor, Tensor]:
    """CrosSCLR's cross-view logits of view ``a`` (``q``, ``k``, ``queue``) informed by view
    ``b`` (``q_other``, ``queue_other``, aligned queues):

    ``logits = [q·k, q·Q_a, (q·Q_a) ⊙ (q_b·Q_b)] / T`` (B, 1 + 2K); without ``context``
    ``[q·k, q·Q_a] / T`` (B, 1 + K). Positives: column 0 and the ``topk`` neighbours of ``q_b``
    in ``Q_b`` (in both queue blocks), from :func:`positive_mask`. As in the reference, the
    context block carries gradient into ``q_other`` as well; detach it to stop that.
    """
    temperature = _check_temperature(temperature)
    _check_rows("q", q)
    _check_rows("k", k, dim=q.shape[1], rows=q.shape[0])
    _check_rows("q_other", q_other, rows=q.shape[0])
    _check_rows("queue_other", queue_other, rows=queue.shape[0] if queue.dim() == 2 else None)
    positive = _paired_cosine(q, k.detach())
    sim = _similarities(q, queue, query_name="q", queue_name="queue")
    sim_other = _similarities(q_other, queue_other, query_name="q_other", queue_name="queue_other")
    logits = _context_logits(positive, sim, sim_other if context else None, temperature)
    return logits, positive_mask(topk_mask(sim_other.detach(), topk), context=context)


def _same_names(what: str, expected: Sequence[str], got: Mapping[str, object]) -> None:
    if set(got) != set(expected):
        raise ValueError(f"{what}: expected modalities {sorted(expected)}, got {sorted(got)}")


def crossclr_losses(
    queries: Mapping[str, Tensor],
    keys: Mapping[str, Tensor],
    queues: Mapping[str, Tensor],
    *,
    temperature: float,
    topk: int = 1,
    context: bool = True,
) -> dict[str, Tensor]:
    """CrosSCLR's cross-view loss of every view (IKEM stage 1 after the warm-up): for view
    ``a``, the mean over the other views ``b`` of :func:`multi_positive_nce` on
    :func:`crossclr_logits` ``(a informed by b)``. Similarities and mined positives are
    computed once per view. Returns ``{view: scalar}``; the caller sums them (the reference
    adds the views' losses with equal weights)."""
    temperature = _check_temperature(temperature)
    names = list(queries)
    if len(names) < 2:
        raise ValueError(f"crossclr_losses needs at least two views, got {names}")
    _same_names("crossclr_losses keys", names, keys)
    _same_names("crossclr_losses queues", names, queues)
    sims, positives, mined = {}, {}, {}
    for name in names:
        _check_rows(f"keys[{name!r}]", keys[name], dim=queries[name].shape[1], rows=queries[name].shape[0])
        sims[name] = _similarities(
            queries[name], queues[name], query_name=f"queries[{name!r}]", queue_name=f"queues[{name!r}]"
        )
        positives[name] = _paired_cosine(queries[name], keys[name].detach())
        mined[name] = topk_mask(sims[name].detach(), topk)
    shapes = {name: tuple(sim.shape) for name, sim in sims.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"crossclr_losses needs the same batch and queue size in every view, got {shapes}")
    losses = {}
    for name in names:
        terms = [
            multi_positive_nce(
                _context_logits(positives[name], sims[name], sims[other] if context else None, temperature),
                positive_mask(mined[other], context=context),
            )
            for other in names
            if other != name
        ]
        losses[name] = torch.stack(terms).mean()
    return losses


# --------------------------------------------------------------------------- IKEM


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class KnowledgeExchange(nn.Module):
    """IKEM's Implicit Knowledge Exchange Module (stage 1, after the warm-up).

    Each modality ``x``'s pooled feature (the backbone's feature *before* its MoCo projection
    head, as in the reference) goes through its own MLP ``dims[x] → hidden → M·key_dim`` and is
    contrasted, MoCo-style with a single positive, against all modalities' keys at once:

    * positive: ``concat_normalized(k_1, ..., k_M)`` of the *same clip* (the momentum keys);
    * negatives: ``concat_normalized(Q_1, ..., Q_M)``, the concatenated rows of the
      modalities' MoCo queues. The queues must be aligned (row j = the same clip in all), which
      the cross-view mining needs anyway; the module keeps no queue of its own, so no
      concatenated copy of the queues is stored (this matches the reference, which builds its
      negatives from the six per-modality queues).

    ``loss_x = CE(moco_logits(mlp_x(f_x), cat k, cat Q, T), 0)``. A modality thus learns to
    predict the joint embedding of all modalities instead of trusting a single other view's
    neighbours, the knowledge CrosSCLR's mining would propagate even from weak modalities.

    Args:
        dims: pooled feature size per modality; the order fixes the concatenation order.
        key_dim: size of every modality's MoCo key (all equal; 128 in IKEM).
        hidden: the MLP's hidden width (default ``M·key_dim``, as in the reference).
        temperature: MoCo temperature (0.07).
    """

    def __init__(
        self, *, dims: Mapping[str, int], key_dim: int, hidden: int | None = None, temperature: float = 0.07
    ) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"KnowledgeExchange needs at least two modalities, got {list(dims)}")
        if key_dim < 1:
            raise ValueError(f"KnowledgeExchange key_dim must be positive, got {key_dim}")
        self.modalities = tuple(dims)
        self.dims = {name: int(dims[name]) for name in self.modalities}
        self.key_dim = int(key_dim)
        self.temperature = _check_temperature(temperature)
        joint_dim = len(self.modalities) * self.key_dim
        self.heads = nn.ModuleDict({name: _mlp(dims[name], hidden or joint_dim, joint_dim) for name in self.modalities})

    def forward(
        self, features: Mapping[str, Tensor], keys: Mapping[str, Tensor], queues: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Per-modality losses ``{x: scalar}`` (the reference adds each to modality x's loss).

        features: ``{x: (B, dims[x])}`` pooled query-encoder features (they get the gradient);
        keys: ``{x: (B, key_dim)}`` momentum keys of the same clips; queues: ``{x: (K, key_dim)}``
        the modalities' aligned queues (``MoCoQueue.keys``).
        """
        for what, given in (("features", features), ("keys", keys), ("queues", queues)):
            _same_names(f"KnowledgeExchange {what}", self.modalities, given)
        for name in self.modalities:
            _check_rows(f"features[{name!r}]", features[name], dim=self.dims[name])
            _check_rows(f"keys[{name!r}]", keys[name], dim=self.key_dim, rows=features[name].shape[0])
            _check_rows(f"queues[{name!r}]", queues[name], dim=self.key_dim)
        positive = concat_normalized([keys[name].detach() for name in self.modalities])
        negatives = concat_normalized([queues[name].detach() for name in self.modalities])
        losses = {}
        for name in self.modalities:
            logits, labels = moco_logits(self.heads[name](features[name]), positive, negatives, self.temperature)
            losses[name] = F.cross_entropy(logits, labels)
        return losses


def relational_kd_logits(
    s: Tensor, t: Tensor, queue_t: Tensor, q_x: Tensor, queue_x: Tensor, temperature: float, *, topk: int = 1
) -> tuple[Tensor, Tensor]:
    """IKEM's relational cross-modality distillation logits for a student and teacher
    modality ``x`` (METHODS.md 3):

    ``logits = [s·t, s·Q_T, (q_x·Q_x) ⊙ (s·Q_T)] / T`` (B, 1 + 2K), positive mask
    ``[True, top1(q_x·Q_x), top1(q_x·Q_x)]`` (B, 1 + 2K).

    Shapes: ``s`` (B, D_T) the student's feature projected into the teacher's concatenated
    space (an MLP head ``student_dim → hidden → D_T``, :class:`RelationalDistillation`);
    ``t`` (B, D_T) the teacher ``concat_normalized`` of the six frozen encoders' features of the
    same clip; ``queue_t`` (K, D_T) past teacher features; ``q_x`` (B, D_x) the frozen
    modality-x encoder's feature of the same clip; ``queue_x`` (K, D_x) its past features,
    aligned with ``queue_t``. The third block is an elementwise product of two similarity rows
    over the same K queued clips: a queued clip counts for the student as much as it is close
    to the anchor in *both* the teacher-x and the student space, and the clip teacher x deems
    nearest is a positive. The student inherits the teacher's relations (anchor, positives,
    negatives), not its raw features. All of ``s, t, q_x`` are normalised here; only ``s``
    gets a gradient. ``topk`` > 1 is an extension (IKEM: 1).
    """
    temperature = _check_temperature(temperature)
    _check_rows("s", s)
    _check_rows("t", t, dim=s.shape[1], rows=s.shape[0])
    _check_rows("q_x", q_x, rows=s.shape[0])
    _check_rows("queue_x", queue_x, rows=queue_t.shape[0] if queue_t.dim() == 2 else None)
    sim_s = _similarities(s, queue_t, query_name="s", queue_name="queue_t")
    sim_x = _similarities(q_x.detach(), queue_x, query_name="q_x", queue_name="queue_x")
    positive = _paired_cosine(s, t.detach())
    logits = _context_logits(positive, sim_s, sim_x, temperature)
    return logits, positive_mask(topk_mask(sim_x, topk), context=True)


def relational_kd_loss(
    s: Tensor, t: Tensor, queue_t: Tensor, q_x: Tensor, queue_x: Tensor, temperature: float, *, topk: int = 1
) -> Tensor:
    """:func:`multi_positive_nce` over :func:`relational_kd_logits` (column 0 always positive)."""
    return multi_positive_nce(*relational_kd_logits(s, t, queue_t, q_x, queue_x, temperature, topk=topk))


class RelationalDistillation(nn.Module):
    """IKEM stage 2: frozen teacher modalities distil their relations into students.

    Owns what the relational loss needs besides the encoders: one projection head per student
    (``student_dim → hidden → D_T``, ``D_T`` = sum of the teacher dims; IKEM's students end in
    such a head), a queue per teacher modality (``Q_x``) and one of teacher features (``Q_T``),
    all enqueued in lock-step so they stay aligned. Per student, the loss is the mean over the
    teacher modalities ``x`` of :func:`relational_kd_loss` (the reference's ``/6``); ``s·Q_T``
    is computed once per student and shared by the ``x`` terms.

    Deviation from the released code: each modality's similarities use its own queue (the
    reference mines the angular-velocity positives in the bone queue, a copy-paste slip).

    Args:
        student_dims: pooled feature size per student (IKEM: joint, motion, bone).
        teacher_dims: feature size per frozen teacher modality (IKEM: six × 128); the order
            fixes the concatenation order of ``t``.
        queue_size: K (32768 in IKEM).
        temperature: T (0.07).
        hidden: the heads' hidden width (default ``D_T``).
        topk: mined positives per teacher modality (IKEM: 1).
    """

    def __init__(
        self,
        *,
        student_dims: Mapping[str, int],
        teacher_dims: Mapping[str, int],
        queue_size: int,
        temperature: float = 0.07,
        hidden: int | None = None,
        topk: int = 1,
    ) -> None:
        super().__init__()
        if not student_dims or not teacher_dims:
            raise ValueError(
                f"RelationalDistillation needs students and teachers, got {list(student_dims)} and {list(teacher_dims)}"
            )
        if not 1 <= topk <= queue_size:
            raise ValueError(f"RelationalDistillation topk must lie in [1, queue_size={queue_size}], got {topk}")
        self.students = tuple(student_dims)
        self.teachers = tuple(teacher_dims)
        self.temperature = _check_temperature(temperature)
        self.topk = int(topk)
        teacher_dim = sum(teacher_dims.values())
        self.heads = nn.ModuleDict(
            {name: _mlp(student_dims[name], hidden or teacher_dim, teacher_dim) for name in self.students}
        )
        self.queues = nn.ModuleDict({name: MoCoQueue(teacher_dims[name], queue_size) for name in self.teachers})
        self.teacher_queue = MoCoQueue(teacher_dim, queue_size)

    def teacher_feature(self, teachers: Mapping[str, Tensor]) -> Tensor:
        """``t = concat_normalized`` of the teacher modalities' features, detached (B, D_T)."""
        _same_names("RelationalDistillation teachers", self.teachers, teachers)
        return concat_normalized([teachers[name].detach() for name in self.teachers])

    def forward(
        self, students: Mapping[str, Tensor], teachers: Mapping[str, Tensor], *, enqueue: bool = True
    ) -> dict[str, Tensor]:
        """Losses ``{student: scalar}``; then, unless ``enqueue=False``, the teachers' features
        of this batch enter the queues (MoCo order: use the queue, then update it).

        students: ``{name: (B, student_dim)}`` pooled student features (the reference feeds the
        students the second augmentation of the clip the teachers see);
        teachers: ``{x: (B, D_x)}`` the frozen teachers' features of the same clips.
        """
        _same_names("RelationalDistillation students", self.students, students)
        t = self.teacher_feature(teachers)
        queue_t = self.teacher_queue.keys
        sim_x = {
            x: _similarities(
                teachers[x].detach(), self.queues[x].keys, query_name=f"teachers[{x!r}]", queue_name=f"Q_{x}"
            )
            for x in self.teachers
        }
        masks = {x: positive_mask(topk_mask(sim, self.topk), context=True) for x, sim in sim_x.items()}
        losses = {}
        for name in self.students:
            s = self.heads[name](students[name])
            _check_rows(f"students[{name!r}]", s, rows=t.shape[0])
            sim_s = _similarities(s, queue_t, query_name=f"student {name!r}", queue_name="Q_T")
            positive = _paired_cosine(s, t)
            terms = [
                multi_positive_nce(_context_logits(positive, sim_s, sim_x[x], self.temperature), masks[x])
                for x in self.teachers
            ]
            losses[name] = torch.stack(terms).mean()
        if enqueue:
            self.enqueue(teachers, t)
        return losses

    @torch.no_grad()
    def enqueue(self, teachers: Mapping[str, Tensor], t: Tensor | None = None) -> None:
        """Add a batch of teacher features to every queue (gathered across ranks), in lock-step."""
        _same_names("RelationalDistillation teachers", self.teachers, teachers)
        for name in self.teachers:
            self.queues[name].enqueue(teachers[name])
        self.teacher_queue.enqueue(self.teacher_feature(teachers) if t is None else t)

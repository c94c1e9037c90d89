"""Episode classifiers that solve many few-shot episodes at once on cached features.

Evaluation encodes every clip once and caches its features (DESIGN.md, "Encode once, then solve
episodes"). What is left per episode is a small problem on a handful of vectors, so every
classifier here fits a *batch* of independent episodes, ``support (E, S, D)`` with
``support_labels (E, S)``, in tensor ops over all of them at once: 600 episodes cost
milliseconds where a per-episode Python loop costs seconds.

A classifier is a plug-in: one class here and one file under ``configs/fewshot/classifier/``
(Hydra ``_target_``). :meth:`EpisodeClassifier.fit` returns an :class:`EpisodeHead` (here always
a :class:`LinearHead`) that scores queries; :func:`solve_episodes` turns a feature cache and an
episode tensor (:attr:`mmfsar.data.episodes.EpisodeSet.tensor`) into per-episode accuracies,
which is all the evaluation loop needs.
"""

from __future__ import annotations

import numbers
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "EpisodeClassifier",
    "EpisodeHead",
    "LinearHead",
    "PrototypeClassifier",
    "LogisticRegressionClassifier",
    "FinetuneLinearClassifier",
    "check_episode_inputs",
    "logistic_objective",
    "episode_probabilities",
    "solve_episodes",
]


class EpisodeHead(Protocol):
    """What a classifier fitted on E episodes returns: it scores the queries of those episodes."""

    def predict_proba(self, query: Tensor) -> Tensor:
        """query (E, M, D) -> (E, M, n_way) class probabilities."""
        ...

    def select(self, index: slice | Tensor) -> "EpisodeHead":
        """The heads of a subset of the episodes (to score queries block by block)."""
        ...


@dataclass(frozen=True)
class LinearHead:
    """Linear classifiers of E episodes: probabilities = softmax(q @ weight[e]ᵀ + bias[e]).

    ``normalize_query``: L2-normalise queries first (classifiers fitted on normalised features).
    ``converged`` / ``n_iter``: per-episode solver diagnostics, when the classifier iterates.
    """

    weight: Tensor  # (E, n_way, D)
    bias: Tensor  # (E, n_way)
    normalize_query: bool = False
    converged: Tensor | None = None  # (E,) bool
    n_iter: Tensor | None = None  # (E,) long

    def __len__(self) -> int:
        return self.weight.shape[0]

    def predict_proba(self, query: Tensor) -> Tensor:
        if (
            query.dim() != 3
            or query.shape[0] != len(self)
            or query.shape[2] != self.weight.shape[2]
        ):
            raise ValueError(
                f"query must be ({len(self)}, queries, {self.weight.shape[2]}), "
                f"got {tuple(query.shape)}"
            )
        # Scoring in the queries' own precision is exact enough for the argmax and saves a copy.
        dtype = _compute_dtype(query)
        q = query.to(dtype)
        if self.normalize_query:
            q = F.normalize(q, dim=-1)
        logits = torch.baddbmm(
            self.bias.to(dtype).unsqueeze(1), q, self.weight.to(dtype).transpose(1, 2)
        )
        return _softmax_(logits)

    def select(self, index: slice | Tensor) -> "LinearHead":
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return LinearHead(
            self.weight[index],
            self.bias[index],
            self.normalize_query,
            pick(self.converged),
            pick(self.n_iter),
        )


class EpisodeClassifier(ABC):
    """Fits on the support set of many episodes at once and returns class probabilities.

    Subclasses implement :meth:`_fit`; the public :meth:`fit` and :meth:`predict_proba` check
    the inputs first, so every plug-in rejects bad shapes and labels with the same clear errors.
    Fitting sees only the support (no transduction): :func:`solve_episodes` fits each episode
    once and scores all its queries and query views with the returned head.
    """

    def fit(self, support: Tensor, support_labels: Tensor, n_way: int) -> EpisodeHead:
        """Fit E episodes: support (E, S, D) float, support_labels (E, S) integers in [0, n_way)."""
        check_episode_inputs(support, support_labels, n_way)
        return self._fit(support, support_labels.long(), int(n_way))

    def predict_proba(
        self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int
    ) -> Tensor:
        """Class probabilities of the queries of E independent episodes.

        support: (E, S, D) float features; support_labels: (E, S) integer way indices in
        ``[0, n_way)``, every way present in every episode; query: (E, M, D).
        Returns (E, M, n_way) probabilities (rows sum to 1) in the queries' precision
        (float32 unless they are float64).
        """
        check_episode_inputs(support, support_labels, n_way, query)
        return self._fit(support, support_labels.long(), int(n_way)).predict_proba(query)

    @abstractmethod
    def _fit(self, support: Tensor, support_labels: Tensor, n_way: int) -> EpisodeHead:
        """Same contract as :meth:`fit`, on inputs already checked (labels long)."""

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


def check_episode_inputs(
    support: Tensor, support_labels: Tensor, n_way: int, query: Tensor | None = None
) -> None:
    """Raise ``ValueError`` naming what is wrong with a batch of episodes."""
    if isinstance(n_way, bool) or not isinstance(n_way, numbers.Integral) or n_way < 2:
        raise ValueError(f"n_way must be an integer >= 2, got {n_way!r}")
    if support.dim() != 3:
        raise ValueError(
            f"support must be (episodes, shots, dim), got shape {tuple(support.shape)}"
        )
    if support_labels.dim() != 2:
        raise ValueError(
            f"support_labels must be (episodes, shots), got shape {tuple(support_labels.shape)}"
        )
    if not support.is_floating_point():
        raise ValueError(f"support features must be floating point, got {support.dtype}")
    if (
        support_labels.is_floating_point()
        or support_labels.is_complex()
        or support_labels.dtype == torch.bool
    ):
        raise ValueError(f"support_labels must be integers, got {support_labels.dtype}")
    if support_labels.shape != support.shape[:2]:
        raise ValueError(
            f"support_labels {tuple(support_labels.shape)} does not match "
            f"support {tuple(support.shape)}"
        )
    if support.shape[0] == 0 or support.shape[1] == 0:
        raise ValueError(f"support is empty: shape {tuple(support.shape)}")
    if query is not None:
        if query.dim() != 3:
            raise ValueError(
                f"query must be (episodes, queries, dim), got shape {tuple(query.shape)}"
            )
        if not query.is_floating_point():
            raise ValueError(f"query features must be floating point, got {query.dtype}")
        if query.shape[0] != support.shape[0]:
            raise ValueError(
                f"support has {support.shape[0]} episodes but query has {query.shape[0]}"
            )
        if query.shape[2] != support.shape[2]:
            raise ValueError(
                f"support features are {support.shape[2]}-d "
                f"but query features are {query.shape[2]}-d"
            )
    low, high = int(support_labels.min()), int(support_labels.max())
    if low < 0 or high >= n_way:
        raise ValueError(f"support label {low if low < 0 else high} outside [0, n_way={n_way})")
    counts = F.one_hot(support_labels.long(), n_way).sum(1)
    if bool((counts == 0).any()):
        episode, way = (counts == 0).nonzero()[0].tolist()
        raise ValueError(f"episode {episode} has no support example of way {way}")
    for name, x in (("support", support), ("query", query)):
        # A sum is NaN/inf whenever an entry is; the full check only confirms (overflow).
        if x is not None and not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
            raise ValueError(f"{name} features contain NaN or inf")


def _softmax_(logits: Tensor) -> Tensor:
    """Softmax over the (short) last dimension, in place: several times faster than
    ``torch.softmax`` for a few classes."""
    logits -= logits.amax(-1, keepdim=True)
    logits.exp_()
    return logits.div_(logits.sum(-1, keepdim=True))


def _compute_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _class_means(support: Tensor, support_labels: Tensor, n_way: int) -> Tensor:
    """(E, n_way, D) mean support feature of each way."""
    onehot = F.one_hot(support_labels, n_way).to(support.dtype)  # (E, S, N)
    return (onehot.transpose(1, 2) @ support) / onehot.sum(1).unsqueeze(-1)


class PrototypeClassifier(EpisodeClassifier):
    """Nearest centroid (ProtoNet-style): each way is the mean p of its support features.

    ``metric="euclidean"``: probabilities = softmax(-‖q - p‖² / temperature), computed as the
    equal softmax of the linear logits (2·q·p - ‖p‖²) / temperature (the ‖q‖² term is
    common to all classes); ``metric="cosine"``: softmax(cos(q, p) / temperature). The temperature
    never changes a single view's predicted class, but it sets how sharply query views are
    weighted when their probabilities are averaged (ensemble masked inference).
    """

    def __init__(
        self, metric: Literal["cosine", "euclidean"] = "euclidean", temperature: float = 1.0
    ) -> None:
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.metric = metric
        self.temperature = float(temperature)

    def _fit(self, support: Tensor, support_labels: Tensor, n_way: int) -> LinearHead:
        prototypes = _class_means(support.to(_compute_dtype(support)), support_labels, n_way)
        if self.metric == "cosine":
            weight = F.normalize(prototypes, dim=-1) / self.temperature
            return LinearHead(weight, weight.new_zeros(weight.shape[:2]), normalize_query=True)
        return LinearHead(
            2 * prototypes / self.temperature, -prototypes.square().sum(-1) / self.temperature
        )


def logistic_objective(
    features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, C: float = 1.0
) -> Tensor:
    """scikit-learn's multinomial objective ``C·Σ_i CE_i + ½‖W‖²`` (bias free), per episode.

    features (E, S, D), labels (E, S), weight (E, N, D), bias (E, N) -> (E,). Used to check that a
    fit reaches the optimum scikit-learn's ``LogisticRegression(C=C)`` aims for.
    """
    logits = features @ weight.transpose(1, 2) + bias.unsqueeze(1)
    ce = -torch.log_softmax(logits, -1).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1).sum(-1)
    return C * ce + 0.5 * weight.square().sum((1, 2))


def _blocks(episodes: int, bytes_per_episode: int, budget: int = 1 << 20) -> range:
    """Starts of episode blocks whose temporaries stay in cache (several times faster here)."""
    return range(0, episodes, max(1, budget // max(1, bytes_per_episode)))


class _SupportBasis:
    """Q = Xᵀ·M per episode, an orthonormal (D, r) basis of the support span, never formed whole.

    The kernel reduction solves in r-dim coordinates; scikit-learn's stopping test needs the
    largest entry of each gradient column mapped back to D dims, which :meth:`small` decides
    from X itself, cheaply where bounds suffice: ‖Q·v‖∞ <= min(‖v‖, max_i ‖x_i‖·‖M·v‖) (x_i the
    i-th feature across the support), and ‖Q·v‖∞ >= |(Q·v)_i| at the coordinate that was largest
    at the episode's last exact evaluation (``probe``); only the undecided episodes are mapped.
    """

    def __init__(self, x: Tensor, coef_map: Tensor, largest_column: Tensor, n_way: int) -> None:
        self.x = x  # (E, S, D) input precision
        self.coef_map_t = coef_map.transpose(1, 2).contiguous()  # (E, r, S) float64
        self.largest_column = largest_column  # (E,) max_i ‖x_i‖² (with a little slack)
        self.probe = torch.zeros(x.shape[0], n_way, dtype=torch.long, device=x.device)
        self.offsets = torch.arange(x.shape[1], device=x.device) * x.shape[2]

    def small(self, ids: Tensor, weights: Tensor, tol: float) -> Tensor:
        """max |(Q·v_n)_i| <= tol for every class n, for episodes ``ids`` with class-major
        gradient columns ``weights`` (n, N, r); float32 features decide to 1e-7 relative."""
        coefficients = weights @ self.coef_map_t.index_select(0, ids)  # (n, N, S): Q·v = Xᵀ·M·v
        bound = torch.minimum(
            weights.square().sum(-1),
            coefficients.square().sum(-1).mul_(self.largest_column.index_select(0, ids)[:, None]),
        )
        small = bound.amax(-1) <= tol * tol
        if bool(small.all()):
            return small
        rows = (~small).nonzero().squeeze(1)
        episode, coefficients = ids.index_select(0, rows), coefficients.index_select(0, rows)
        shots, dim = self.x.shape[1:]
        where = (episode * (shots * dim))[:, None, None] + self.offsets
        where = where + self.probe.index_select(0, episode)[:, :, None]  # (u, N, S)
        probed = self.x.reshape(-1).take(where).to(coefficients.dtype)
        lower = (probed * coefficients).sum(-1).abs_().amax(-1)
        keep = lower <= tol
        if bool(keep.any()):
            rows, episode, coefficients = rows[keep], episode[keep], coefficients[keep]
            mapped = torch.bmm(coefficients.to(self.x.dtype), self.x.index_select(0, episode)).abs_()
            peak, coordinate = mapped.max(-1)  # (u, N)
            small[rows] = is_small = peak.amax(-1) <= tol
            self.probe[episode[~is_small]] = coordinate[~is_small]
        return small


def _combine(coefficients: Tensor, x: Tensor) -> Tensor:
    """coefficients (E, N, S) @ x (E, S, D) in cache-sized blocks of episodes: (E, N, D)."""
    out = x.new_empty(x.shape[0], coefficients.shape[1], x.shape[2])
    step = _blocks(x.shape[0], x.element_size() * x.shape[2] * (x.shape[1] + coefficients.shape[1])).step
    for start in range(0, x.shape[0], step):
        torch.bmm(coefficients[start : start + step], x[start : start + step], out=out[start : start + step])
    return out


def _kernel_reduction(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Z (E, S, S) and M (E, S, S) with Z·Zᵀ = X·Xᵀ and Q = Xᵀ·M orthonormal (float64), and
    max_i ‖x_i‖² (E,) (x_i the i-th feature across the support, for :class:`_SupportBasis`).

    Cholesky X·Xᵀ = L·Lᵀ gives Z = L, M = L⁻ᵀ; episodes whose Gram matrix is singular or
    badly conditioned (repeated clips) use the eigendecomposition U·Λ·Uᵀ instead: Z = U·Λ^½,
    M = U·Λ^-½ on the non-negligible eigenvalues (a pseudo-inverse), which stays orthonormal.
    The Gram matrix is exact (float64 products of the features), computed in cache-sized blocks.
    """
    episodes, shots, dim = x.shape
    gram = x.new_empty(episodes, shots, shots, dtype=torch.float64)
    largest_column = x.new_empty(episodes, dtype=torch.float64)
    step = _blocks(episodes, 8 * shots * dim).step
    for start in range(0, episodes, step):
        block = x[start : start + step].double()
        torch.bmm(block, block.transpose(1, 2), out=gram[start : start + step])
        largest_column[start : start + step] = block.square().sum(1).amax(-1)  # (not in place: .double() may be x)
    largest_column.mul_(1 + 1e-5)
    factor, info = torch.linalg.cholesky_ex(gram)
    diagonal = factor.diagonal(dim1=1, dim2=2)
    bad = (info != 0) | ~(diagonal.amin(-1) > 1e-5 * diagonal.amax(-1))
    eye = torch.eye(shots, dtype=torch.float64, device=x.device)
    coef_map = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False).transpose(
        1, 2
    )
    features = factor
    if bool(bad.any()):
        eigenvalues, eigenvectors = torch.linalg.eigh(gram[bad])
        kept = (
            eigenvalues
            > eigenvalues.amax(-1, keepdim=True) * shots * torch.finfo(torch.float64).eps
        )
        root = eigenvalues.clamp_min(0).sqrt()
        features[bad] = eigenvectors * torch.where(kept, root, 0).unsqueeze(1)
        coef_map[bad] = eigenvectors * torch.where(kept, 1 / root.clamp_min(1e-300), 0).unsqueeze(1)
    return features, coef_map, largest_column


class LogisticRegressionClassifier(EpisodeClassifier):
    """Multinomial logistic regression fitted for all episodes of a batch at once, as scikit-learn.

    The objective is scikit-learn's ``LogisticRegression()``: ``C·Σ_i CE_i + ½‖W‖²`` with a
    free (unpenalised) intercept, the classifier MM-CDFSL fits per episode (lbfgs, C=1).
    Every operation is one tensor op over all episodes of the batch (episodes that stopped
    leave the batch as it shrinks).

    **Kernel reduction (both solvers).** The loss sees W only through X·Wᵀ and a component of W
    orthogonal to the support features only adds to ‖W‖², so iterates and optimum stay in their
    span. With an orthonormal basis Q (D, S) of that span, from the support Gram matrix
    (Cholesky X·Xᵀ = L·Lᵀ, Q = Xᵀ·L⁻ᵀ; see :func:`_kernel_reduction`), the problem is the
    *same* logistic regression on the S-dimensional features X·Q = L (S = support size, 25 for
    5-way 5-shot, instead of D = 384), and W = Bᵀ·Qᵀ.

    ``solver="lbfgs"`` (default) replays scikit-learn's own solve: L-BFGS with SciPy's
    L-BFGS-B line search and stopping rules (see :func:`_lbfgs_logistic`); iterates, iteration
    counts and predictions are scikit-learn's up to round-off. This matters: on raw encoder
    features that solve stops early. scikit-learn's ``tol`` bounds the gradient of the
    objective divided by ``C·S``, which is loose when features have a large norm, so
    ``LogisticRegression()`` halts before the optimum (objective 0.03–0.8 % above it on
    LayerNorm-scaled features, D = 384) and its predictions differ from the optimum's on 1–8 %
    of 1-shot queries (its accuracy was up to 0.9 points *higher*: stopping early regularises).
    Reproducing MM-CDFSL's numbers needs that early stop, not the optimum (measured on the
    features of ``benchmarks/bench_logreg.py``: the optimum agrees with ``LogisticRegression()``
    on 97.0 % of 5-way 1-shot and 99.3 % of 5-shot predictions, the replay on 100 %).

    Cost of the replay (``benchmarks/bench_logreg.py``): the Gram matrices (S²·D per episode)
    and, per L-BFGS iteration, two small batched products (the logits along the new direction,
    the gradient at the accepted point), the two-loop recursion over the correction pairs and
    a few elementwise passes; line-search trials need no product (logits are linear along the
    direction); the Moré–Thuente state machine runs on NumPy views on the CPU. Parameters are
    held class-major (E, N, S + 1), the layout in which the batched products are fastest.

    ``solver="newton"`` finds the optimum itself: Newton steps by conjugate gradients
    preconditioned with Böhning's bound (diag(p) - p·pᵀ <= ½(I - 11ᵀ/N), Böhning 1992, which
    gives a fixed (S+1)×(S+1) matrix per episode, inverted once), an Armijo line search, and
    iterates kept in the sum-zero class subspace (the softmax ignores a vector added to every
    class; the intercepts come out centred). It agrees with scikit-learn run to convergence
    (e.g. ``tol=1e-8``), not necessarily with its default early stop.

    ``normalize``: L2-normalise support and query features first. Off by default because
    MM-CDFSL fits on the raw features and this keeps the fit identical to scikit-learn's.
    With ``n_way == 2`` scikit-learn fits a binomial model (one weight vector), which has the
    optimum of the multinomial model with C/2; C/2 is used there (same optimum; the lbfgs replay
    is then not step for step scikit-learn's). The solve runs in float64, as scikit-learn's;
    the returned head scores queries in their own precision.
    """

    def __init__(
        self,
        C: float = 1.0,
        max_iter: int = 100,
        tol: float = 1e-4,
        normalize: bool = False,
        solver: Literal["lbfgs", "newton"] = "lbfgs",
    ) -> None:
        if C <= 0:
            raise ValueError(f"C must be > 0, got {C}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        if tol <= 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if solver not in ("lbfgs", "newton"):
            raise ValueError(f"solver must be 'lbfgs' or 'newton', got {solver!r}")
        self.C = float(C)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.normalize = bool(normalize)
        self.solver = solver

    def _fit(self, support: Tensor, support_labels: Tensor, n_way: int) -> LinearHead:
        x = support.to(_compute_dtype(support))
        if self.normalize:
            x = F.normalize(x, dim=-1)
        episodes, shots, dim = x.shape
        C = self.C / 2 if n_way == 2 else self.C
        basis = None
        if shots < dim:
            features, coef_map, largest_column = _kernel_reduction(x)
            if self.solver == "lbfgs":
                basis = _SupportBasis(x, coef_map, largest_column, n_way)
        else:
            features = x.double()
        if self.solver == "lbfgs":
            theta, converged, n_iter = _lbfgs_logistic(
                features, support_labels, n_way, C, self.max_iter, self.tol, basis
            )
        else:
            theta, converged, n_iter = _newton_logistic(
                features, support_labels, n_way, C, self.max_iter, self.tol
            )
        if shots < dim:  # W = (Xᵀ·M·B)ᵀ, in the features' precision
            weight = _combine((coef_map @ theta[:, :-1]).transpose(1, 2).to(x.dtype), x)
        else:
            weight = theta[:, :-1].transpose(1, 2).to(x.dtype)
        if not bool(converged.all()):
            warnings.warn(
                f"logistic regression ({self.solver}) did not converge in max_iter={self.max_iter} "
                f"iterations for {int((~converged).sum())} of {episodes} episodes",
                RuntimeWarning,
                stacklevel=3,
            )
        return LinearHead(weight, theta[:, -1].to(x.dtype), self.normalize, converged, n_iter)


def _newton_logistic(
    features: Tensor, labels: Tensor, n_way: int, C: float, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Preconditioned Newton-CG on ``C·Σ CE + ½‖W‖²`` for E episodes at once.

    features (E, S, D), labels (E, S). ``tol`` as scikit-learn's (largest gradient entry of the
    objective divided by C·S), on the gradient in these (reduced) coordinates; the last Newton
    step usually lands far below it. Returns theta (E, D + 1, N) (W stacked over the intercept
    row: logits = [x, 1] @ theta), converged (E,) and Newton steps taken (E,).
    """
    episodes, shots, dim = features.shape
    dtype = features.dtype
    x1 = torch.cat([features, features.new_ones(episodes, shots, 1)], -1)  # (E, S, D + 1)
    x1t = x1.transpose(1, 2)
    targets = F.one_hot(labels, n_way).to(dtype)
    penalised = torch.ones(dim + 1, 1, dtype=dtype, device=features.device)
    penalised[-1] = 0
    bound = 0.5 * C * (x1t @ x1) + torch.diag(penalised.squeeze(1))
    precondition = torch.linalg.inv(bound)  # (E, D + 1, D + 1), once
    tiny = torch.finfo(dtype).tiny

    def objective(theta: Tensor) -> Tensor:
        logp = torch.log_softmax(x1 @ theta, -1)
        return -C * (logp * targets).sum((1, 2)) + 0.5 * (theta * penalised).pow(2).sum((1, 2))

    def hessian_times(probs: Tensor, v: Tensor) -> Tensor:
        dlogits = x1 @ v
        weighted = probs * dlogits
        weighted = weighted - probs * weighted.sum(-1, keepdim=True)
        return C * (x1t @ weighted) + penalised * v

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum((1, 2))

    theta = features.new_zeros(episodes, dim + 1, n_way)
    scale = C * shots  # scikit-learn's tol applies to the objective divided by C·S
    first_norm = None
    steps = torch.zeros(episodes, dtype=torch.long, device=features.device)
    while True:
        probs = torch.softmax(x1 @ theta, -1)
        grad = C * (x1t @ (probs - targets)) + penalised * theta
        converged = grad.abs().amax((1, 2)) <= tol * scale
        if int(steps.max()) == max_iter or bool(converged.all()):
            break
        grad_norm = dot(grad, grad).sqrt()
        first_norm = grad_norm if first_norm is None else first_norm
        # Inexact Newton: solve H·step = -grad to a relative residual that shrinks with ‖grad‖.
        forcing = torch.clamp(grad_norm / first_norm.clamp_min(tiny), max=0.5).sqrt() * 0.5
        limit = torch.where(converged, torch.inf, forcing * grad_norm)
        step = torch.zeros_like(grad)
        residual = -grad
        direction = precondition @ residual
        rz = dot(residual, direction)
        for _ in range(2 * (dim + 1) * n_way):
            running = dot(residual, residual).sqrt() > limit
            if not bool(running.any()):
                break
            curved = hessian_times(probs, direction)
            alpha = torch.where(running, rz / dot(direction, curved).clamp_min(tiny), 0)
            step = step + alpha[:, None, None] * direction
            residual = residual - alpha[:, None, None] * curved
            preconditioned = precondition @ residual
            rz_next = dot(residual, preconditioned)
            beta = torch.where(running, rz_next / rz.clamp_min(tiny), 0)
            direction = preconditioned + beta[:, None, None] * direction
            rz = rz_next

        # Backtracking (Armijo) line search, per episode.
        current = objective(theta)
        slope = dot(grad, step)
        slack = 16 * torch.finfo(dtype).eps * current.abs()  # round-off must not reject a good step
        length = torch.ones_like(current)
        for _ in range(40):
            failed = (
                objective(theta + length[:, None, None] * step)
                > current + 1e-4 * length * slope + slack
            )
            if not bool(failed.any()):
                break
            length = torch.where(failed, length / 2, length)
        theta = theta + length[:, None, None] * step
        steps += (~converged).long()
    return theta, converged, steps


def _select(mask: Tensor, new: tuple[Tensor, ...], old: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Per episode (leading dim), ``new`` where ``mask`` is set, else ``old``."""
    return tuple(torch.where(mask.view(-1, *[1] * (n.dim() - 1)), n, o) for n, o in zip(new, old, strict=True))


def _lbfgs_logistic(
    features: Tensor,
    labels: Tensor,
    n_way: int,
    C: float,
    max_iter: int,
    tol: float,
    basis: "_SupportBasis | None",
    memory: int = 10,
    max_line_search: int = 50,
) -> tuple[Tensor, Tensor, Tensor]:
    """scikit-learn's lbfgs solve, replayed for E episodes at once.

    The algorithm of ``LogisticRegression(solver="lbfgs")``, i.e. SciPy's L-BFGS-B without
    bounds, step for step: the scaled objective ``mean CE + ‖W‖²/(2·C·S)`` from zero; L-BFGS
    directions from the last 10 correction pairs (a pair is skipped when s·y <= eps·(-s·g));
    the Moré–Thuente line search (ftol 1e-3, gtol 0.9, xtol 0.1, first step 1/‖d‖, then 1; at
    most 50 evaluations, after which the memory is dropped and the iteration restarted); and the
    stopping rules: largest gradient entry <= ``tol`` *in the original coordinates* (hence
    ``basis``, the orthonormal map of the kernel reduction), relative decrease of the
    objective <= 64·eps (scikit-learn's ftol), or ``max_iter`` iterations.

    L-BFGS only uses inner products, so the orthonormal change of coordinates of the kernel
    reduction (``features``) leaves the iterates unchanged: they are scikit-learn's up to
    round-off. Parameters are held class-major, theta (E, N, r + 1) (row n: class n's weights
    and intercept), so logits (E, N, S) = theta·[Z, 1]ᵀ. Every gradient's class rows sum to zero,
    and so does every iterate.

    Cost, per iteration: the two-loop recursion, two small batched matrix products (the logits
    along the new direction and the gradient at the accepted point) and elementwise work.
    Line-search trials need no matrix product: logits(theta + t·d) = logits(theta) + t·(d·[Z, 1]ᵀ),
    and the slope there is ⟨P - Y, d·[Z, 1]ᵀ⟩ + the penalty's share, so each trial is a few
    elementwise passes over (E, N, S).
    Returns theta (E, r + 1, N), converged (E,) and iterations (E,) (scikit-learn's ``n_iter_``).
    """
    episodes, shots, dim = features.shape
    width = dim + 1
    size = n_way * width
    dtype, device = features.dtype, features.device
    eps = torch.finfo(dtype).eps
    x1 = torch.cat([features, features.new_ones(episodes, shots, 1)], -1)  # (E, S, r + 1)
    targets = F.one_hot(labels, n_way).to(dtype).transpose(1, 2).contiguous()  # (E, N, S)
    penalty = torch.full((width,), 1.0 / C, dtype=dtype, device=device)
    penalty[-1] = 0
    penalty = penalty.repeat(n_way)  # (N·(r + 1),): the intercepts are not penalised
    inverse_shots = 1.0 / shots

    def evaluate(theta: Tensor, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled objective (E,) and P - Y (E, N, S) at ``theta`` with logits (E, N, S)."""
        top = logits.amax(1, keepdim=True)
        exp = (logits - top).exp_()
        total = exp.sum(1, keepdim=True)
        value = torch.linalg.vecdot(theta * penalty, theta).mul_(0.5)
        value += total.log().add_(top).sum((1, 2)) - (logits * y).sum((1, 2))
        return value.mul_(inverse_shots), exp.div_(total).sub_(y)

    def gradient(theta: Tensor, residual: Tensor, x: Tensor) -> Tensor:
        return torch.bmm(residual, x).view(-1, size).addcmul_(theta, penalty).mul_(inverse_shots)

    def gradient_small(grad: Tensor, ids: Tensor, among: Tensor) -> Tensor:
        """Largest |gradient entry| in scikit-learn's coordinates <= tol (for rows in ``among``)."""
        g = grad.view(-1, n_way, width)
        if basis is None:
            return among & (g.abs().amax((1, 2)) <= tol)
        weights = g[:, :, :-1]
        # ‖Q·v‖∞ >= ‖v‖/√D: a cheap first filter
        candidate = among & (g[:, :, -1].abs().amax(-1) <= tol)
        candidate &= weights.square().sum(-1).amax(-1) <= tol * tol * basis.x.shape[2]
        if not bool(candidate.any()):
            return candidate
        rows = candidate.nonzero().squeeze(1)
        candidate[rows] = basis.small(ids.index_select(0, rows), weights.index_select(0, rows), tol)
        return candidate

    theta_out = features.new_zeros(episodes, size)
    converged_out = torch.zeros(episodes, dtype=torch.bool, device=device)
    iterations_out = torch.zeros(episodes, dtype=torch.long, device=device)

    ids = torch.arange(episodes, device=device)
    theta = features.new_zeros(episodes, size)
    logits = features.new_zeros(episodes, n_way, shots)
    value, residual = evaluate(theta, logits, targets)
    grad = gradient(theta, residual, x1)
    converged = gradient_small(grad, ids, torch.ones_like(ids, dtype=torch.bool))
    running = ~converged
    iterations = torch.zeros(episodes, dtype=torch.long, device=device)
    # Correction pairs in a ring shared by all episodes: slot `head` is the oldest, the one
    # written next; an episode that skips an update is rotated so its own order is kept.
    s_pairs: list[Tensor | None] = [None] * memory
    y_pairs: list[Tensor | None] = [None] * memory
    rho = theta.new_zeros(memory, episodes)  # 1 / s·y, 0 for an empty slot
    inv_theta = theta.new_ones(episodes)  # L-BFGS-B's 1/theta = s·y / y·y of the newest pair
    head = 0

    def flush(rows: Tensor) -> None:
        theta_out[ids[rows]] = theta[rows]
        converged_out[ids[rows]] = converged[rows]
        iterations_out[ids[rows]] = iterations[rows]

    while True:
        count = int(running.sum())
        if count == 0:
            flush(torch.ones_like(running))
            break
        if 4 * count <= 3 * len(ids):  # drop stopped episodes from the batch
            flush(~running)
            keep = running.nonzero().squeeze(1)
            ids, x1, targets = ids[keep], x1[keep], targets[keep]
            theta, logits, value, grad, residual = (
                theta[keep],
                logits[keep],
                value[keep],
                grad[keep],
                residual[keep],
            )
            iterations, converged, running = iterations[keep], converged[keep], running[keep]
            inv_theta, rho = inv_theta[keep], rho[:, keep]
            s_pairs = [None if s is None else s[keep] for s in s_pairs]
            y_pairs = [None if y is None else y[keep] for y in y_pairs]

        # Two-loop recursion, newest pair first: direction = -H·g.
        order = [
            (head + j) % memory for j in range(memory) if s_pairs[(head + j) % memory] is not None
        ]
        direction, alphas = grad.neg(), {}
        for slot in reversed(order):
            alphas[slot] = alpha = rho[slot] * torch.linalg.vecdot(s_pairs[slot], direction)
            direction.addcmul_(alpha[:, None], y_pairs[slot], value=-1)
        if order:
            direction.mul_(inv_theta[:, None])
        for slot in order:
            beta = rho[slot] * torch.linalg.vecdot(y_pairs[slot], direction)
            direction.addcmul_((alphas[slot] - beta)[:, None], s_pairs[slot])

        # Moré–Thuente line search (MINPACK-2 dcsrch, as L-BFGS-B's lnsrlb calls it).
        slope = torch.linalg.vecdot(grad, direction)
        first = iterations == 0
        stp = slope.new_ones(len(ids))
        if bool(first.any()):
            stp = torch.where(first, torch.clamp(direction.norm(dim=-1).reciprocal(), max=1e10), stp)
        search = _LineSearch(value, slope, stp)
        pending = running & (slope < 0)  # an ascent direction fails the search at once
        along = torch.bmm(direction.view(-1, n_way, width), x1.transpose(1, 2))  # (E, N, S)
        penalised_direction = direction * penalty
        new_theta, new_logits, new_value, new_residual = theta, logits, value, residual
        for trial in range(max_line_search):
            everyone = trial == 0 and bool(pending.all())
            live = None if everyone else pending.nonzero().squeeze(1)
            if everyone or 4 * len(live) > len(ids):  # evaluate all: cheaper than gathering most
                step_size = search.step
                trial_theta = torch.addcmul(theta, step_size[:, None], direction)
                trial_logits = torch.addcmul(logits, step_size[:, None, None], along)
                f_trial, r_trial = evaluate(trial_theta, trial_logits, targets)
                g_trial = (r_trial * along).sum((1, 2))
                g_trial += torch.linalg.vecdot(penalised_direction, trial_theta)
                finished = search.update(pending, f_trial, g_trial.mul_(inverse_shots))
                trial = (trial_theta, trial_logits, f_trial, r_trial)
                new_theta, new_logits, new_value, new_residual = (
                    trial if everyone else _select(pending, trial, (new_theta, new_logits, new_value, new_residual))
                )
            else:  # a few episodes still searching: evaluate only theirs
                step_size = search.step.index_select(0, live)
                part = direction.index_select(0, live)
                part_along = along.index_select(0, live)
                trial_theta = torch.addcmul(theta.index_select(0, live), step_size[:, None], part)
                trial_logits = torch.addcmul(
                    logits.index_select(0, live), step_size[:, None, None], part_along
                )
                f_trial, r_trial = evaluate(trial_theta, trial_logits, targets.index_select(0, live))
                g_trial = (r_trial * part_along).sum((1, 2))
                g_trial += torch.linalg.vecdot(penalised_direction.index_select(0, live), trial_theta)
                f_all, g_all = value.clone(), torch.zeros_like(value)
                f_all[live], g_all[live] = f_trial, g_trial.mul_(inverse_shots)
                finished = search.update(pending, f_all, g_all)
                new_theta, new_logits = new_theta.clone(), new_logits.clone()
                new_value, new_residual = new_value.clone(), new_residual.clone()
                new_theta[live], new_logits[live] = trial_theta, trial_logits
                new_value[live], new_residual[live] = f_trial, r_trial
            pending = pending & ~finished
            if not bool(pending.any()):
                break
        new_grad = gradient(new_theta, new_residual, x1)

        # A failed search restores the iterate and restarts without memory (stops if empty).
        failed = running & (pending | (slope >= 0))
        ok = running & ~failed
        all_ok = bool(ok.all())
        if not all_ok:
            abnormal = failed & (rho == 0).all(0)
            restart = failed & ~abnormal
            rho = torch.where(restart, 0.0, rho)
            inv_theta = torch.where(restart, 1.0, inv_theta)
            iterations = iterations + (ok | abnormal).long()
        else:
            abnormal = torch.zeros_like(ok)
            iterations = iterations + 1
        last_step = search.last_step
        step = direction.mul_(last_step[:, None])
        y_new = new_grad - grad
        sy = torch.linalg.vecdot(step, y_new)
        accept = ok & (sy > eps * (-slope * last_step))
        small_decrease = (value - new_value) <= 64 * eps * torch.maximum(
            torch.maximum(value.abs(), new_value.abs()), torch.ones_like(value)
        )
        accepted = (new_theta, new_logits, new_value, new_grad, new_residual)
        theta, logits, value, grad, residual = (
            accepted if all_ok else _select(ok, accepted, (theta, logits, value, grad, residual))
        )
        stop_now = ok & (gradient_small(grad, ids, ok) | small_decrease) & (iterations < max_iter)
        converged = converged | stop_now
        running = running & ~(abnormal | stop_now | (ok & (iterations >= max_iter)))

        if bool(accept.any()):
            every = bool(accept.all())
            skipped = running & ok & ~accept
            if not every and bool(skipped.any()):
                for pairs in (s_pairs, y_pairs):
                    old = list(pairs)
                    for slot in range(memory):
                        source = old[(slot - 1) % memory]
                        if pairs[slot] is not None and source is not None:
                            pairs[slot] = torch.where(skipped[:, None], source, pairs[slot])
                rho = torch.where(skipped, rho.roll(1, 0), rho)
            if every:
                s_pairs[head], y_pairs[head] = step, y_new
            elif s_pairs[head] is None:
                s_pairs[head] = torch.where(accept[:, None], step, 0.0)
                y_pairs[head] = torch.where(accept[:, None], y_new, 0.0)
            else:
                s_pairs[head] = torch.where(accept[:, None], step, s_pairs[head])
                y_pairs[head] = torch.where(accept[:, None], y_new, y_pairs[head])
            rho[head] = torch.where(accept, sy.reciprocal(), rho[head])
            inv_theta = torch.where(accept, sy / torch.linalg.vecdot(y_new, y_new), inv_theta)
            head = (head + 1) % memory
    return theta_out.view(episodes, n_way, width).transpose(1, 2), converged_out, iterations_out


class _LineSearch:
    """Vectorised MINPACK-2 ``dcsrch`` (Moré & Thuente) with L-BFGS-B's parameters.

    One instance runs the line searches of a batch of episodes: :meth:`update` takes the value
    and slope at each episode's current step (:attr:`step`) and proposes the next where needed.
    The state is a dozen (E,) vectors and each update a few dozen elementwise operations, so on
    the CPU it runs in NumPy (zero-copy views of the tensors), whose per-operation overhead on
    short vectors is 2-3x lower than torch's; elsewhere in torch.
    """

    ftol, gtol, xtol, stpmin, stpmax = 1e-3, 0.9, 0.1, 0.0, 1e10
    _state = (
        "stp",
        "brackt",
        "stage2",
        "stx",
        "fx",
        "gx",
        "sty",
        "fy",
        "gy",
        "stmin",
        "stmax",
        "width",
        "width1",
    )

    def __init__(self, value: Tensor, slope: Tensor, stp: Tensor) -> None:
        self._cpu = value.device.type == "cpu"
        xp = self.xp = np if self._cpu else torch
        value, slope, stp = (self._array(t) for t in (value, slope, stp))
        self.stp = stp
        self.last_stp = stp
        self.brackt = xp.zeros_like(stp) > 0
        self.stage2 = self.brackt
        self.finit, self.ginit, self.gtest = value, slope, self.ftol * slope
        self.stx, self.fx, self.gx = xp.zeros_like(stp), value, slope
        self.sty, self.fy, self.gy = xp.zeros_like(stp), value, slope
        self.stmin, self.stmax = xp.zeros_like(stp), 5 * stp
        self.width = xp.full_like(stp, self.stpmax - self.stpmin)
        self.width1 = 2 * self.width

    def _array(self, t: Tensor):
        return t.detach().numpy() if self._cpu else t

    def _tensor(self, a) -> Tensor:
        return torch.from_numpy(a) if self._cpu else a

    @property
    def step(self) -> Tensor:
        """The step each episode evaluates next."""
        return self._tensor(self.stp)

    @property
    def last_step(self) -> Tensor:
        """The step each episode evaluated last (its final one once finished)."""
        return self._tensor(self.last_stp)

    def update(self, searching: Tensor, f: Tensor, g: Tensor) -> Tensor:
        """f and f' at :attr:`step`; returns which episodes finished (only ``searching`` ones
        change)."""
        if self._cpu:
            with np.errstate(all="ignore"):  # discarded lanes may divide by zero
                return self._tensor(self._update(*(self._array(t) for t in (searching, f, g))))
        return self._update(searching, f, g)

    def _update(self, searching, f, g):
        xp = self.xp
        stp, brackt, stmin, stmax = self.stp, self.brackt, self.stmin, self.stmax
        self.last_stp = xp.where(searching, stp, self.last_stp)
        ftest = self.finit + stp * self.gtest
        lower = f <= ftest
        stage2 = self.stage2 | (lower & (g >= 0))
        finished = lower & (abs(g) <= self.gtol * (-self.ginit))
        if bool(brackt.any()):
            finished |= brackt & ((stp <= stmin) | (stp >= stmax) | (stmax - stmin <= self.xtol * stmax))
        finished |= ((stp == self.stpmax) & lower & (g <= self.gtest)) | (
            (stp == self.stpmin) & (~lower | (g >= self.gtest))
        )
        go = searching & ~finished  # a finished search keeps its state (dcsrch returns early)
        if not bool(go.any()):
            return finished

        # First stage with a lower but not sufficiently lower value: step on the modified function.
        shift = xp.where(~stage2 & (f <= self.fx) & ~lower, self.gtest, 0)
        stx, sty = self.stx, self.sty
        stx, fxm, gxm, sty, fym, gym, new_stp, brackt = _dcstep(
            xp,
            stx,
            self.fx - stx * shift,
            self.gx - shift,
            sty,
            self.fy - sty * shift,
            self.gy - shift,
            stp,
            f - stp * shift,
            g - shift,
            brackt,
            stmin,
            stmax,
        )
        new = {"stx": stx, "sty": sty, "brackt": brackt, "stage2": stage2}
        new["fx"], new["gx"] = fxm + stx * shift, gxm + shift
        new["fy"], new["gy"] = fym + sty * shift, gym + shift
        bisect = brackt & (abs(sty - stx) >= 0.66 * self.width1)
        new_stp = xp.where(bisect, stx + 0.5 * (sty - stx), new_stp)
        new["width1"] = xp.where(brackt, self.width, self.width1)
        new["width"] = xp.where(brackt, abs(sty - stx), self.width)
        new["stmin"] = xp.where(brackt, xp.minimum(stx, sty), new_stp + 1.1 * (new_stp - stx))
        new["stmax"] = xp.where(brackt, xp.maximum(stx, sty), new_stp + 4.0 * (new_stp - stx))
        new_stp = xp.clip(new_stp, self.stpmin, self.stpmax)
        stuck = brackt & (
            (new_stp <= new["stmin"])
            | (new_stp >= new["stmax"])
            | (new["stmax"] - new["stmin"] <= self.xtol * new["stmax"])
        )
        new["stp"] = xp.where(stuck, stx, new_stp)
        for name in self._state:
            setattr(self, name, xp.where(go, new[name], getattr(self, name)))
        return finished


def _dcstep(xp, stx, fx, dx, sty, fy, dy, stp, fp, dp, brackt, stpmin, stpmax) -> tuple:
    """Vectorised MINPACK-2 ``dcstep``: safeguarded cubic/quadratic step and interval update.

    ``xp``: the array namespace (numpy or torch) of the (E,) arguments.
    """
    where, maximum, minimum = xp.where, xp.maximum, xp.minimum
    sgnd = dp * xp.sign(dx)
    higher = fp > fx  # case 1
    opposite = ~higher & (sgnd < 0)  # case 2
    decreasing = ~higher & ~opposite & (abs(dp) < abs(dx))  # case 3, else case 4

    theta = 3 * (fx - fp) / (stp - stx) + dx + dp
    s = maximum(maximum(abs(theta), abs(dx)), abs(dp))
    gamma = s * xp.sqrt(xp.clip((theta / s) ** 2 - (dx / s) * (dp / s), 0, None))

    g1 = where(stp < stx, -gamma, gamma)
    stpc = stx + (g1 - dx + theta) / (g1 - dx + g1 + dp) * (stp - stx)
    stpq = stx + dx / ((fx - fp) / (stp - stx) + dx) / 2 * (stp - stx)
    step1 = where(abs(stpc - stx) < abs(stpq - stx), stpc, stpc + (stpq - stpc) / 2)

    g2 = where(stp > stx, -gamma, gamma)
    stpc = stp + (g2 - dp + theta) / (g2 - dp + g2 + dx) * (stx - stp)
    secant = stp + dp / (dp - dx) * (stx - stp)
    step2 = where(abs(stpc - stp) > abs(secant - stp), stpc, secant)

    r = (g2 - dp + theta) / (g2 + (dx - dp) + g2)
    stpc = where((r < 0) & (g2 != 0), stp + r * (stx - stp), where(stp > stx, stpmax, stpmin))
    closer = where(abs(stpc - stp) < abs(secant - stp), stpc, secant)
    limit = stp + 0.66 * (sty - stp)
    closer = where(stp > stx, minimum(limit, closer), maximum(limit, closer))
    farther = where(abs(stpc - stp) > abs(secant - stp), stpc, secant)
    farther = minimum(maximum(farther, stpmin), stpmax)
    step3 = where(brackt, closer, farther)

    theta4 = 3 * (fp - fy) / (sty - stp) + dy + dp
    s4 = maximum(maximum(abs(theta4), abs(dy)), abs(dp))
    gamma4 = s4 * xp.sqrt(xp.clip((theta4 / s4) ** 2 - (dy / s4) * (dp / s4), 0, None))
    gamma4 = where(stp > sty, -gamma4, gamma4)
    cubic4 = stp + (gamma4 - dp + theta4) / (gamma4 - dp + gamma4 + dy) * (sty - stp)
    step4 = where(brackt, cubic4, where(stp > stx, stpmax, stpmin))

    step = where(higher, step1, where(opposite, step2, where(decreasing, step3, step4)))
    brackt = brackt | higher | opposite
    move_y_to_x = ~higher & (sgnd < 0)
    new_sty = where(higher, stp, where(move_y_to_x, stx, sty))
    new_fy = where(higher, fp, where(move_y_to_x, fx, fy))
    new_dy = where(higher, dp, where(move_y_to_x, dx, dy))
    new_stx = where(higher, stx, stp)
    new_fx = where(higher, fx, fp)
    new_dx = where(higher, dx, dp)
    return new_stx, new_fx, new_dx, new_sty, new_fy, new_dy, step, brackt


class FinetuneLinearClassifier(EpisodeClassifier):
    """A linear head trained by gradient descent on each episode's support set.

    All heads of a batch are trained together: the summed loss of independent episodes has
    independent gradients, and Adam updates each parameter on its own, so this is exactly E
    separate fine-tunings. ``init="prototype"`` starts from W = 2·p, b = -‖p‖² (p the class
    means), whose logits rank classes exactly as the euclidean prototype classifier, so
    fine-tuning starts from that baseline instead of from chance; ``init="zeros"`` from zero.
    ``normalize`` L2-normalises features first, which makes ``lr`` independent of the encoder's
    feature scale. ``weight_decay`` is AdamW's decoupled decay on W (not on the bias).
    """

    def __init__(
        self,
        steps: int = 100,
        lr: float = 0.01,
        weight_decay: float = 0.0,
        init: Literal["prototype", "zeros"] = "prototype",
        normalize: bool = True,
    ) -> None:
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if init not in ("prototype", "zeros"):
            raise ValueError(f"init must be 'prototype' or 'zeros', got {init!r}")
        self.steps = int(steps)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.init = init
        self.normalize = bool(normalize)

    def _fit(self, support: Tensor, support_labels: Tensor, n_way: int) -> LinearHead:
        # Evaluation may run under inference_mode; training the heads needs autograd.
        with torch.inference_mode(False), torch.enable_grad():
            x = support.to(_compute_dtype(support)).clone()
            if self.normalize:
                x = F.normalize(x, dim=-1)
            if self.init == "prototype":
                prototypes = _class_means(x, support_labels.clone(), n_way)
                weight, bias = 2 * prototypes, -prototypes.square().sum(-1)
            else:
                weight = x.new_zeros(x.shape[0], n_way, x.shape[2])
                bias = x.new_zeros(x.shape[0], n_way)
            weight.requires_grad_(True)
            bias.requires_grad_(True)
            optimizer = torch.optim.AdamW(
                [
                    {"params": [weight], "weight_decay": self.weight_decay},
                    {"params": [bias], "weight_decay": 0.0},
                ],
                lr=self.lr,
            )
            labels = support_labels.reshape(-1).clone()
            for _ in range(self.steps):
                logits = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
                # Sum over episodes of each episode's mean loss: the gradients stay per episode.
                loss = (
                    F.cross_entropy(logits.reshape(-1, n_way), labels, reduction="sum") / x.shape[1]
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return LinearHead(weight.detach(), bias.detach(), normalize_query=self.normalize)


def _check_cache(
    features: Tensor, episodes: Tensor, k_shot: int, query_views: Tensor | None
) -> None:
    if features.dim() not in (2, 3):
        raise ValueError(
            "features must be (clips, dim) or (clips, views, dim), "
            f"got shape {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    if episodes.dim() != 3:
        raise ValueError(
            "episodes must be (episodes, n_way, k_shot + n_query), "
            f"got shape {tuple(episodes.shape)}"
        )
    if episodes.is_floating_point() or episodes.is_complex() or episodes.dtype == torch.bool:
        raise ValueError(f"episodes must hold integer clip positions, got {episodes.dtype}")
    if (
        isinstance(k_shot, bool)
        or not isinstance(k_shot, numbers.Integral)
        or not 1 <= k_shot < episodes.shape[2]
    ):
        raise ValueError(
            f"k_shot={k_shot!r} must be an integer in [1, {episodes.shape[2] - 1}] for episodes "
            f"with {episodes.shape[2]} clips per way (k_shot support + at least one query)"
        )
    if episodes.numel() and (int(episodes.min()) < 0 or int(episodes.max()) >= features.shape[0]):
        raise ValueError(
            f"episodes refer to clip positions in [{int(episodes.min())}, {int(episodes.max())}] "
            f"but the feature cache has {features.shape[0]} clips"
        )
    if query_views is not None:
        if query_views.dim() != 3:
            raise ValueError(
                f"query_views must be (clips, views, dim), got shape {tuple(query_views.shape)}"
            )
        if query_views.shape[0] != features.shape[0] or query_views.shape[-1] != features.shape[-1]:
            raise ValueError(
                f"query_views {tuple(query_views.shape)} does not match features "
                f"{tuple(features.shape)} (same clips and feature size needed)"
            )


def episode_probabilities(
    classifier: EpisodeClassifier,
    features: Tensor,
    episodes: Tensor,
    k_shot: int,
    *,
    query_views: Tensor | None = None,
    chunk: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Class probabilities of every query of every episode, averaged over query views.

    Same arguments as :func:`solve_episodes`; returns (E, N, Q, N): episode, way of the query,
    query index within the way, class probabilities (float32 unless the features are float64).
    """
    _check_cache(features, episodes, k_shot, query_views)
    k_shot = int(k_shot)
    for name, x in (("features", features), ("query_views", query_views)):
        # Checked once here: the support sets below are drawn from it with valid labels, so the
        # classifiers' per-batch input checks (a pass over every support set) are skipped.
        if x is not None and not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
            raise ValueError(f"{name} contain NaN or inf")
    if episodes.shape[1] < 2:
        raise ValueError(f"n_way must be an integer >= 2, got {episodes.shape[1]}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    support_source = features if features.dim() == 2 else features[:, 0]
    query_source = query_views if query_views is not None else features
    views = 1 if query_source.dim() == 2 else query_source.shape[1]
    dim = features.shape[-1]
    query_source = query_source.reshape(query_source.shape[0], views * dim)  # one row per clip
    episodes = episodes.to(features.device)
    total, n_way, clips_per_way = episodes.shape
    n_query = clips_per_way - k_shot
    labels = torch.arange(n_way, device=features.device).repeat_interleave(k_shot)
    out = features.new_empty(total, n_way, n_query, n_way, dtype=_compute_dtype(features))
    # Queries are gathered and scored a few episodes at a time: small blocks (~1.5 MB) stay in
    # cache and avoid allocating (and page-faulting) one large tensor per chunk; 3x faster than
    # 4 MB blocks here.
    per_block = max(1, (3 << 19) // (n_way * n_query * views * dim * features.element_size()))
    for start in range(0, total, chunk):
        block = episodes[start : start + chunk]
        e = block.shape[0]
        # index_select: several times faster than advanced indexing for row gathers
        support = support_source.index_select(0, block[:, :, :k_shot].reshape(-1)).view(e, -1, dim)
        head = classifier._fit(support, labels.expand(e, -1), n_way)
        for first in range(0, e, per_block):
            sub = block[first : first + per_block]
            query = query_source.index_select(0, sub[:, :, k_shot:].reshape(-1))  # (b·N·Q, V·D)
            probs = head.select(slice(first, first + per_block)).predict_proba(
                query.view(sub.shape[0], -1, dim)
            )
            out[start + first : start + first + sub.shape[0]] = probs.reshape(
                -1, n_way, n_query, views, n_way
            ).mean(3)
        if progress is not None:
            progress(e)
    return out


def solve_episodes(
    classifier: EpisodeClassifier,
    features: Tensor,
    episodes: Tensor,
    k_shot: int,
    *,
    query_views: Tensor | None = None,
    chunk: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Per-episode accuracy (E,) in [0, 1] of ``classifier`` on a feature cache.

    features: (clips, D) or (clips, V, D), indexed by the clip positions of ``episodes``
    (E, N, K + Q) (``EpisodeSet.tensor``: per way, K support clips then Q queries; a query's label
    is its way index). With V views the support uses view 0 and each query the average of the
    class probabilities of its V views (MM-CDFSL's ensemble masked inference).
    ``query_views`` (clips, P, D), when given, supplies the query views instead (support still
    from ``features``), for caches that encode support and queries differently.
    ``chunk``: episodes fitted per batch; larger batches amortise per-operation overhead, smaller
    ones bound memory (about chunk × (support features + 20 × S × N) floats for logistic
    regression). ``progress``: called with the number of episodes done after each batch (a
    progress bar's ``update``).
    """
    probs = episode_probabilities(
        classifier, features, episodes, k_shot, query_views=query_views, chunk=chunk, progress=progress
    )
    truth = torch.arange(episodes.shape[1], device=probs.device).view(1, -1, 1)
    return (probs.argmax(-1) == truth).float().mean((1, 2))

"""Episode classifiers that solve many few-shot episodes at once on cached features.

Evaluation encodes every clip once and caches its features (DESIGN.md, "Encode once, then solve
episodes"). What is left per episode is a small problem on a handful of vectors, so every
classifier here fits a *batch* of independent episodes, ``support (E, S, D)`` with
``support_labels (E, S)``, at once: in tensor ops over all of them, or, where an episode's solve
is iterative and tiny (logistic regression), in compiled per-episode loops on the CPU
(:mod:`mmfsar.fewshot.compiled`). 600 episodes cost milliseconds where a per-episode Python
loop costs seconds.

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
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mmfsar.fewshot.compiled import (
    lbfgs_fit,
    linear_head_probabilities,
    support_gram,
)

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

    def predict_proba_at(self, source: Tensor, positions: Tensor, views: int = 1) -> Tensor:
        """Queries given by position: source (clips, V·D) holds every clip's V views side by
        side, positions (E, M) the rows of each episode's queries -> (E, M, n_way)
        probabilities averaged over the views."""
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

    def predict_proba_at(self, source: Tensor, positions: Tensor, views: int = 1) -> Tensor:
        dim = self.weight.shape[2]
        if source.dim() != 2 or source.shape[1] != views * dim or positions.shape[0] != len(self):
            raise ValueError(
                f"source must be (clips, {views} x {dim}) and positions ({len(self)}, queries), "
                f"got {tuple(source.shape)} and {tuple(positions.shape)}"
            )
        dtype = _compute_dtype(source)
        if source.device.type == "cpu":  # compiled: reads the queries in place
            probs = linear_head_probabilities(
                source.detach().to(dtype).numpy(),
                positions.numpy(),
                self.weight.detach().to(dtype).numpy(),
                self.bias.detach().double().numpy(),
                views=views,
                normalize=self.normalize_query,
                threads=compiled_threads(),
            )
            return torch.from_numpy(probs).to(dtype)
        return self._predict_proba_gathered(source, positions, views)

    def _predict_proba_gathered(self, source: Tensor, positions: Tensor, views: int) -> Tensor:
        """:meth:`predict_proba_at` off the CPU: queries gathered and scored a few episodes at a
        time (small blocks, ~1.5 MB, stay in cache and avoid allocating one large tensor)."""
        dim, dtype = self.weight.shape[2], _compute_dtype(source)
        episodes, queries = positions.shape
        out = source.new_empty(episodes, queries, self.weight.shape[1], dtype=dtype)
        per_block = max(1, (3 << 19) // (queries * views * dim * source.element_size()))
        for first in range(0, episodes, per_block):
            part = positions[first : first + per_block]
            query = source.index_select(0, part.reshape(-1)).view(part.shape[0], -1, dim)
            probs = self.select(slice(first, first + per_block)).predict_proba(query)
            out[first : first + part.shape[0]] = probs.view(part.shape[0], queries, views, -1).mean(2)
        return out

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


def _combine(coefficients: Tensor, x: Tensor) -> Tensor:
    """coefficients (E, N, S) @ x (E, S, D) in cache-sized blocks of episodes: (E, N, D)."""
    out = x.new_empty(x.shape[0], coefficients.shape[1], x.shape[2])
    step = _blocks(x.shape[0], x.element_size() * x.shape[2] * (x.shape[1] + coefficients.shape[1])).step
    for start in range(0, x.shape[0], step):
        torch.bmm(coefficients[start : start + step], x[start : start + step], out=out[start : start + step])
    return out


def _kernel_reduction(x: Tensor) -> tuple[Tensor, Tensor]:
    """Z (E, S, S) and M (E, S, S) with Z·Zᵀ = X·Xᵀ and Q = Xᵀ·M orthonormal (float64).

    Cholesky X·Xᵀ = L·Lᵀ gives Z = L, M = L⁻ᵀ; episodes whose Gram matrix is singular or
    badly conditioned (repeated clips) use the eigendecomposition U·Λ·Uᵀ instead: Z = U·Λ^½,
    M = U·Λ^-½ on the non-negligible eigenvalues (a pseudo-inverse), which stays orthonormal.
    The Gram matrix is exact (float64 products of the features): compiled per episode on the
    CPU (:func:`~mmfsar.fewshot.compiled.support_gram`), in cache-sized batched blocks elsewhere.
    """
    episodes, shots, dim = x.shape
    if x.device.type == "cpu":
        gram = torch.from_numpy(support_gram(x.detach().numpy(), threads=compiled_threads()))
    else:
        gram = x.new_empty(episodes, shots, shots, dtype=torch.float64)
        step = _blocks(episodes, 8 * shots * dim).step
        for start in range(0, episodes, step):
            block = x[start : start + step].double()
            torch.bmm(block, block.transpose(1, 2), out=gram[start : start + step])
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
    return features, coef_map


class LogisticRegressionClassifier(EpisodeClassifier):
    """Multinomial logistic regression fitted for all episodes of a batch at once, as scikit-learn.

    The objective is scikit-learn's ``LogisticRegression()``: ``C·Σ_i CE_i + ½‖W‖²`` with a
    free (unpenalised) intercept, the classifier MM-CDFSL fits per episode (lbfgs, C=1).

    **Kernel reduction (both solvers).** The loss sees W only through X·Wᵀ and a component of W
    orthogonal to the support features only adds to ‖W‖², so iterates and optimum stay in their
    span. With an orthonormal basis Q (D, S) of that span, from the support Gram matrix
    (Cholesky X·Xᵀ = L·Lᵀ, Q = Xᵀ·L⁻ᵀ; see :func:`_kernel_reduction`), the problem is the
    *same* logistic regression on the S-dimensional features X·Q = L (S = support size, 25 for
    5-way 5-shot, instead of D = 384), and W = Bᵀ·Qᵀ.

    ``solver="lbfgs"`` (default) replays scikit-learn's own solve: L-BFGS with SciPy's
    L-BFGS-B line search and stopping rules, compiled (:func:`mmfsar.fewshot.compiled.lbfgs_fit`:
    Gram matrix, Cholesky reduction, solve and weights per episode on the CPU, episodes split
    over ``torch.get_num_threads()`` threads; support sets on another device go to the CPU and
    the heads come back); iterates, iteration counts and predictions are scikit-learn's up to
    round-off.
    This matters: on raw encoder
    features that solve stops early. scikit-learn's ``tol`` bounds the gradient of the
    objective divided by ``C·S``, which is loose when features have a large norm, so
    ``LogisticRegression()`` halts before the optimum (objective 0.03–0.8 % above it on
    LayerNorm-scaled features, D = 384) and its predictions differ from the optimum's on 1–8 %
    of 1-shot queries (its accuracy was up to 0.9 points *higher*: stopping early regularises).
    Reproducing MM-CDFSL's numbers needs that early stop, not the optimum (measured on the
    features of ``benchmarks/bench_logreg.py``: the optimum agrees with ``LogisticRegression()``
    on 97.0 % of 5-way 1-shot and 99.3 % of 5-shot predictions, the replay on 100 %).
    Why compiled: an iteration of a 130-parameter problem is a few thousand flops; as batched
    tensor ops over all episodes it was ~300 small operations bound by per-operation overhead
    and memory traffic, 3x slower (``benchmarks/bench_logreg.py``).

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
        if self.solver == "lbfgs":
            weight, bias, converged, n_iter = self._fit_lbfgs(x, support_labels, n_way, C)
        else:
            features, coef_map = _kernel_reduction(x) if shots < dim else (x.double(), None)
            theta, converged, n_iter = _newton_logistic(
                features, support_labels, n_way, C, self.max_iter, self.tol
            )
            if coef_map is not None:  # W = (Xᵀ·M·B)ᵀ, in the features' precision
                weight = _combine((coef_map @ theta[:, :-1]).transpose(1, 2).to(x.dtype), x)
            else:
                weight = theta[:, :-1].transpose(1, 2).to(x.dtype)
            bias = theta[:, -1]
        if not bool(converged.all()):
            warnings.warn(
                f"logistic regression ({self.solver}) did not converge in max_iter={self.max_iter} "
                f"iterations for {int((~converged).sum())} of {episodes} episodes",
                RuntimeWarning,
                stacklevel=3,
            )
        return LinearHead(weight, bias.to(x.dtype), self.normalize, converged, n_iter)

    def _fit_lbfgs(
        self, x: Tensor, labels: Tensor, n_way: int, C: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The compiled replay on the CPU (the support sets are small; results move back)."""
        options = dict(C=C, max_iter=self.max_iter, tol=self.tol, threads=compiled_threads())
        support, y = x.detach().cpu().numpy(), labels.detach().cpu().numpy()
        if x.shape[1] >= x.shape[2]:  # no reduction: solve on the features themselves
            *out, _ = lbfgs_fit(support, y, n_way, reduction=(support, None), **options)
        else:
            *out, solved = lbfgs_fit(support, y, n_way, **options)
            if not solved.all():  # singular or ill-conditioned Gram matrices: eigendecomposition
                rows = np.flatnonzero(~solved)
                features, coef_map = _kernel_reduction(x[torch.from_numpy(rows).to(x.device)].cpu())
                *redone, _ = lbfgs_fit(
                    support[rows], y[rows], n_way, reduction=(features.numpy(), coef_map.numpy()), **options
                )
                for whole, part in zip(out, redone):
                    whole[rows] = part
        return tuple(torch.from_numpy(a).to(x.device) for a in out)


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


_COMPILED_THREADS: ContextVar[int | None] = ContextVar("compiled_threads", default=None)


def compiled_threads() -> int:
    """Threads of the compiled CPU kernels: torch's thread count (as it was on entering
    :func:`torch_on_one_thread`, which sets torch's own to one)."""
    return _COMPILED_THREADS.get() or torch.get_num_threads()


@contextmanager
def torch_on_one_thread(device: torch.device) -> Iterator[None]:
    """Run torch's CPU ops on one thread inside; the compiled kernels keep torch's thread count.

    An episode solve's torch ops are small (gathers, checks, matrices of a few episodes), so
    OpenMP's synchronisation costs more than a second thread gains, and they slowed down many
    times over when another process held the other cores (3-30x with 2 threads on a busy 2-core
    machine). Worse, after every parallel op torch's OpenMP workers keep busy-waiting for the
    next one (milliseconds, with libgomp's defaults), taking the cores from the compiled
    kernels' threads: the logistic-regression solve ran 1.4x slower on 2 cores.
    ``benchmarks/bench_logreg.py`` measures both. No-op off the CPU and when already inside.
    """
    if device.type != "cpu" or _COMPILED_THREADS.get() is not None:
        yield
        return
    threads = torch.get_num_threads()
    token = _COMPILED_THREADS.set(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _COMPILED_THREADS.reset(token)


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
    On the CPU, torch runs on one thread and the compiled kernels on torch's thread count
    (:func:`torch_on_one_thread`).
    """
    with torch_on_one_thread(features.device):
        return _episode_probabilities(classifier, features, episodes, k_shot, query_views, chunk, progress)


def _episode_probabilities(
    classifier: EpisodeClassifier,
    features: Tensor,
    episodes: Tensor,
    k_shot: int,
    query_views: Tensor | None,
    chunk: int,
    progress: Callable[[int], None] | None,
) -> Tensor:
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
    for start in range(0, total, chunk):
        block = episodes[start : start + chunk]
        e = block.shape[0]
        # index_select: several times faster than advanced indexing for row gathers
        support = support_source.index_select(0, block[:, :, :k_shot].reshape(-1)).view(e, -1, dim)
        head = classifier._fit(support, labels.expand(e, -1), n_way)
        probs = head.predict_proba_at(query_source, block[:, :, k_shot:].reshape(e, -1), views)
        out[start : start + e] = probs.view(e, n_way, n_query, n_way)
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

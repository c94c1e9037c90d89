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
from typing import Literal, Protocol

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
        return torch.softmax(logits, dim=-1)

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

    The kernel reduction solves in r-dim coordinates; scikit-learn's stopping test needs
    gradient columns mapped back to D dims, which is all this provides, from X itself.
    """

    def __init__(self, x: Tensor, coef_map: Tensor) -> None:
        self.x, self.coef_map = x, coef_map  # (E, S, D) input precision, (E, S, r) float64
        # |(Q·v)_i| = |x_iᵀ·M·v| <= ‖x_i‖·‖M·v‖, x_i the i-th feature across the support.
        self.largest_column = coef_map.new_empty(len(x))
        episodes, shots, dim = x.shape
        step = _blocks(episodes, x.element_size() * shots * dim).step
        for start in range(0, episodes, step):
            squares = x[start : start + step].square().sum(1)
            self.largest_column[start : start + step] = squares.amax(-1).double().sqrt() * (
                1 + 1e-5
            )

    def bound(self, ids: Tensor, v: Tensor) -> Tensor:
        """Upper bound of max |(Q·v)_i| per episode, v (n, r, N)."""
        mapped = (self.coef_map[ids] @ v).square().sum(1).sqrt()
        return torch.minimum(
            v.square().sum(1).sqrt(), self.largest_column[ids, None] * mapped
        ).amax(-1)

    def entries(self, ids: Tensor, coords: Tensor, v: Tensor) -> Tensor:
        """Entries ``coords`` (n, N, k) of Q·v for episodes ``ids``, v (n, r, N): (n, N, k)."""
        picked = self.x[ids[:, None, None], :, coords].to(v.dtype)  # (n, N, k, S)
        coefficients = (self.coef_map[ids] @ v).transpose(1, 2)  # (n, N, S)
        return (picked @ coefficients.unsqueeze(-1)).squeeze(-1)

    def map(self, ids: Tensor, v: Tensor) -> Tensor:
        """(Q·v)ᵀ for episodes ``ids``, v (n, r, N): (n, N, D) in the features' precision.

        (float32 features decide scikit-learn's tolerance test to 1e-7 relative, not bit-exactly.)
        """
        coefficients = (self.coef_map[ids] @ v).transpose(1, 2).to(self.x.dtype)  # (n, N, S)
        if 2 * len(ids) > len(self.x):  # most episodes: multiply all rather than gather
            everyone = coefficients.new_zeros(len(self.x), *coefficients.shape[1:])
            everyone[ids] = coefficients
            return (everyone @ self.x)[ids]
        return coefficients @ self.x.index_select(0, ids)


def _kernel_reduction(x: Tensor) -> tuple[Tensor, Tensor]:
    """Z (E, S, S) and M (E, S, S) with Z·Zᵀ = X·Xᵀ and Q = Xᵀ·M orthonormal (float64).

    Cholesky X·Xᵀ = L·Lᵀ gives Z = L, M = L⁻ᵀ; episodes whose Gram matrix is singular or
    badly conditioned (repeated clips) use the eigendecomposition U·Λ·Uᵀ instead: Z = U·Λ^½,
    M = U·Λ^-½ on the non-negligible eigenvalues (a pseudo-inverse), which stays orthonormal.
    """
    episodes, shots, dim = x.shape
    gram = x.new_empty(episodes, shots, shots, dtype=torch.float64)
    step = _blocks(episodes, 8 * shots * dim).step
    for start in range(0, episodes, step):
        block = x[start : start + step].double()
        gram[start : start + step] = block @ block.transpose(1, 2)
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
    Every operation is one tensor op over all episodes of the batch.

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
    Reproducing MM-CDFSL's numbers needs that early stop, not the optimum.

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
            features, coef_map = _kernel_reduction(x)
            if self.solver == "lbfgs":
                basis = _SupportBasis(x, coef_map)
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
            weight = (coef_map @ theta[:, :-1]).transpose(1, 2).to(x.dtype) @ x
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

    L-BFGS only uses inner products, so any orthonormal change of coordinates of the subspace
    the iterates live in leaves them unchanged: the kernel reduction (features), and the
    sum-zero class subspace (every gradient's class columns sum to zero, so N classes are
    carried as N - 1 orthonormal contrasts). The iterates are scikit-learn's up to round-off.
    Returns theta (E, r + 1, N), converged (E,) and iterations (E,) (scikit-learn's ``n_iter_``).
    """
    episodes, shots, dim = features.shape
    rows_per, contrasts = dim + 1, n_way - 1
    size = rows_per * contrasts
    dtype, device = features.dtype, features.device
    eps = torch.finfo(dtype).eps
    centring = torch.eye(n_way, dtype=dtype, device=device) - 1.0 / n_way
    classes = torch.linalg.qr(centring[:, :contrasts]).Q  # (N, N - 1), orthonormal, ⊥ 1
    penalty = torch.ones(rows_per, contrasts, dtype=dtype, device=device)
    penalty[-1] = 0
    penalty = penalty.reshape(-1) / C

    x1 = torch.cat([features, features.new_ones(episodes, shots, 1)], -1)
    targets = F.one_hot(labels, n_way).to(dtype)

    def value_and_grad(theta: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logp = x @ (theta.view(-1, contrasts) @ classes.T).view(-1, rows_per, n_way)
        logp = logp - torch.logsumexp(logp, -1, keepdim=True)  # faster than log_softmax for small N
        value = (0.5 * torch.linalg.vecdot(penalty * theta, theta) - (logp * y).sum((1, 2))) / shots
        grad = ((x.transpose(1, 2) @ logp.exp_().sub_(y)).view(-1, n_way) @ classes).view(-1, size)
        return value, grad.add_(penalty * theta).div_(shots)

    # The test needs max_i |(Q·v)_i| for each gradient column v, where Q (D, r) is the basis: a
    # D-dim product, decided from bounds when possible. Upper: `basis.bound`. Lower: the
    # entry at the coordinate that was largest at the last exact evaluation (`probe`).
    probe = torch.zeros(episodes, n_way, 1, dtype=torch.long, device=device)

    def gradient_small(grad: Tensor, ids: Tensor, among: Tensor) -> Tensor:
        """Largest |gradient entry| in scikit-learn's coordinates <= tol (for rows in ``among``)."""
        g = (grad.view(-1, contrasts) @ classes.T).view(-1, rows_per, n_way)
        if basis is None:
            return among & (g.abs().amax((1, 2)) <= tol)
        weights = g[:, :-1]
        # ‖Q·v‖_∞ >= ‖v‖/√D: a cheap first filter
        column_norm = weights.square().sum(1).amax(-1).sqrt()
        candidate = (
            among
            & (g[:, -1].abs().amax(-1) <= tol)
            & (column_norm <= tol * basis.x.shape[2] ** 0.5)
        )
        small = candidate.clone()
        if bool(candidate.any()):
            small[candidate] = basis.bound(ids[candidate], weights[candidate]) <= tol
        unsure = candidate & ~small
        if bool(unsure.any()):
            rows = unsure.nonzero().squeeze(1)
            lower = basis.entries(ids[rows], probe[ids[rows]], weights[rows]).abs().amax((1, 2))
            rows = rows[lower <= tol]
            if len(rows):
                mapped = basis.map(ids[rows], weights[rows]).abs()  # (n, N, D)
                small[rows] = is_small = mapped.amax((1, 2)) <= tol
                probe[ids[rows[~is_small]]] = mapped[~is_small].argmax(-1, keepdim=True)
        return small

    theta_out = features.new_zeros(episodes, size)
    converged_out = torch.zeros(episodes, dtype=torch.bool, device=device)
    iterations_out = torch.zeros(episodes, dtype=torch.long, device=device)

    ids = torch.arange(episodes, device=device)
    theta = features.new_zeros(episodes, size)
    value, grad = value_and_grad(theta, x1, targets)
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
            theta, value, grad, iterations, converged = (
                theta[keep],
                value[keep],
                grad[keep],
                iterations[keep],
                converged[keep],
            )
            inv_theta, rho, running = inv_theta[keep], rho[:, keep], running[keep]
            s_pairs = [None if s is None else s[keep] for s in s_pairs]
            y_pairs = [None if y is None else y[keep] for y in y_pairs]

        # Two-loop recursion, newest pair first: direction = -H·g.
        order = [
            (head + j) % memory for j in range(memory) if s_pairs[(head + j) % memory] is not None
        ]
        r, alphas = grad.neg(), {}
        for slot in reversed(order):
            alphas[slot] = rho[slot] * torch.linalg.vecdot(s_pairs[slot], r)
            r.addcmul_(alphas[slot][:, None], y_pairs[slot], value=-1)
        r.mul_(inv_theta[:, None])
        for slot in order:
            beta = rho[slot] * torch.linalg.vecdot(y_pairs[slot], r)
            r.addcmul_((alphas[slot] - beta)[:, None], s_pairs[slot])
        direction = r

        # Moré–Thuente line search (MINPACK-2 dcsrch, as L-BFGS-B's lnsrlb calls it).
        slope = torch.linalg.vecdot(grad, direction)
        stp = torch.where(
            iterations == 0, torch.clamp(direction.norm(dim=-1).reciprocal(), max=1e10), 1.0
        )
        search = _LineSearch(value, slope, stp)
        pending = running & (slope < 0)  # an ascent direction fails the search at once
        new_theta, new_value, new_grad = theta, value, grad
        for _ in range(max_line_search):
            everyone = bool(pending.all())
            live = None if everyone else pending.nonzero().squeeze(1)
            if everyone or len(live) > len(ids) // 4:  # evaluate all: cheaper than gathering most
                trial = torch.addcmul(theta, search.stp[:, None], direction)
                f_trial, g_trial = value_and_grad(trial, x1, targets)
                finished = search.update(pending, f_trial, torch.linalg.vecdot(g_trial, direction))
                if everyone:
                    new_theta, new_value, new_grad = trial, f_trial, g_trial
                else:
                    new_theta = torch.where(pending[:, None], trial, new_theta)
                    new_value = torch.where(pending, f_trial, new_value)
                    new_grad = torch.where(pending[:, None], g_trial, new_grad)
            else:
                trial = torch.addcmul(theta[live], search.stp[live, None], direction[live])
                f_trial, g_trial = value_and_grad(trial, x1[live], targets[live])
                slope_trial = torch.zeros_like(value)
                slope_trial[live] = torch.linalg.vecdot(g_trial, direction[live])
                f_full = value.clone()
                f_full[live] = f_trial
                finished = search.update(pending, f_full, slope_trial)
                new_theta, new_value, new_grad = (
                    new_theta.clone(),
                    new_value.clone(),
                    new_grad.clone(),
                )
                new_theta[live], new_value[live], new_grad[live] = trial, f_trial, g_trial
            pending = pending & ~finished
            if not bool(pending.any()):
                break

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
        step = direction.mul_(search.last_stp[:, None])
        y_new = new_grad - grad
        sy = torch.linalg.vecdot(step, y_new)
        accept = ok & (sy > eps * (-slope * search.last_stp))
        small_decrease = (value - new_value) <= 64 * eps * torch.maximum(
            torch.maximum(value.abs(), new_value.abs()), torch.ones_like(value)
        )
        if all_ok:
            theta, value, grad = new_theta, new_value, new_grad
        else:
            theta = torch.where(ok[:, None], new_theta, theta)
            value = torch.where(ok, new_value, value)
            grad = torch.where(ok[:, None], new_grad, grad)
        stop_now = ok & (gradient_small(grad, ids, ok) | small_decrease) & (iterations < max_iter)
        converged = converged | stop_now
        running = running & ~(abnormal | stop_now | (ok & (iterations >= max_iter)))

        if bool(accept.any()):
            skipped = running & ok & ~accept
            if bool(skipped.any()):
                rolled = list(range(memory))
                for pairs in (s_pairs, y_pairs):
                    old = list(pairs)
                    for slot in rolled:
                        source = old[(slot - 1) % memory]
                        if pairs[slot] is not None and source is not None:
                            pairs[slot] = torch.where(skipped[:, None], source, pairs[slot])
                rho = torch.where(skipped, rho.roll(1, 0), rho)
            if bool(accept.all()) or s_pairs[head] is None:
                s_pairs[head] = (
                    torch.where(accept[:, None], step, 0.0) if not bool(accept.all()) else step
                )
                y_pairs[head] = (
                    torch.where(accept[:, None], y_new, 0.0) if not bool(accept.all()) else y_new
                )
            else:
                s_pairs[head] = torch.where(accept[:, None], step, s_pairs[head])
                y_pairs[head] = torch.where(accept[:, None], y_new, y_pairs[head])
            rho[head] = torch.where(accept, sy.reciprocal(), rho[head])
            inv_theta = torch.where(accept, sy / torch.linalg.vecdot(y_new, y_new), inv_theta)
            head = (head + 1) % memory
    theta_out = (theta_out.view(-1, contrasts) @ classes.T).view(episodes, rows_per, n_way)
    return theta_out, converged_out, iterations_out


class _LineSearch:
    """Vectorised MINPACK-2 ``dcsrch`` (Moré & Thuente) with L-BFGS-B's parameters.

    One instance runs the line searches of a batch of episodes: :meth:`update` takes the value
    and slope at each episode's current ``stp`` and proposes the next ``stp`` where needed.
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
        self.stp = stp
        self.last_stp = stp
        self.brackt = torch.zeros_like(stp, dtype=torch.bool)
        self.stage2 = torch.zeros_like(self.brackt)
        self.finit, self.ginit, self.gtest = value, slope, self.ftol * slope
        self.stx, self.fx, self.gx = torch.zeros_like(stp), value, slope
        self.sty, self.fy, self.gy = torch.zeros_like(stp), value, slope
        self.stmin, self.stmax = torch.zeros_like(stp), 5 * stp
        self.width = torch.full_like(stp, self.stpmax - self.stpmin)
        self.width1 = 2 * self.width

    def update(self, searching: Tensor, f: Tensor, g: Tensor) -> Tensor:
        """f and f' at ``stp``; returns which episodes finished (only ``searching`` ones change)."""
        stp, brackt, stmin, stmax = self.stp, self.brackt, self.stmin, self.stmax
        self.last_stp = torch.where(searching, stp, self.last_stp)
        ftest = self.finit + stp * self.gtest
        stage2 = self.stage2 | ((f <= ftest) & (g >= 0))
        warning = (
            (brackt & ((stp <= stmin) | (stp >= stmax)))
            | (brackt & (stmax - stmin <= self.xtol * stmax))
            | ((stp == self.stpmax) & (f <= ftest) & (g <= self.gtest))
            | ((stp == self.stpmin) & ((f > ftest) | (g >= self.gtest)))
        )
        finished = warning | ((f <= ftest) & (g.abs() <= self.gtol * (-self.ginit)))
        go = searching & ~finished  # a finished search keeps its state (dcsrch returns early)
        if not bool(go.any()):
            return finished

        # First stage with a lower but not sufficiently lower value: step on the modified function.
        shift = torch.where(~stage2 & (f <= self.fx) & (f > ftest), self.gtest, 0)
        stx, sty = self.stx, self.sty
        stx, fxm, gxm, sty, fym, gym, new_stp, brackt = _dcstep(
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
        bisect = brackt & ((sty - stx).abs() >= 0.66 * self.width1)
        new_stp = torch.where(bisect, stx + 0.5 * (sty - stx), new_stp)
        new["width1"] = torch.where(brackt, self.width, self.width1)
        new["width"] = torch.where(brackt, (sty - stx).abs(), self.width)
        new["stmin"] = torch.where(brackt, torch.minimum(stx, sty), new_stp + 1.1 * (new_stp - stx))
        new["stmax"] = torch.where(brackt, torch.maximum(stx, sty), new_stp + 4.0 * (new_stp - stx))
        new_stp = new_stp.clamp(self.stpmin, self.stpmax)
        stuck = brackt & (
            (new_stp <= new["stmin"])
            | (new_stp >= new["stmax"])
            | (new["stmax"] - new["stmin"] <= self.xtol * new["stmax"])
        )
        new["stp"] = torch.where(stuck, stx, new_stp)
        for name in self._state:
            setattr(self, name, torch.where(go, new[name], getattr(self, name)))
        return finished


def _dcstep(
    stx: Tensor,
    fx: Tensor,
    dx: Tensor,
    sty: Tensor,
    fy: Tensor,
    dy: Tensor,
    stp: Tensor,
    fp: Tensor,
    dp: Tensor,
    brackt: Tensor,
    stpmin: Tensor,
    stpmax: Tensor,
) -> tuple[Tensor, ...]:
    """Vectorised MINPACK-2 ``dcstep``: safeguarded cubic/quadratic step and interval update."""
    sgnd = dp * torch.sign(dx)
    higher = fp > fx  # case 1
    opposite = ~higher & (sgnd < 0)  # case 2
    decreasing = ~higher & ~opposite & (dp.abs() < dx.abs())  # case 3, else case 4

    theta = 3 * (fx - fp) / (stp - stx) + dx + dp
    s = torch.maximum(torch.maximum(theta.abs(), dx.abs()), dp.abs())
    gamma = s * ((theta / s) ** 2 - (dx / s) * (dp / s)).clamp_min(0).sqrt()

    g1 = torch.where(stp < stx, -gamma, gamma)
    stpc = stx + (g1 - dx + theta) / (g1 - dx + g1 + dp) * (stp - stx)
    stpq = stx + dx / ((fx - fp) / (stp - stx) + dx) / 2 * (stp - stx)
    step1 = torch.where((stpc - stx).abs() < (stpq - stx).abs(), stpc, stpc + (stpq - stpc) / 2)

    g2 = torch.where(stp > stx, -gamma, gamma)
    stpc = stp + (g2 - dp + theta) / (g2 - dp + g2 + dx) * (stx - stp)
    secant = stp + dp / (dp - dx) * (stx - stp)
    step2 = torch.where((stpc - stp).abs() > (secant - stp).abs(), stpc, secant)

    r = (g2 - dp + theta) / (g2 + (dx - dp) + g2)
    stpc = torch.where(
        (r < 0) & (g2 != 0), stp + r * (stx - stp), torch.where(stp > stx, stpmax, stpmin)
    )
    closer = torch.where((stpc - stp).abs() < (secant - stp).abs(), stpc, secant)
    limit = stp + 0.66 * (sty - stp)
    closer = torch.where(stp > stx, torch.minimum(limit, closer), torch.maximum(limit, closer))
    farther = torch.where((stpc - stp).abs() > (secant - stp).abs(), stpc, secant)
    farther = torch.minimum(torch.maximum(farther, stpmin), stpmax)
    step3 = torch.where(brackt, closer, farther)

    theta4 = 3 * (fp - fy) / (sty - stp) + dy + dp
    s4 = torch.maximum(torch.maximum(theta4.abs(), dy.abs()), dp.abs())
    gamma4 = s4 * ((theta4 / s4) ** 2 - (dy / s4) * (dp / s4)).clamp_min(0).sqrt()
    gamma4 = torch.where(stp > sty, -gamma4, gamma4)
    cubic4 = stp + (gamma4 - dp + theta4) / (gamma4 - dp + gamma4 + dy) * (sty - stp)
    step4 = torch.where(brackt, cubic4, torch.where(stp > stx, stpmax, stpmin))

    step = torch.where(
        higher, step1, torch.where(opposite, step2, torch.where(decreasing, step3, step4))
    )
    brackt = brackt | higher | opposite
    move_y_to_x = ~higher & (sgnd < 0)
    new_sty = torch.where(higher, stp, torch.where(move_y_to_x, stx, sty))
    new_fy = torch.where(higher, fp, torch.where(move_y_to_x, fx, fy))
    new_dy = torch.where(higher, dp, torch.where(move_y_to_x, dx, dy))
    new_stx = torch.where(higher, stx, stp)
    new_fx = torch.where(higher, fx, fp)
    new_dx = torch.where(higher, dx, dp)
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
) -> Tensor:
    """Class probabilities of every query of every episode, averaged over query views.

    Same arguments as :func:`solve_episodes`; returns (E, N, Q, N): episode, way of the query,
    query index within the way, class probabilities (float32 unless the features are float64).
    """
    _check_cache(features, episodes, k_shot, query_views)
    k_shot = int(k_shot)
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
    # Queries are gathered and scored a few episodes at a time: small blocks stay in cache and
    # avoid allocating (and page-faulting) one large tensor per chunk.
    per_block = max(1, (4 << 20) // (n_way * n_query * views * dim * features.element_size()))
    for start in range(0, total, chunk):
        block = episodes[start : start + chunk]
        e = block.shape[0]
        # index_select: several times faster than advanced indexing for row gathers
        support = support_source.index_select(0, block[:, :, :k_shot].reshape(-1)).view(e, -1, dim)
        head = classifier.fit(support, labels.expand(e, -1), n_way)
        for first in range(0, e, per_block):
            sub = block[first : first + per_block]
            query = query_source.index_select(0, sub[:, :, k_shot:].reshape(-1))  # (b·N·Q, V·D)
            probs = head.select(slice(first, first + per_block)).predict_proba(
                query.view(sub.shape[0], -1, dim)
            )
            out[start + first : start + first + sub.shape[0]] = probs.reshape(
                -1, n_way, n_query, views, n_way
            ).mean(3)
    return out


def solve_episodes(
    classifier: EpisodeClassifier,
    features: Tensor,
    episodes: Tensor,
    k_shot: int,
    *,
    query_views: Tensor | None = None,
    chunk: int = 1000,
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
    regression).
    """
    probs = episode_probabilities(
        classifier, features, episodes, k_shot, query_views=query_views, chunk=chunk
    )
    truth = torch.arange(episodes.shape[1], device=probs.device).view(1, -1, 1)
    return (probs.argmax(-1) == truth).float().mean((1, 2))

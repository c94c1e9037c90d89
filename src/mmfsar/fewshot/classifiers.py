"""Few-shot classifiers: the logits of an episode's queries, given its support set.

Evaluation encodes every clip once and caches its features (:mod:`mmfsar.fewshot.engine`); what
is left per episode is a small problem on a handful of vectors. Every classifier
is an ``nn.Module`` with one signature, batched over E independent episodes::

    logits = classifier(support, query)   # support (E, N, K, T, D), query (E, M, T, D) -> (E, M, N)

N ways of K support clips each (way n's clips are ``support[:, n]``, so labels are implicit), M
queries, T time steps (1 for pooled clip features; ``uses_frames`` says whether a classifier wants
per-frame ones) and D the feature size. The same object serves evaluation on cached features,
validation during training and, for matching heads with parameters, episodic training.

A classifier is a plug-in: one class and one file under ``configs/fewshot/classifier/``.
"""

from __future__ import annotations

import numbers
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _positive_int(value: object, name: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def check_episode_inputs(
    support: Tensor,
    query: Tensor,
    *,
    dim: int | None = None,
    num_frames: int | None = None,
    who: str = "few-shot classifier",
) -> None:
    """Raise ``ValueError`` naming what is wrong with a batch of episodes.

    support must be (E, N, K, T, D) and query (E, Q, T, D), floating point, no size zero, with E,
    T and D shared; ``dim`` / ``num_frames``, when given, are the D and T the classifier was built for.
    """
    if not isinstance(support, Tensor) or support.dim() != 5:
        shape = tuple(support.shape) if isinstance(support, Tensor) else type(support).__name__
        raise ValueError(f"{who}: support must be (episodes, ways, shots, frames, dim), got {shape}")
    if not isinstance(query, Tensor) or query.dim() != 4:
        shape = tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__
        raise ValueError(f"{who}: query must be (episodes, queries, frames, dim), got {shape}")
    s_shape, q_shape = tuple(support.shape), tuple(query.shape)
    if not (support.is_floating_point() and query.is_floating_point()):
        raise ValueError(f"{who}: support and query must be floating point, got {support.dtype} and {query.dtype}")
    if 0 in s_shape or 0 in q_shape:
        raise ValueError(f"{who}: every size must be >= 1, got support {s_shape} and query {q_shape}")
    if q_shape[0] != s_shape[0]:
        raise ValueError(f"{who}: support has {s_shape[0]} episodes but query has {q_shape[0]} ({s_shape} vs {q_shape})")
    if q_shape[2] != s_shape[3]:
        raise ValueError(f"{who}: support has {s_shape[3]} frames but query has {q_shape[2]} ({s_shape} vs {q_shape})")
    if q_shape[3] != s_shape[4]:
        raise ValueError(f"{who}: support features are {s_shape[4]}-d but query features are {q_shape[3]}-d")
    if dim is not None and s_shape[4] != dim:
        raise ValueError(f"{who} was built for {dim}-d features, got {s_shape[4]}-d (support {s_shape})")
    if num_frames is not None and s_shape[3] != num_frames:
        raise ValueError(f"{who} was built for {num_frames} frames, got {s_shape[3]} (support {s_shape})")


class EpisodeClassifier(nn.Module, ABC):
    """Base of the few-shot classifiers: support (E, N, K, T, D), query (E, Q, T, D) -> logits
    (E, Q, N), batched over episodes, the inputs checked first.

    ``uses_frames``: True when the classifier compares clips frame by frame and needs per-frame
    features; False when pooled features (T = 1) are enough, so the caller may keep one vector per
    clip. ``dim`` / ``num_frames``: what it was built for. Every classifier takes them (keyword-only;
    configs are ``_partial_`` and completed with the encoder's sizes by :func:`build_classifier`),
    those with parameters need them (TRX), and inputs are checked against them when given.
    """

    uses_frames: bool = False

    def __init__(self, *, dim: int | None = None, num_frames: int | None = None) -> None:
        super().__init__()
        self.dim = _positive_int(dim, "dim", allow_none=True)
        self.num_frames = _positive_int(num_frames, "num_frames", allow_none=True)

    def forward(self, support: Tensor, query: Tensor) -> Tensor:
        self.check(support, query)
        return self.match(self.embed(support), self.embed(query))

    def check(self, support: Tensor, query: Tensor) -> None:
        """Raise ``ValueError`` if these are not inputs this classifier takes."""
        check_episode_inputs(
            support,
            query,
            dim=self.dim,
            num_frames=self.num_frames if self.uses_frames else None,
            who=type(self).__name__,
        )

    def embed(self, clips: Tensor) -> Tensor:
        """The part of the classifier that sees one clip at a time: (..., T, D) -> (..., R, d).

        Evaluation applies it once to every clip of the feature bank and :meth:`match` to each
        episode's embedded clips, so per-clip work (TRX's tuple projections) is not repeated in
        every episode a clip appears in. The identity unless a classifier has such work."""
        return clips

    @abstractmethod
    def match(self, support: Tensor, query: Tensor) -> Tensor:
        """Logits (E, Q, N) of embedded, checked support (E, N, K, R, d) and query (E, Q, R, d)."""

    def pair_width(self) -> int | None:
        """Floats per (query clip, support clip) pair of :meth:`pair_table`; None (the default):
        the classifier has no pairwise form.

        Why: when a query's logit for a class is a function of per-pair terms (OTAM averages its
        distances to the K shots; TRX's attention over the K·P support tuples factors into one
        softmax per shot and a softmax over shots), evaluation computes those terms once per clip
        pair, not once per episode in which the pair meets: 10,000 five-shot episodes of 200 clips
        use each pair about 30 times."""
        return None

    def pair_table(self, query: Tensor, support: Tensor) -> list[Tensor]:
        """Embedded query clips (A, R, d) and support clips (B, R, d) -> what :meth:`match_pairs`
        needs of each pair: tensors shaped (A, B, ...), pair_width() floats per pair in all."""
        raise NotImplementedError(f"{type(self).__name__} has no pairwise form (pair_width() is None)")

    def match_pairs(self, table: Sequence[Tensor], pairs: Tensor, query: Tensor) -> Tensor:
        """Logits (E, Q, N), equal to :meth:`match`'s, of the episodes whose query and support
        clips meet in ``pairs`` (E, Q, N, K): positions ``a·B + b`` of the pairs of :meth:`pair_table`
        (its tensors flattened over (A, B)); the embedded queries ``query`` (E, Q, R, d)."""
        raise NotImplementedError(f"{type(self).__name__} has no pairwise form (pair_width() is None)")


def build_classifier(factory: Callable[..., EpisodeClassifier], *, dim: int, num_frames: int) -> EpisodeClassifier:
    """A classifier from its config's partial (``instantiate(cfg.fewshot.classifier)``), for
    features of size ``dim`` with ``num_frames`` time steps."""
    return factory(dim=dim, num_frames=num_frames)


def _pooled(x: Tensor) -> Tensor:
    """Features averaged over time (the identity for T = 1), in at least float32."""
    x = x.mean(-2)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class PrototypeClassifier(EpisodeClassifier):
    """Nearest centroid (ProtoNet, Snell et al., NeurIPS 2017) on time-pooled features.

    A clip is the mean of its T feature vectors (with T = 1: exactly the pooled feature); a class
    prototype p is the mean of its K clips; logits are ``-‖q - p‖² / temperature``
    (``metric="euclidean"``) or ``cos(q, p) / temperature``. The temperature never changes one
    view's predicted class, but it sets how sharply query views are weighted when their
    probabilities are averaged (ensemble masked inference). The baseline every temporal head must beat.
    """

    def __init__(
        self,
        *,
        metric: Literal["cosine", "euclidean"] = "euclidean",
        temperature: float = 1.0,
        dim: int | None = None,
        num_frames: int | None = None,
    ) -> None:
        super().__init__(dim=dim, num_frames=num_frames)
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        self.metric = metric
        self.temperature = _positive_float(temperature, "temperature")

    def match(self, support: Tensor, query: Tensor) -> Tensor:
        prototypes, queries = _pooled(support).mean(2), _pooled(query)
        if self.metric == "cosine":
            return F.normalize(queries, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2) / self.temperature
        # ‖q‖² - 2 q·p + ‖p‖² keeps memory at (E, Q, N) instead of (E, Q, N, D)
        squared = torch.baddbmm(
            queries.square().sum(-1, keepdim=True) + prototypes.square().sum(-1).unsqueeze(1),
            queries,
            prototypes.transpose(1, 2),
            alpha=-2,
        )
        return -squared.clamp_min(0) / self.temperature

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, temperature={self.temperature}"


@dataclass(frozen=True)
class LinearHead:
    """Linear classifiers of E episodes: logits = q @ weight[e]ᵀ + bias[e].

    ``normalize_query``: L2-normalise queries first (classifiers fitted on normalised features).
    ``converged`` / ``n_iter``: per-episode solver diagnostics, when the classifier iterates.
    """

    weight: Tensor  # (E, n_way, D)
    bias: Tensor  # (E, n_way)
    normalize_query: bool = False
    converged: Tensor | None = None  # (E,) bool
    n_iter: Tensor | None = None  # (E,) long

    def logits(self, query: Tensor) -> Tensor:
        """query (E, M, D) -> (E, M, n_way), in the query's precision (at least float32)."""
        q = query if query.dtype in (torch.float32, torch.float64) else query.float()
        if self.normalize_query:
            q = F.normalize(q, dim=-1)
        return torch.baddbmm(self.bias.to(q.dtype).unsqueeze(1), q, self.weight.to(q.dtype).transpose(1, 2))


def _support_matrix(support: Tensor) -> tuple[Tensor, Tensor]:
    """(E, N, K, T, D) -> support rows (E, N·K, D) and their way labels (E, N·K), for the
    classifiers fitted on the support (at least two ways)."""
    if support.shape[1] < 2:
        raise ValueError(f"a classifier fitted on the support needs at least 2 ways, got support {tuple(support.shape)}")
    x = _pooled(support)
    episodes, n_way, k_shot, dim = x.shape
    labels = torch.arange(n_way, device=x.device).repeat_interleave(k_shot).expand(episodes, -1)
    return x.reshape(episodes, n_way * k_shot, dim), labels


def logistic_objective(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, C: float = 1.0) -> Tensor:
    """scikit-learn's multinomial objective ``C·Σ_i CE_i + ½‖W‖²`` (bias free), per episode.

    features (E, S, D), labels (E, S), weight (E, N, D), bias (E, N) -> (E,).
    """
    logits = features @ weight.transpose(1, 2) + bias.unsqueeze(1)
    ce = -torch.log_softmax(logits, -1).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1).sum(-1)
    return C * ce + 0.5 * weight.square().sum((1, 2))


def _kernel_reduction(x: Tensor) -> tuple[Tensor, Tensor]:
    """Z (E, S, S) and M (E, S, S) with Z·Zᵀ = X·Xᵀ and Q = Xᵀ·M orthonormal (float64).

    Cholesky X·Xᵀ = L·Lᵀ gives Z = L, M = L⁻ᵀ; episodes whose Gram matrix is singular or badly
    conditioned (repeated clips) use the eigendecomposition U·Λ·Uᵀ instead: Z = U·Λ^½,
    M = U·Λ^-½ on the non-negligible eigenvalues (a pseudo-inverse), which stays orthonormal.
    """
    shots = x.shape[1]
    xd = x.double()
    gram = xd @ xd.transpose(1, 2)
    factor, info = torch.linalg.cholesky_ex(gram)
    diagonal = factor.diagonal(dim1=1, dim2=2)
    bad = (info != 0) | ~(diagonal.amin(-1) > 1e-5 * diagonal.amax(-1))
    eye = torch.eye(shots, dtype=torch.float64, device=x.device)
    coef_map = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False).transpose(1, 2)
    features = factor
    if bool(bad.any()):
        eigenvalues, eigenvectors = torch.linalg.eigh(gram[bad])
        kept = eigenvalues > eigenvalues.amax(-1, keepdim=True) * shots * torch.finfo(torch.float64).eps
        root = eigenvalues.clamp_min(0).sqrt()
        features[bad] = eigenvectors * torch.where(kept, root, 0).unsqueeze(1)
        coef_map[bad] = eigenvectors * torch.where(kept, 1 / root.clamp_min(1e-300), 0).unsqueeze(1)
    return features, coef_map


class LogisticRegressionClassifier(EpisodeClassifier):
    """Multinomial logistic regression per episode: ``C·Σ_i CE_i + ½‖W‖²`` with a free
    (unpenalised) intercept, scikit-learn's ``LogisticRegression()``, the classifier MM-CDFSL
    fits on the support features of each episode (lbfgs, C=1).

    ``solver="newton"`` (default) solves all episodes at once in torch, on any device, to the
    optimum (a gradient tolerance far below scikit-learn's default stop). **Kernel reduction:**
    the loss sees W only through X·Wᵀ and a component of W orthogonal to the support features
    only adds to ‖W‖², so the optimum lies in their span; with an orthonormal basis Q of it
    (Cholesky of the support Gram matrix, :func:`_kernel_reduction`) the problem is the same
    logistic regression on S-dimensional features (S = support size, 25 at 5-way 5-shot, instead
    of D), and W = Bᵀ·Qᵀ. Newton steps by conjugate gradients in coordinates whitened by
    Böhning's bound on the Hessian (a fixed matrix per episode, factored once), and an Armijo
    line search (:func:`_newton_logistic`).

    ``solver="sklearn"`` fits scikit-learn's ``LogisticRegression`` itself, episode by episode
    (``n_jobs`` joblib workers), on the features as given: bit-exact parity with a paper's
    released evaluation, which stops early at scikit-learn's default ``tol``. The two agree on
    the accuracy to a fraction of a point (``benchmarks/bench_logreg.py``); with scikit-learn run
    to convergence they agree on the predictions.

    ``tol``: newton: gradient max-norm relative to C·S (default 1e-8); sklearn: its own ``tol``
    (default 1e-4). ``normalize``: L2-normalise support and query features first (MM-CDFSL fits
    on the raw features). With ``n_way == 2`` scikit-learn fits a binomial model, whose optimum is
    the multinomial one with C/2; newton uses C/2 there too.
    """

    def __init__(
        self,
        *,
        C: float = 1.0,
        solver: Literal["newton", "sklearn"] = "newton",
        tol: float | None = None,
        max_iter: int = 100,
        normalize: bool = False,
        n_jobs: int | None = None,
        dim: int | None = None,
        num_frames: int | None = None,
    ) -> None:
        super().__init__(dim=dim, num_frames=num_frames)
        if C <= 0:
            raise ValueError(f"C must be > 0, got {C}")
        if solver not in ("newton", "sklearn"):
            raise ValueError(f"solver must be 'newton' or 'sklearn', got {solver!r}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        if tol is not None and tol <= 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        self.C = float(C)
        self.solver = solver
        self.tol = float(tol) if tol is not None else (1e-8 if solver == "newton" else 1e-4)
        self.max_iter = int(max_iter)
        self.normalize = bool(normalize)
        self.n_jobs = n_jobs

    def match(self, support: Tensor, query: Tensor) -> Tensor:
        x, labels = _support_matrix(support)
        return torch.log_softmax(self.fit(x, labels, support.shape[1]).logits(_pooled(query)), -1)

    def fit(self, support: Tensor, labels: Tensor, n_way: int) -> LinearHead:
        """Fit E episodes: support (E, S, D), labels (E, S) in [0, n_way)."""
        x = F.normalize(support, dim=-1) if self.normalize else support
        if not bool(torch.isfinite(x).all()):
            raise ValueError("support features contain NaN or inf")
        fit = self._fit_sklearn if self.solver == "sklearn" else self._fit_newton
        weight, bias, converged, n_iter = fit(x, labels, n_way)
        if not bool(converged.all()):
            warnings.warn(
                f"logistic regression ({self.solver}) did not converge in max_iter={self.max_iter} "
                f"iterations for {int((~converged).sum())} of {len(converged)} episodes",
                RuntimeWarning,
                stacklevel=3,
            )
        return LinearHead(weight.to(x.dtype), bias.to(x.dtype), self.normalize, converged, n_iter)

    def _fit_newton(self, x: Tensor, labels: Tensor, n_way: int) -> tuple[Tensor, ...]:
        C = self.C / 2 if n_way == 2 else self.C
        reduce = x.shape[1] < x.shape[2]
        features, coef_map = _kernel_reduction(x) if reduce else (x.double(), None)
        theta, converged, n_iter = _newton_logistic(features, labels, n_way, C, self.max_iter, self.tol)
        weight = theta[:, :-1].transpose(1, 2)
        if coef_map is not None:  # W = (Xᵀ·M·B)ᵀ
            weight = (coef_map @ theta[:, :-1]).transpose(1, 2) @ x.double()
        return weight, theta[:, -1], converged, n_iter

    def _fit_sklearn(self, x: Tensor, labels: Tensor, n_way: int) -> tuple[Tensor, ...]:
        from joblib import Parallel, delayed

        support, y = x.detach().cpu().numpy(), labels.cpu().numpy()
        options = dict(C=self.C, tol=self.tol, max_iter=self.max_iter)
        fits = Parallel(n_jobs=self.n_jobs)(delayed(_sklearn_fit)(s, t, options) for s, t in zip(support, y))
        weight, bias, n_iter = (torch.from_numpy(np.stack(v)) for v in zip(*fits))
        if n_way == 2:  # binomial: sigmoid(z) = softmax([-z/2, z/2])[1]
            weight, bias = torch.cat([-weight, weight], 1) / 2, torch.cat([-bias, bias], 1) / 2
        device = x.device
        return weight.to(device), bias.to(device), (n_iter < self.max_iter).to(device), n_iter.to(device)


def _sklearn_fit(support: np.ndarray, labels: np.ndarray, options: dict) -> tuple[np.ndarray, ...]:
    """One episode through scikit-learn (a joblib task): coef (N|1, D), intercept, n_iter."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # counted and reported by the caller
        model = LogisticRegression(**options).fit(support, labels)
    return model.coef_, model.intercept_, np.asarray(int(model.n_iter_.max()))


def _newton_logistic(
    features: Tensor, labels: Tensor, n_way: int, C: float, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Newton-CG on ``C·Σ CE + ½‖W‖²`` for E episodes at once (float64).

    The variables are whitened by Böhning's bound on the Hessian (diag(p) − p·pᵀ ≤ ½I gives
    H ≤ M = ½C·X₁ᵀX₁ + P, P the penalty's diagonal, 0 for the intercept): with M = UᵀU and
    φ = U·θ the bound is the identity, so plain CG on the whitened Hessian
    ``I + C·X̃ᵀ(D − ½I)X̃`` (X̃ = X₁·U⁻¹) converges as fast as CG preconditioned by M⁻¹ while
    each iteration costs two small batched products instead of three. Backtracking (Armijo) line
    search per episode; a step that cannot decrease the objective (round-off at an unreachable
    ``tol``) is not taken.

    Converged: the θ-gradient's max-norm is below ``tol·C·S`` (scikit-learn's scaling of its
    tolerance: the objective divided by C·S). Returns theta (E, D + 1, N) (W stacked over the
    intercept row: logits = [x, 1] @ theta), converged (E,) and Newton steps taken (E,).
    """
    episodes, shots, dim = features.shape
    dtype = features.dtype
    x1 = torch.cat([features, features.new_ones(episodes, shots, 1)], -1)  # (E, S, D + 1)
    penalised = torch.ones(dim + 1, dtype=dtype, device=features.device)
    penalised[-1] = 0
    bound = 0.5 * C * (x1.transpose(1, 2) @ x1) + torch.diag(penalised)  # positive definite
    root = torch.linalg.cholesky(bound, upper=True)  # bound = rootᵀ·root
    # Class-major layout (E, N, ·): CPU batched products of these small shapes are ~2x faster so.
    xw = torch.linalg.solve_triangular(root, x1, upper=True, left=False).contiguous()  # X̃ = X₁·root⁻¹
    xwt = xw.transpose(1, 2).contiguous()
    targets = F.one_hot(labels.long(), n_way).to(dtype).transpose(1, 2)  # (E, N, S)
    tiny = torch.finfo(dtype).tiny

    def objective(phi: Tensor) -> Tensor:  # ½θᵀPθ = ½‖φ‖² − ¼C‖X₁θ‖²
        logits = phi @ xwt
        ce = -(torch.log_softmax(logits, 1) * targets).sum((1, 2))
        return C * ce + 0.5 * phi.pow(2).sum((1, 2)) - 0.25 * C * logits.pow(2).sum((1, 2))

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum((1, 2))

    # The objective is flat along one direction, the same shift of every class's intercept
    # (φ-direction 1·uᵀ, u = root's last column). The gradient is orthogonal to it; projecting
    # round-off out of each step keeps the intercepts from drifting along it.
    shift = root[:, None, :, -1] / (n_way * root[:, :, -1].pow(2).sum(1)).sqrt()[:, None, None]

    def off_flat(a: Tensor) -> Tensor:
        return a - shift * (shift * a).sum((1, 2), keepdim=True)

    phi = features.new_zeros(episodes, n_way, dim + 1)  # φᵀ
    first_norm = None
    steps = torch.zeros(episodes, dtype=torch.long, device=features.device)
    while True:
        logits = phi @ xwt
        probs = torch.softmax(logits, 1)
        grad = off_flat((C * (probs - targets) - 0.5 * C * logits) @ xw + phi)
        converged = (grad @ root).abs().amax((1, 2)) <= tol * C * shots  # the θ-gradient
        if int(steps.max()) == max_iter or bool(converged.all()):
            break
        grad_norm = dot(grad, grad).sqrt()
        first_norm = grad_norm if first_norm is None else first_norm
        # inexact Newton: solve H·step = -grad to a relative residual that shrinks with ‖grad‖
        forcing = torch.clamp(grad_norm / first_norm.clamp_min(tiny), max=0.5).sqrt() * 0.5
        limit = torch.where(converged, torch.inf, forcing * grad_norm)
        step = torch.zeros_like(grad)
        residual = -grad
        direction = residual
        rr = dot(residual, residual)
        for _ in range(2 * (dim + 1) * n_way):
            running = rr.sqrt() > limit
            if not bool(running.any()):
                break
            z = direction @ xwt
            weighted = probs * z
            weighted = C * (weighted - probs * weighted.sum(1, keepdim=True) - 0.5 * z)
            curved = weighted @ xw + direction
            curvature = dot(direction, curved)
            running = running & (curvature > 0)
            alpha = torch.where(running, rr / curvature.clamp_min(tiny), 0)
            step = step + alpha[:, None, None] * direction
            residual = residual - alpha[:, None, None] * curved
            rr_next = dot(residual, residual)
            beta = torch.where(running, rr_next / rr.clamp_min(tiny), 0)
            direction = residual + beta[:, None, None] * direction
            rr = rr_next
        step = off_flat(step)
        current = objective(phi)
        slope = dot(grad, step)
        slack = 16 * torch.finfo(dtype).eps * current.abs()  # round-off must not reject a good step
        length = torch.ones_like(current)
        for _ in range(40):
            failed = ~(objective(phi + length[:, None, None] * step) <= current + 1e-4 * length * slope + slack)
            if not bool(failed.any()):
                break
            length = torch.where(failed, length / 2, length)
        phi = phi + torch.where(failed, 0, length)[:, None, None] * step
        steps += (~converged).long()
    theta = torch.linalg.solve_triangular(root, phi.transpose(1, 2), upper=True)
    return theta, converged, steps


class FinetuneLinearClassifier(EpisodeClassifier):
    """A linear head trained by gradient descent on each episode's support set.

    All heads of a batch are trained together: the summed loss of independent episodes has
    independent gradients, and Adam updates each parameter on its own, so this is exactly E
    separate fine-tunings. ``init="prototype"`` starts from W = 2·p, b = −‖p‖² (p the class
    means), whose logits rank classes exactly as the euclidean prototype classifier, so
    fine-tuning starts from that baseline instead of from chance; ``init="zeros"`` from zero.
    ``normalize`` L2-normalises features first, which makes ``lr`` independent of the encoder's
    feature scale. ``weight_decay`` is AdamW's decoupled decay on W (not on the bias).
    """

    def __init__(
        self,
        *,
        steps: int = 100,
        lr: float = 0.01,
        weight_decay: float = 0.0,
        init: Literal["prototype", "zeros"] = "prototype",
        normalize: bool = True,
        dim: int | None = None,
        num_frames: int | None = None,
    ) -> None:
        super().__init__(dim=dim, num_frames=num_frames)
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

    def match(self, support: Tensor, query: Tensor) -> Tensor:
        x, labels = _support_matrix(support)
        return self.fit(x, labels, support.shape[1]).logits(_pooled(query))

    def fit(self, support: Tensor, labels: Tensor, n_way: int) -> LinearHead:
        # evaluation may run under inference_mode; training the heads needs autograd
        with torch.inference_mode(False), torch.enable_grad():
            x = support.clone()
            if self.normalize:
                x = F.normalize(x, dim=-1)
            labels = labels.clone()
            if self.init == "prototype":
                prototypes = (F.one_hot(labels, n_way).to(x.dtype).transpose(1, 2) @ x) / (
                    F.one_hot(labels, n_way).sum(1).unsqueeze(-1)
                )
                weight, bias = 2 * prototypes, -prototypes.square().sum(-1)
            else:
                weight, bias = x.new_zeros(x.shape[0], n_way, x.shape[2]), x.new_zeros(x.shape[0], n_way)
            weight.requires_grad_(True)
            bias.requires_grad_(True)
            optimizer = torch.optim.AdamW(
                [{"params": [weight], "weight_decay": self.weight_decay}, {"params": [bias], "weight_decay": 0.0}],
                lr=self.lr,
            )
            flat = labels.reshape(-1)
            for _ in range(self.steps):
                logits = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
                # sum over episodes of each episode's mean loss: the gradients stay per episode
                loss = F.cross_entropy(logits.reshape(-1, n_way), flat, reduction="sum") / x.shape[1]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return LinearHead(weight.detach(), bias.detach(), normalize_query=self.normalize)

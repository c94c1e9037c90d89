"""mmfsar's logistic regression on all episodes vs scikit-learn fitted per episode: time, accuracy.

DESIGN.md's target: solving the logistic-regression episodes all at once (``episode_probabilities``
with ``LogisticRegressionClassifier``: a compiled replay of scikit-learn's solve on the CPU,
episodes split over torch's thread count) is >= 50x faster
than fitting scikit-learn's ``LogisticRegression()`` per episode (as MM-CDFSL's evaluation does),
with accuracy within 0.5 points, on the same features and episodes.

    python benchmarks/bench_logreg.py                  # 600 episodes, 5-way 1- and 5-shot, D=384
    python benchmarks/bench_logreg.py --solver newton  # the exact-optimum solver instead

Prints one JSON object. Both sides are timed in this process on the same episodes, warm-up
excluded: mmfsar's solver (best of ``--repeats`` runs, with all of torch's threads and with one,
the better counting, both reported; queries scored inside the timing), scikit-learn one episode after
another (gather, fit, predict), by default
with its thread pools limited to one thread, its fastest setting for these tiny fits (the
default two-thread OpenMP pool only adds synchronisation); ``--sklearn-threads 0`` leaves them
as they are. :func:`run` is the reusable core (``benchmarks/bench_eval.py`` can call it on real
encoder features).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

try:
    import mmfsar  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmfsar.data.episodes import EpisodeSampler, EpisodeSettings
from mmfsar.fewshot import (
    LogisticRegressionClassifier,
    episode_probabilities,
    mean_confidence_interval,
)


def synthetic_features(
    classes: int = 24, per_class: int = 100, dim: int = 384, spread: float = 5.0, seed: int = 0
) -> tuple[torch.Tensor, list[str], list[str]]:
    """Clip features with class structure, shaped like a ViT's pooled LayerNorm output.

    Each class has a random mean; a clip is its class mean plus isotropic noise ``spread`` times
    larger per dimension, then standardised per vector (LayerNorm without affine), so norms are
    ~sqrt(dim) like real encoder features. ``spread=5`` gives 5-way accuracies of roughly
    41 % (1-shot) and 66 % (5-shot), the range of the published results.
    Returns (features (clips, dim) float32, clip ids, class name of each clip).
    """
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, 1, dim, generator=generator)
    noise = torch.randn(classes, per_class, dim, generator=generator) * spread
    features = torch.nn.functional.layer_norm((means + noise).reshape(-1, dim), (dim,))
    clip_ids = [f"c{c:03d}_{i:04d}" for c in range(classes) for i in range(per_class)]
    class_of_clip = [f"class{c:03d}" for c in range(classes) for _ in range(per_class)]
    return features, clip_ids, class_of_clip


def _sklearn_predictions(
    features: np.ndarray, episodes: np.ndarray, k_shot: int
) -> tuple[np.ndarray, float, int]:
    """Per-episode ``LogisticRegression().fit`` on the support, argmax of the query probabilities.

    Returns predictions (E, N, Q), seconds, and how many fits warned of non-convergence.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    n_way = episodes.shape[1]
    labels = np.repeat(np.arange(n_way), k_shot)
    views = features[:, None] if features.ndim == 2 else features
    predictions = np.empty(episodes.shape[:1] + (n_way, episodes.shape[2] - k_shot), dtype=np.int64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        start = time.perf_counter()
        for e, episode in enumerate(episodes):
            support = views[episode[:, :k_shot].reshape(-1), 0]
            query = views[episode[:, k_shot:].reshape(-1)]  # (N·Q, V, D)
            model = LogisticRegression().fit(support, labels)
            probs = model.predict_proba(query.reshape(-1, query.shape[-1])).reshape(
                query.shape[0], -1, n_way
            )
            predictions[e] = probs.mean(1).argmax(-1).reshape(n_way, -1)
        seconds = time.perf_counter() - start
    not_converged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return predictions, seconds, not_converged


def run(
    features: torch.Tensor,
    episodes: torch.Tensor,
    k_shot: int,
    *,
    classifier: LogisticRegressionClassifier | None = None,
    repeats: int = 3,
    sklearn_repeats: int = 2,
    sklearn_threads: int | None = 1,
    chunk: int = 1000,
) -> dict:
    """Time and score mmfsar's logistic regression against scikit-learn on one episode set.

    features: (clips, D) or (clips, V, D) cached features (V query views, support = view 0);
    episodes: (E, N, K + Q) clip positions (``EpisodeSet.tensor``). Times are the best of
    ``repeats`` torch runs and ``sklearn_repeats`` scikit-learn runs; ``sklearn_threads``: thread
    limit for scikit-learn's pools (None: leave them). Returns times (s), speed-up, accuracies
    (percent, mean and 95% CI), their difference and the share of identical query predictions.
    """
    from threadpoolctl import threadpool_limits

    classifier = classifier or LogisticRegressionClassifier()
    features = features.float()
    truth = torch.arange(episodes.shape[1]).view(1, -1, 1)
    array, positions = features.double().numpy(), episodes.numpy()

    def solve() -> torch.Tensor:
        return episode_probabilities(classifier, features, episodes, k_shot, chunk=chunk).argmax(-1)

    def solve_sklearn() -> tuple[np.ndarray, float, int]:
        if sklearn_threads is None:
            return _sklearn_predictions(array, positions, k_shot)
        with threadpool_limits(limits=sklearn_threads):
            return _sklearn_predictions(array, positions, k_shot)

    # Warm-up, then the two sides take turns (so a burst of other load hits both) and each
    # keeps its best time. torch runs with all its threads and with one: on two cores busy
    # with other work one thread can be faster; the speed-up uses the better of the two.
    threads = torch.get_num_threads()
    counts = sorted({threads, 1}, reverse=True)
    torch_times: dict[int, list[float]] = {count: [] for count in counts}
    sk_times: list[float] = []
    try:
        for count in counts:
            torch.set_num_threads(count)
            solve()
        _sklearn_predictions(array, positions[:2], k_shot)
        for _ in range(repeats):
            for count in counts:
                torch.set_num_threads(count)
                start = time.perf_counter()
                torch_predictions = solve()
                torch_times[count].append(time.perf_counter() - start)
            if len(sk_times) < sklearn_repeats:
                sk_predictions, seconds, not_converged = solve_sklearn()
                sk_times.append(seconds)
    finally:
        torch.set_num_threads(threads)
    sk_predictions, sk_seconds = torch.from_numpy(sk_predictions), min(sk_times)

    torch_acc = mean_confidence_interval((torch_predictions == truth).double().mean((1, 2)))
    sk_acc = mean_confidence_interval((sk_predictions == truth).double().mean((1, 2)))
    best = {count: min(times) for count, times in torch_times.items()}
    torch_seconds = min(best.values())
    return {
        "episodes": int(episodes.shape[0]),
        "n_way": int(episodes.shape[1]),
        "k_shot": k_shot,
        "n_query": int(episodes.shape[2] - k_shot),
        "dim": int(features.shape[-1]),
        "views": 1 if features.dim() == 2 else int(features.shape[1]),
        "classifier": repr(classifier),
        "mmfsar_seconds": round(torch_seconds, 4),
        "mmfsar_seconds_by_torch_threads": {
            count: [round(t, 4) for t in times] for count, times in torch_times.items()
        },
        "sklearn_seconds": round(sk_seconds, 3),
        "sklearn_seconds_all": [round(t, 3) for t in sk_times],
        "speedup": round(sk_seconds / torch_seconds, 1),
        "speedup_all_threads": round(sk_seconds / best[threads], 1),
        "mmfsar_accuracy": round(torch_acc[0], 2),
        "mmfsar_ci95": round(torch_acc[1], 2),
        "sklearn_accuracy": round(sk_acc[0], 2),
        "sklearn_ci95": round(sk_acc[1], 2),
        "accuracy_difference": round(torch_acc[0] - sk_acc[0], 3),
        "same_prediction_percent": round(
            100 * (torch_predictions == sk_predictions).double().mean().item(), 3
        ),
        "sklearn_not_converged": not_converged,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=24)
    parser.add_argument("--spread", type=float, default=5.0)
    parser.add_argument("--solver", choices=["lbfgs", "newton"], default="lbfgs")
    parser.add_argument("--repeats", type=int, default=5, help="torch timings (best counts)")
    parser.add_argument(
        "--sklearn-repeats", type=int, default=2, help="scikit-learn timings (best counts)"
    )
    parser.add_argument(
        "--sklearn-threads",
        type=int,
        default=1,
        help="0: leave scikit-learn's thread pools as they are",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    features, clip_ids, class_of_clip = synthetic_features(
        args.classes, 100, args.dim, args.spread, args.seed
    )
    results = []
    for k_shot in args.shots:
        settings = EpisodeSettings(args.ways, k_shot, args.queries, args.episodes, args.seed)
        episode_set = EpisodeSampler(clip_ids, class_of_clip, settings).sample()
        # The sampler sorts clips by id; map its positions back to rows of `features`.
        rows = (
            torch.tensor([clip_ids.index(c) for c in episode_set.clip_ids])
            if episode_set.clip_ids != clip_ids
            else None
        )
        episodes = episode_set.tensor if rows is None else rows[episode_set.tensor]
        results.append(
            run(
                features,
                episodes,
                k_shot,
                classifier=LogisticRegressionClassifier(solver=args.solver),
                repeats=args.repeats,
                sklearn_repeats=args.sklearn_repeats,
                sklearn_threads=args.sklearn_threads or None,
            )
        )
    report = {
        "benchmark": "logreg",
        "torch_threads": torch.get_num_threads(),
        "sklearn_threads": args.sklearn_threads or "default",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

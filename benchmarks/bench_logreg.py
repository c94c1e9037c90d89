"""Logistic regression on few-shot episodes: the batched torch solver vs scikit-learn per episode.

Both solvers sit behind the same ``LogisticRegressionClassifier`` and run through the same
``episode_probabilities`` on the same features and episodes:

* ``solver="newton"``: every episode at once in torch, to the optimum of the objective;
* ``solver="sklearn"``: scikit-learn's ``LogisticRegression()`` fitted per episode (MM-CDFSL's
  evaluation), ``--sklearn-jobs`` joblib workers (default 1: one episode after another, as the
  papers' evaluation scripts do).

Targets: newton >= 20x faster than sklearn, mean accuracy within 0.5 points (600 episodes, 5-way
1- and 5-shot). The default features are synthetic (class means plus noise, LayerNorm-scaled like a
ViT's pooled output); ``benchmarks/bench_eval.py`` calls :func:`run` on a trained encoder's features.

    python benchmarks/bench_logreg.py                   # 600 episodes, 5-way 1- and 5-shot, D=384
    python benchmarks/bench_logreg.py --tiny            # a few episodes, one repeat (the test suite)

Prints one JSON object; times are the best of ``--repeats`` runs after a warm-up, the two
solvers taking turns so that a burst of other load on the machine hits both.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

try:
    import mmfsar  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmfsar.data.episodes import EpisodeSampler, EpisodeSettings
from mmfsar.fewshot import LogisticRegressionClassifier, episode_probabilities, mean_confidence_interval


def synthetic_features(
    classes: int = 24, per_class: int = 100, dim: int = 384, spread: float = 5.0, seed: int = 0
) -> tuple[torch.Tensor, list[str], list[str]]:
    """Clip features with class structure, shaped like a ViT's pooled LayerNorm output: each class
    a random mean, each clip its class mean plus ``spread`` times larger isotropic noise, then
    standardised per vector. ``spread=5`` gives 5-way accuracies of roughly 40 % (1-shot) and 65 %
    (5-shot), the range of the published results. Returns (features (clips, dim), clip ids, classes)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, 1, dim, generator=generator)
    noise = torch.randn(classes, per_class, dim, generator=generator) * spread
    features = torch.nn.functional.layer_norm((means + noise).reshape(-1, dim), (dim,))
    clip_ids = [f"c{c:03d}_{i:04d}" for c in range(classes) for i in range(per_class)]
    return features, clip_ids, [f"class{c:03d}" for c in range(classes) for _ in range(per_class)]


def run(features: torch.Tensor, episodes: torch.Tensor, k_shot: int, *, repeats: int = 3, sklearn_jobs: int | None = 1) -> dict:
    """Time and score both solvers on one episode set.

    features: (clips, D) or the engine's (clips, views, time, D); episodes: (E, N, K + Q) clip
    positions. Returns times (s), the speed-up, accuracies (percent, mean and 95% CI), their
    difference and the share of identical query predictions.
    """
    bank = features.float() if features.dim() == 4 else features.float()[:, None, None]
    solvers = {
        "newton": LogisticRegressionClassifier(solver="newton"),
        "sklearn": LogisticRegressionClassifier(solver="sklearn", n_jobs=sklearn_jobs),
    }
    truth = torch.arange(episodes.shape[1]).view(1, -1, 1)
    for classifier in solvers.values():  # warm-up (and joblib's workers)
        episode_probabilities(classifier, bank, episodes[:4], k_shot)
    times: dict[str, list[float]] = {name: [] for name in solvers}
    predictions = {}
    for _ in range(repeats):
        for name, classifier in solvers.items():
            start = time.perf_counter()
            predictions[name] = episode_probabilities(classifier, bank, episodes, k_shot).argmax(-1)
            times[name].append(time.perf_counter() - start)
    accuracy = {name: mean_confidence_interval((p == truth).double().mean((1, 2))) for name, p in predictions.items()}
    best = {name: min(t) for name, t in times.items()}
    return {
        "episodes": int(episodes.shape[0]),
        "setting": f"{episodes.shape[1]}-way {k_shot}-shot {episodes.shape[2] - k_shot} queries",
        "dim": int(bank.shape[-1]),
        "newton_seconds": round(best["newton"], 4),
        "sklearn_seconds": round(best["sklearn"], 4),
        "all_seconds": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "sklearn_jobs": sklearn_jobs,
        "speedup": round(best["sklearn"] / best["newton"], 1),
        "newton_accuracy": [round(v, 2) for v in accuracy["newton"]],
        "sklearn_accuracy": [round(v, 2) for v in accuracy["sklearn"]],
        "accuracy_difference": round(accuracy["newton"][0] - accuracy["sklearn"][0], 3),
        "same_prediction_percent": round(100 * (predictions["newton"] == predictions["sklearn"]).double().mean().item(), 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--spread", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sklearn-jobs", type=int, default=1, help="joblib workers of the sklearn solver (-1: every core)")
    parser.add_argument("--tiny", action="store_true", help="20 episodes, one repeat: checks that the script runs")
    args = parser.parse_args(argv)
    if args.tiny:
        args.episodes, args.repeats = 20, 1

    features, clip_ids, classes = synthetic_features(dim=args.dim, spread=args.spread)
    results = []
    for k_shot in args.shots:
        episode_set = EpisodeSampler(clip_ids, classes, EpisodeSettings(args.ways, k_shot, args.queries, args.episodes)).sample()
        rows = torch.tensor([clip_ids.index(c) for c in episode_set.clip_ids])  # the sampler sorts clips by id
        results.append(run(features, rows[episode_set.tensor], k_shot, repeats=args.repeats, sklearn_jobs=args.sklearn_jobs))
    report = {
        "benchmark": "logreg",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "results": results,
        "targets": {
            "newton >= 20x faster than sklearn": all(r["speedup"] >= 20 for r in results),
            "accuracy within 0.5 points": all(abs(r["accuracy_difference"]) <= 0.5 for r in results),
        },
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

"""Few-shot classifiers: prototypes, logistic regression (both solvers, against scikit-learn),
fine-tuning; the engine that solves episodes on a feature bank; the CI statistic."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfsar.fewshot import (
    FinetuneLinearClassifier,
    LogisticRegressionClassifier,
    PrototypeClassifier,
    episode_probabilities,
    format_mean_ci,
    logistic_objective,
    mean_confidence_interval,
    solve_episodes,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "fewshot" / "classifier"


def structured_features(classes: int, per_class: int, dim: int, spread: float, seed: int) -> torch.Tensor:
    """Class means plus noise, standardised per vector like a LayerNorm output (float64)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, 1, dim, generator=generator, dtype=torch.float64)
    noise = torch.randn(classes, per_class, dim, generator=generator, dtype=torch.float64) * spread
    return torch.nn.functional.layer_norm((means + noise).reshape(-1, dim), (dim,))


def random_episodes(classes: int, per_class: int, n_way: int, k_shot: int, n_query: int, count: int, seed: int) -> torch.Tensor:
    """(count, n_way, k_shot + n_query) clip positions of clips laid out class by class."""
    generator = torch.Generator().manual_seed(seed)
    episodes = []
    for _ in range(count):
        ways = torch.randperm(classes, generator=generator)[:n_way]
        episodes.append(torch.stack([w * per_class + torch.randperm(per_class, generator=generator)[: k_shot + n_query] for w in ways]))
    return torch.stack(episodes)


def bank(features: torch.Tensor) -> torch.Tensor:
    """(clips, D) -> the engine's (clips, views=1, time=1, D)."""
    return features[:, None, None]


def split(features: torch.Tensor, episodes: torch.Tensor, k_shot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier inputs of the episodes: support (E, N, K, 1, D) and query (E, N·Q, 1, D)."""
    support = features[episodes[:, :, :k_shot]][:, :, :, None]
    query = features[episodes[:, :, k_shot:]].flatten(1, 2)[:, :, None]
    return support, query


def sklearn_fits(features: torch.Tensor, episodes: torch.Tensor, k_shot: int, **options):
    """Per-episode scikit-learn fits: predictions (E, N, Q), objectives (E,), coef (E, N|1, D)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    n_way, n_query = episodes.shape[1], episodes.shape[2] - k_shot
    labels = np.repeat(np.arange(n_way), k_shot)
    C = options.get("C", 1.0)
    predictions, objectives, coefs = [], [], []
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for episode in episodes:
            support = features[episode[:, :k_shot].reshape(-1)]
            model = LogisticRegression(**options).fit(support.numpy(), labels)
            query = features[episode[:, k_shot:].reshape(-1)].numpy()
            predictions.append(torch.from_numpy(model.predict(query).reshape(n_way, n_query)))
            weight, bias = torch.from_numpy(model.coef_)[None], torch.from_numpy(model.intercept_)[None]
            coefs.append(model.coef_)
            if n_way == 2:  # binomial: one weight vector, the optimum of multinomial with C/2
                weight, bias = torch.cat([weight, -weight], 1) / 2, torch.cat([bias, -bias], 1) / 2
            objectives.append(
                logistic_objective(support[None], torch.from_numpy(labels)[None], weight, bias, C / 2 if n_way == 2 else C)
            )
    return torch.stack(predictions), torch.cat(objectives), np.stack(coefs)


def support_rows(features: torch.Tensor, episodes: torch.Tensor, k_shot: int) -> tuple[torch.Tensor, torch.Tensor]:
    count, n_way = episodes.shape[:2]
    return features[episodes[:, :, :k_shot].reshape(count, -1)], torch.arange(n_way).repeat_interleave(k_shot).expand(count, -1)


# --- prototypes -------------------------------------------------------------------------------


def test_prototype_accuracy_matches_a_hand_computation():
    # 3 ways of 2 support clips in 2-D; centroids A (1, 0), B (1, 4), C (6, 1).
    points = {
        "a1": (0, 0), "a2": (2, 0), "b1": (0, 4), "b2": (2, 4), "c1": (6, 0), "c2": (6, 2),
        "qa1": (1, 1), "qa2": (1, -1),  # d² to A = 1: correct
        "qb1": (1, 3),  # d² to B = 1: correct
        "qb2": (4, 3),  # d² to B = 10, to C = 8: misclassified as C
        "qc1": (6, 1), "qc2": (5, 0),  # d² to C = 0 and 2: correct
    }  # fmt: skip
    names = list(points)
    features = torch.tensor([points[n] for n in names], dtype=torch.float32)
    at = names.index
    episode0 = [
        [at("a1"), at("a2"), at("qa1"), at("qa2")],
        [at("b1"), at("b2"), at("qb1"), at("qb2")],
        [at("c1"), at("c2"), at("qc1"), at("qc2")],
    ]
    # Same clips, ways reordered and the hard query left out: every query right.
    episode1 = [
        [at("c1"), at("c2"), at("qc2"), at("qc1")],
        [at("a1"), at("a2"), at("qa2"), at("qa1")],
        [at("b1"), at("b2"), at("qb1"), at("qb1")],
    ]
    episodes = torch.tensor([episode0, episode1])
    accuracy = solve_episodes(PrototypeClassifier(metric="euclidean"), bank(features), episodes, k_shot=2)
    assert accuracy.tolist() == pytest.approx([5 / 6, 1.0])
    probs = episode_probabilities(PrototypeClassifier(metric="euclidean"), bank(features), episodes, k_shot=2)
    squared = torch.tensor([[9 + 9, 9 + 1, 4 + 4]], dtype=torch.float32)  # qb2 to A, B, C
    assert torch.allclose(probs[0, 1, 1], torch.softmax(-squared, -1)[0], atol=1e-6)
    logits = PrototypeClassifier(metric="euclidean", temperature=2.0)(*split(features, episodes, 2))
    assert torch.allclose(logits[0, 3], -squared[0] / 2)  # qb2 is query 3 of episode 0


def test_prototype_cosine_logits_average_frames():
    generator = torch.Generator().manual_seed(0)
    support = torch.randn(4, 3, 2, 5, 8, generator=generator)  # (E, N, K, T, D)
    query = torch.randn(4, 5, 5, 8, generator=generator)
    logits = PrototypeClassifier(metric="cosine", temperature=0.1)(support, query)
    prototypes = support.mean(3).mean(2)
    cosine = torch.nn.functional.cosine_similarity(query.mean(2)[:, :, None], prototypes[:, None], dim=-1)
    assert torch.allclose(logits, cosine / 0.1, atol=1e-5)


# --- logistic regression ----------------------------------------------------------------------


@pytest.mark.parametrize("k_shot,dim", [(1, 384), (5, 128)])
def test_newton_reaches_scikit_learns_optimum(k_shot, dim):
    features = structured_features(classes=12, per_class=25, dim=dim, spread=4.0, seed=k_shot)
    episodes = random_episodes(12, 25, n_way=5, k_shot=k_shot, n_query=10, count=40, seed=k_shot)
    classifier = LogisticRegressionClassifier()  # newton, C = 1, raw features
    head = classifier.fit(*support_rows(features, episodes, k_shot), 5)
    ours = logistic_objective(*support_rows(features, episodes, k_shot), head.weight, head.bias)
    assert bool(head.converged.all())
    _, default_objectives, _ = sklearn_fits(features, episodes, k_shot)
    assert bool((ours <= default_objectives * (1 + 1e-9)).all()), "at least as low as scikit-learn's early stop"
    tight_predictions, tight_objectives, _ = sklearn_fits(features, episodes, k_shot, tol=1e-10, max_iter=10_000)
    assert torch.allclose(ours, tight_objectives, rtol=1e-7)
    predictions = episode_probabilities(classifier, bank(features), episodes, k_shot).argmax(-1)
    assert (predictions == tight_predictions).double().mean() >= 0.99


def test_sklearn_solver_is_scikit_learn_itself():
    features = structured_features(classes=12, per_class=25, dim=64, spread=4.0, seed=3).float()
    episodes = random_episodes(12, 25, n_way=5, k_shot=2, n_query=6, count=12, seed=3)
    classifier = LogisticRegressionClassifier(solver="sklearn")
    head = classifier.fit(*support_rows(features, episodes, 2), 5)
    sk_predictions, _, sk_coef = sklearn_fits(features, episodes, 2)
    assert np.array_equal(head.weight.numpy(), sk_coef), "the same fit, bit for bit"
    predictions = episode_probabilities(classifier, bank(features), episodes, 2).argmax(-1)
    assert torch.equal(predictions, sk_predictions)
    parallel = episode_probabilities(LogisticRegressionClassifier(solver="sklearn", n_jobs=2), bank(features), episodes, 2)
    assert torch.equal(parallel.argmax(-1), sk_predictions)


def test_newton_and_sklearn_accuracies_agree():
    # The default scikit-learn stop differs from the optimum on a few hard queries only.
    features = structured_features(classes=12, per_class=25, dim=96, spread=5.0, seed=5).float()
    episodes = random_episodes(12, 25, n_way=5, k_shot=1, n_query=10, count=100, seed=5)
    newton = solve_episodes(LogisticRegressionClassifier(), bank(features), episodes, 1).mean()
    sklearn = solve_episodes(LogisticRegressionClassifier(solver="sklearn"), bank(features), episodes, 1).mean()
    assert abs(float(newton - sklearn)) <= 0.01


def test_two_way_logistic_regression_has_sklearn_binary_optimum():
    features = structured_features(classes=10, per_class=20, dim=64, spread=3.0, seed=3)
    episodes = random_episodes(10, 20, n_way=2, k_shot=3, n_query=8, count=20, seed=3)
    for solver in ("newton", "sklearn"):
        predictions = episode_probabilities(LogisticRegressionClassifier(solver=solver, tol=1e-10, max_iter=10_000), bank(features), episodes, 3)
        sk_predictions, _, _ = sklearn_fits(features, episodes, 3, tol=1e-10, max_iter=10_000)
        assert (predictions.argmax(-1) == sk_predictions).double().mean() >= 0.99, solver


def test_more_shots_than_dimensions_and_repeated_support_clips():
    # S >= D skips the kernel reduction; identical or nearly identical support clips make the Gram
    # matrix singular or ill-conditioned (the eigendecomposition path).
    features = structured_features(classes=10, per_class=20, dim=16, spread=2.0, seed=4)
    episodes = random_episodes(10, 20, n_way=5, k_shot=5, n_query=5, count=20, seed=4)
    wide = structured_features(classes=8, per_class=12, dim=64, spread=3.0, seed=11)
    repeated = random_episodes(8, 12, n_way=5, k_shot=3, n_query=4, count=10, seed=11)
    wide[repeated[:, 0, 1]] = wide[repeated[:, 0, 0]]
    wide[repeated[:, 1, 2]] = wide[repeated[:, 1, 0]] * (1 + 1e-7)
    for feats, eps, k in ((features, episodes, 5), (wide, repeated, 3)):
        head = LogisticRegressionClassifier().fit(*support_rows(feats, eps, k), 5)
        ours = logistic_objective(*support_rows(feats, eps, k), head.weight, head.bias)
        _, tight, _ = sklearn_fits(feats, eps, k, tol=1e-10, max_iter=10_000)
        assert torch.allclose(ours, tight, rtol=1e-7)


def test_logistic_regression_warns_when_not_converged():
    features = structured_features(classes=6, per_class=10, dim=32, spread=3.0, seed=9)
    support, labels = support_rows(features, random_episodes(6, 10, 5, 2, 1, 4, seed=9), 2)
    for solver in ("newton", "sklearn"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            head = LogisticRegressionClassifier(solver=solver, max_iter=1).fit(support, labels, 5)
        assert not bool(head.converged.any()), solver
        assert any("did not converge" in str(w.message) for w in caught), solver


def test_newton_at_an_unreachable_tolerance_keeps_its_best_finite_fit():
    # Below float64's round-off the gradient test cannot pass; the solver used to divide by a
    # round-off curvature and return NaN weights for some episodes. It must stop at a finite fit
    # that is the optimum to the precision available, and say it did not converge.
    features = structured_features(classes=12, per_class=25, dim=128, spread=4.0, seed=7)
    episodes = random_episodes(12, 25, n_way=5, k_shot=5, n_query=5, count=60, seed=7)
    support, labels = support_rows(features, episodes, 5)
    reference = LogisticRegressionClassifier().fit(support, labels, 5)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        head = LogisticRegressionClassifier(tol=1e-15, max_iter=30).fit(support, labels, 5)
    assert bool(torch.isfinite(head.weight).all()) and bool(torch.isfinite(head.bias).all())
    ours = logistic_objective(support, labels, head.weight, head.bias)
    assert torch.allclose(ours, logistic_objective(support, labels, reference.weight, reference.bias), rtol=1e-9)


# --- the engine on a bank: chunks, views ------------------------------------------------------


def test_chunking_does_not_change_results_and_reports_progress():
    features = structured_features(classes=10, per_class=20, dim=48, spread=3.0, seed=5)
    episodes = random_episodes(10, 20, n_way=5, k_shot=2, n_query=4, count=23, seed=5)
    for classifier in (PrototypeClassifier(), LogisticRegressionClassifier()):
        done: list[int] = []
        whole = episode_probabilities(classifier, bank(features), episodes, 2)
        pieces = episode_probabilities(classifier, bank(features), episodes, 2, chunk=5, progress=done.append)
        assert torch.allclose(whole, pieces, atol=1e-10) and done == [5, 5, 5, 5, 3]


def test_averaging_query_views_changes_the_prediction():
    # 2-way 1-shot, prototypes A = (1, 0) and B = (-1, 0). The way-B query's view 0 leans to A,
    # its two other views clearly to B: view 0 alone errs, the average of 3 views does not.
    views = torch.tensor(
        [
            [[1.0, 0.0]] * 3,  # clip 0: support of way A
            [[-1.0, 0.0]] * 3,  # clip 1: support of way B
            [[0.1, 0.0], [-0.6, 0.0], [-0.6, 0.0]],  # clip 2: query of way B
            [[0.9, 0.0]] * 3,  # clip 3: query of way A
        ]
    )[:, :, None]
    episodes = torch.tensor([[[0, 3], [1, 2]]])
    classifier = PrototypeClassifier(metric="euclidean")
    assert solve_episodes(classifier, views[:, :1], episodes, k_shot=1).item() == 0.5
    assert solve_episodes(classifier, views, episodes, k_shot=1).item() == 1.0
    probs = episode_probabilities(classifier, views, episodes, k_shot=1)
    expected = torch.softmax(-torch.tensor([[0.9**2, 1.1**2], [1.6**2, 0.4**2], [1.6**2, 0.4**2]]), -1).mean(0)
    assert torch.allclose(probs[0, 1, 0], expected, atol=1e-6)


# --- fine-tuning, statistics, errors, configs --------------------------------------------------


def test_finetune_separates_trivial_episodes_under_inference_mode():
    features = structured_features(classes=8, per_class=10, dim=32, spread=0.05, seed=6).float()
    episodes = random_episodes(8, 10, n_way=5, k_shot=2, n_query=5, count=12, seed=6)
    for init in ("prototype", "zeros"):
        classifier = FinetuneLinearClassifier(steps=50, lr=0.05, init=init)
        with torch.inference_mode():  # evaluation runs so; the heads still train
            accuracy = solve_episodes(classifier, bank(features), episodes, k_shot=2)
        assert accuracy.min().item() == 1.0


def test_finetune_prototype_init_without_steps_is_the_prototype_classifier():
    features = structured_features(classes=8, per_class=10, dim=32, spread=3.0, seed=8).float()
    episodes = random_episodes(8, 10, n_way=5, k_shot=3, n_query=5, count=10, seed=8)
    untrained = episode_probabilities(FinetuneLinearClassifier(steps=0, normalize=False), bank(features), episodes, 3)
    prototype = episode_probabilities(PrototypeClassifier(metric="euclidean"), bank(features), episodes, 3)
    assert torch.allclose(untrained, prototype, atol=1e-5)


def test_mean_confidence_interval_by_hand():
    accuracies = [0.2, 0.4, 0.6, 0.8]
    std = math.sqrt(((0.3**2) * 2 + (0.1**2) * 2) / 4)  # population std (ddof=0)
    mean, ci = mean_confidence_interval(accuracies)
    assert mean == pytest.approx(50.0)
    assert ci == pytest.approx(100 * 1.96 * std / 2)  # 21.91
    assert mean_confidence_interval(torch.tensor(accuracies), percent=False) == pytest.approx((0.5, 1.96 * std / 2))
    assert mean_confidence_interval([0.5]) == (50.0, 0.0)
    assert format_mean_ci(41.9731, 0.5249) == "41.97 ± 0.52"
    with pytest.raises(ValueError, match="no episode"):
        mean_confidence_interval([])
    with pytest.raises(ValueError, match="fractions"):
        mean_confidence_interval([41.97])


def test_bad_inputs_raise_clear_errors():
    support, query = torch.randn(3, 2, 2, 1, 8), torch.randn(3, 5, 1, 8)
    classifier = PrototypeClassifier()
    with pytest.raises(ValueError, match="support must be"):
        classifier(support[:, :, 0], query)
    with pytest.raises(ValueError, match="8-d but query features are 7-d"):
        classifier(support, query[..., :7])
    with pytest.raises(ValueError, match="3 episodes but query has 2"):
        classifier(support, query[:2])
    with pytest.raises(ValueError, match="at least 2 ways"):
        LogisticRegressionClassifier()(support[:, :1], query)
    with pytest.raises(ValueError, match="NaN"):
        LogisticRegressionClassifier()(support.index_put((torch.tensor([1]),), torch.tensor(float("nan"))), query)

    features, episodes = bank(torch.randn(10, 8)), torch.arange(8).view(2, 2, 2)
    with pytest.raises(ValueError, match="k_shot=2 must be an integer in"):
        solve_episodes(classifier, features, episodes, k_shot=2)
    with pytest.raises(ValueError, match="feature cache has 6 clips"):
        solve_episodes(classifier, features[:6], episodes, k_shot=1)
    with pytest.raises(ValueError, match="episodes must be"):
        solve_episodes(classifier, features, episodes[0], k_shot=1)
    with pytest.raises(ValueError, match=r"features must be a float tensor \(clips, views, time, dim\)"):
        solve_episodes(classifier, features[:, 0], episodes, k_shot=1)
    with pytest.raises(ValueError, match="NaN"):
        solve_episodes(classifier, features.index_put((torch.tensor([3]),), torch.tensor(float("inf"))), episodes, k_shot=1)
    with pytest.raises(ValueError, match="solver"):
        LogisticRegressionClassifier(solver="saga")


@pytest.mark.parametrize(
    "name,cls",
    [("prototype", PrototypeClassifier), ("logreg", LogisticRegressionClassifier), ("finetune", FinetuneLinearClassifier)],
)
def test_configs_instantiate_their_classifier(name, cls):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    classifier = instantiate(OmegaConf.load(CONFIGS / f"{name}.yaml"))(dim=16, num_frames=1)
    assert type(classifier) is cls
    features = structured_features(classes=6, per_class=8, dim=16, spread=0.1, seed=10).float()
    episodes = random_episodes(6, 8, n_way=3, k_shot=2, n_query=3, count=4, seed=10)
    assert solve_episodes(classifier, bank(features), episodes, k_shot=2).min().item() == 1.0

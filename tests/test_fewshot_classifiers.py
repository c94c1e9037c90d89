"""Episode solvers: prototypes, logistic regression (vs scikit-learn), fine-tuning.

scikit-learn is a test-only reference here: the logistic regression must reproduce
``LogisticRegression()`` as MM-CDFSL fits it per episode.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfsar.fewshot import (
    FinetuneLinearClassifier,
    LinearHead,
    LogisticRegressionClassifier,
    PrototypeClassifier,
    episode_probabilities,
    format_mean_ci,
    logistic_objective,
    mean_confidence_interval,
    solve_episodes,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "fewshot" / "classifier"


def structured_features(
    classes: int, per_class: int, dim: int, spread: float, seed: int
) -> torch.Tensor:
    """Class means plus noise, standardised per vector like a LayerNorm output (float64)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, 1, dim, generator=generator, dtype=torch.float64)
    noise = torch.randn(classes, per_class, dim, generator=generator, dtype=torch.float64) * spread
    return torch.nn.functional.layer_norm((means + noise).reshape(-1, dim), (dim,))


def random_episodes(
    classes: int, per_class: int, n_way: int, k_shot: int, n_query: int, count: int, seed: int
) -> torch.Tensor:
    """(count, n_way, k_shot + n_query) clip positions of clips laid out class by class."""
    generator = torch.Generator().manual_seed(seed)
    episodes = []
    for _ in range(count):
        ways = torch.randperm(classes, generator=generator)[:n_way]
        episodes.append(
            torch.stack(
                [
                    w * per_class
                    + torch.randperm(per_class, generator=generator)[: k_shot + n_query]
                    for w in ways
                ]
            )
        )
    return torch.stack(episodes)


def sklearn_fits(features: torch.Tensor, episodes: torch.Tensor, k_shot: int, **options):
    """Per-episode scikit-learn fits: predictions (E, N, Q), objectives (E,), n_iter (E,)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    n_way, n_query = episodes.shape[1], episodes.shape[2] - k_shot
    labels = np.repeat(np.arange(n_way), k_shot)
    C = options.get("C", 1.0)
    predictions, objectives, iterations = [], [], []
    with threadpool_limits(1):  # tiny fits: more threads only add synchronisation
        for episode in episodes:
            support = features[episode[:, :k_shot].reshape(-1)]
            model = LogisticRegression(**options).fit(support.numpy(), labels)
            query = features[episode[:, k_shot:].reshape(-1)].numpy()
            predictions.append(torch.from_numpy(model.predict(query).reshape(n_way, n_query)))
            weight = torch.from_numpy(model.coef_)[None]
            bias = torch.from_numpy(model.intercept_)[None]
            if n_way == 2:  # binomial: one weight vector, the optimum of multinomial with C/2
                weight, bias = torch.cat([weight, -weight], 1) / 2, torch.cat([bias, -bias], 1) / 2
            objectives.append(
                logistic_objective(
                    support[None],
                    torch.from_numpy(labels)[None],
                    weight,
                    bias,
                    C / 2 if n_way == 2 else C,
                )
            )
            iterations.append(int(model.n_iter_[0]))
    return torch.stack(predictions), torch.cat(objectives), torch.tensor(iterations)


def support_of(
    features: torch.Tensor, episodes: torch.Tensor, k_shot: int
) -> tuple[torch.Tensor, torch.Tensor]:
    count, n_way = episodes.shape[:2]
    support = features[episodes[:, :, :k_shot].reshape(count, -1)]
    return support, torch.arange(n_way).repeat_interleave(k_shot).expand(count, -1)


# --- prototypes -------------------------------------------------------------------------------


def test_prototype_accuracy_matches_a_hand_computation():
    # 3 ways of 2 support clips in 2-D; centroids A (1, 0), B (1, 4), C (6, 1).
    points = {
        "a1": (0, 0),
        "a2": (2, 0),
        "b1": (0, 4),
        "b2": (2, 4),
        "c1": (6, 0),
        "c2": (6, 2),
        "qa1": (1, 1),
        "qa2": (1, -1),  # d² to A = 1: correct
        "qb1": (1, 3),  # d² to B = 1: correct
        "qb2": (4, 3),  # d² to B = 10, to C = 8: misclassified as C
        "qc1": (6, 1),
        "qc2": (5, 0),  # d² to C = 0 and 2: correct
    }
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
    accuracy = solve_episodes(PrototypeClassifier("euclidean"), features, episodes, k_shot=2)
    assert accuracy.tolist() == pytest.approx([5 / 6, 1.0])

    probs = episode_probabilities(PrototypeClassifier("euclidean"), features, episodes, k_shot=2)
    squared = torch.tensor([[9 + 9, 9 + 1, 4 + 4]], dtype=torch.float32)  # qb2 to A, B, C
    assert torch.allclose(probs[0, 1, 1], torch.softmax(-squared, -1)[0], atol=1e-6)


def test_prototype_cosine_probabilities():
    generator = torch.Generator().manual_seed(0)
    support = torch.randn(4, 6, 8, generator=generator)
    labels = torch.tensor([0, 0, 1, 1, 2, 2]).expand(4, -1)
    query = torch.randn(4, 5, 8, generator=generator)
    probs = PrototypeClassifier("cosine", temperature=0.1).predict_proba(support, labels, query, 3)
    prototypes = support.view(4, 3, 2, 8).mean(2)
    cosine = torch.nn.functional.cosine_similarity(query[:, :, None], prototypes[:, None], dim=-1)
    assert torch.allclose(probs, torch.softmax(cosine / 0.1, -1), atol=1e-5)


# --- logistic regression vs scikit-learn ----------------------------------------------------


@pytest.mark.parametrize("k_shot,dim", [(1, 384), (5, 128)])
def test_logistic_regression_replays_sklearn(k_shot, dim):
    features = structured_features(classes=12, per_class=25, dim=dim, spread=4.0, seed=k_shot)
    episodes = random_episodes(12, 25, n_way=5, k_shot=k_shot, n_query=10, count=50, seed=k_shot)
    classifier = LogisticRegressionClassifier()  # lbfgs replay, C=1, raw features
    predictions = episode_probabilities(classifier, features, episodes, k_shot).argmax(-1)
    head = classifier.fit(*support_of(features, episodes, k_shot), 5)
    sk_predictions, sk_objectives, sk_iterations = sklearn_fits(features, episodes, k_shot)

    assert (predictions == sk_predictions).double().mean() >= 0.99
    ours = logistic_objective(*support_of(features, episodes, k_shot), head.weight, head.bias)
    assert torch.allclose(ours, sk_objectives, rtol=1e-6)
    assert (
        head.n_iter == sk_iterations
    ).double().mean() >= 0.95  # same iterations, not just the same end
    assert bool(head.converged.all())


def test_newton_reaches_the_optimum():
    k_shot = 1
    features = structured_features(classes=12, per_class=25, dim=256, spread=4.0, seed=7)
    episodes = random_episodes(12, 25, n_way=5, k_shot=k_shot, n_query=10, count=40, seed=7)
    support, labels = support_of(features, episodes, k_shot)
    head = LogisticRegressionClassifier(solver="newton").fit(support, labels, 5)
    ours = logistic_objective(support, labels, head.weight, head.bias)

    default_predictions, default_objectives, _ = sklearn_fits(features, episodes, k_shot)
    assert bool(
        (ours <= default_objectives * (1 + 1e-9)).all()
    )  # at least as low as scikit-learn's stop
    tight_predictions, tight_objectives, _ = sklearn_fits(
        features, episodes, k_shot, tol=1e-10, max_iter=10_000
    )
    assert torch.allclose(ours, tight_objectives, rtol=1e-7)
    predictions = episode_probabilities(
        LogisticRegressionClassifier(solver="newton"), features, episodes, k_shot
    )
    assert (predictions.argmax(-1) == tight_predictions).double().mean() >= 0.99


def test_two_way_logistic_regression_has_sklearn_binary_optimum():
    features = structured_features(classes=10, per_class=20, dim=64, spread=3.0, seed=3)
    episodes = random_episodes(10, 20, n_way=2, k_shot=3, n_query=8, count=20, seed=3)
    predictions = episode_probabilities(
        LogisticRegressionClassifier(solver="newton"), features, episodes, 3
    )
    sk_predictions, _, _ = sklearn_fits(features, episodes, 3, tol=1e-10, max_iter=10_000)
    assert (predictions.argmax(-1) == sk_predictions).double().mean() >= 0.99


def test_more_shots_than_dimensions_and_float32_features():
    # S >= D skips the kernel reduction; float32 features score in float32.
    features = structured_features(classes=10, per_class=20, dim=16, spread=2.0, seed=4)
    episodes = random_episodes(10, 20, n_way=5, k_shot=5, n_query=5, count=20, seed=4)
    predictions = episode_probabilities(
        LogisticRegressionClassifier(), features.float(), episodes, 5
    )
    assert predictions.dtype == torch.float32
    sk_predictions, _, _ = sklearn_fits(features, episodes, 5)
    assert (predictions.argmax(-1) == sk_predictions).double().mean() >= 0.99


def test_repeated_support_clips_still_replay_sklearn():
    # Identical and nearly identical support features make the Gram matrix singular or
    # ill-conditioned, which takes the eigendecomposition path of the kernel reduction.
    features = structured_features(classes=8, per_class=12, dim=64, spread=3.0, seed=11)
    episodes = random_episodes(8, 12, n_way=5, k_shot=3, n_query=4, count=10, seed=11)
    features[episodes[:, 0, 1]] = features[episodes[:, 0, 0]]
    features[episodes[:, 1, 2]] = features[episodes[:, 1, 0]] * (1 + 1e-7)
    classifier = LogisticRegressionClassifier()
    predictions = episode_probabilities(classifier, features, episodes, 3).argmax(-1)
    head = classifier.fit(*support_of(features, episodes, 3), 5)
    sk_predictions, sk_objectives, sk_iterations = sklearn_fits(features, episodes, 3)
    assert (predictions == sk_predictions).all()
    ours = logistic_objective(*support_of(features, episodes, 3), head.weight, head.bias)
    assert torch.allclose(ours, sk_objectives, rtol=1e-6)
    assert (head.n_iter == sk_iterations).all()


def test_chunking_does_not_change_results():
    features = structured_features(classes=10, per_class=20, dim=48, spread=3.0, seed=5)
    episodes = random_episodes(10, 20, n_way=5, k_shot=2, n_query=4, count=23, seed=5)
    classifier = LogisticRegressionClassifier()
    whole = episode_probabilities(classifier, features, episodes, 2)
    pieces = episode_probabilities(classifier, features, episodes, 2, chunk=5)
    assert torch.allclose(whole, pieces, atol=1e-10)


# --- views, fine-tuning, statistics, errors, configs ----------------------------------------


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
    )
    episodes = torch.tensor([[[0, 3], [1, 2]]])
    classifier = PrototypeClassifier("euclidean")
    assert solve_episodes(classifier, views[:, :1], episodes, k_shot=1).item() == 0.5
    assert solve_episodes(classifier, views, episodes, k_shot=1).item() == 1.0
    separate = solve_episodes(classifier, views[:, 0], episodes, k_shot=1, query_views=views)
    assert separate.item() == 1.0
    probs = episode_probabilities(classifier, views, episodes, k_shot=1)
    expected = torch.softmax(
        -torch.tensor([[0.9**2, 1.1**2], [1.6**2, 0.4**2], [1.6**2, 0.4**2]]), -1
    ).mean(0)
    assert torch.allclose(probs[0, 1, 0], expected, atol=1e-6)


def test_finetune_separates_trivial_episodes_under_inference_mode():
    features = structured_features(classes=8, per_class=10, dim=32, spread=0.05, seed=6).float()
    episodes = random_episodes(8, 10, n_way=5, k_shot=2, n_query=5, count=12, seed=6)
    for init in ("prototype", "zeros"):
        classifier = FinetuneLinearClassifier(steps=50, lr=0.05, init=init)
        with torch.inference_mode():  # evaluation runs so; the heads still train
            accuracy = solve_episodes(classifier, features, episodes, k_shot=2)
        assert accuracy.min().item() == 1.0


def test_finetune_prototype_init_without_steps_is_the_prototype_classifier():
    features = structured_features(classes=8, per_class=10, dim=32, spread=3.0, seed=8).float()
    episodes = random_episodes(8, 10, n_way=5, k_shot=3, n_query=5, count=10, seed=8)
    untrained = episode_probabilities(
        FinetuneLinearClassifier(steps=0, normalize=False), features, episodes, 3
    )
    prototype = episode_probabilities(PrototypeClassifier("euclidean"), features, episodes, 3)
    assert torch.allclose(untrained, prototype, atol=1e-5)


def test_mean_confidence_interval_by_hand():
    accuracies = [0.2, 0.4, 0.6, 0.8]
    std = math.sqrt(((0.3**2) * 2 + (0.1**2) * 2) / 4)  # population std (ddof=0)
    mean, ci = mean_confidence_interval(accuracies)
    assert mean == pytest.approx(50.0)
    assert ci == pytest.approx(100 * 1.96 * std / 2)  # 21.91
    fraction = mean_confidence_interval(torch.tensor(accuracies), percent=False)
    assert fraction == pytest.approx((0.5, 1.96 * std / 2))
    assert mean_confidence_interval([0.5]) == (50.0, 0.0)
    assert format_mean_ci(41.9731, 0.5249) == "41.97 ± 0.52"
    with pytest.raises(ValueError, match="no episode"):
        mean_confidence_interval([])
    with pytest.raises(ValueError, match="fractions"):
        mean_confidence_interval([41.97])


def test_bad_inputs_raise_clear_errors():
    support = torch.randn(3, 4, 8)
    labels = torch.tensor([0, 0, 1, 1]).expand(3, -1)
    query = torch.randn(3, 5, 8)
    classifier = PrototypeClassifier()
    with pytest.raises(ValueError, match=r"support label 2 outside \[0, n_way=2\)"):
        classifier.predict_proba(support, torch.tensor([0, 0, 1, 2]).expand(3, -1), query, 2)
    with pytest.raises(ValueError, match="support label -1"):
        classifier.predict_proba(support, torch.tensor([0, -1, 1, 1]).expand(3, -1), query, 2)
    with pytest.raises(ValueError, match="does not match support"):
        classifier.predict_proba(support, labels[:, :3], query, 2)
    with pytest.raises(ValueError, match="8-d but query features are 7-d"):
        classifier.predict_proba(support, labels, query[..., :7], 2)
    with pytest.raises(ValueError, match="3 episodes but query has 2"):
        classifier.predict_proba(support, labels, query[:2], 2)
    with pytest.raises(ValueError, match="no support example of way 2"):
        classifier.predict_proba(support, labels, query, 3)
    with pytest.raises(ValueError, match="integers"):
        classifier.predict_proba(support, labels.float(), query, 2)
    with pytest.raises(ValueError, match="NaN"):
        LogisticRegressionClassifier().fit(
            support.index_put((torch.tensor([1]),), torch.tensor(float("nan"))), labels, 2
        )

    features, episodes = torch.randn(10, 8), torch.arange(8).view(2, 2, 2)
    with pytest.raises(ValueError, match="k_shot=2 must be an integer in"):
        solve_episodes(classifier, features, episodes, k_shot=2)
    with pytest.raises(ValueError, match="feature cache has 6 clips"):
        solve_episodes(classifier, features[:6], episodes, k_shot=1)
    with pytest.raises(ValueError, match="episodes must be"):
        solve_episodes(classifier, features, episodes[0], k_shot=1)
    with pytest.raises(ValueError, match="query_views"):
        solve_episodes(classifier, features, episodes, k_shot=1, query_views=torch.randn(10, 2, 7))
    with pytest.raises(ValueError, match="solver"):
        LogisticRegressionClassifier(solver="saga")


def test_logistic_regression_warns_when_not_converged():
    features = structured_features(classes=6, per_class=10, dim=32, spread=3.0, seed=9)
    support, labels = support_of(features, random_episodes(6, 10, 5, 2, 1, 4, seed=9), 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head = LogisticRegressionClassifier(max_iter=2).fit(support, labels, 5)
    assert not bool(head.converged.any()) and head.n_iter.max().item() == 2
    assert any("did not converge" in str(w.message) for w in caught)


def test_linear_head_select_and_shape_check():
    head = LinearHead(torch.randn(4, 3, 8), torch.randn(4, 3))
    part = head.select(slice(1, 3))
    assert len(part) == 2 and part.predict_proba(torch.randn(2, 5, 8)).shape == (2, 5, 3)
    with pytest.raises(ValueError, match="query must be"):
        part.predict_proba(torch.randn(3, 5, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [False, True])
def test_compiled_scoring_by_position_matches_gathering(dtype, normalize):
    # The CPU path scores queries where they lie in the cache (compiled); the other devices'
    # path gathers them and uses predict_proba. Same probabilities, views averaged.
    generator = torch.Generator().manual_seed(0)
    views, dim = 2, 12
    source = torch.randn(30, views * dim, generator=generator, dtype=dtype) * 3
    positions = torch.randint(0, 30, (7, 9), generator=generator)
    head = LinearHead(
        torch.randn(7, 4, dim, generator=generator, dtype=dtype), torch.randn(7, 4, generator=generator, dtype=dtype), normalize
    )
    probs = head.predict_proba_at(source, positions, views)
    gathered = source[positions].view(7, 9 * views, dim)
    expected = head.predict_proba(gathered).view(7, 9, views, 4).mean(2)
    assert probs.dtype == dtype and probs.shape == (7, 9, 4)
    assert torch.allclose(probs, expected, atol=1e-5 if dtype == torch.float32 else 1e-12)
    blocks = head._predict_proba_gathered(source, positions, views)  # the path off the CPU
    assert torch.allclose(blocks, expected, atol=1e-6 if dtype == torch.float32 else 1e-12)
    with pytest.raises(ValueError, match="source must be"):
        head.predict_proba_at(source, positions, views=3)


def test_logistic_regression_does_not_depend_on_the_thread_count():
    features = structured_features(classes=12, per_class=25, dim=64, spread=4.0, seed=2).float()
    episodes = random_episodes(12, 25, n_way=5, k_shot=3, n_query=6, count=64, seed=2)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(episode_probabilities(LogisticRegressionClassifier(), features, episodes, 3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_episode_solves_run_torch_on_one_thread_and_kernels_on_torchs_count():
    """Inside ``episode_probabilities`` torch's own ops run on one CPU thread (its OpenMP workers
    would otherwise busy-wait beside the compiled kernels) while the kernels get the caller's
    thread count; the count is restored afterwards, also when a fit fails."""
    from mmfsar.fewshot.classifiers import compiled_threads

    seen = []

    class Recording(PrototypeClassifier):
        def _fit(self, support, support_labels, n_way):
            seen.append((torch.get_num_threads(), compiled_threads()))
            if len(seen) == 2:
                raise RuntimeError("fit failed")
            return super()._fit(support, support_labels, n_way)

    features = structured_features(classes=6, per_class=6, dim=8, spread=4.0, seed=0).float()
    episodes = random_episodes(6, 6, n_way=3, k_shot=1, n_query=2, count=4, seed=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        episode_probabilities(Recording(), features, episodes, 1)
        assert seen == [(1, 3)] and torch.get_num_threads() == 3 and compiled_threads() == 3
        with pytest.raises(RuntimeError, match="fit failed"):
            episode_probabilities(Recording(), features, episodes, 1)
        assert torch.get_num_threads() == 3 and compiled_threads() == 3
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "name,cls",
    [
        ("prototype", PrototypeClassifier),
        ("logreg", LogisticRegressionClassifier),
        ("finetune", FinetuneLinearClassifier),
    ],
)
def test_configs_instantiate_their_classifier(name, cls):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    classifier = instantiate(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    assert type(classifier) is cls
    features = structured_features(classes=6, per_class=8, dim=16, spread=0.1, seed=10).float()
    episodes = random_episodes(6, 8, n_way=3, k_shot=2, n_query=3, count=4, seed=10)
    assert solve_episodes(classifier, features, episodes, k_shot=2).min().item() == 1.0

"""Few-shot evaluation on cached features: batched episode classifiers and statistics.

Evaluation encodes each clip once; :func:`solve_episodes` then solves every episode of an
:class:`~mmfsar.data.episodes.EpisodeSet` on the feature cache with one of the plug-in
classifiers (``configs/fewshot/classifier/*.yaml``: fitted on the support like logistic
regression, or matching heads like OTAM and TRX, :mod:`mmfsar.fewshot.matching`), and
:func:`mean_confidence_interval` summarises the per-episode accuracies as ``mean ± 95% CI`` in percent.
"""

from mmfsar.fewshot.classifiers import (
    EpisodeClassifier,
    FinetuneLinearClassifier,
    LinearHead,
    LogisticRegressionClassifier,
    PrototypeClassifier,
    build_classifier,
    check_episode_inputs,
    logistic_objective,
)
from mmfsar.fewshot.engine import episode_probabilities, solve_episodes
from mmfsar.fewshot.matching import OTAM, TRX, FrameCosineHead, otam_distance
from mmfsar.fewshot.stats import format_mean_ci, mean_confidence_interval

__all__ = [
    "OTAM",
    "TRX",
    "EpisodeClassifier",
    "FinetuneLinearClassifier",
    "FrameCosineHead",
    "LinearHead",
    "LogisticRegressionClassifier",
    "PrototypeClassifier",
    "build_classifier",
    "check_episode_inputs",
    "episode_probabilities",
    "format_mean_ci",
    "logistic_objective",
    "mean_confidence_interval",
    "otam_distance",
    "solve_episodes",
]

"""The encode-once engine's parts, in-process: feature bank, masks, solver batches, line search,
the sweep table. (``test_eval.py`` runs them together through ``lit_main_eval.py``.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mmfsar.fewshot import LogisticRegressionClassifier, PrototypeClassifier, solve_episodes
from mmfsar.fewshot.compiled import LINE_SEARCH_STATE, _exp_nonpositive, dcsrch, dcsrch_start
from mmfsar.fewshot.engine import FeatureBank, view_masks
from mmfsar.tasks.evaluate import FewShotEvalModule, default_chunk
from mmfsar.utils.hydra_callbacks import SweepResultsTable


def test_feature_bank_gathers_ranks_and_averages_padded_duplicates():
    # Two ranks of a distributed sampler over 5 clips: rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and
    # clip 0 again (padding). The gathered bank holds each clip once.
    features = torch.arange(5 * 2 * 3, dtype=torch.float32).view(5, 2, 3)
    banks = [FeatureBank(5, 2), FeatureBank(5, 2)]
    banks[0].add(torch.tensor([0, 2, 4]), features[[0, 2, 4]])
    banks[1].add(torch.tensor([1, 3, 0]), features[[1, 3, 0]])

    def all_gather(t: torch.Tensor) -> torch.Tensor:  # what LightningModule.all_gather returns
        if t.dim() == 3:
            return torch.stack([b.features for b in banks])
        return torch.stack([b.filled.to(t.dtype) for b in banks])

    merged = banks[0].gather(all_gather, 2)
    assert torch.equal(merged, features)
    lonely = FeatureBank(3, 1)
    lonely.add(torch.tensor([0]), torch.zeros(1, 1, 4))
    with pytest.raises(RuntimeError, match="2 of 3 clips were never encoded"):
        lonely.gather(lambda t: t, 1)


def test_view_masks_depend_on_clip_and_view_only():
    grid = (4, 8, 8)
    a = view_masks(torch.tensor([3, 7, 9]), grid, 0.75, view=1, seed=0, device=torch.device("cpu"))
    b = view_masks(torch.tensor([9, 3]), grid, 0.75, view=1, seed=0, device=torch.device("cpu"))
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0]), "a clip's mask does not depend on its batch"
    assert a.shape == (3, 256) and int(a[0].sum()) == 192
    other_view = view_masks(torch.tensor([3]), grid, 0.75, view=0, seed=0, device=torch.device("cpu"))
    other_seed = view_masks(torch.tensor([3]), grid, 0.75, view=1, seed=1, device=torch.device("cpu"))
    assert not torch.equal(other_view[0], a[0]) and not torch.equal(other_seed[0], a[0])


def test_solving_in_batches_gives_the_same_accuracies_and_reports_progress():
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(6, 1, 32, generator=generator)
    features = torch.nn.functional.layer_norm((means + 2 * torch.randn(6, 8, 32, generator=generator)).reshape(-1, 32), (32,))
    episodes = torch.stack(
        [torch.stack([c * 8 + torch.randperm(8, generator=generator)[:4] for c in torch.randperm(6, generator=generator)[:3]]) for _ in range(23)]
    )
    for classifier in (PrototypeClassifier(), LogisticRegressionClassifier()):
        done: list[int] = []
        whole = solve_episodes(classifier, features, episodes, 2)
        parts = solve_episodes(classifier, features, episodes, 2, chunk=5, progress=done.append)
        assert torch.equal(whole, parts) and done == [5, 5, 5, 5, 3]
    assert default_chunk(600) == 600 and default_chunk(10_000) == 1250 and default_chunk(20) == 600


def test_eval_module_rejects_bad_view_settings():
    encoder, classifier = torch.nn.Identity(), PrototypeClassifier()
    with pytest.raises(ValueError, match="views > 1 needs fewshot.mask_ratio > 0"):
        FewShotEvalModule(encoder=encoder, classifier=classifier, views=2)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        FewShotEvalModule(encoder=encoder, classifier=classifier, mask_ratio=1.0)
    with pytest.raises(ValueError, match="views must be >= 1"):
        FewShotEvalModule(encoder=encoder, classifier=classifier, views=0)


def test_compiled_softmax_exp_is_within_a_few_ulp_of_libm():
    """The solver's vectorised exp (softmax of logits minus their maximum, so x <= 0): within
    4 ulp of numpy's exp over the whole normal range, exactly 1 at 0 (the arg-max class), and
    clamped at exp(-708) below it instead of under- or overflowing."""
    rng = np.random.default_rng(0)
    x = np.concatenate([-rng.uniform(0, 708, 20000), -rng.exponential(1.0, 20000), [0.0, -1e-300, -0.5 * np.log(2), -708.0]])
    got = x.copy()
    _exp_nonpositive(got, np.empty_like(got))
    want = np.exp(x)
    assert np.all(np.abs(got - want) <= 4 * np.spacing(want))
    assert got[-4] == 1.0
    far = np.array([-709.0, -1e5, -np.inf])
    _exp_nonpositive(far, np.empty(3))
    assert np.all(np.abs(far - np.exp(-708.0)) <= 4 * np.spacing(np.exp(-708.0)))


def test_compiled_line_search_takes_minpack_steps():
    # The replay's Moré–Thuente search must propose exactly the steps of MINPACK-2's dcsrch
    # (SciPy's Python port, the reference here) on 1-d quadratics plus quartics, where the
    # searches extrapolate, bracket and interpolate.
    from scipy.optimize._dcsrch import DCSRCH

    rng = np.random.default_rng(0)
    count = 96
    curvature = np.where(rng.random(count) < 0.3, 0.0, rng.uniform(0.1, 10, count))  # some nearly linear
    quartics = 10.0 ** rng.uniform(-6, 0.3, count)
    searched = 0
    for a, b, quartic, first in zip(curvature, rng.uniform(-5, -0.1, count), quartics, 10.0 ** rng.uniform(-3, 1, count)):

        def f(t: float) -> float:
            return a * t * t / 2 + b * t + quartic * t**4

        def g(t: float) -> float:
            return a * t + b + 4 * quartic * t**3

        reference = DCSRCH(f, g, ftol=1e-3, gtol=0.9, xtol=0.1, stpmin=0.0, stpmax=1e10)
        expected, (stp, _, _, task) = [], reference._iterate(first, f(0.0), g(0.0), b"START")
        while task[:2] == b"FG":
            expected.append(stp)
            stp, _, _, task = reference._iterate(stp, f(stp), g(stp), task)

        state = np.empty(LINE_SEARCH_STATE)
        dcsrch_start(state, f(0.0), g(0.0), first)
        steps = [state[0]]
        while not dcsrch(state, f(steps[-1]), g(steps[-1])):
            steps.append(state[0])
        assert np.allclose(steps, expected, rtol=1e-12, atol=0), (steps, expected)
        assert abs(g(steps[-1])) <= 0.9 * abs(g(0.0)) + 1e-12, "strong Wolfe curvature condition"
        searched += len(steps) > 1
    assert searched > 10, "the searches took several trials"


def test_sweep_table_from_job_results(tmp_path: Path):
    sweep = tmp_path / "sweep"
    for job, (n_way, k_shot, mean) in enumerate([(5, 1, 41.0), (5, 5, 58.5), (10, 1, 30.2), (10, 5, 44.1)]):
        (sweep / str(job)).mkdir(parents=True)
        record = {
            "setting": f"{n_way}-way {k_shot}-shot",
            "n_way": n_way,
            "k_shot": k_shot,
            "n_query": 15,
            "episodes": 600,
            "seed": 0,
            "classifier": "PrototypeClassifier",
            "views": 1,
            "mask_ratio": 0.0,
            "split": "novel",
            "domain": "target",
            "encoder": "/runs/student/encoder.pt",
            "dataset": "/data",
            "mean": mean,
            "ci95": 0.5,
            "episode_sha256": f"hash{job}",
            "per_episode": [0.5],
        }
        (sweep / str(job) / "results.json").write_text(json.dumps(record))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "task_name": "eval", "logger": None})
    SweepResultsTable().on_multirun_end(config)
    rows = list(csv.DictReader((sweep / "results_table.csv").open()))
    assert [(r["setting"], r["mean"], r["job"]) for r in rows] == [
        ("5-way 1-shot", "41.0", "0"),
        ("5-way 5-shot", "58.5", "1"),
        ("10-way 1-shot", "30.2", "2"),
        ("10-way 5-shot", "44.1", "3"),
    ]
    markdown = (sweep / "results_table.md").read_text()
    assert "| /runs/student/encoder.pt | 10-way 5-shot | 15 | 600 | PrototypeClassifier | 44.10 ± 0.50 |" in markdown
    assert (sweep / "accuracy_vs_shots.png").stat().st_size > 1000
    assert not (sweep / "wandb").exists(), "no W&B run without logger=wandb"

"""The encode-once engine's parts, in-process: feature bank, masks, solver batches, the sweep
table. (``test_eval.py`` runs them together through ``lit_main_eval.py``.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mmfsar.fewshot import PrototypeClassifier
from mmfsar.fewshot.engine import FeatureBank, view_masks
from mmfsar.tasks.evaluate import FewShotEvalModule, default_chunk
from mmfsar.utils.hydra_callbacks import SweepResultsTable


def test_feature_bank_gathers_ranks_and_averages_padded_duplicates():
    # Two ranks of a distributed sampler over 5 clips: rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and
    # clip 0 again (padding). The gathered bank holds each clip once.
    features = torch.arange(5 * 2 * 3, dtype=torch.float32).view(5, 2, 1, 3)
    banks = [FeatureBank(5, 2), FeatureBank(5, 2)]
    banks[0].add(torch.tensor([0, 2, 4]), features[[0, 2, 4]])
    banks[1].add(torch.tensor([1, 3, 0]), features[[1, 3, 0]])

    def all_gather(t: torch.Tensor) -> torch.Tensor:  # what LightningModule.all_gather returns
        if t.dim() == 4:
            return torch.stack([b.features for b in banks])
        return torch.stack([b.filled.to(t.dtype) for b in banks])

    merged = banks[0].gather(all_gather, 2)
    assert torch.equal(merged, features)
    lonely = FeatureBank(3, 1)
    lonely.add(torch.tensor([0]), torch.zeros(1, 1, 1, 4))
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


def test_default_chunk():
    assert default_chunk(600) == 600 and default_chunk(10_000) == 1250 and default_chunk(20) == 600


def test_eval_module_rejects_bad_view_settings():
    encoder, classifier = torch.nn.Identity(), PrototypeClassifier()
    with pytest.raises(ValueError, match="views > 1 needs fewshot.mask_ratio > 0"):
        FewShotEvalModule(encoder=encoder, classifier=classifier, views=2)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        FewShotEvalModule(encoder=encoder, classifier=classifier, mask_ratio=1.0)
    with pytest.raises(ValueError, match="views must be >= 1"):
        FewShotEvalModule(encoder=encoder, classifier=classifier, views=0)


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

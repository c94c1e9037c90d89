"""Shared runs of the end-to-end training tests, trained once per session; loaded by
``test_pretrain.py`` and ``test_distill.py`` with ``pytest_plugins = ["conftest_training"]``.

* ``mm_cdfsl_pretrained``: ``lit_main_pretrain.py -m experiment=mm_cdfsl_tiny/pretrain
  modality=rgb,flow,pose logger=many_loggers``: one sweep, three jobs, CSV + TensorBoard + offline
  W&B per job; its exports are the teachers (and the student's initialisation) of MM-CDFSL.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import MODALITIES, PretrainSweep, run_entry, tiny


@pytest.fixture(scope="session")
def wandb_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wandb_home")


@pytest.fixture(scope="session")
def mm_cdfsl_pretrained(episode_dataset: Path, tmp_path_factory: pytest.TempPathFactory, wandb_home: Path) -> PretrainSweep:
    """``lit_main_pretrain.py -m experiment=mm_cdfsl_tiny/pretrain modality=rgb,flow,pose`` (2
    training steps per job, every logger): the MM-CDFSL teachers and the student's start."""
    from mmfsar.models.base import load_export

    sweep = tmp_path_factory.mktemp("mm_cdfsl_pretrain")
    output = run_entry(
        "lit_main_pretrain.py",
        "-m",
        "experiment=mm_cdfsl_tiny/pretrain",
        f"modality={','.join(MODALITIES)}",
        "logger=many_loggers",
        f"hydra.sweep.dir={sweep}",
        *tiny(episode_dataset),
        home=wandb_home,
    )
    runs = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()):
        if (job / "encoder.pt").is_file():
            runs[load_export(job / "encoder.pt")["encoder"]["modality"]] = job
    return PretrainSweep(sweep, runs, output)

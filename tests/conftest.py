"""Shared fixtures: tiny synthetic datasets generated once per test session.

Every dataset here is written by the real generator (``mmfsar.data.synthetic.generate``) into a
session temp folder, so the readers, modalities and data modules are tested on files in the
documented layout. Fixtures that return a dataset path are **read-only**: a test that corrupts or
edits a dataset works on a copy (``tiny_dataset_copy``).

* ``tiny_dataset``: 3 base / 2 val / 2 novel classes, 3 clips per class and domain (source and
  target), the default storage formats (rgb mp4, flow / pose / depth npy): 42 clips.
* ``tiny_dataset_alt_formats``: the same clips (same seed and settings) stored in the other
  formats (rgb JPEG frames, flow ``x_/y_`` JPEG pairs, depth 16-bit PNG, pose npy), so the two can
  be compared frame for frame.
* ``episode_dataset``: 3 base / 5 val / 5 novel classes, 6 clips per class and domain, 8-12 frame
  clips: enough for 5-way 1-shot 5-query episodes over the val and the novel classes of the
  target domain (and for short training runs on the base classes of both domains).
"""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402

from mmfsar.data.synthetic import SyntheticConfig, generate  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"

ALT_FORMATS = {"rgb": "frames", "flow": "flow_xy", "depth": "png16", "pose": "npy"}
TINY_SETTINGS = dict(seed=0, clips_per_class=3, classes_per_split={"base": 3, "val": 2, "novel": 2})
EPISODE_SETTINGS = dict(
    seed=0, clips_per_class=6, classes_per_split={"base": 3, "val": 5, "novel": 5}, min_frames=8, max_frames=12
)
TASK_SETTINGS = dict(
    seed=0, clips_per_class=6, domains=("source",), classes_per_split={"base": 10, "val": 5, "novel": 2}, min_frames=8,
    max_frames=12,
)


@pytest.fixture(scope="session")
def tiny_config() -> SyntheticConfig:
    """Generator settings of ``tiny_dataset`` (default formats)."""
    return SyntheticConfig(**TINY_SETTINGS)


@pytest.fixture(scope="session")
def tiny_alt_config() -> SyntheticConfig:
    """Generator settings of ``tiny_dataset_alt_formats``: ``tiny_config`` with the other formats."""
    return SyntheticConfig(**TINY_SETTINGS, formats=dict(ALT_FORMATS))


@pytest.fixture(scope="session")
def episode_config() -> SyntheticConfig:
    """Generator settings of ``episode_dataset``."""
    return SyntheticConfig(**EPISODE_SETTINGS)


@pytest.fixture(scope="session")
def datasets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="session")
def tiny_dataset(datasets_dir: Path, tiny_config: SyntheticConfig) -> Path:
    """42 clips (3/2/2 classes x 2 domains x 3), default formats. Read-only."""
    return generate(tiny_config, datasets_dir / "tiny", workers=2, progress=False)


@pytest.fixture(scope="session")
def tiny_dataset_alt_formats(datasets_dir: Path, tiny_alt_config: SyntheticConfig) -> Path:
    """The clips of ``tiny_dataset`` in the alternative formats. Read-only."""
    return generate(tiny_alt_config, datasets_dir / "tiny_alt", workers=2, progress=False)


@pytest.fixture(scope="session")
def episode_dataset(datasets_dir: Path, episode_config: SyntheticConfig) -> Path:
    """156 clips (3/5/5 classes x 2 domains x 6), default formats: 5-way 1-shot 5-query
    episodes over val or novel classes of either domain. Read-only."""
    return generate(episode_config, datasets_dir / "episodes", workers=2, progress=False)


@pytest.fixture(scope="session")
def task_dataset(datasets_dir: Path) -> Path:
    """102 source-domain clips (10/5/2 classes x 6): enough base classes for 5-way training tasks
    that do not repeat one set of classes. Read-only."""
    return generate(SyntheticConfig(**TASK_SETTINGS), datasets_dir / "tasks", workers=2, progress=False)


@pytest.fixture
def tiny_dataset_copy(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A private, writable copy of ``tiny_dataset`` (for corruption tests)."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "tiny_copy"))


@pytest.fixture(scope="session")
def make_modalities() -> Callable[..., dict]:
    """``make_modalities("rgb", "flow", pose={"sigma": 1.0})``: modality plug-ins built from
    ``configs/modality/<name>.yaml`` (the configs users select), with optional overrides."""
    from omegaconf import OmegaConf

    from mmfsar.data.modalities import build_modalities

    def make(*names: str, **overrides: dict) -> dict:
        cfgs = {}
        for name in (*names, *[n for n in overrides if n not in names]):
            cfg = OmegaConf.load(CONFIG_DIR / "modality" / f"{name}.yaml")
            cfgs[name] = OmegaConf.merge(cfg, overrides.get(name, {}))
        # the modality configs read their sizes from the `input` group, as in a composed config
        root = OmegaConf.create({"input": OmegaConf.load(CONFIG_DIR / "input" / "synthetic.yaml"), "modalities": cfgs})
        return build_modalities(OmegaConf.to_container(root, resolve=True)["modalities"])

    return make

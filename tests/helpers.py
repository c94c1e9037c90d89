"""Helpers of the end-to-end training tests (``test_pretrain.py``, ``test_distill.py``; their
shared runs are fixtures in ``conftest_training.py``).

The entry points run as real subprocesses (``python lit_main_*.py key=value ...`` in the
repository) on ``episode_dataset`` with run-length overrides that keep each job to a few
seconds (:func:`tiny`).

* :func:`run_entry`: runs an entry point, fails the test with the tail of its output;
* :func:`read_wandb_run`: reads an offline ``run-<id>.wandb`` file with wandb's own protobuf
  messages (offline runs write no ``wandb-summary.json``);
* :func:`val_batch`: the val clips of a dataset, read exactly as an exported encoder says;
* :func:`checkpoint`: a Lightning checkpoint as a dict;
* :func:`run_ddp`: a two-process CPU run of an entry point, checked.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
MODALITIES = ("rgb", "flow", "pose")


def tiny(root: Path, *, batches: int | None = 2, epochs: int = 1) -> list[str]:
    """Overrides for a few-second training run on ``root`` (a dataset without generator settings).

    ``batches``: training batches per epoch (None: the whole epoch). Validation uses all 30 val
    clips of ``episode_dataset`` and 20 episodes of the default 5-way 1-shot 5-query."""
    out = [
        "data=folder",
        f"data.root={root}",
        f"trainer.max_epochs={epochs}",
        "trainer.log_every_n_steps=1",
        "trainer.check_val_every_n_epoch=1",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        "data.batch_size=4",
        "data.eval_batch_size=16",
        "data.num_workers=0",
        "data.val_episodes.episodes=20",
        "print_config=false",
        "callbacks.model_summary=null",
        "callbacks.progress_bar=null",
    ]
    if batches is not None:
        out.append(f"++trainer.limit_train_batches={batches}")
    return out


def eval_overrides(root: Path, encoder: Path, out_dir: Path) -> list[str]:
    """A 20-episode 5-way 1-shot 5-query evaluation of ``encoder`` on the novel classes of ``root``."""
    return [
        "data=folder",
        f"data.root={root}",
        f"encoder={encoder}",
        f"hydra.run.dir={out_dir}",
        "fewshot.n_query=5",
        "fewshot.episodes=20",
        "data.eval_batch_size=16",
        "data.num_workers=0",
        "++trainer.enable_progress_bar=false",
    ]


def run_entry(script: str, *overrides: str, home: Path, timeout: float = 600) -> str:
    """Run ``python <script> overrides...`` in the repository; return its output (stdout + stderr).

    ``home``: a private folder for W&B's caches (offline artifacts are staged there, not in ~).
    A non-zero exit fails the test with the command and the end of the output."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "WANDB_MODE": "offline",  # safety net; the configs are offline by default (checked in the tests)
        "WANDB_SILENT": "true",
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "HYDRA_FULL_ERROR": "1",
        "TQDM_DISABLE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [sys.executable, script, *overrides]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)}\nexited with {proc.returncode}; output tail:\n{proc.stdout[-6000:]}", pytrace=False)
    return proc.stdout


def checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint as a dict (it holds optimiser and loop state, hence not weights-only)."""
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------- W&B offline runs

_WANDB_BLOCK = 32768
_WANDB_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
_WANDB_RECORD = struct.Struct("<IHB")  # crc32c, length, type (full / first / middle / last)


def wandb_records(path: Path) -> Iterator[Any]:
    """The ``wandb_internal_pb2.Record`` messages of an offline run file ``run-<id>.wandb``.

    The file is W&B's transaction log (LevelDB log framing: 32 KiB blocks of records, large
    records split in first/middle/last chunks); the records are wandb's own protobuf messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, _ = _WANDB_HEADER.unpack_from(data)
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    pos, chunks = _WANDB_HEADER.size, b""
    while pos + _WANDB_RECORD.size <= len(data):
        left = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if left < _WANDB_RECORD.size:
            pos += left  # block trailer
            continue
        _, length, kind = _WANDB_RECORD.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        pos += _WANDB_RECORD.size
        chunks += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # full record, or last chunk of a split one
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


@dataclass
class WandbRun:
    """What an offline run recorded: config keys, history rows, artifacts, and whether it exited."""

    run_id: str
    config: dict[str, Any]
    history: list[dict[str, float | str]]
    artifacts: list[tuple[str, str, list[str]]]  # (name, type, file paths)
    exited: bool

    def series(self, key: str) -> list[float]:
        return [float(row[key]) for row in self.history if key in row]


def read_wandb_run(path: Path) -> WandbRun:
    import json

    run_id, config, history, artifacts, exited = "", {}, [], [], False
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id = rec.run.run_id
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in rec.config.update})
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
        elif kind == "artifact":
            a = rec.artifact
            artifacts.append((a.name, a.type, [entry.path for entry in a.manifest.contents]))
        elif kind == "exit":
            exited = True
    return WandbRun(run_id, config, history, artifacts, exited)


# --------------------------------------------------------------------------- feeding exports


def val_batch(root: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Every val-class clip of ``root`` (target domain) in one batch, read with the modality and
    frame settings stored in an exported encoder's ``payload``; also returns the val episodes."""
    from hydra.utils import instantiate

    from mmfsar.data.datamodules import PretrainDataModule
    from mmfsar.data.modalities import build_modalities

    dm = PretrainDataModule(
        root=root,
        modalities=build_modalities(payload["modalities"]),
        frames=instantiate(payload["frames"]),
        val_episodes={"n_way": 5, "k_shot": 1, "n_query": 5, "episodes": 20, "seed": 0},
        eval_batch_size=1000,
        num_workers=0,
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    return {"batch": batch, "datamodule": dm}


def run_ddp(script: str, *overrides: str, run: Path, root: Path, home: Path, train_domain: str) -> None:
    """Run ``script`` with ``trainer=ddp trainer.accelerator=cpu trainer.devices=2`` for one
    epoch (batches of 4) on ``root`` into ``run`` and check it:
    both ranks started and trained on their half of the ``train_clips`` (so the epoch took half
    the steps), one checkpoint folder and one export were written, and the validation accuracy
    the ranks computed together (features gathered across ranks) equals a single-process
    evaluation of the export. ``train_domain``: the domain of the base-class clips it trains on."""
    import math

    from mmfsar.data.meta import DatasetFolder
    from mmfsar.fewshot import PrototypeClassifier, mean_confidence_interval, solve_episodes
    from mmfsar.fewshot.engine import episode_positions
    from mmfsar.models.base import build_encoder, load_export

    output = run_entry(
        script,
        *overrides,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={run}",
        *tiny(root, batches=None),
        home=home,
        timeout=900,
    )
    for rank in (0, 1):
        assert f"Initializing distributed: GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in output, output[-3000:]
    assert "[rank: 1] Seed set to 42" in output
    assert sorted(p.relative_to(run.parent) for p in run.parent.rglob("checkpoints")) == [Path(run.name) / "checkpoints"]
    assert sorted(p.relative_to(run.parent) for p in run.parent.rglob("encoder.pt")) == [Path(run.name) / "encoder.pt"]
    assert output.count("exported encoder:") == 1

    train_clips = len(DatasetFolder.open(root).select(splits=["base"], domains=[train_domain]))
    single, per_rank = train_clips // 4, math.ceil(train_clips / 2) // 4  # drop_last
    assert per_rank < single
    last = checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == per_rank, f"global step {last['global_step']}: the data was not sharded"

    payload = load_export(run / "encoder.pt")
    encoder = build_encoder(payload).eval()
    feed = val_batch(root, payload)
    dm, batch = feed["datamodule"], feed["batch"]
    with torch.no_grad():
        feats = encoder({m: batch[m] for m in encoder.modalities}).pooled
    positions = episode_positions(dm.val_episodes, [r.clip_id for r in dm.val_set.records])
    mean, _ = mean_confidence_interval(solve_episodes(PrototypeClassifier(), feats[batch["index"].argsort()][:, None, None], positions, 1))
    assert payload["info"]["val_acc"] == pytest.approx(float(mean), abs=0.25), "DDP validation disagrees with one process"


@dataclass
class PretrainSweep:
    sweep_dir: Path
    runs: dict[str, Path]  # modality -> job folder
    output: str

    def encoder(self, modality: str) -> Path:
        return self.runs[modality] / "encoder.pt"

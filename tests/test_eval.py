"""``lit_main_eval.py`` end to end: a tiny exported encoder on ``episode_dataset``.

The entry point runs as a real subprocess (``python lit_main_eval.py key=value ...``), like a
user runs it; the input checks run in-process on the composed config (they must fail before any
clip is encoded, so they take a fraction of a second). The runs share a session's tiny RGB
VideoViT export (random weights: the numbers are near chance, the tests are about the engine).

* ``first_run``: 30 episodes, logistic regression, offline W&B, on-disk feature cache (a miss);
* ``second_run``: ``fewshot.episode_file=`` the first run's episodes, same cache (a hit);
* DDP: ``trainer=ddp trainer.accelerator=cpu trainer.devices=2`` on the same episodes;
* masked views (``fewshot.views=2 fewshot.mask_ratio=0.75``) at two batch sizes;
* a ``-m fewshot.k_shot=1,2 fewshot.n_way=2,3`` sweep (its jobs hit the cache).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import wandb_records

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
EPISODES = 30
BASE = ["fewshot.n_query=5", f"fewshot.episodes={EPISODES}", "data.eval_batch_size=16", "data.num_workers=0"]
QUIET = ["++trainer.enable_progress_bar=false"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported RGB ``ModalityEncoder`` around a 1-block, 32-wide ``VideoViT`` (random,
    seeded), with the modality and frame configs that ``configs/modality/rgb.yaml`` and
    ``configs/data/synthetic.yaml`` compose (64-px frames, 8 frames per clip)."""
    from hydra.utils import instantiate

    from mmfsar.models.base import export_encoder
    from mmfsar.tasks.common import modality_encoder_config

    composed = OmegaConf.create(
        {
            "input": OmegaConf.load(CONFIG_DIR / "input" / "synthetic.yaml"),
            "modality": OmegaConf.load(CONFIG_DIR / "modality" / "rgb.yaml"),
            "frames": OmegaConf.load(CONFIG_DIR / "data" / "synthetic.yaml").frames,
            "backbone": OmegaConf.load(CONFIG_DIR / "model" / "encoder" / "vit_tiny.yaml"),
        }
    )
    modality = OmegaConf.to_container(composed.modality, resolve=True)
    frames = OmegaConf.to_container(composed.frames, resolve=True)
    backbone = {**OmegaConf.to_container(composed.backbone), "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}
    inputs = {"num_frames": frames["num_frames"], "in_channels": 3, "img_size": modality["size"]}
    config = modality_encoder_config(backbone, "rgb", inputs)
    torch.manual_seed(0)
    encoder = instantiate(config, _convert_="all")
    path = tmp_path_factory.mktemp("tiny_encoder") / "encoder.pt"
    return export_encoder(path, encoder, encoder_config=config, modalities={"rgb": modality}, frames=frames, info={"task": "test"})


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval")


def run_eval(*overrides: str, home: Path, expect_ok: bool = True, timeout: float = 600) -> str:
    """``python lit_main_eval.py overrides...``; returns stdout + stderr (fails the test on a
    non-zero exit unless ``expect_ok`` is False)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "HYDRA_FULL_ERROR": "1",
        "TQDM_DISABLE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [sys.executable, "lit_main_eval.py", *overrides]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)}\nexited with {proc.returncode}; output tail:\n{proc.stdout[-6000:]}", pytrace=False)
    return proc.stdout


def common(episode_dataset: Path, encoder: Path, *, sizes: bool = True) -> list[str]:
    return [f"encoder={encoder}", "data=folder", f"data.root={episode_dataset}", *(BASE if sizes else BASE[2:])]


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def first_run(work: Path, episode_dataset: Path, tiny_encoder: Path) -> tuple[Path, str]:
    run = work / "first"
    output = run_eval(
        *common(episode_dataset, tiny_encoder),
        "fewshot/classifier=logreg",
        "logger=wandb",
        f"fewshot.cache_dir={work / 'cache'}",
        f"hydra.run.dir={run}",
        *QUIET,
        home=work / "home",
    )
    return run, output


@pytest.fixture(scope="module")
def second_run(first_run, work: Path, episode_dataset: Path, tiny_encoder: Path) -> tuple[Path, str]:
    first, _ = first_run
    run = work / "second"
    output = run_eval(
        *common(episode_dataset, tiny_encoder),
        "fewshot/classifier=logreg",
        f"fewshot.episode_file={results(first)['episode_file']}",
        f"fewshot.cache_dir={work / 'cache'}",
        f"hydra.run.dir={run}",
        *QUIET,
        home=work / "home",
    )
    return run, output


# --------------------------------------------------------------------------- results, episodes, W&B


def test_results_files_hold_the_documented_fields(first_run, tiny_encoder, episode_dataset):
    from mmfsar.data.episodes import EpisodeSet
    from mmfsar.fewshot import mean_confidence_interval

    run, output = first_run
    record = results(run)
    for key in ("setting", "encoder", "dataset", "episode_sha256", "seed", "mean", "ci95", "per_episode", "classifier"):
        assert key in record, key
    assert record["setting"] == "5-way 1-shot" and record["n_query"] == 5 and record["episodes"] == EPISODES
    assert record["encoder"] == str(tiny_encoder) and record["dataset"] == str(episode_dataset)
    assert record["classifier"] == "LogisticRegressionClassifier" and record["seed"] == 0
    per_episode = record["per_episode"]
    assert len(per_episode) == EPISODES and all(0 <= a <= 1 for a in per_episode)
    mean, ci = mean_confidence_interval(per_episode)
    assert record["mean"] == pytest.approx(mean, abs=1e-4) and record["ci95"] == pytest.approx(ci, abs=1e-4)

    with (run / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    row = rows[0]
    assert row["setting"] == "5-way 1-shot" and row["encoder"] == str(tiny_encoder) and row["dataset"] == str(episode_dataset)
    assert row["episode_sha256"] == record["episode_sha256"] and int(row["seed"]) == 0
    assert float(row["mean"]) == pytest.approx(record["mean"]) and float(row["ci95"]) == pytest.approx(record["ci95"])

    episode_file = Path(record["episode_file"])
    assert episode_file.parent == run and episode_file.is_file(), "the episode file is saved beside the results"
    assert EpisodeSet.load(episode_file).hash == record["episode_sha256"]
    summary = f"5-way 1-shot (5 queries, {EPISODES} episodes, LogisticRegressionClassifier) on novel/target: {record['mean']:.2f} ± {record['ci95']:.2f}"
    assert summary in output, "the one-line summary"


def test_episodes_hold_only_novel_target_clips(first_run, episode_dataset):
    from mmfsar.data.episodes import EpisodeSet
    from mmfsar.data.meta import DatasetFolder

    run, _ = first_run
    episodes = EpisodeSet.load(results(run)["episode_file"])
    folder = DatasetFolder.open(episode_dataset)
    by_id = {r.clip_id: r for r in folder.records}
    used = {episodes.clip_ids[i] for i in episodes.tensor.unique().tolist()}
    assert used and all(by_id[c].split == "novel" and by_id[c].domain == "target" for c in used)
    assert set(episodes.class_names) == set(folder.meta.classes_of("novel"))
    for e in range(len(episodes)):  # ways are distinct classes; every clip of a way is of its class
        classes = [episodes.class_names[c] for c in episodes.classes[e].tolist()]
        assert len(set(classes)) == len(classes)
        for way, name in enumerate(classes):
            clips = episodes.tensor[e, way].tolist()
            assert len(set(clips)) == len(clips)
            assert all(by_id[episodes.clip_ids[i]].label_name == name for i in clips)


@pytest.mark.parametrize("split", ["novel", "val"])
def test_episode_draw_never_touches_other_splits(split, episode_dataset):
    from mmfsar.data.datamodules import FewShotDataModule
    from mmfsar.data.meta import DatasetFolder
    from mmfsar.data.modalities import build_modalities

    dm = FewShotDataModule(
        root=episode_dataset,
        modalities=build_modalities({"rgb": {"_target_": "mmfsar.data.modalities.RGB", "size": 64}}),
        split=split,
        episodes={"n_way": 5, "k_shot": 1, "n_query": 5, "episodes": 50, "seed": 3},
        num_workers=0,
    )
    dm.setup("test")
    split_of = {r.clip_id: r.split for r in DatasetFolder.open(episode_dataset).records}
    assert {split_of[c] for c in dm.episodes.clip_ids} == {split}
    assert {split_of[r.clip_id] for r in dm.clips.records} == {split}, "only the split's clips are encoded"


def test_wandb_job_logs_summary_table_and_histogram(first_run):
    run, _ = first_run
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "one offline W&B run in the run folder"
    summary, history, config, exited = {}, {}, {}, False
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.summary.update})
        elif kind == "history":
            history.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in rec.config.update})
        elif kind == "exit":
            exited = True
    record = results(run)
    assert summary["acc"] == pytest.approx(record["mean"]) and summary["ci95"] == pytest.approx(record["ci95"])
    assert summary["episode_sha256"] == record["episode_sha256"]
    assert history["settings/_type"] == "table-file" and history["settings/nrows"] == 1
    assert history["per_episode_accuracy/_type"] == "histogram"
    assert sum(history["per_episode_accuracy/values"]) == EPISODES
    assert config["fewshot"]["k_shot"] == 1 and exited


# --------------------------------------------------------------------------- encode once: cache, reuse


def test_same_episode_file_and_cache_give_the_same_results(first_run, second_run, work):
    (first, first_output), (second, second_output) = first_run, second_run
    assert "encoding 30 clips once" in first_output and "features cached:" in first_output
    assert "read from" in second_output and "encoding" not in second_output, "a cache hit skips the encoder"
    a, b = results(first), results(second)
    assert a["episode_sha256"] == b["episode_sha256"], "the reused episode file has the same hash"
    assert a["per_episode"] == b["per_episode"] and a["mean"] == b["mean"] and a["ci95"] == b["ci95"]
    assert a["features_cache"] == b["features_cache"] and Path(a["features_cache"]).is_file()


def test_feature_cache_key_covers_encoder_data_and_views(tmp_path, episode_dataset, tiny_encoder):
    from mmfsar.fewshot.engine import FeatureCache, feature_cache_key

    base = dict(
        encoder_file=tiny_encoder,
        dataset_root=episode_dataset,
        clip_ids=["a", "b", "c"],
        modalities={"rgb": {"size": 64}},
        frames={"num_frames": 8},
        views=1,
        mask_ratio=0.0,
        mask_seed=0,
    )
    key, info = feature_cache_key(**base)
    assert feature_cache_key(**base)[0] == key
    other_encoder = tmp_path / "encoder.pt"
    shutil.copy(tiny_encoder, other_encoder)
    assert feature_cache_key(**{**base, "encoder_file": other_encoder})[0] == key, "the content counts, not the path"
    other_encoder.write_bytes(other_encoder.read_bytes() + b"\0")
    changes = {
        "encoder_file": other_encoder,
        "clip_ids": ["a", "c", "b"],
        "modalities": {"rgb": {"size": 32}},
        "frames": {"num_frames": 16},
        "views": 2,
        "mask_ratio": 0.75,
        "mask_seed": 1,
        "precision": "bf16-mixed",
        "per_frame": True,
    }
    keys = {name: feature_cache_key(**{**base, name: value})[0] for name, value in changes.items()}
    assert key not in keys.values() and len(set(keys.values())) == len(keys)
    copy = Path(shutil.copytree(episode_dataset, tmp_path / "data", ignore=shutil.ignore_patterns("rgb", "flow", "pose", "depth")))
    assert feature_cache_key(**{**base, "dataset_root": copy})[0] != key, "another dataset folder"

    cache = FeatureCache(tmp_path / "cache")
    assert cache.load(key, info) is None
    features = torch.randn(3, 1, 1, 8)
    cache.save(key, info, features, ["a", "b", "c"])
    assert torch.equal(cache.load(key, info), features)
    assert cache.load(key, {**info, "views": 2}) is None, "a file of other settings is a miss"
    cache.path(key).write_bytes(b"truncated")
    assert cache.load(key, info) is None, "an unreadable file is a miss"


# --------------------------------------------------------------------------- DDP, masked views, sweep


def test_ddp_two_processes_give_identical_results(first_run, work, episode_dataset, tiny_encoder):
    first, _ = first_run
    run = work / "ddp"
    run_eval(
        *common(episode_dataset, tiny_encoder),
        "fewshot/classifier=logreg",
        f"fewshot.episode_file={results(first)['episode_file']}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={run}",
        *QUIET,
        home=work / "home",
    )
    a, b = results(first), results(run)
    assert b["episode_sha256"] == a["episode_sha256"]
    assert b["per_episode"] == a["per_episode"], "per-episode accuracies differ between 1 and 2 processes"
    assert (b["mean"], b["ci95"]) == (a["mean"], a["ci95"])


def test_masked_views_are_deterministic_and_independent_of_batch_size(first_run, work, episode_dataset, tiny_encoder):
    first, _ = first_run
    outputs, cache_files = [], []
    for batch_size in (4, 16):
        cache = work / f"cache_masked_{batch_size}"
        outputs.append(
            run_eval(
                *common(episode_dataset, tiny_encoder),
                "fewshot/classifier=logreg",
                "fewshot.views=2",
                "fewshot.mask_ratio=0.75",
                f"data.eval_batch_size={batch_size}",
                f"fewshot.episode_file={results(first)['episode_file']}",
                f"fewshot.cache_dir={cache}",
                f"hydra.run.dir={work / f'masked_{batch_size}'}",
                *QUIET,
                home=work / "home",
            )
        )
        cache_files.append(list(cache.glob("features_*.pt")))
    assert all("encoding 30 clips x 2 masked views once" in out for out in outputs)
    a, b = results(work / "masked_4"), results(work / "masked_16")
    assert a["views"] == 2 and a["mask_ratio"] == pytest.approx(0.75)
    assert a["per_episode"] == b["per_episode"]
    assert len(cache_files[0]) == len(cache_files[1]) == 1
    fa, fb = (torch.load(f[0], weights_only=True)["features"] for f in cache_files)
    assert fa.shape == (30, 2, 1, 32) and torch.equal(fa, fb), "features depend on the batch size"
    assert not torch.equal(fa[:, 0], fa[:, 1]), "the two views use different masks"
    assert Path(a["features_cache"]).name != Path(results(first)["features_cache"]).name, "other views: another key"


def test_sweep_writes_one_combined_table(first_run, work, episode_dataset, tiny_encoder):
    sweep = work / "sweep"
    output = run_eval(
        "-m",
        *common(episode_dataset, tiny_encoder, sizes=False),
        "fewshot.k_shot=1,2",
        "fewshot.n_way=2,3",
        "fewshot.n_query=3",
        "fewshot.episodes=10",
        "logger=wandb",
        f"fewshot.cache_dir={work / 'cache'}",
        f"hydra.sweep.dir={sweep}",
        *QUIET,
        home=work / "home",
    )
    assert output.count("read from") == 4, "every job of the sweep hits the first run's cache"
    with (sweep / "results_table.csv").open() as f:
        rows = list(csv.DictReader(f))
    settings = sorted((int(r["n_way"]), int(r["k_shot"])) for r in rows)
    assert settings == [(2, 1), (2, 2), (3, 1), (3, 2)], "one row per setting"
    for r in rows:
        job = results(sweep / r["job"])
        assert float(r["mean"]) == pytest.approx(job["mean"]) and r["episode_sha256"] == job["episode_sha256"]
    table = (sweep / "results_table.md").read_text().strip().splitlines()
    assert len(table) == 2 + 4 and "2-way 1-shot" in table[2] and "±" in table[2]
    assert (sweep / "accuracy_vs_shots.png").stat().st_size > 1000

    files = list((sweep / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "one W&B run for the sweep summary"
    logged = {}
    for rec in wandb_records(files[0]):
        if rec.WhichOneof("record_type") == "history":
            logged.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    assert logged["results/_type"] == "table-file" and logged["results/nrows"] == 4
    assert logged["accuracy_vs_shots/_type"] == "image-file"


# --------------------------------------------------------------------------- bad input fails fast


def compose_eval(overrides: list[str], out: Path):
    from hydra import compose, initialize_config_dir

    import mmfsar.utils  # noqa: F401  (MMFSAR_ROOT)

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("eval", overrides=[*overrides, f"paths.output_dir={out}", "print_config=false"])


def fails(overrides: list[str], out: Path, error: type[Exception], match: str) -> None:
    from mmfsar.tasks.pipelines import evaluate

    cfg = compose_eval(overrides, out)
    with pytest.raises(error, match=match):
        evaluate(cfg)
    assert not any(out.glob("*")), "nothing may be written before the inputs are checked"


def test_missing_or_foreign_encoder_fails_fast(tmp_path, episode_dataset):
    data = ["data=folder", f"data.root={episode_dataset}"]
    fails([f"encoder={tmp_path / 'nope.pt'}", *data], tmp_path / "a", FileNotFoundError, "encoder file not found")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    fails([f"encoder={tmp_path / 'other.pt'}", *data], tmp_path / "b", ValueError, "not an mmfsar encoder export")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    fails([f"encoder={tmp_path / 'text.pt'}", *data], tmp_path / "c", ValueError, "not a readable mmfsar encoder file")


def test_dataset_without_the_encoders_modality_fails_fast(tmp_path, episode_dataset, tiny_encoder):
    from mmfsar.errors import DataError

    data = tmp_path / "no_rgb"
    data.mkdir()
    meta = json.loads((episode_dataset / "meta.json").read_text())
    del meta["modalities"]["rgb"]
    (data / "meta.json").write_text(json.dumps(meta))
    shutil.copy(episode_dataset / "annotations.csv", data / "annotations.csv")
    fails([f"encoder={tiny_encoder}", "data=folder", f"data.root={data}"], tmp_path / "out", DataError, r"reads modality 'rgb'.*meta.json lists \['depth', 'flow', 'pose', 'skeleton'\]")


def test_impossible_episodes_fail_fast(tmp_path, episode_dataset, tiny_encoder):
    from mmfsar.errors import DataError

    common_args = [f"encoder={tiny_encoder}", "data=folder", f"data.root={episode_dataset}"]
    fails([*common_args, "fewshot.n_way=6", "fewshot.n_query=5"], tmp_path / "a", DataError, "n_way=6 but the split has only 5 classes")
    fails([*common_args, "fewshot.n_query=15"], tmp_path / "b", DataError, r"has 6 clips, fewer than k_shot \+ n_query")
    fails([*common_args, "fewshot.views=2", "fewshot.n_query=5"], tmp_path / "c", ValueError, "views > 1 needs fewshot.mask_ratio")


def test_masked_views_need_a_token_encoder():
    from mmfsar.models.base import masking_grid

    with pytest.raises(ValueError, match="cannot drop tokens"):
        masking_grid(torch.nn.Linear(2, 2))

"""Episodic training: tasks drawn from the base classes (layout, determinism, sharding, resuming),
the training module (learns, exports its matching head, which evaluation then uses)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import mmfsar.utils  # noqa: F401  (MMFSAR_ROOT)
from helpers import CONFIG_DIR, run_entry, tiny
from mmfsar.data.datamodules import PretrainDataModule
from mmfsar.data.episodes import EpisodeSettings, TaskSampler, split_task
from mmfsar.errors import DataError

pytest_plugins = ["conftest_training"]

TASK = {"n_way": 3, "k_shot": 2, "n_query": 2, "episodes": 12, "seed": 7}


def task_data(root: Path, make_modalities, *, labelled_source: bool = True, unlabelled_target: bool = False, **task) -> PretrainDataModule:
    dm = PretrainDataModule(
        root=root,
        modalities=make_modalities("flow"),
        labelled_source=labelled_source,
        unlabelled_target=unlabelled_target,
        train_episodes={**TASK, **task},
        val_episodes={"n_way": 5, "k_shot": 1, "n_query": 5, "episodes": 4},
        num_workers=0,
    )
    dm.setup("fit")
    return dm


def test_tasks_never_mix_classes_and_follow_the_layout(episode_dataset, make_modalities):
    dm = task_data(episode_dataset, make_modalities)
    names = {r.clip_id: r.label_name for r in dm.train_sets["source"].records}
    loader = dm.train_dataloader()["source"]
    tasks = list(loader)
    assert len(tasks) == 12
    for task in tasks:
        assert task["flow"].shape[0] == 3 * (2 + 2)
        classes = [names[c] for c in task["clip_id"]]
        per_way = [classes[i * 4 : (i + 1) * 4] for i in range(3)]
        assert all(len(set(way)) == 1 for way in per_way), "a way mixes classes"
        assert len({way[0] for way in per_way}) == 3, "two ways share a class"
        assert len(set(task["clip_id"])) == 12, "a clip appears twice in a task"
        assert task["label"].view(3, 4).unique(dim=1).shape == (3, 1)  # labels constant per way
    support, query, target = split_task(tasks[0]["flow"], EpisodeSettings(**TASK))
    assert support.shape[:3] == (1, 3, 2) and query.shape[:2] == (1, 6) and target.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(query[0, 0], tasks[0]["flow"][2]) and torch.equal(support[0, 1, 0], tasks[0]["flow"][4])


def test_episodic_training_with_unlabelled_target_clips(episode_dataset, make_modalities):
    """``unlabelled_target``: each task comes with a batch of unlabelled target-domain base
    clips (label -1); without labelled source clips there are no tasks, a clear error."""
    from mmfsar.errors import ConfigError

    dm = task_data(episode_dataset, make_modalities, unlabelled_target=True)
    loaders = dm.train_dataloader()
    assert sorted(loaders) == ["source", "target"]
    domain = {r.clip_id: r.domain for r in dm.train_sets["target"].records}
    clips = next(iter(loaders["target"]))
    assert set(clips["label"].tolist()) == {-1} and {domain[c] for c in clips["clip_id"]} == {"target"}
    assert {r.split for r in dm.train_sets["target"].records} == {"base"}
    with pytest.raises(ConfigError, match="labelled_source=true"):
        task_data(episode_dataset, make_modalities, labelled_source=False, unlabelled_target=True)


def test_tasks_depend_on_seed_epoch_and_number_only(episode_dataset, make_modalities):
    """Two processes see disjoint halves of one epoch's tasks, together those of one process; a
    resumed run (set_epoch) draws the epoch's tasks again; the next epoch draws others."""
    dm = task_data(episode_dataset, make_modalities)
    tasks = dm.tasks
    single = [tasks.positions(*key).tolist() for key in TaskSampler(12)]
    ranks = [[tasks.positions(*key).tolist() for key in TaskSampler(12, rank=r, world_size=2)] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(single) and not set(map(str, ranks[0])) & set(map(str, ranks[1]))
    sampler = TaskSampler(12)
    sampler.set_epoch(3)
    epoch3 = [tasks.positions(*key).tolist() for key in sampler]
    resumed = TaskSampler(12)
    resumed.set_epoch(3)
    assert [tasks.positions(*key).tolist() for key in resumed] == epoch3 and epoch3 != single
    other_seed = task_data(episode_dataset, make_modalities, seed=8).tasks
    assert [other_seed.positions(*key).tolist() for key in TaskSampler(12)] != single
    assert len(TaskSampler(13, world_size=2)) == 6  # every rank takes as many steps


def test_impossible_tasks_fail_at_setup_naming_classes_and_key(episode_dataset, make_modalities):
    with pytest.raises(DataError, match=r"(?s)training tasks, base classes.*model.episodes.n_way=5 but the split has only 3"):
        task_data(episode_dataset, make_modalities, n_way=5)
    with pytest.raises(DataError, match=r"class '\w+' has 6 clips, fewer than k_shot \+ n_query = 2 \+ 5 = 7"):
        task_data(episode_dataset, make_modalities, n_query=5)


def compose_pretrain(overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="pretrain", overrides=[*overrides, f"paths.output_dir={out}"])


EPISODIC = [
    "model=episodic",
    "modality=flow",
    "input=native",
    "model/encoder=c3d_tiny",
    "model.episodes={n_way: 5, k_shot: 1, n_query: 3, episodes: 60, seed: 0}",
    "data.frames.num_frames=8",
    "model.encoder.temporal_strides=[1,1,1,2]",  # 4 temporal positions to match frame by frame
]


@pytest.mark.parametrize("head", ["otam", "frame_cosine", "trx"])
def test_episodic_training_raises_val_accuracy(head, task_dataset, tmp_path):
    """A few dozen tasks of episodic training lift the val-episode accuracy of a random encoder
    clearly (flow, a small 3D CNN): the loss reaches the encoder through the matching head."""
    import lightning as L

    from mmfsar.tasks.pipelines import build_training

    small = ["model.classifier.proj_dim=64"] if head == "trx" else []
    cfg = compose_pretrain(
        [*EPISODIC, f"fewshot/classifier@model.classifier={head}", *small, *tiny(task_dataset, batches=None), "data.val_domain=source"],
        tmp_path,
    )
    torch.manual_seed(0)
    run = build_training(cfg)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    before = trainer.validate(run.module, datamodule=run.datamodule, verbose=False)[0]["val/acc"]
    trainer.fit(run.module, datamodule=run.datamodule)
    after = float(trainer.callback_metrics["val/acc"])
    assert trainer.global_step == 120
    assert after > before + 10, (before, after)


def test_episodic_run_exports_its_head_and_evaluation_uses_it(episode_dataset, tmp_path, wandb_home):
    run = tmp_path / "run"
    run_entry(
        "lit_main_pretrain.py",
        *EPISODIC,
        "fewshot/classifier@model.classifier=otam",
        "model.episodes.episodes=8",
        "model.episodes.n_way=3",
        f"hydra.run.dir={run}",
        *tiny(episode_dataset, batches=None),
        home=wandb_home,
    )
    payload = torch.load(run / "encoder.pt", weights_only=True)
    assert payload["classifier"]["config"]["_target_"] == "mmfsar.fewshot.matching.OTAM"
    assert payload["classifier"]["config"]["num_frames"] == 4  # the 3D CNN's temporal positions
    out = tmp_path / "eval"
    run_entry(
        "lit_main_eval.py",
        "data=folder",
        f"data.root={episode_dataset}",
        f"encoder={run / 'encoder.pt'}",
        "fewshot.n_query=5",
        "fewshot.episodes=10",
        "data.num_workers=0",
        f"hydra.run.dir={out}",
        home=wandb_home,
    )
    assert json.loads((out / "results.json").read_text())["classifier"] == "OTAM"
    out2 = tmp_path / "eval_prototype"
    run_entry(
        "lit_main_eval.py",
        "data=folder",
        f"data.root={episode_dataset}",
        f"encoder={run / 'encoder.pt'}",
        "fewshot/classifier=prototype",
        "fewshot.n_query=5",
        "fewshot.episodes=10",
        "data.num_workers=0",
        f"hydra.run.dir={out2}",
        home=wandb_home,
    )
    assert json.loads((out2 / "results.json").read_text())["classifier"] == "PrototypeClassifier"


def test_episodic_evaluation_is_identical_with_two_processes(episode_dataset, tmp_path, wandb_home):
    """An OTAM evaluation on per-frame features: 1 and 2 DDP processes give the same per-episode
    accuracies."""
    run = tmp_path / "run"
    run_entry(
        "lit_main_pretrain.py", *EPISODIC, "fewshot/classifier@model.classifier=otam", "model.episodes.episodes=4",
        "model.episodes.n_way=3",
        f"hydra.run.dir={run}", *tiny(episode_dataset, batches=None), home=wandb_home,
    )  # fmt: skip
    common = [
        "data=folder", f"data.root={episode_dataset}", f"encoder={run / 'encoder.pt'}", "fewshot.n_query=5",
        "fewshot.episodes=30", "data.num_workers=0", "data.eval_batch_size=8",
    ]  # fmt: skip
    run_entry("lit_main_eval.py", *common, f"hydra.run.dir={tmp_path / 'one'}", home=wandb_home)
    run_entry(
        "lit_main_eval.py", *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        f"hydra.run.dir={tmp_path / 'two'}", home=wandb_home, timeout=900,
    )  # fmt: skip
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["classifier"] == two["classifier"] == "OTAM"
    assert np.allclose(one["per_episode"], two["per_episode"]) and one["episode_sha256"] == two["episode_sha256"]

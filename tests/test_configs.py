"""Every experiment preset composes and builds, chained stage by stage as its header says (as
lightning-hydra-template's ``test_configs.py``), and every command in README.md,
DATA_STRUCTURE.md and the presets' headers composes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import mmfsar.utils  # noqa: F401  (MMFSAR_ROOT)
from helpers import CONFIG_DIR, REPO_ROOT

ENTRY_CONFIG = {"lit_main_pretrain.py": "pretrain", "lit_main_distill.py": "distill", "lit_main_eval.py": "eval"}
# method -> (modalities of its pretraining, stages in order); every preset file must be listed
CHAINS = {
    "mm_cdfsl": (("rgb", "flow", "pose"), ("pretrain", "distill", "eval")),
    "mm_cdfsl_tiny": (("rgb", "flow", "pose"), ("pretrain", "distill", "eval")),
    "lite_mkd": (("rgb", "depth", "flow"), ("pretrain", "fusion", "distill", "eval")),
    "lite_mkd_tiny": (("rgb", "flow", "pose"), ("pretrain", "fusion", "distill", "eval")),
}


SKELETON_STREAMS = {"joint": "skeleton", "bone": "skeleton_bone", "motion": "skeleton_motion"}


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_every_preset_is_in_a_chain():
    presets = {f"{p.parent.name}/{p.stem}" for p in (CONFIG_DIR / "experiment").glob("*/*.yaml")}
    chained = {f"{method}/{stage}" for method, (_, stages) in CHAINS.items() for stage in stages}
    single = {"demo/eval", "search/mm_cdfsl_tiny_lr"} | {f"skeleton_tiny/{s}" for s in ("supervised", *SKELETON_STREAMS)}
    single |= {"mmcl/train", "mmcl/eval", "mmcl_tiny/rgb", "mmcl_tiny/train", "mmcl_tiny/eval"}  # test_mmcl_training
    single |= {f"{m}/{s}" for m in ("ikem", "ikem_tiny") for s in ("pretrain", "teacher", "distill", "eval")}  # test_ikem
    single |= {"ikem/linear"}
    single |= {"clip_mdmf/clip_mdmf", "clip_mdmf/eval"}  # test_clip_mdmf_training
    single |= {f"clip_mdmf_tiny/{s}" for s in ("clip", "clip_mdmf", "eval")}
    assert presets == chained | single


@pytest.mark.parametrize("stream", sorted(SKELETON_STREAMS))
def test_skeleton_presets_build(stream, tiny_dataset, tmp_path):
    """``experiment=skeleton_tiny/<stream>``: the stream's modality, a protocol data module (every
    class labelled, no val episodes), an ST-GCN with one output per class, exported."""
    from mmfsar.tasks.pipelines import build_training, export_trained

    cfg = compose_config(
        "pretrain", [f"experiment=skeleton_tiny/{stream}", "data=folder", f"data.root={tiny_dataset}", "data.num_workers=0",
                     f"paths.output_dir={tmp_path}"],
    )  # fmt: skip
    run = build_training(cfg)
    assert list(run.datamodule.modalities) == [SKELETON_STREAMS[stream]]
    assert run.datamodule.val_episodes is None and run.datamodule.protocol == "xsub"
    assert run.module.encoder.head.out_features == 7  # all classes of tiny_dataset
    assert type(run.module.encoder.backbone).__name__ == "STGCN"
    assert export_trained(cfg, run).is_file()


@pytest.mark.parametrize("method", sorted(CHAINS))
def test_presets_compose_and_build_stage_after_stage(method, tiny_dataset, tmp_path):
    """Each stage's preset on the tiny dataset: data set up (files checked, val episodes drawn),
    module built (from the previous stage's exports), trainer and callbacks instantiated, the
    encoder exported; evaluation built on the student. No training step runs."""
    from mmfsar.tasks.pipelines import build_evaluation, build_training, export_trained
    from mmfsar.utils import instantiate_callbacks

    modalities, stages = CHAINS[method]
    data = [
        "data=folder",
        f"data.root={tiny_dataset}",
        "data.num_workers=0",
        "data.val_episodes={n_way: 2, k_shot: 1, n_query: 2, episodes: 2, seed: 0}",
    ]

    def train_stage(stage: str, name: str, entry: str, extra: list[str]) -> Path:
        cfg = compose_config(entry, [f"experiment={method}/{stage}", *data, f"paths.output_dir={tmp_path / name}", *extra])
        if "episodes" in cfg.model:  # episodic stages: tasks the tiny dataset can give
            cfg.model.episodes = {"n_way": 2, "k_shot": 1, "n_query": 2, "episodes": 2, "seed": 0}
        torch.manual_seed(0)
        run = build_training(cfg)
        trainer = instantiate(cfg.trainer, callbacks=instantiate_callbacks(cfg.callbacks) + run.callbacks, logger=False)
        assert trainer.max_epochs >= 1 and isinstance(run.module.optim.build, object)
        return export_trained(cfg, run)

    exports = {m: train_stage("pretrain", m, "pretrain", [f"modality={m}"]) for m in modalities}
    teachers = [f"model.teachers.{m}={exports[m]}" for m in modalities]
    if "fusion" in stages:
        fusion = train_stage("fusion", "fusion", "pretrain", [f"model.encoders.{m}={exports[m]}" for m in modalities])
        teachers = [f"model.teacher={fusion}"]
    student = train_stage("distill", "student", "distill", [f"model.init_from={exports['rgb']}", *teachers])
    cfg = compose_config(
        "eval",
        [
            f"experiment={method}/eval",
            f"encoder={student}",
            *data[:3],
            "fewshot.n_way=2",
            "fewshot.n_query=2",
            "fewshot.episodes=2",
            f"paths.output_dir={tmp_path / 'eval'}",
        ],
    )
    _, datamodule, module = build_evaluation(cfg)
    assert len(datamodule.episodes) == 2 and module.encoder.modalities == ["rgb"]


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, entry config, overrides) of every ``python lit_main_*.py`` / ``python -m
    mmfsar.data.validate`` command in the docs and the presets' headers; placeholders like
    ``<run>/encoder.pt`` become a path, a sweep (``-m a=x,y``) its first value."""
    sources = [REPO_ROOT / "README.md", REPO_ROOT / "DATA_STRUCTURE.md", *sorted((CONFIG_DIR / "experiment").glob("*/*.yaml"))]
    entries = {**ENTRY_CONFIG, "mmfsar.data.validate": "validate"}
    out = []
    for source in sources:
        text = re.sub(r"\\\n\s*(#\s*)?", " ", source.read_text())  # continuation lines
        for line in text.splitlines():
            match = re.search(r"python (-m )?(lit_main_\w+\.py|mmfsar\.data\.validate)\b(.*)", line)
            if not match:
                continue
            command = re.sub(r"<[^>]*>", "run", match.group(3).split("`")[0].split(" #")[0])
            command = command.replace("...", "run")
            overrides, config = [], entries[match.group(2)]
            tokens = iter(shlex.split(command))
            for token in tokens:
                if token == "--config-name":
                    config = next(tokens)
                    continue
                if token in ("-m", "--multirun") or token.startswith("["):
                    continue
                key, _, value = token.partition("=")
                if "," in value and not value.startswith(("[", "{")):
                    value = value.split(",")[0]
                overrides.append(f"{key}={value}")
            out.append((f"{source.name}: {line.strip()[:100]}", config, overrides))
    return out


DOCUMENTED = documented_commands()


def test_the_docs_have_commands():
    assert len(DOCUMENTED) >= 15 and {entry for _, entry, _ in DOCUMENTED} == {"pretrain", "distill", "eval", "eval_protocol", "validate"}


@pytest.mark.parametrize("where,entry,overrides", DOCUMENTED, ids=[w for w, _, _ in DOCUMENTED])
def test_documented_commands_compose(where, entry, overrides):
    cfg = compose_config(entry, overrides)
    assert OmegaConf.select(cfg, "data.root") is not None, where

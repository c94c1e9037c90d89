"""Stage 2 end to end: the tiny presets of both published recipes through the entry points, and
the frozen-teacher guarantees of the distillation module.

* MM-CDFSL (``experiment=mm_cdfsl_tiny/{pretrain,distill,eval}``): a small 3D CNN per modality
  (the session sweep of ``conftest_training.py``), the RGB student initialised from the RGB one,
  translation MSE to rgb / flow / pose teachers on unlabelled target clips, logistic-regression
  episodes.
* Lite-MKD (``experiment=lite_mkd_tiny/{pretrain,fusion,distill,eval}``): a 3D CNN per modality,
  the MFM fusion teacher over them trained on tasks with a TRX head (width 64 in the fast chain),
  a 3D-CNN RGB student with two projections and a TRX head distilled on tasks (episode KD +
  relations + CE) from the cached teacher features, evaluated with its own head; the unmodified
  preset runs under ``-m slow``.

Every run trains 2 steps of 4 clips on ``episode_dataset``; evaluation solves 20 five-way
one-shot five-query episodes on its novel classes.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import get_class, instantiate

from helpers import CONFIG_DIR, MODALITIES, checkpoint, eval_overrides, run_ddp, run_entry, tiny
from mmfsar.models.base import load_export

pytest_plugins = ["conftest_training"]

# Lite-MKD teachers small enough for the fast suite (see the module docstring)
SMALL_TEACHERS: list[str] = []  # the presets' 3D CNN is small already
# tasks the 3 base classes x 6 clips of episode_dataset can give, an optimiser step per task
LITE_TASKS = ["model.episodes={n_way: 3, k_shot: 2, n_query: 2, episodes: 2, seed: 0}", "trainer.accumulate_grad_batches=1"]
SMALL_FUSION = ["model.fusion.dim=64", *LITE_TASKS]


@dataclass
class LiteMKDTeachers:
    runs: dict[str, Path]  # modality -> pretraining run
    fusion: Path  # fusion-teacher run


def lite_mkd_teachers(root: Path, out: Path, home: Path, *, teacher: list[str], fusion: list[str]) -> LiteMKDTeachers:
    run_entry(
        "lit_main_pretrain.py",
        "-m",
        "experiment=lite_mkd_tiny/pretrain",
        f"modality={','.join(MODALITIES)}",
        f"hydra.sweep.dir={out / 'pretrain'}",
        *teacher,
        *tiny(root),
        home=home,
    )
    runs = {load_export(p)["encoder"]["modality"]: p.parent for p in (out / "pretrain").glob("*/encoder.pt")}
    assert sorted(runs) == sorted(MODALITIES)
    run_entry(
        "lit_main_pretrain.py",
        "experiment=lite_mkd_tiny/fusion",
        *[f"model.encoders.{m}={runs[m] / 'encoder.pt'}" for m in MODALITIES],
        f"hydra.run.dir={out / 'fusion'}",
        *fusion,
        *tiny(root),
        home=home,
    )
    return LiteMKDTeachers(runs, out / "fusion")


@pytest.fixture(scope="module")
def lite_mkd_pretrained(episode_dataset, tmp_path_factory, wandb_home) -> LiteMKDTeachers:
    return lite_mkd_teachers(
        episode_dataset, tmp_path_factory.mktemp("lite_mkd"), wandb_home, teacher=SMALL_TEACHERS, fusion=SMALL_FUSION
    )


def mm_cdfsl_teachers(sweep) -> list[str]:
    return [f"model.init_from={sweep.encoder('rgb')}", *[f"model.teachers.{m}={sweep.encoder(m)}" for m in MODALITIES]]


# --------------------------------------------------------------------------- chains through the entry points


def check_student_run(run: Path, *, backbone: str) -> dict:
    """The distillation run exported an RGB-only student; its checkpoint holds the student and
    the loss terms' heads, never a teacher."""
    payload = torch.load(run / "encoder.pt", map_location="cpu", weights_only=True)
    assert payload["encoder"]["modality"] == "rgb" and list(payload["modalities"]) == ["rgb"]
    assert payload["encoder"]["num_classes"] == 0
    assert payload["encoder"]["backbone"]["_target_"].endswith(backbone)
    assert payload["info"]["task"] == "distill"
    last = checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2
    prefixes = {k.split(".")[0] for k in last["state_dict"]}
    assert prefixes == {"student", "terms"}, f"checkpoint holds {prefixes}: teachers must not be saved"
    return last


def check_results(run: Path, encoder: Path, classifier: str) -> dict:
    results = json.loads((run / "results.json").read_text())
    assert results["encoder"] == str(encoder)
    assert results["modalities"] == ["rgb"], "the student must need RGB only at test time"
    assert results["classifier"] == classifier
    assert results["setting"] == "5-way 1-shot" and results["episodes"] == 20 and len(results["per_episode"]) == 20
    assert 0 <= results["mean"] <= 100 and math.isfinite(results["ci95"])
    assert (run / "results.csv").is_file() and Path(results["episode_file"]).is_file()
    return results


def test_mm_cdfsl_tiny_chain(mm_cdfsl_pretrained, episode_dataset, tmp_path, wandb_home):
    """``experiment=mm_cdfsl_tiny/distill`` from the rgb / flow / pose exports of the pretraining
    sweep, then ``experiment=mm_cdfsl_tiny/eval`` on the student."""
    run = tmp_path / "distill"
    run_entry(
        "lit_main_distill.py",
        "experiment=mm_cdfsl_tiny/distill",
        *mm_cdfsl_teachers(mm_cdfsl_pretrained),
        f"hydra.run.dir={run}",
        *tiny(episode_dataset),
        home=wandb_home,
    )
    last = check_student_run(run, backbone="Conv3DEncoder")
    translators = {k.split(".")[3] for k in last["state_dict"] if k.startswith("terms.translation_mse.translators.")}
    assert translators == set(MODALITIES), f"one translation MLP per teacher expected, got {translators}"
    init = load_export(mm_cdfsl_pretrained.encoder("rgb"))["state_dict"]
    student = load_export(run / "encoder.pt")["state_dict"]
    assert set(student) == {k for k in init if not k.startswith("head.")}, "the student is not the RGB encoder's architecture"
    assert any(not torch.equal(v, init[k]) for k, v in student.items()), "the student did not train"

    out = tmp_path / "eval"
    run_entry("lit_main_eval.py", "experiment=mm_cdfsl_tiny/eval", *eval_overrides(episode_dataset, run / "encoder.pt", out), home=wandb_home)
    results = check_results(out, run / "encoder.pt", "LogisticRegressionClassifier")
    assert results["views"] == 1  # a CNN student: no masked views


def check_episodic_student_run(run: Path) -> dict:
    """The episodic distillation exported an RGB student with its two-branch head; the checkpoint
    holds the student encoder and head, never the teacher."""
    payload = torch.load(run / "encoder.pt", map_location="cpu", weights_only=True)
    assert payload["encoder"]["modality"] == "rgb" and list(payload["modalities"]) == ["rgb"]
    assert payload["classifier"]["config"]["_target_"] == "mmfsar.fewshot.matching.TwoBranchHead"
    last = checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2
    prefixes = {k.split(".")[0] for k in last["state_dict"]}
    assert prefixes == {"encoder", "classifier"}, f"checkpoint holds {prefixes}: the teacher must not be saved"
    return last


def test_lite_mkd_tiny_chain(lite_mkd_pretrained, episode_dataset, tmp_path, wandb_home):
    """``experiment=lite_mkd_tiny/{pretrain,fusion}`` (the module fixture: MFM + TRX trained on
    tasks), then ``.../distill`` from the episodic teacher and ``.../eval`` with the student's head."""
    fusion = load_export(lite_mkd_pretrained.fusion / "encoder.pt")
    assert fusion["encoder"]["_target_"] == "mmfsar.models.fusion.FusionTeacher"
    assert fusion["encoder"]["fusion"]["_target_"] == "mmfsar.models.fusion.MFM"
    assert sorted(fusion["modalities"]) == sorted(MODALITIES) and fusion["encoder"]["num_classes"] == 0
    assert fusion["classifier"]["config"]["_target_"] == "mmfsar.fewshot.matching.TRX"
    for m, run in lite_mkd_pretrained.runs.items():  # the fusion teacher carries the stage-1 encoders unchanged
        stage1 = load_export(run / "encoder.pt")["state_dict"]
        assert all(torch.equal(v, fusion["state_dict"][f"encoders.{m}.{k}"]) for k, v in stage1.items())

    run = tmp_path / "distill"
    run_entry(
        "lit_main_distill.py",
        "experiment=lite_mkd_tiny/distill",
        f"model.init_from={lite_mkd_pretrained.runs['rgb'] / 'encoder.pt'}",
        f"model.teacher={lite_mkd_pretrained.fusion / 'encoder.pt'}",
        f"hydra.run.dir={run}",
        *LITE_TASKS,
        *tiny(episode_dataset),
        home=wandb_home,
    )
    check_episodic_student_run(run)
    out = tmp_path / "eval"
    run_entry("lit_main_eval.py", "experiment=lite_mkd_tiny/eval", *eval_overrides(episode_dataset, run / "encoder.pt", out), home=wandb_home)
    check_results(out, run / "encoder.pt", "TwoBranchHead")


@pytest.mark.slow
def test_lite_mkd_tiny_preset_unmodified(episode_dataset, tmp_path, wandb_home):
    """The Lite-MKD tiny preset as shipped (ResNet-18 teachers, full-width MFM), only shortened."""
    teachers = lite_mkd_teachers(episode_dataset, tmp_path, wandb_home, teacher=[], fusion=LITE_TASKS)
    run = tmp_path / "distill"
    run_entry(
        "lit_main_distill.py",
        "experiment=lite_mkd_tiny/distill",
        f"model.init_from={teachers.runs['rgb'] / 'encoder.pt'}",
        f"model.teacher={teachers.fusion / 'encoder.pt'}",
        f"hydra.run.dir={run}",
        *LITE_TASKS,
        *tiny(episode_dataset),
        home=wandb_home,
    )
    check_episodic_student_run(run)
    out = tmp_path / "eval"
    run_entry("lit_main_eval.py", "experiment=lite_mkd_tiny/eval", *eval_overrides(episode_dataset, run / "encoder.pt", out), home=wandb_home)
    check_results(out, run / "encoder.pt", "TwoBranchHead")


# --------------------------------------------------------------------------- frozen teachers, in process


def compose_distill(overrides: list[str], out_dir: Path):
    """The ``lit_main_distill.py`` config for ``overrides``, composed as Hydra composes it (the
    run folder, which Hydra would create, given as ``paths.output_dir``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import mmfsar.utils  # noqa: F401  (sets MMFSAR_ROOT, as the entry points do)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="distill", overrides=[*overrides, f"paths.output_dir={out_dir}", f"paths.log_dir={out_dir}"])


@pytest.mark.parametrize("recipe", ["mm_cdfsl", "lite_mkd", "lite_mkd_target", "lite_mkd_translate"])
def test_teachers_stay_frozen_while_the_student_learns(recipe, request, episode_dataset, tmp_path):
    """A short distillation (3 steps, the module and trainer built from the composed config as
    ``pipelines.train`` builds them): every teacher tensor (weights and BatchNorm statistics)
    equals its exported file bit for bit, no teacher parameter has a gradient or is in the
    optimiser or the checkpoint, every teacher module is in eval mode, and the student and the
    loss terms' heads did change. ``lite_mkd_target`` adds unlabelled target clips (one batch per
    task) and the feature term on them, ``lite_mkd_translate`` the translation term (whose MLPs
    train) on them; a fusion teacher's frozen parts, which the cache stores, are its encoders."""
    from mmfsar.data.modalities import build_modalities

    if recipe == "mm_cdfsl":
        sweep = request.getfixturevalue("mm_cdfsl_pretrained")
        teachers = {m: sweep.encoder(m) for m in MODALITIES}
        overrides = ["experiment=mm_cdfsl_tiny/distill", *mm_cdfsl_teachers(sweep)]
    else:
        pretrained = request.getfixturevalue("lite_mkd_pretrained")
        fusion = pretrained.fusion / "encoder.pt"
        teachers = {"teacher": fusion}
        overrides = [
            "experiment=lite_mkd_tiny/distill",
            f"model.teacher={fusion}",
            f"model.init_from={pretrained.runs['rgb'] / 'encoder.pt'}",
            *LITE_TASKS,
            "model.episodes.episodes=3",
            *([f"distill={recipe}"] if recipe != "lite_mkd" else []),
        ]
    cfg = compose_distill(
        [
            *overrides,
            *[o for o in tiny(episode_dataset, batches=3) if not o.startswith("callbacks.")],
            "++trainer.limit_val_batches=0",
            "++trainer.enable_checkpointing=false",
            "~logger",
            "callbacks=none",
        ],
        tmp_path,
    )
    module_cls = get_class(cfg.model._target_)
    datamodule = instantiate(cfg.data, modalities=build_modalities(module_cls.modality_configs(cfg.model, cfg.modalities)))
    datamodule.setup("fit")
    module = module_cls.build(cfg.model, datamodule)
    student = module.student if recipe == "mm_cdfsl" else module.encoder
    trained_heads = module.terms if recipe == "mm_cdfsl" else torch.nn.ModuleList([module.classifier, module.terms])
    student_before = copy.deepcopy(student.state_dict())
    heads_before = copy.deepcopy(trained_heads.state_dict())
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 3
    if recipe != "mm_cdfsl":
        target_terms = {"lite_mkd": set(), "lite_mkd_target": {"feature"}, "lite_mkd_translate": {"translation"}}[recipe]
        assert target_terms == set(module.terms) - {"kd", "relation", "ce"}
        assert bool(target_terms) == ("target" in datamodule.train_sets)
        assert sorted(module.frozen_models()) == sorted(MODALITIES)

    models = module.frozen_models() if recipe == "mm_cdfsl" else module._teachers
    assert sorted(models) == sorted(teachers)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    for name, path in teachers.items():
        teacher, exported = models[name], load_export(path)["state_dict"]
        state = teacher.state_dict()
        assert sorted(state) == sorted(exported)
        changed = [k for k, v in state.items() if v.dtype != exported[k].dtype or not torch.equal(v, exported[k])]
        assert not changed, f"teacher {name!r} changed during distillation: {changed[:5]}"
        for pname, p in teacher.named_parameters():
            assert p.grad is None and not p.requires_grad, f"teacher {name!r} parameter {pname} takes gradients"
            assert id(p) not in optimised, f"teacher {name!r} parameter {pname} is in the optimiser"
        training = [n for n, m in teacher.named_modules() if m.training]
        assert not training, f"teacher {name!r} modules in train mode: {training[:5]}"
    if recipe != "mm_cdfsl":
        assert any("running_mean" in k for k in exported), "the fusion teacher should carry BatchNorm statistics"
    saved = {k.split(".")[0] for k in module.state_dict()}
    expected = {"mm_cdfsl": {"student", "terms"}, "lite_mkd_translate": {"encoder", "classifier", "terms"}}
    assert saved == expected.get(recipe, {"encoder", "classifier"})
    if recipe != "mm_cdfsl":
        teacher_head = module._teacher_heads["teacher"]
        exported_head = load_export(fusion)["classifier"]["state_dict"]
        assert all(torch.equal(v, exported_head[k]) for k, v in teacher_head.state_dict().items()), "the teacher's head changed"
        assert not any(p.requires_grad for p in teacher_head.parameters()) and not teacher_head.training

    after = student.state_dict()
    assert any(not torch.equal(v, student_before[k]) for k, v in after.items()), "the student did not change"
    assert any(not torch.equal(v, heads_before[k]) for k, v in trained_heads.state_dict().items()), "the trained heads did not change"
    if recipe == "mm_cdfsl":  # started from the RGB pretraining (without its head)
        init = load_export(sweep.encoder("rgb"))["state_dict"]
        assert all(torch.equal(v, init[k]) for k, v in student_before.items())


def test_target_clips_and_the_terms_that_use_them_come_together(lite_mkd_pretrained, episode_dataset, tmp_path):
    """Unlabelled target clips no term uses, or a term that needs them without them: a
    ConfigError naming the keys, before training."""
    from mmfsar.data.modalities import build_modalities
    from mmfsar.errors import ConfigError

    base = [
        "experiment=lite_mkd_tiny/distill",
        f"model.teacher={lite_mkd_pretrained.fusion / 'encoder.pt'}",
        f"model.init_from={lite_mkd_pretrained.runs['rgb'] / 'encoder.pt'}",
        *LITE_TASKS,
        *[o for o in tiny(episode_dataset, batches=3) if not o.startswith("callbacks.")],
    ]
    for extra, message in (
        (["distill.unlabelled_target=true"], "no term in model.losses uses target clips"),
        (["distill=lite_mkd_target", "distill.unlabelled_target=false"], r"\['feature'\] use unlabelled target clips"),
    ):
        cfg = compose_distill([*base, *extra], tmp_path)
        module_cls = get_class(cfg.model._target_)
        datamodule = instantiate(cfg.data, modalities=build_modalities(module_cls.modality_configs(cfg.model, cfg.modalities)))
        datamodule.setup("fit")
        with pytest.raises(ConfigError, match=message):
            module_cls.build(cfg.model, datamodule)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step outside a Trainer
def test_clip_level_terms_see_the_target_clips_and_the_fusion_teachers_encoders(lite_mkd_pretrained, episode_dataset, tmp_path):
    """``distill=lite_mkd_translate``: in a training step the translation term gets the target
    clips only (the student encoder's rows after the task's), and as its teachers the fusion
    teacher's per-modality encoders on those clips; its value is MM-CDFSL's loss on them."""
    import torch.nn.functional as F

    from mmfsar.data.modalities import build_modalities

    cfg = compose_distill(
        [
            "experiment=lite_mkd_tiny/distill",
            "distill=lite_mkd_translate",
            f"model.teacher={lite_mkd_pretrained.fusion / 'encoder.pt'}",
            f"model.init_from={lite_mkd_pretrained.runs['rgb'] / 'encoder.pt'}",
            *LITE_TASKS,
            *[o for o in tiny(episode_dataset, batches=3) if not o.startswith("callbacks.")],
        ],
        tmp_path,
    )
    module_cls = get_class(cfg.model._target_)
    datamodule = instantiate(cfg.data, modalities=build_modalities(module_cls.modality_configs(cfg.model, cfg.modalities)))
    datamodule.setup("fit")
    module = module_cls.build(cfg.model, datamodule).eval()
    loaders = datamodule.train_dataloader()
    batch = {key: next(iter(loader)) for key, loader in loaders.items()}
    n_task, n_target = batch["source"]["rgb"].shape[0], batch["target"]["rgb"].shape[0]
    assert n_task == 3 * (2 + 2) and n_target > 1
    term = module.terms["translation"]
    seen = []
    term.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        module.training_step(batch, 0)
        (clip_batch, value), = seen
        clips = batch["target"]
        student = module.encoder({"rgb": clips["rgb"]}).pooled
        teacher = module._teachers["teacher"]
        expected = {m: teacher.encoders[m](clips).pooled for m in MODALITIES}
        torch.testing.assert_close(clip_batch.student.pooled, student, rtol=1e-4, atol=1e-5)
        assert sorted(clip_batch.teachers) == sorted(MODALITIES)
        for m in MODALITIES:
            torch.testing.assert_close(clip_batch.teachers[m].pooled, expected[m], rtol=1e-4, atol=1e-5)
        assert (clip_batch.labels == -1).all() and clip_batch.labels.shape == (n_target,)
        by_hand = sum(F.mse_loss(term.translators[m](student), expected[m]) for m in MODALITIES)
    torch.testing.assert_close(value, by_hand, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step outside a Trainer
def test_cached_teacher_views_are_what_the_teachers_give_on_the_students_inputs(mm_cdfsl_pretrained, episode_dataset, tmp_path):
    """``cache=frozen cache.views=3``: the teachers encode 3 seeded views per training clip
    before training; every training batch then carries each clip's view, and the cached outputs
    looked up for it are the teachers' outputs on exactly the student's input: the training
    step's loss equals the loss with the teachers run on the batch (an RGB teacher, so the
    student's batch is all it needs)."""
    from mmfsar.data.modalities import build_modalities

    sweep = mm_cdfsl_pretrained
    overrides = [
        "experiment=mm_cdfsl_tiny/distill",
        f"model.init_from={sweep.encoder('rgb')}",
        f"model.teachers.rgb={sweep.encoder('rgb')}",
        "cache.views=3",
        *tiny(episode_dataset),
    ]
    cfg = compose_distill(overrides, tmp_path)
    module_cls = get_class(cfg.model._target_)
    datamodule = instantiate(cfg.data, modalities=build_modalities(module_cls.modality_configs(cfg.model, cfg.modalities)))
    datamodule.setup("fit")
    module = module_cls.build(cfg.model, datamodule)
    cache = instantiate(cfg.cache)
    torch.manual_seed(0)
    cache.setup(SimpleNamespace(datamodule=datamodule, strategy=SimpleNamespace(root_device=torch.device("cpu"))), module, "fit")
    assert module.frozen_cache is cache and cache.tables["target"]["rgb"].pooled.shape[0] == 3
    views = set()
    for batch in datamodule.train_dataloader()["target"]:
        assert set(batch) == {"rgb", "label", "clip_id", "domain", "index", "view"}
        with torch.no_grad():
            cached = module.training_step({"target": batch}, 0)
            module.frozen_cache = None
            direct = module.training_step({"target": batch}, 0)
            module.frozen_cache = cache
        torch.testing.assert_close(cached, direct, rtol=1e-4, atol=1e-6)
        assert cached > 0
        views.update(batch["view"].tolist())
    assert views == {0, 1, 2}


def test_ddp_distillation_on_two_cpu_processes(mm_cdfsl_pretrained, episode_dataset, tmp_path, wandb_home):
    """``experiment=mm_cdfsl_tiny/distill trainer=ddp trainer.accelerator=cpu trainer.devices=2``
    through the entry point (teacher outputs cached over views on each rank):
    :func:`helpers.run_ddp`: sharded training, one export, validation as one process."""
    run_ddp(
        "lit_main_distill.py",
        "experiment=mm_cdfsl_tiny/distill",
        *mm_cdfsl_teachers(mm_cdfsl_pretrained),
        run=tmp_path / "ddp",
        root=episode_dataset,
        home=wandb_home,
        train_domain="target",
    )


# ViT geometry for the synthetic data: 64-px streams, 8 frames (the paper's 224 px / 16 frames
# need a GPU); everything else is the published preset.
VIT_ON_SYNTHETIC = ["model/encoder=vit_tiny", "input=synthetic", "data.frames.num_frames=8"]


@pytest.mark.slow
def test_mm_cdfsl_vit_chain(episode_dataset, tmp_path, wandb_home):
    """``experiment=mm_cdfsl/{pretrain,distill,eval}`` with VideoMAE-style ViTs: masked
    reconstruction (tube mask 0.9, decoder) in stage 1, translation MSE under the shared tube
    mask 0.75 in stage 2, and two masked query views in the evaluation."""
    sweep = tmp_path / "pretrain"
    run_entry(
        "lit_main_pretrain.py",
        "-m",
        "experiment=mm_cdfsl/pretrain",
        f"modality={','.join(MODALITIES)}",
        f"hydra.sweep.dir={sweep}",
        *VIT_ON_SYNTHETIC,
        *tiny(episode_dataset),
        home=wandb_home,
        timeout=1800,
    )
    exports = {}
    for job in sweep.glob("[0-9]*"):
        payload = load_export(job / "encoder.pt")
        exports[payload["encoder"]["modality"]] = job / "encoder.pt"
        assert payload["encoder"]["backbone"]["_target_"].endswith("VideoViT")
        state = checkpoint(job / "checkpoints" / "last.ckpt")["state_dict"]
        assert any(k.startswith("decoder.") for k in state), "stage 1 did not train a reconstruction decoder"
    assert sorted(exports) == sorted(MODALITIES)

    run = tmp_path / "distill"
    output = run_entry(
        "lit_main_distill.py",
        "experiment=mm_cdfsl/distill",
        f"model.init_from={exports['rgb']}",
        *[f"model.teachers.{m}={p}" for m, p in exports.items()],
        f"hydra.run.dir={run}",
        *VIT_ON_SYNTHETIC,
        *tiny(episode_dataset),
        home=wandb_home,
        timeout=1800,
    )
    composed = (run / ".hydra" / "config.yaml").read_text()
    assert "mask_ratio: 0.75" in composed, output[-2000:]
    check_student_run(run, backbone="VideoViT")

    out = tmp_path / "eval"
    run_entry(
        "lit_main_eval.py",
        "experiment=mm_cdfsl/eval",
        *eval_overrides(episode_dataset, run / "encoder.pt", out),
        home=wandb_home,
    )
    results = check_results(out, run / "encoder.pt", "LogisticRegressionClassifier")
    assert results["views"] == 2 and results["mask_ratio"] == 0.75


def test_partial_validation_in_distillation_is_skipped_with_a_warning(mm_cdfsl_pretrained, episode_dataset, tmp_path, wandb_home):
    output = run_entry(
        "lit_main_distill.py",
        "experiment=mm_cdfsl_tiny/distill",
        *mm_cdfsl_teachers(mm_cdfsl_pretrained),
        "+trainer.fast_dev_run=true",
        f"hydra.run.dir={tmp_path / 'fast'}",
        *tiny(episode_dataset),
        home=wandb_home,
    )
    assert "val/acc needs every val clip encoded" in output and (tmp_path / "fast" / "encoder.pt").is_file()


def test_cache_with_persistent_loader_workers(mm_cdfsl_pretrained, episode_dataset, tmp_path, wandb_home):
    """The frozen-output cache is in place before Lightning builds the training loaders: with
    persistent worker processes (``data.num_workers=2``) every batch carries the cached view."""
    run_entry(
        "lit_main_distill.py",
        "experiment=mm_cdfsl_tiny/distill",
        *mm_cdfsl_teachers(mm_cdfsl_pretrained),
        f"hydra.run.dir={tmp_path / 'workers'}",
        *[o for o in tiny(episode_dataset) if o != "data.num_workers=0"],
        "data.num_workers=2",
        home=wandb_home,
    )
    assert (tmp_path / "workers" / "encoder.pt").is_file()

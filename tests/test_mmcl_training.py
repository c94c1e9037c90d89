"""MMCL end to end (issue #18; METHODS.md 4): the training module's loss against hand-computed
values, the frozen RGB encoder (never updated, its features computed once per clip with
``cache=frozen``), an exported model evaluated on a dataset without ``rgb/`` and ``text/``
(supervised top-1 of the head, the two-stream average of logits, few-shot episodes), the
generator's text features, and the benchmark in its ``--tiny`` mode.

The building blocks (``symmetric_info_nce``, ``FeatureAlignment``, ``refine_logits``,
``TextRefinement``, ``mmcl_loss``) have their own hand-computed tests in ``test_mmcl.py``."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import lightning as L
import numpy as np
import pytest
import torch
from conftest import TINY_SETTINGS
from helpers import CONFIG_DIR, REPO_ROOT, checkpoint, eval_overrides, run_entry, tiny
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch import nn

from mmfsar.errors import ConfigError, DataError
from mmfsar.losses.mmcl import FeatureAlignment, TextRefinement
from mmfsar.models.base import EncoderOutput, ModalityEncoder, UnmaskedBackbone, build_encoder, load_export
from mmfsar.tasks.common import Optimization
from mmfsar.tasks.mmcl import FrameSubsampled, MMCLModule, subsample_frames

pytestmark = pytest.mark.filterwarnings("ignore:.*self.log\\(\\).*")  # training_step called outside a Trainer


def compose_pretrain(overrides: list[str], out_dir: Path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def data_overrides(root: Path) -> list[str]:
    return ["data=folder", f"data.root={root}", "data.num_workers=0", "data.batch_size=8", "data.eval_batch_size=32"]


@pytest.fixture(scope="module")
def rgb_export(episode_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The frozen RGB encoder: ``mm_cdfsl_tiny/pretrain``'s RGB 3D CNN (8 frames), exported as a run
    would export it (random weights: what it encodes does not matter to these tests)."""
    from mmfsar.tasks.pipelines import build_training, export_trained

    out = tmp_path_factory.mktemp("rgb")
    cfg = compose_pretrain(
        ["experiment=mm_cdfsl_tiny/pretrain", "modality=rgb", *data_overrides(episode_dataset),
         "data.val_episodes={n_way: 2, k_shot: 1, n_query: 2, episodes: 2, seed: 0}"], out,
    )  # fmt: skip
    torch.manual_seed(0)
    return export_trained(cfg, build_training(cfg))


def build_mmcl(root: Path, teacher: Path | None, tmp_path: Path, *extra: str):
    from mmfsar.tasks.pipelines import build_training

    teacher_arg = [f"model.teacher={teacher}"] if teacher is not None else []
    cfg = compose_pretrain(["experiment=mmcl_tiny/train", *teacher_arg, *data_overrides(root), *extra], tmp_path)
    torch.manual_seed(0)
    return cfg, build_training(cfg)


# ------------------------------------------------------------------ the loss, by hand
class _Identity2d(UnmaskedBackbone):
    """A 'backbone' whose clip feature is its input (B, 2): the loss can be computed by hand."""

    feature_dim = 2

    def encode(self, x: torch.Tensor, *, return_tokens: bool = False) -> EncoderOutput:
        return EncoderOutput(pooled=x, frames=x[:, None])


class _RGBStub(nn.Module):
    """A frozen 'RGB encoder' whose feature is its input."""

    modalities: ClassVar[list[str]] = ["rgb"]
    feature_dim = 2

    def forward(self, inputs: dict[str, torch.Tensor], **kwargs) -> EncoderOutput:
        return EncoderOutput(pooled=inputs["rgb"], frames=inputs["rgb"][:, None])


def _hand_module(text: torch.Tensor) -> MMCLModule:
    encoder = ModalityEncoder(modality="skeleton", backbone=_Identity2d(), num_classes=2)
    alignment = FeatureAlignment(skeleton_dim=2, rgb_dim=2, proj_dim=2)  # the skeleton's space: no skeleton projection
    with torch.no_grad():
        encoder.head.weight.copy_(torch.eye(2))  # fc(x) = x
        encoder.head.bias.zero_()
        for layer in (alignment.rgb_proj[0], alignment.rgb_proj[2]):  # MLP(rgb) = rgb for positive rgb
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    refinement = TextRefinement(text_dim=3, num_classes=2, class_text=text)
    return MMCLModule(
        encoder=encoder,
        encoder_config={},
        teacher=_RGBStub(),
        alignment=alignment,
        refinement=refinement,
        optim=Optimization(optimizer=functools.partial(torch.optim.AdamW, lr=1e-3)),
    )


def _ce(logits: list[float], label: int) -> float:
    return -logits[label] + math.log(sum(math.exp(v) for v in logits))


SKELETON = [[2.0, 0.0], [0.0, 1.0]]  # = fc(x): the clips' class scores
RGB = [[1.0, 1.0], [0.0, 2.0]]
LABELS = [0, 1]
TAU = 0.4


def _hand_info_nce() -> float:
    """cos(s_i, r_k): s_0 = (2, 0) vs r_0 = (1, 1): 1/√2, vs r_1 = (0, 2): 0; s_1 = (0, 1): 1/√2 and 1.
    InfoNCE = ½ [mean_i -log softmax_k(S_ik)[i] + mean_k -log softmax_i(S_ik)[k]], S = cos / τ."""
    c = 1 / math.sqrt(2)
    s = [[c / TAU, 0.0], [c / TAU, 1.0 / TAU]]
    rows = _ce(s[0], 0) + _ce(s[1], 1)
    cols = _ce([s[0][0], s[1][0]], 0) + _ce([s[0][1], s[1][1]], 1)  # column 0: both entries c/τ -> log 2
    assert _ce([s[0][0], s[1][0]], 0) == pytest.approx(math.log(2))
    return 0.5 * (rows / 2 + cols / 2)


def _step_loss(module: MMCLModule) -> float:
    batch = {"source": {"skeleton": torch.tensor(SKELETON), "rgb": torch.tensor(RGB), "label": torch.tensor(LABELS)}}
    return float(module.training_step(batch, 0).detach())


def test_training_step_loss_at_init_is_hand_computed():
    """W± = 1 at initialisation and p⁺ + p⁻ = 1, so refined = fc(x):
    loss = CE + 0.2·CE + 0.1·InfoNCE(skeleton, MLP(rgb)), all by hand."""
    module = _hand_module(torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))
    ce = (_ce(SKELETON[0], 0) + _ce(SKELETON[1], 1)) / 2  # log(1 + e^-2) and log(1 + e^-1)
    assert ce == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2)
    assert _step_loss(module) == pytest.approx(ce + 0.2 * ce + 0.1 * _hand_info_nce(), rel=1e-5)


def test_training_step_loss_with_trained_refinement_is_hand_computed():
    """Gate p⁺ = ¾, p⁻ = ¼ for every clip (zero weights, output bias (log 3, 0)), W⁺ = (2, 2),
    W⁻ = (0, 4): the scale of class 0 is ¾·2 + ¼·0 = 1.5, of class 1 ¾·2 + ¼·4 = 2.5."""
    module = _hand_module(torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        for layer in (module.refinement.gate_mlp[0], module.refinement.gate_mlp[2]):
            layer.weight.zero_()
            layer.bias.zero_()
        module.refinement.gate_mlp[2].bias.copy_(torch.tensor([math.log(3.0), 0.0]))
        module.refinement.positive_weight.copy_(torch.tensor([2.0, 2.0]))
        module.refinement.negative_weight.copy_(torch.tensor([0.0, 4.0]))
    refined = [[2.0 * 1.5, 0.0 * 2.5], [0.0 * 1.5, 1.0 * 2.5]]
    ce = (_ce(SKELETON[0], 0) + _ce(SKELETON[1], 1)) / 2
    refined_ce = (_ce(refined[0], 0) + _ce(refined[1], 1)) / 2
    assert _step_loss(module) == pytest.approx(ce + 0.2 * refined_ce + 0.1 * _hand_info_nce(), rel=1e-5)


def test_weights_select_the_terms():
    """align_weight = 0: no alignment (no teacher); refine_weight = 0: no refinement; the loss is CE."""
    module = _hand_module(torch.zeros(2, 3))
    plain = MMCLModule(
        encoder=module.encoder, encoder_config={}, teacher=None, alignment=None, refinement=None,
        optim=module.optim, refine_weight=0.0, align_weight=0.0,
    )  # fmt: skip
    assert plain.frozen_models() == {} and plain.alignment is None and plain.refinement is None
    assert _step_loss(plain) == pytest.approx((_ce(SKELETON[0], 0) + _ce(SKELETON[1], 1)) / 2, rel=1e-6)
    with pytest.raises(ConfigError, match="model.teacher"):
        MMCLModule(encoder=module.encoder, encoder_config={}, teacher=None, alignment=module.alignment, refinement=None,
                   optim=module.optim, refine_weight=0.0)  # fmt: skip
    with pytest.raises(ConfigError, match="rgb_output"):
        MMCLModule(encoder=module.encoder, encoder_config={}, teacher=_RGBStub(), alignment=module.alignment,
                   refinement=module.refinement, optim=module.optim, rgb_output="frames")  # fmt: skip


def test_subsample_frames_hand_indices():
    """16 -> 8: the frame nearest each of 8 segment centres, ⌊(j + ½)·16/8⌋ = 1, 3, ..., 15;
    equal counts: unchanged; 4 -> 8: each frame twice."""
    x = torch.arange(16.0).reshape(1, 1, 16, 1, 1).expand(2, 3, 16, 2, 2)
    assert subsample_frames(x, 8)[0, 0, :, 0, 0].tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert subsample_frames(x, 16) is x
    assert subsample_frames(x[:, :, :4], 8)[0, 0, :, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    seen = {}
    stub = FrameSubsampled(_RecordingEncoder(seen), 8)
    stub({"rgb": x})
    assert seen["rgb"].shape == (2, 3, 8, 2, 2) and stub.modalities == ["rgb"]


class _RecordingEncoder(nn.Module):
    modalities: ClassVar[list[str]] = ["rgb"]
    feature_dim = 1

    def __init__(self, seen: dict) -> None:
        super().__init__()
        self.seen = seen

    def forward(self, inputs, **kwargs):
        self.seen.update(inputs)
        return EncoderOutput(pooled=inputs["rgb"].mean((1, 2, 3, 4))[:, None], frames=inputs["rgb"][:, :1, :, 0, 0])


# ------------------------------------------------------------------ building from the presets
def test_preset_builds_the_skeleton_classifier_and_the_text(episode_dataset: Path, rgb_export: Path, tmp_path: Path):
    """``experiment=mmcl_tiny/train``: the skeleton_tiny/joint model (ST-GCN, linear fc over the 13
    xsub classes, 16 frames), the RGB encoder at its own 8 frames, the RGB MLP into the skeleton's
    128-d space (no skeleton projection), the dataset's class text in the protocol's class order,
    and refined = fc(x) at initialisation."""
    from mmfsar.data.text import read_class_text

    _, run = build_mmcl(episode_dataset, rgb_export, tmp_path)
    module, dm = run.module, run.datamodule
    assert type(module.encoder.backbone).__name__ == "STGCN" and module.encoder.head.out_features == 13
    assert module.modality == "skeleton" and sorted(dm.modalities) == ["rgb", "skeleton"] and dm.frames.num_frames == 16
    teacher = module.frozen_models()["rgb"]
    assert isinstance(teacher, FrameSubsampled) and teacher.num_frames == 8
    assert isinstance(module.alignment.skeleton_proj, nn.Identity) and module.alignment.rgb_proj[2].out_features == 128
    text = read_class_text(episode_dataset, dm.classes).features
    assert torch.equal(module.refinement.class_text, torch.as_tensor(text))
    logits, labels = torch.randn(6, 13), torch.arange(6)
    assert torch.allclose(module.refinement(logits, labels=labels), logits, atol=1e-6)
    assert module.trained_modalities == ["skeleton"] and module.exported_encoder()[0] is module.encoder


def test_class_disjoint_variant_builds(episode_dataset: Path, rgb_export: Path, tmp_path: Path):
    """MMCL on the base classes of the source domain (the pretraining data module, validated on val
    episodes) instead of a protocol: the fc head and the text cover the 3 base classes only, so the
    novel classes of few-shot episodes stay unseen."""
    from mmfsar.data.text import read_class_text

    _, run = build_mmcl(
        episode_dataset, rgb_export, tmp_path, "data._target_=mmfsar.data.datamodules.PretrainDataModule",
        "~data.protocol", "data.val_episodes={n_way: 5, k_shot: 1, n_query: 2, episodes: 5, seed: 0}",
    )  # fmt: skip
    module, dm = run.module, run.datamodule
    assert module.encoder.head.out_features == 3 and dm.val_episodes is not None
    assert {r.split for r in dm.train_sets["source"].records} == {"base"} and "target" not in dm.train_sets
    text = read_class_text(episode_dataset, dm.base_classes).features
    assert torch.equal(module.refinement.class_text, torch.as_tensor(text))


def test_clear_errors_before_training(episode_dataset: Path, rgb_export: Path, tmp_path: Path):
    """No teacher, a dataset without text, two student streams: clear errors at build time."""
    with pytest.raises(ConfigError, match="model.teacher"):
        build_mmcl(episode_dataset, None, tmp_path / "a")
    no_text = Path(
        shutil.copytree(
            episode_dataset, tmp_path / "no_text", ignore=shutil.ignore_patterns("rgb", "flow", "depth", "pose")
        )
    )
    shutil.rmtree(no_text / "text")
    with pytest.raises(DataError, match=r"text/features\.npy not found"):
        build_mmcl(no_text, None, tmp_path / "b", "model.align_weight=0")
    _, run = build_mmcl(no_text, None, tmp_path / "c", "model.align_weight=0", "model.refine_weight=0", "~cache")
    assert run.module.frozen_models() == {} and run.module.refinement is None  # plain CE: neither needed
    with pytest.raises(ConfigError, match="one skeleton stream"):
        build_mmcl(
            episode_dataset,
            rgb_export,
            tmp_path / "d",
            "+modalities.skeleton_bone={_target_: mmfsar.data.modalities.Skeleton, stream: skeleton, derived: bone}",
        )


# ------------------------------------------------------------------ the RGB encoder stays frozen
@pytest.mark.parametrize("cache", ["frozen", "null"])
def test_rgb_encoder_stays_frozen(cache: str, episode_dataset: Path, rgb_export: Path, tmp_path: Path):
    """A few real training steps (Lightning, in process): the RGB encoder's weights and batch-norm
    statistics are unchanged, it is in no optimiser group and no checkpoint, it runs in ``eval()``;
    with ``cache=frozen`` it encodes each training clip once before the first step and never in a
    step (one call per batch of the caching pass), without a cache once per step."""
    _, run = build_mmcl(episode_dataset, rgb_export, tmp_path, "cache=frozen" if cache == "frozen" else "~cache")
    module, dm = run.module, run.datamodule
    teacher = module.frozen_models()["rgb"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    calls: list[bool] = []
    teacher.register_forward_hook(lambda mod, args, out: calls.append(mod.training))
    encoder_before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    steps = 3
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=run.callbacks, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    clips = len(dm.train_sets["source"])
    assert len(calls) == (math.ceil(clips / dm.eval_batch_size) if cache == "frozen" else steps)
    assert not any(calls), "the RGB encoder ran in training mode"
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the RGB encoder (weights or BN statistics) changed"
    assert not any(p.requires_grad for p in teacher.parameters())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert optimised >= {id(p) for p in module.encoder.parameters()} | {id(p) for p in module.alignment.parameters()}
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    keys = checkpoint(tmp_path / "c.ckpt")["state_dict"].keys()
    assert {k.split(".")[0] for k in keys} == {"encoder", "alignment", "refinement"}
    assert any(not torch.equal(encoder_before[k], v) for k, v in module.encoder.state_dict().items()), "nothing trained"
    if cache == "frozen":
        assert "rgb" not in dm.train_sets["source"].modalities  # the loader no longer reads the RGB clips
    assert list(dm.val_set.modalities) == ["skeleton"]  # validation never reads them


# ------------------------------------------------------------------ end to end, evaluated without rgb and text
def _without_rgb_and_text(root: Path, dest: Path) -> Path:
    """A copy of the dataset with no ``rgb/`` and ``text/`` folders and no rgb stream in meta.json."""
    copy = Path(shutil.copytree(root, dest, ignore=shutil.ignore_patterns("rgb", "text")))
    meta = json.loads((copy / "meta.json").read_text())
    del meta["modalities"]["rgb"]
    (copy / "meta.json").write_text(json.dumps(meta, indent=1))
    return copy


def test_train_then_evaluate_on_skeletons_alone(episode_dataset: Path, rgb_export: Path, tmp_path: Path):
    """``lit_main_pretrain.py experiment=mmcl_tiny/train`` (joint, 2 epochs) through the entry point,
    and a bone-stream model exported as it would; the exports hold the skeleton classifier alone and are
    evaluated on a copy of the dataset without RGB and text: the head's top-1 on the xsub test clips
    (equal to the exported checkpoint's validation), the two streams' logits averaged (checked by
    hand), and 5-way 1-shot episodes."""
    from mmfsar.tasks.pipelines import export_trained

    home, runs = tmp_path / "home", {"joint": tmp_path / "joint", "bone": tmp_path / "bone"}
    run_entry(
        "lit_main_pretrain.py", "experiment=mmcl_tiny/train", f"model.teacher={rgb_export}",
        f"hydra.run.dir={runs['joint']}", "data.batch_size=16",
        *[o for o in tiny(episode_dataset, batches=None, epochs=2) if not o.startswith("data.val_episodes")],
        home=home,
    )  # fmt: skip
    rows = list(csv.DictReader((runs["joint"] / "csv" / "metrics.csv").open()))
    val = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(val) == 2 and {"train/ce", "train/refine_ce", "train/align"} <= set(rows[0])
    # the second stream, as the entry point would export it (untrained: only the averaging is checked)
    bone_cfg, bone = build_mmcl(episode_dataset, rgb_export, runs["bone"], "modality=skeleton_bone")
    export_trained(bone_cfg, bone)
    for stream, run in runs.items():
        payload = load_export(run / "encoder.pt")
        assert list(payload["modalities"]) == [{"joint": "skeleton", "bone": "skeleton_bone"}[stream]]
        assert payload["encoder"]["num_classes"] == 13 and "classifier" not in payload
        assert {k.split(".")[0] for k in payload["state_dict"]} == {"backbone", "head"}  # no RGB MLP, no text gate

    bare = _without_rgb_and_text(episode_dataset, tmp_path / "skeleton_only")
    files = [runs["joint"] / "encoder.pt", runs["bone"] / "encoder.pt"]
    run_entry(
        "lit_main_eval.py", "--config-name", "eval_protocol", "protocol=head", "data=folder", f"data.root={bare}",
        f"encoder=[{','.join(map(str, files))}]", f"hydra.run.dir={tmp_path / 'head'}", "data.num_workers=0",
        "++trainer.enable_progress_bar=false", home=home,
    )  # fmt: skip
    head = json.loads((tmp_path / "head" / "results.json").read_text())
    assert head["classifier"] == "TrainedHead" and head["test_clips"] == 52 and head["streams"] == 2
    assert head["per_stream"][0]["top1"] == pytest.approx(max(val), abs=1e-3)  # the checkpoint's own validation
    assert head["top1"] == pytest.approx(_averaged_logits_top1(bare, files), abs=1e-3)

    run_entry("lit_main_eval.py", *eval_overrides(bare, files[0], tmp_path / "fewshot"), home=home)
    fewshot = json.loads((tmp_path / "fewshot" / "results.json").read_text())
    assert (
        fewshot["setting"] == "5-way 1-shot" and fewshot["modalities"] == ["skeleton"] and 0 <= fewshot["mean"] <= 100
    )
    print(
        "val/acc",
        val,
        "head top-1",
        head["per_stream"][0]["top1"],
        "two streams",
        head["top1"],
        "1-shot",
        fewshot["mean"],
    )


def _averaged_logits_top1(root: Path, files: list[Path]) -> float:
    """Top-1 (%) of the mean of the exports' logits on the xsub test clips, computed here."""
    from hydra.utils import instantiate

    from mmfsar.data.datamodules import ProtocolDataModule
    from mmfsar.data.modalities import build_modalities

    payloads = [load_export(f) for f in files]
    modalities = {m: cfg for p in payloads for m, cfg in p["modalities"].items()}
    frames = instantiate(payloads[0]["frames"])
    dm = ProtocolDataModule(root=root, modalities=build_modalities(modalities), frames=frames,
                            protocol="xsub", val_episodes=None, num_workers=0, eval_batch_size=64)  # fmt: skip
    dm.setup()
    encoders = [build_encoder(p).eval() for p in payloads]
    hits = total = 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits = torch.stack([e({m: batch[m] for m in e.modalities}).logits for e in encoders]).mean(0)
            hits += int((logits.argmax(1) == batch["label"]).sum())
            total += len(batch["label"])
    return 100.0 * hits / total


# ------------------------------------------------------------------ the generator's text features
def test_generator_text_features_are_deterministic(tiny_dataset: Path, tmp_path: Path):
    """The same generator settings in another process (another Python hash seed), writing the
    skeleton stream only, give byte-identical class text: descriptions, features and their info."""
    code = (
        "import sys; from mmfsar.data.synthetic import SyntheticConfig, generate; "
        f"s = {TINY_SETTINGS!r}; "
        "generate(SyntheticConfig(**s, formats={'skeleton': 'npy'}), sys.argv[1], workers=1, progress=False)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "again")], check=True, cwd=REPO_ROOT, env=env, timeout=300
    )
    for name in ("descriptions.csv", "features.npy", "features.json"):
        assert (tmp_path / "again" / "text" / name).read_bytes() == (tiny_dataset / "text" / name).read_bytes(), name
    features = np.load(tiny_dataset / "text" / "features.npy")
    assert features.shape[0] == 7 and np.isfinite(features).all() and len(np.unique(features, axis=0)) == 7


# ------------------------------------------------------------------ the benchmark runs
def test_bench_mmcl_runs(episode_dataset: Path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_mmcl.py"), "--tiny", "--root", str(episode_dataset)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])["mmcl"]
    assert report["mmcl_step_ms"] > 0 and report["plain_step_ms"] > 0 and report["rgb_cache_s"] >= 0
    assert report["rgb_encoder"] == "FrameSubsampled" and report["frames"] == 16 and report["batch_size"] == 4


# ------------------------------------------------------------------ CTR-GCN (the paper's encoder) and the paper preset
def test_ctrgcn_partitions_by_hand():
    """A star (0 joined to 1 and 2) plus a tail 2-3, root 0: inward = child -> parent
    (A[1, parent, child]); the outward part is its transpose, columns divided by their sums
    (joint 0 sends to two children: ½ each)."""
    from mmfsar.models.encoders.ctrgcn import ctrgcn_partitions

    a = ctrgcn_partitions(4, [[0, 1], [0, 2], [2, 3]], root=0)
    inward = torch.zeros(4, 4)
    inward[0, 1] = inward[0, 2] = inward[2, 3] = 1.0
    outward = torch.zeros(4, 4)
    outward[1, 0] = outward[2, 0] = 0.5
    outward[3, 2] = 1.0
    assert torch.equal(a[0], torch.eye(4)) and torch.equal(a[1], inward) and torch.equal(a[2], outward)
    assert torch.equal(ctrgcn_partitions(4, [[0, 1], [0, 2], [2, 3]], root=None), a)  # the centre of this graph is 0
    with pytest.raises(ValueError, match="root"):
        ctrgcn_partitions(4, [[0, 1]], root=7)


def test_ctrgcn_topology_refinement_by_hand():
    """One CTR-GC: with α = 0 the output is A ⋅ ξ(x); with α = 1 the channel-wise topology
    conv4(tanh(φ(x̄)_u − ψ(x̄)_v)) is added to A, computed here joint pair by joint pair."""
    from mmfsar.models.encoders.ctrgcn import ChannelTopologyConv

    torch.manual_seed(0)
    conv = ChannelTopologyConv(3, 4)
    x, adj = torch.randn(2, 3, 5, 3), torch.rand(3, 3)
    xi = torch.einsum("oc,nctv->notv", conv.xi.weight[:, :, 0, 0], x) + conv.xi.bias[None, :, None, None]
    expected0 = torch.einsum("uv,nctv->nctu", adj, xi)
    assert torch.allclose(conv(x, adj, torch.zeros(1)), expected0, atol=1e-5)
    q = torch.einsum("rc,nctv->nrtv", conv.phi.weight[:, :, 0, 0], x).mean(2) + conv.phi.bias[None, :, None]
    k = torch.einsum("rc,nctv->nrtv", conv.psi.weight[:, :, 0, 0], x).mean(2) + conv.psi.bias[None, :, None]
    topo = torch.empty(2, 4, 3, 3)
    for u in range(3):
        for v in range(3):
            topo[:, :, u, v] = (
                torch.tanh(q[:, :, u] - k[:, :, v]) @ conv.expand.weight[:, :, 0, 0].t() + conv.expand.bias
            )
    assert torch.allclose(conv(x, adj, torch.ones(1)), torch.einsum("ncuv,nctv->nctu", topo + adj, xi), atol=1e-5)


def test_ctrgcn_paper_size():
    """The reference network on NTU-25 with a 120-class fc: 1.46 M parameters (CTR-GCN's paper);
    64 frames -> 16 time steps of 256-d features; two persons averaged."""
    from mmfsar.data.skeleton import NTU25
    from mmfsar.models.encoders.ctrgcn import CTRGCN

    net = CTRGCN(in_channels=3, num_frames=64, num_joints=25, edges=NTU25.edges, root=20)
    head = nn.Linear(net.feature_dim, 120)
    assert round(sum(p.numel() for p in [*net.parameters(), *head.parameters()]) / 1e6, 2) == 1.46
    net.eval()
    x = torch.randn(2, 3, 64, 25, 2)
    out = net(x)
    assert out.frames.shape == (2, 16, 256) and torch.allclose(out.pooled, out.frames.mean(1))
    with pytest.raises(ValueError, match="expects skeletons"):
        net(torch.randn(2, 3, 64, 25, 1))


def test_paper_preset_builds(episode_dataset: Path, rgb_export: Path, tmp_path: Path):
    """``experiment=mmcl/train`` on the small dataset (its xsub protocol, 15-joint layout, 16 frames):
    CTR-GCN, SGD with the step schedule (×0.1 at 90 and 100 of 110 epochs), batch 200, no flip."""
    from mmfsar.tasks.schedules import StepDecaySchedule

    cfg = compose_pretrain(
        ["experiment=mmcl/train", f"data.root={episode_dataset}", f"model.teacher={rgb_export}", "data.protocol=xsub",
         "model.encoder.root=null", "data.frames.num_frames=16", "data.num_workers=0"], tmp_path,
    )  # fmt: skip
    assert cfg.data.batch_size == 200 and cfg.data.augmentation.flip_prob == 0 and cfg.trainer.max_epochs == 110
    from mmfsar.tasks.pipelines import build_training

    module = build_training(cfg).module
    assert type(module.encoder.backbone).__name__ == "CTRGCN" and module.encoder.feature_dim == 256
    assert module.alignment.proj_dim == 256 and isinstance(module.alignment.skeleton_proj, nn.Identity)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = module.optim.scheduler(opt, t_initial=105, warmup_t=5, warmup_lr_init=0.02, lr_min=0.0)
    assert isinstance(sched, StepDecaySchedule)
    lrs = []
    for t in range(110):
        sched.step_update(num_updates=t)
        lrs.append(opt.param_groups[0]["lr"])
    assert (
        lrs[5:89] == [pytest.approx(0.1)] * 84
        and lrs[90:99] == [pytest.approx(0.01)] * 9
        and lrs[-1] == pytest.approx(1e-3)
    )

"""IKEM end to end (issue #17): the MoCo step of the contrastive module (momentum update, no
gradient into the key encoder, the queue holding the last K keys in order), cross-modal positive
mining and the knowledge exchange on hand-made embeddings, the relational KD term against a hand
computation, the two-view data option, multi-stream exports, the presets, the contrastive stage
on two CPU DDP processes (one consistent queue), and the whole tiny pipeline through the entry
points (stage 1 -> distillation -> linear evaluation and few-shot episodes)."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import CONFIG_DIR, REPO_ROOT, run_entry, tiny
from torch import nn

from mmfsar.errors import ConfigError
from mmfsar.losses.contrastive import KnowledgeExchange, relational_kd_logits
from mmfsar.losses.distill import DistillBatch, DistillSpec
from mmfsar.losses.relational_kd import RelationalKD
from mmfsar.models.base import EncoderOutput, ModalityEncoder, export_encoder, load_export
from mmfsar.models.multistream import MultiStreamEncoder, ProjectionMLP, combine_exports
from mmfsar.tasks.common import Optimization
from mmfsar.tasks.contrastive import ContrastivePretrainModule, TeacherStream, loo_nn_accuracy

SIX = [
    "skeleton",
    "skeleton_motion",
    "skeleton_bone",
    "skeleton_acceleration",
    "skeleton_rotation_axis",
    "skeleton_angular_velocity",
]


class TinyBackbone(nn.Module):
    """A linear 'encoder' without batch norm or dropout: a key recomputed after a step is the one
    the step enqueued."""

    def __init__(self, in_dim: int = 4, dim: int = 3) -> None:
        super().__init__()
        self.feature_dim = dim
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, x: torch.Tensor, **kwargs) -> EncoderOutput:
        f = self.proj(x)
        return EncoderOutput(pooled=f, frames=f[:, None])


def tiny_module(modalities=("a",), *, key_dim=3, **kwargs) -> ContrastivePretrainModule:
    torch.manual_seed(0)
    encoders = {
        m: ModalityEncoder(modality=m, backbone=TinyBackbone(), num_classes=key_dim, head=ProjectionMLP)
        for m in modalities
    }
    optim = Optimization(optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    return ContrastivePretrainModule(
        encoders=encoders, encoder_configs={m: {} for m in modalities}, optim=optim, **kwargs
    )


def two_view_batch(seed: int, modalities=("a",), b: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "source": {
            **{m: torch.randn(b, 2, 4, generator=g) for m in modalities},
            "label": torch.zeros(b, dtype=torch.long),
            "index": torch.arange(b),
        }
    }


# --------------------------------------------------------------------------- MoCo step


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_moco_step_momentum_update_no_key_gradient_and_queue_order():
    module = tiny_module(queue_size=5, momentum=0.75, temperature=0.5)
    query, key = module.encoders["a"], module.key_encoders["a"]
    assert all(not p.requires_grad for p in key.parameters())
    with torch.no_grad():  # make the query encoder differ from its momentum copy
        for p in query.parameters():
            p.add_(1.0)
    before_k = {n: p.clone() for n, p in key.named_parameters()}
    before_q = {n: p.clone() for n, p in query.named_parameters()}
    initial_queue = module.queues["a"].keys.clone()

    batch = two_view_batch(0)
    # the loss of the step: InfoNCE of the query view against its key and the queue *before* the step
    loss = module.training_step(batch, 0)
    loss.backward()

    for name, p in key.named_parameters():  # theta_k <- 0.75 theta_k + 0.25 theta_q, and no gradient
        assert torch.allclose(p, 0.75 * before_k[name] + 0.25 * before_q[name]), name
        assert p.grad is None, name
    assert all(p.grad is not None for p in query.parameters())
    with torch.no_grad():
        k = F.normalize(key({"a": batch["source"]["a"][:, 1]}).logits, dim=1)
        q = F.normalize(query({"a": batch["source"]["a"][:, 0]}).logits, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ initial_queue.T], 1) / 0.5
    assert math.isclose(loss.item(), F.cross_entropy(logits, torch.zeros(2, dtype=torch.long)).item(), rel_tol=1e-5)

    # three steps of 2 keys into a queue of 5: it holds the last 5 keys, oldest first
    keys = [k]
    for step in (1, 2):
        batch = two_view_batch(step)
        module.training_step(batch, step)
        with torch.no_grad():
            keys.append(F.normalize(key({"a": batch["source"]["a"][:, 1]}).logits, dim=1))
    queue = module.queues["a"]
    assert int(queue.ptr) == 6 % 5
    assert torch.allclose(queue.ordered(), torch.cat(keys)[1:], atol=1e-6)
    assert torch.allclose(
        torch.cat(list(module.last_keys.values())),
        keys[-1] * module.last_keys["a"].norm(dim=1, keepdim=True),
        atol=1e-6,
    )


def test_momentum_one_keeps_the_key_encoder_fixed():
    module = tiny_module(queue_size=4, momentum=1.0)
    frozen = {n: p.clone() for n, p in module.key_encoders["a"].named_parameters()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in module.encoders["a"].parameters():
            p.mul_(3.0)
        module.training_step(two_view_batch(0), 0)
    assert all(torch.equal(p, frozen[n]) for n, p in module.key_encoders["a"].named_parameters())


# --------------------------------------------------------------------------- cross-modal stage


def _hand_outputs(q_a, q_b, f=None):
    f = f or {}
    return {
        "a": EncoderOutput(
            pooled=f.get("a", torch.zeros(1, 3)), frames=torch.zeros(1, 1, 3), logits=torch.tensor([q_a])
        ),
        "b": EncoderOutput(
            pooled=f.get("b", torch.zeros(1, 3)), frames=torch.zeros(1, 1, 3), logits=torch.tensor([q_b])
        ),
    }


def test_cross_modal_positive_mining_on_hand_made_embeddings():
    """Modality a's extra positive is the queue entry nearest to the clip in modality *b*'s
    embedding (entry 1), not in a's own (entry 0), and vice versa; T = 1, top-1, context on."""
    module = tiny_module(
        ("a", "b"), key_dim=2, queue_size=3, temperature=1.0, warmup_epochs=0, knowledge_exchange=False
    )
    module.queues["a"].keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    module.queues["b"].keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    keys = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, 1.0]])}
    terms = module.contrastive_losses(_hand_outputs([2.0, 0.0], [0.0, 3.0]), keys)  # norms do not matter
    assert set(terms) == {"a/crossclr", "b/crossclr"}
    # a: q_a.k_a = 1; q_a.Q_a = [1, 0, 0.6]; q_b.Q_b = [0, 1, 0] -> context = [0, 0, 0]
    #    logits [1 | 1, 0, 0.6 | 0, 0, 0], positives: column 0 and entry 1 (b's neighbour) in both blocks
    #    loss = logsumexp - (1 + 0 + 0) / 3
    lse_a = math.log(2 * math.e + math.exp(0.6) + 4)
    assert math.isclose(terms["a/crossclr"].item(), lse_a - 1 / 3, rel_tol=1e-6)
    # b: q_b.k_b = 1; q_b.Q_b = [0, 1, 0]; q_a.Q_a = [1, 0, 0.6] -> context = [0, 0, 0]
    #    logits [1 | 0, 1, 0 | 0, 0, 0], positives: column 0 and entry 0 (a's neighbour): values 1, 0, 0
    lse_b = math.log(2 * math.e + 5)
    assert math.isclose(terms["b/crossclr"].item(), lse_b - 1 / 3, rel_tol=1e-6)


def test_warm_up_then_knowledge_exchange():
    module = tiny_module(("a", "b"), key_dim=2, queue_size=3, temperature=0.5, warmup_epochs=1)
    outputs = _hand_outputs(
        [1.0, 0.0], [0.0, 1.0], {"a": torch.tensor([[1.0, 2.0, 3.0]]), "b": torch.tensor([[0.0, 1.0, 0.0]])}
    )
    keys = {"a": torch.tensor([[0.6, 0.8]]), "b": torch.tensor([[0.0, 1.0]])}
    assert not module.cross_modal and set(module.contrastive_losses(outputs, keys)) == {
        "a/moco",
        "b/moco",
    }  # epoch 0 < 1
    module.warmup_epochs = 0
    terms = module.contrastive_losses(outputs, keys)
    assert set(terms) == {"a/crossclr", "b/crossclr", "a/exchange", "b/exchange"}
    queues = {m: module.queues[m].keys for m in "ab"}
    expected = module.exchange({m: outputs[m].pooled for m in "ab"}, keys, queues)
    assert all(torch.allclose(terms[f"{m}/exchange"], expected[m]) for m in "ab")
    assert (
        isinstance(module.exchange, KnowledgeExchange) and module.exchange.heads["a"][-1].out_features == 4
    )  # 2 modalities x key 2
    single = tiny_module(("a",), warmup_epochs=0)
    assert single.exchange is None and not single.cross_modal  # one modality: plain MoCo


def test_contrastive_module_errors():
    with pytest.raises(ConfigError, match="projection head"):
        ContrastivePretrainModule(
            encoders={"a": ModalityEncoder(modality="a", backbone=TinyBackbone())},
            encoder_configs={"a": {}},
            optim=Optimization(optimizer=torch.optim.SGD),
        )
    with pytest.raises(ConfigError, match="same size"):
        encoders = {
            m: ModalityEncoder(modality=m, backbone=TinyBackbone(), num_classes=n, head=ProjectionMLP)
            for m, n in (("a", 2), ("b", 3))
        }
        ContrastivePretrainModule(
            encoders=encoders, encoder_configs={"a": {}, "b": {}}, optim=Optimization(optimizer=torch.optim.SGD)
        )
    with pytest.raises(ConfigError, match="needs a projection head|no projection head"):
        TeacherStream(ModalityEncoder(modality="a", backbone=TinyBackbone()), feature="projection", source="'a' (x.pt)")


def test_loo_nearest_neighbour_accuracy():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.8, 0.2]])
    labels = torch.tensor([0, 0, 1, 0, 1])
    # cosines: cos(0,1) = 0.9939 > cos(1,4) = 0.9910 > cos(0,4) = 0.9701; cos(2,3) = 0.9939
    # nearest other clip: 0->1, 1->0, 2->3, 3->2, 4->1; labels agree for 0 and 1 only: 2 of 5
    assert loo_nn_accuracy(feats, labels) == pytest.approx(40.0)
    assert loo_nn_accuracy(feats * torch.tensor([[3.0], [1.0], [2.0], [5.0], [0.5]]), labels) == pytest.approx(
        40.0
    )  # cosine


# --------------------------------------------------------------------------- relational KD term


def test_relational_kd_term_logits_mask_and_loss_by_hand():
    """Two teacher modalities x, y (2-d), B = 1, K = 2, T = 1, the student's head the identity."""
    spec = DistillSpec(student_dim=4, teacher_dims={"x": 2, "y": 2}, num_classes=0)
    term = RelationalKD(spec=spec, queue_size=2, temperature=1.0)
    term.relational.heads["student"] = nn.Identity()
    rkd = term.relational
    rkd.queues["x"].keys = torch.tensor([[0.6, 0.8], [1.0, 0.0]])  # q_x.Q_x = [0.6, 1]: top-1 entry 1
    rkd.queues["y"].keys = torch.tensor([[0.0, 1.0], [0.6, 0.8]])  # q_y.Q_y = [1, 0.8]: top-1 entry 0
    rkd.teacher_queue.keys = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    q_x, q_y = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.5]])
    t = torch.tensor([[1.0, 0.0, 0.0, 1.0]]) / math.sqrt(2)  # normalize(cat(normalize(q_x), normalize(q_y)))
    s = t.clone().requires_grad_()  # the student agrees with the teacher: s.t = 1, s.Q_T = [a, a], a = 1/sqrt 2
    a = 1 / math.sqrt(2)
    logits, mask = relational_kd_logits(s, t, rkd.teacher_queue.keys, q_x, rkd.queues["x"].keys, 1.0)
    # [s.t | s.Q_T | (q_x.Q_x) * (s.Q_T)] = [1 | a, a | 0.6 a, a]; positives: 0 and entry 1 in both blocks
    assert torch.allclose(logits, torch.tensor([[1.0, a, a, 0.6 * a, a]]))
    assert mask.tolist() == [[True, False, True, False, True]]
    loss_x = math.log(math.e + 3 * math.exp(a) + math.exp(0.6 * a)) - (1 + 2 * a) / 3
    # y: [1 | a, a | a, 0.8 a], positives: 0 and entry 0
    loss_y = math.log(math.e + 3 * math.exp(a) + math.exp(0.8 * a)) - (1 + 2 * a) / 3
    teachers = {
        "x": EncoderOutput(pooled=q_x, frames=q_x[:, None]),
        "y": EncoderOutput(pooled=q_y, frames=q_y[:, None]),
    }
    loss = term(
        DistillBatch(student=EncoderOutput(pooled=s, frames=s[:, None]), teachers=teachers, labels=torch.tensor([-1]))
    )
    assert math.isclose(loss.item(), (loss_x + loss_y) / 2, rel_tol=1e-6)
    loss.backward()
    assert s.grad is not None
    # the teachers' features of the batch entered the queues, in lock-step
    assert int(rkd.teacher_queue.ptr) == int(rkd.queues["x"].ptr) == 1
    assert torch.allclose(rkd.teacher_queue.keys[0], t[0]) and torch.allclose(
        rkd.queues["x"].keys[0], torch.tensor([1.0, 0.0])
    )


# --------------------------------------------------------------------------- data and exports


def test_augmented_views_are_distinct_fixed_views(episode_dataset: Path, make_modalities):
    from mmfsar.data.transforms import ClipAugmentation
    from mmfsar.data.views import AugmentedViews, MultiViewProtocolDataModule

    dm = MultiViewProtocolDataModule(
        root=episode_dataset,
        modalities=make_modalities("skeleton", "skeleton_bone"),
        protocol="xsub",
        train_views=2,
        num_workers=0,
        batch_size=4,
        augmentation=ClipAugmentation(shear=0.5),
    )
    dm.setup()
    loader = dm.train_dataloader()["source"]
    assert isinstance(loader.dataset, AugmentedViews)
    batch = next(iter(loader))
    assert batch["skeleton"].shape[:2] == (4, 2) and batch["label"].shape == (4,)
    assert not torch.equal(batch["skeleton"][:, 0], batch["skeleton"][:, 1])  # two augmentations
    # with the frozen-output cache's fixed views: two distinct views, each exactly that view's load
    ds = dm.train_sets["source"]
    ds.views, ds.view_seed = 3, 7
    item = AugmentedViews(ds, 2)[5]
    assert item["view"].shape == (2,) and item["view"][0] != item["view"][1]
    for v in range(2):
        frames, params = ds.draw(ds.records[5], int(item["view"][v]))
        for m in ("skeleton", "skeleton_bone"):
            assert torch.allclose(item[m][v], ds.modalities[m](ds.records[5], frames, params))
    ds.views = 1
    with pytest.raises(ConfigError, match="cache.views >= 2"):
        AugmentedViews(ds, 2)[0]


def test_multistream_encoder_and_combined_exports(tmp_path: Path):
    torch.manual_seed(0)
    streams = {
        m: ModalityEncoder(modality=m, backbone=TinyBackbone(dim=2), num_classes=3, head=ProjectionMLP)
        for m in ("a", "b")
    }
    enc = MultiStreamEncoder(streams=streams)
    x = {"a": torch.randn(5, 4), "b": torch.randn(5, 4)}
    out = enc(x)
    pa, pb = streams["a"](x).pooled, streams["b"](x).pooled
    # normalize(cat(normalize(a), normalize(b))) = cat(unit a, unit b) / sqrt 2
    assert torch.allclose(
        out.pooled, torch.cat([F.normalize(pa, dim=1), F.normalize(pb, dim=1)], 1) / math.sqrt(2), atol=1e-6
    )
    assert enc.modalities == ["a", "b"] and enc.feature_dim == 4 and out.logits is None

    def cfg(m: str) -> dict:
        return {
            "_target_": "mmfsar.models.base.ModalityEncoder",
            "modality": m,
            "num_classes": 3,
            "backbone": {"_target_": "test_ikem.TinyBackbone", "dim": 2},
            "head": {"_target_": "mmfsar.models.multistream.ProjectionMLP", "_partial_": True},
        }

    paths = {
        m: export_encoder(
            tmp_path / f"{m}.pt", streams[m], encoder_config=cfg(m), modalities={m: {"k": 1}}, frames={"n": 8}
        )
        for m in "ab"
    }
    combined = combine_exports(paths, tmp_path / "ab.pt")
    payload = load_export(combined)
    assert payload["modalities"] == {"a": {"k": 1}, "b": {"k": 1}} and payload["feature_dim"] == 4
    from mmfsar.models.base import build_encoder

    assert torch.allclose(build_encoder(payload)(x).pooled, out.pooled, atol=1e-6)
    # the command line (module run as __main__) writes the same importable target
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cli = tmp_path / "cli.pt"
    args = [sys.executable, "-m", "mmfsar.models.multistream", str(cli), *(f"{m}={paths[m]}" for m in "ab")]
    subprocess.run(args, check=True, env=env, capture_output=True, timeout=120)
    assert load_export(cli)["encoder"]["_target_"] == "mmfsar.models.multistream.MultiStreamEncoder"
    assert torch.allclose(build_encoder(cli)(x).pooled, out.pooled, atol=1e-6)
    bad = export_encoder(
        tmp_path / "c.pt", streams["a"], encoder_config=cfg("a"), modalities={"a": {"k": 2}}, frames={"n": 8}
    )
    with pytest.raises(ConfigError, match="other settings"):
        combine_exports({"a": paths["a"], "c": bad}, tmp_path / "bad.pt")


# --------------------------------------------------------------------------- presets


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("method", ["ikem_tiny", "ikem"])
def test_ikem_presets_build_stage_after_stage(method, tiny_dataset, tmp_path):
    """Every stage of the preset on the tiny dataset: modules built (the distillation's from the
    teacher's export), exported, then linear and few-shot evaluation built on the student."""
    from mmfsar.tasks.pipelines import build_evaluation, build_training, export_trained

    data = ["data=folder", f"data.root={tiny_dataset}", "data.num_workers=0", "data.protocol=xsub", "data.batch_size=4"]
    exports = {}
    for stage, entry in (("pretrain", "pretrain"), ("teacher", "pretrain")):
        cfg = _compose(entry, [f"experiment={method}/{stage}", *data, f"paths.output_dir={tmp_path / stage}"])
        run = build_training(cfg)
        assert isinstance(run.module, ContrastivePretrainModule) and run.datamodule.train_views == 2
        exports[stage] = export_trained(cfg, run)
    assert sorted(load_export(exports["teacher"])["modalities"]) == sorted(SIX)
    assert run.module.exchange is not None and run.module.warmup_epochs > 0
    cfg = _compose(
        "distill",
        [
            f"experiment={method}/distill",
            *data,
            f"model.teachers.ikem={exports['teacher']}",
            "model.student_modality=skeleton_bone",
            f"paths.output_dir={tmp_path / 'student'}",
        ],
    )
    run = build_training(cfg)
    assert sorted(run.module.frozen_models()) == sorted(SIX) and run.module.two_views
    assert list(run.module.terms) == ["relational"] and run.module.trained_modalities == ["skeleton_bone"]
    # one step with the teachers run on the batch (no frozen-output cache set up): a finite loss, a student gradient
    batch = {"source": next(iter(run.datamodule.train_dataloader()["source"]))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = run.module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in run.module.student.parameters() if p.requires_grad)
    student = export_trained(cfg, run)
    evaluation = _compose(
        "eval",
        [
            f"experiment={method}/eval",
            f"encoder={student}",
            *data[:3],
            "fewshot.n_way=2",
            "fewshot.n_query=1",
            "fewshot.episodes=2",
            f"paths.output_dir={tmp_path / 'eval'}",
        ],
    )
    _, _, module = build_evaluation(evaluation)
    assert (
        module.encoder.modalities == ["skeleton_bone"]
        and type(module.classifier).__name__ == "LogisticRegressionClassifier"
    )


def test_contrastive_stage_needs_two_views(tiny_dataset, tmp_path):
    from mmfsar.tasks.pipelines import build_training

    cfg = _compose(
        "pretrain",
        [
            "experiment=ikem_tiny/pretrain",
            "data=folder",
            f"data.root={tiny_dataset}",
            "data.num_workers=0",
            "data.train_views=1",
            f"paths.output_dir={tmp_path}",
        ],
    )
    with pytest.raises(ConfigError, match="two augmented views"):
        build_training(cfg)


# --------------------------------------------------------------------------- entry points


def _protocol_tiny(root: Path, **kwargs) -> list[str]:
    return [o for o in tiny(root, **kwargs) if not o.startswith("data.val_episodes")]


def test_contrastive_stage_on_two_ddp_processes_keeps_one_queue(episode_dataset: Path, tmp_path: Path, monkeypatch):
    """Two CPU processes, joint + motion with the cross-modal stage from the first step: every
    rank ends with the same queues, the pointer advanced by both ranks' keys, and the newest keys,
    oldest first, are rank 0's then rank 1's keys of the last step."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    probe = tmp_path / "probe"
    run_entry(
        "lit_main_pretrain.py",
        "experiment=ikem_tiny/pretrain",
        "modality=[skeleton,skeleton_motion]",
        "modalities.skeleton_motion.persons=1",
        "model.warmup_epochs=0",
        "model.queue_size=64",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        *_protocol_tiny(episode_dataset, batches=5),
        "data.batch_size=8",
        "data.frames.num_frames=8",
        "+callbacks.queue_probe._target_=ikem_queue_probe.QueueProbe",
        f"+callbacks.queue_probe.out={probe}",
        home=tmp_path / "home",
        timeout=900,
    )
    ranks = [torch.load(probe / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["global_step"] == ranks[1]["global_step"] == 5
    for m in ("skeleton", "skeleton_motion"):
        q0, q1 = ranks[0]["queues"][m], ranks[1]["queues"][m]
        assert torch.equal(q0["keys"], q1["keys"]) and q0["ptr"] == q1["ptr"] == (5 * 2 * 8) % 64
        ordered = torch.roll(q0["keys"], -q0["ptr"], 0)
        newest = torch.cat([F.normalize(r["last_keys"][m], dim=1) for r in ranks])
        assert torch.allclose(ordered[-16:], newest, atol=1e-5)
        assert not torch.allclose(newest[:8], newest[8:])  # the ranks saw different clips
    assert (tmp_path / "run" / "encoder.pt").is_file()


def test_tiny_pipeline_through_the_entry_points(episode_dataset: Path, tmp_path: Path):
    """Stage 1 (the six modalities, cross-modal from epoch 0) -> a distilled bone student (teachers
    cached over 2 views) -> linear evaluation of the student with the teacher as a two-encoder
    multi-stream model (scores averaged), and few-shot episodes of the student."""
    home, common = (
        tmp_path / "home",
        [*_protocol_tiny(episode_dataset, batches=2), "data.batch_size=8", "data.frames.num_frames=8"],
    )
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    run_entry(
        "lit_main_pretrain.py",
        "experiment=ikem_tiny/teacher",
        "model.warmup_epochs=0",
        "model.queue_size=32",
        f"hydra.run.dir={teacher}",
        *common,
        home=home,
    )
    assert sorted(load_export(teacher / "encoder.pt")["modalities"]) == sorted(SIX)
    out = run_entry(
        "lit_main_distill.py",
        "experiment=ikem_tiny/distill",
        f"model.teachers.ikem={teacher / 'encoder.pt'}",
        "model.student_modality=skeleton_bone",
        "distill.losses.relational.queue_size=32",
        "cache.views=2",
        f"hydra.run.dir={student}",
        *common,
        home=home,
    )
    assert "exported encoder" in out and list(load_export(student / "encoder.pt")["modalities"]) == ["skeleton_bone"]
    files = f"{student / 'encoder.pt'},{teacher / 'encoder.pt'}"
    run_entry(
        "lit_main_eval.py",
        "--config-name",
        "eval_protocol",
        "data=folder",
        f"data.root={episode_dataset}",
        f"encoder=[{files}]",
        f"hydra.run.dir={tmp_path / 'linear'}",
        "data.num_workers=0",
        "++trainer.enable_progress_bar=false",
        home=home,
    )
    linear = json.loads((tmp_path / "linear" / "results.json").read_text())
    assert linear["streams"] == 2 and linear["classifier"] == "LinearProbe" and 0 <= linear["top1"] <= 100
    run_entry(
        "lit_main_eval.py",
        "experiment=ikem_tiny/eval",
        "data=folder",
        f"data.root={episode_dataset}",
        f"encoder={student / 'encoder.pt'}",
        "fewshot.n_query=5",
        "fewshot.episodes=20",
        f"hydra.run.dir={tmp_path / 'fewshot'}",
        "data.num_workers=0",
        "++trainer.enable_progress_bar=false",
        home=home,
    )
    fewshot = json.loads((tmp_path / "fewshot" / "results.json").read_text())
    assert (
        fewshot["modalities"] == ["skeleton_bone"]
        and fewshot["episodes"] == 20
        and fewshot["setting"] == "5-way 1-shot"
    )


def test_bench_contrastive_runs(episode_dataset: Path):
    from test_benchmarks import run_benchmark

    report = run_benchmark("bench_contrastive.py", "--root", str(episode_dataset))
    assert report["contrastive_step_ms"] > 0 and report["plain_step_ms"] > 0 and "contrastive_over_plain" in report

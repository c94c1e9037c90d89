"""CLIP-MDMF end to end: the CLIP towers as one exported encoder (local weights only), the tiny CLIP
pretraining, the episodic module, the matching head as a few-shot classifier bound to the
evaluated classes' texts, the presets, and the chain pretrain -> CLIP-MDMF -> lit_main_eval.py.

The head's pieces (prompt scores and sampling, the views' receptive fields, the fusion, the mutual
distillation by hand) are tested in ``test_clip_mdmf.py``; the towers' loading in ``test_clip.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from helpers import CONFIG_DIR, run_entry, tiny
from mmfsar.errors import ConfigError
from mmfsar.fewshot.clip_mdmf import ClipMDMFClassifier
from mmfsar.models.clip_mdmf import mutual_distillation_loss, select_prompts
from mmfsar.models.encoders.clip import TINY_CLIP_MODEL, load_open_clip

pytest_plugins = ["conftest_training"]

PRETRAIN_TASKS = "model.episodes={n_way: 3, k_shot: 1, n_query: 1, episodes: 2, seed: 0}"
MDMF_TASKS = "model.episodes={n_way: 3, k_shot: 1, n_query: 2, episodes: 3, seed: 0}"


def compose_pretrain(overrides: list[str], out: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="pretrain", overrides=[*overrides, f"paths.output_dir={out}"])


def data(root: Path) -> list[str]:
    return ["data=folder", f"data.root={root}", "data.num_workers=0", "data.val_episodes={n_way: 5, k_shot: 1, n_query: 2, episodes: 4, seed: 0}"]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CLIP, saved by the test as a plain open_clip state dict (no hub, no download)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip_weights") / "tiny_clip.pt"
    torch.save(load_open_clip(TINY_CLIP_MODEL, None).state_dict(), path)
    return path


# --------------------------------------------------------------------------- weights from a local file


def test_a_checkpoint_written_by_the_test_loads_through_model_clip_pretrained(clip_file, episode_dataset, tmp_path):
    """model=clip_mdmf model.clip.pretrained=<file>: both towers hold the file's weights, the frame
    features are CLIP's image embeddings of each frame, and the base classes' text features are the
    text embeddings of "a photo of <name>" (the model's default prompt), unit norm."""
    from mmfsar.tasks.pipelines import build_training

    cfg = compose_pretrain(["model=clip_mdmf", f"model.clip.pretrained={clip_file}", MDMF_TASKS, *data(episode_dataset)], tmp_path)
    run = build_training(cfg)
    module = run.module
    reference = load_open_clip(TINY_CLIP_MODEL, clip_file).eval()
    saved = torch.load(clip_file, weights_only=True)
    for name, value in module.towers.image.visual.state_dict().items():
        assert torch.equal(value, saved[f"visual.{name}"]), name
    for name, value in module.towers.text.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert module.towers.freeze_text and not module.towers.freeze_image  # the released code fine-tunes the image tower

    clips = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        frames = module.towers({"rgb": clips}).frames
        expected = torch.stack([reference.encode_image(clips[:, :, t]) for t in range(8)], dim=1)
        names = ["a photo of " + c.replace("_", " ") for c in run.datamodule.base_classes]
        text = reference.encode_text(module.towers.text.tokenizer(names), normalize=True)
    torch.testing.assert_close(frames, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(module.base_text, text, rtol=1e-4, atol=1e-5)


def _forbid_reading_data_and_building(monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip

    from mmfsar.data.meta import DatasetFolder

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was read or a model built before the weights file was checked")

    monkeypatch.setattr(DatasetFolder, "open", fail)
    monkeypatch.setattr(open_clip, "create_model", fail)


@pytest.mark.parametrize("model", ["clip_mdmf", "clip_pretrain"])
def test_a_missing_weights_file_fails_before_any_data_is_read(model, monkeypatch, tmp_path):
    from mmfsar.tasks.pipelines import build_training

    _forbid_reading_data_and_building(monkeypatch)
    missing = tmp_path / "ViT-B-16_openai.pt"
    cfg = compose_pretrain([f"model={model}", f"model.clip.pretrained={missing}", *data(tmp_path / "no_dataset")], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.clip\.pretrained: CLIP weights file not found: .*ViT-B-16_openai\.pt"):
        build_training(cfg)


def test_clip_mdmf_needs_exactly_one_source_of_weights(monkeypatch, clip_file, tmp_path):
    from mmfsar.tasks.pipelines import build_training

    _forbid_reading_data_and_building(monkeypatch)
    common = data(tmp_path / "no_dataset")
    neither = compose_pretrain(["model=clip_mdmf", *common], tmp_path)
    with pytest.raises(ConfigError, match="model.clip.pretrained=.*or model.init_from=.*not neither"):
        build_training(neither)
    both = compose_pretrain(["model=clip_mdmf", f"model.clip.pretrained={clip_file}", f"model.init_from={clip_file}", *common], tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        build_training(both)
    paper = compose_pretrain(["experiment=clip_mdmf/clip_mdmf", *common], tmp_path)  # ViT-B/16, pretrained: ???
    with pytest.raises(ConfigError, match="not neither"):
        build_training(paper)
    pretrain = compose_pretrain(["model=clip_pretrain", "model/encoder@model.clip=clip_vit_b16", *common], tmp_path)
    with pytest.raises(ConfigError, match=r"model\.clip\.pretrained: give the local CLIP weights file of the 'ViT-B-16'"):
        build_training(pretrain)


# --------------------------------------------------------------------------- the classifier plug-in


def _classifier(dim: int = 16, frames: int = 8, classes: int = 6, seed: int = 0) -> ClipMDMFClassifier:
    torch.manual_seed(seed)
    classifier = ClipMDMFClassifier(dim=dim, num_frames=frames, heads=4).eval()
    classifier.set_class_text(F.normalize(torch.randn(classes, dim), dim=-1), [f"class{c}" for c in range(classes)])
    return classifier


def test_precomputed_clips_give_the_heads_logits_with_prompts_from_the_episode_only():
    """Evaluation embeds each clip once under every bound class prompt; an episode then gathers
    rows. Its logits equal the head run on the episode (whose prompt candidates are the episode's
    classes only), also for a query whose frames match best a bound class outside its episode."""
    classifier = _classifier()
    text = classifier.class_text
    E, N, K, Q, T, D = 2, 3, 2, 4, 8, 16
    classes = torch.tensor([[0, 1, 2], [5, 3, 1]])
    support, query = torch.randn(E, N, K, T, D), torch.randn(E, Q, T, D)
    query[:, 0] = text[4] + 0.05 * torch.randn(E, T, D)  # class 4 is in neither episode
    scores = select_prompts(query, text, sample=False)[1]
    assert bool((scores.argmax(-1)[:, 0] == 4).all())
    with torch.no_grad():
        embedded = classifier(support, query, classes=classes)
        head = classifier.head(support, query, support_text=text[classes])["logits"]
        classifier.precompute = False
        per_episode = classifier(support, query, classes=classes)
    torch.testing.assert_close(embedded, head, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(per_episode, head)
    assert classifier.embedded_rows == 1 + 2 * 6 * 9  # scores, then 2 views x 6 classes x (prompt token + 8 frames)
    classifier.precompute = True
    rows = classifier.embed(query)
    classifier.set_class_text(text[:5])
    with pytest.raises(ValueError, match="other class texts"):
        classifier.match(classifier.embed(support), rows, classes=classes % 5)


def test_the_engine_passes_each_episodes_classes():
    """solve_episodes on a feature bank = the classifier on each episode with that episode's
    classes (EpisodeSet.classes); a classifier that needs them fails clearly without them."""
    from mmfsar.fewshot import solve_episodes
    from mmfsar.fewshot.engine import episode_probabilities

    classifier = _classifier()
    torch.manual_seed(1)
    bank = torch.randn(30, 1, 8, 16)
    episodes = torch.stack([torch.randperm(30)[:9].view(3, 3) for _ in range(5)])  # 3-way 1-shot 2-query
    classes = torch.stack([torch.randperm(6)[:3] for _ in range(5)])
    probs = episode_probabilities(classifier, bank, episodes, 1, classes=classes, chunk=2)
    for e in range(5):
        support = bank[episodes[e, :, :1], 0][None]
        query = bank[episodes[e, :, 1:].reshape(-1), 0][None]
        with torch.no_grad():
            expected = torch.softmax(classifier(support, query, classes=classes[e : e + 1]), -1)
        torch.testing.assert_close(probs[e].reshape(-1, 3), expected[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="ClipMDMFClassifier needs each episode's classes"):
        solve_episodes(classifier, bank, episodes, 1)


def test_binding_needs_a_clip_text_tower(episode_dataset):
    from mmfsar.models.base import ModalityEncoder

    with pytest.raises(ConfigError, match="has no.*CLIP text tower|encoded by a CLIP text tower"):
        _classifier().bind_classes(["a"], root=episode_dataset, encoder=ModalityEncoder(modality="rgb", backbone=torch.nn.Identity()))
    with pytest.raises(RuntimeError, match="bind_classes"):
        ClipMDMFClassifier(dim=16, num_frames=8).embed(torch.randn(2, 8, 16))


# --------------------------------------------------------------------------- the training step


def test_a_cached_training_step_is_ce_plus_mutual_distillation(clip_file, episode_dataset, tmp_path):
    """With frozen towers and cache=frozen, every training clip's frames are encoded once (equal to
    the towers' frames of the un-augmented clip), tasks carry no video, and the loss is
    CE(-(D_local + D_global), query ways) + L_KD of the head's own outputs."""
    from mmfsar.tasks.pipelines import build_training

    cfg = compose_pretrain(
        ["model=clip_mdmf", f"model.clip.pretrained={clip_file}", "model.clip.freeze=true", "cache=frozen", MDMF_TASKS, *data(episode_dataset)],
        tmp_path,
    )
    run = build_training(cfg)
    module, dm, (cache,) = run.module, run.datamodule, run.callbacks
    assert set(module.frozen_models()) == {"clip"} and module.trained_modalities == []
    cache.build(module.frozen_models(), dm, torch.device("cpu"))
    dm.configure_training(views=0, seed=0, modalities=module.trained_modalities)
    module.frozen_cache = cache
    task = next(iter(dm.train_dataloader()["source"]))
    assert "rgb" not in task  # the loader reads no video any more
    clip = dm.train_sets["source"].records[int(task["index"][0])]
    plain = dm._subset(dm.train_sets["source"], ["rgb"], train=False)[int(task["index"][0])]
    assert plain["clip_id"] == clip.clip_id
    with torch.no_grad():
        torch.testing.assert_close(module.task_frames(task)[0], module.towers({"rgb": plain["rgb"][None]}).frames[0], rtol=1e-4, atol=1e-5)

    module.log = module.log_dict = lambda *args, **kwargs: None
    module.train()
    torch.manual_seed(7)
    loss = module.training_step({"source": task}, 0)
    torch.manual_seed(7)
    from mmfsar.data.episodes import split_task

    support, query, target = split_task(module.task_frames(task), module.task)
    labels = task["label"].view(3, 3)
    out = module.classifier.head(support, query, support_text=module.base_text[labels[:, 0]][None])
    kd = mutual_distillation_loss(
        torch.softmax(-out["distance_local"], -1), torch.softmax(-out["distance_global"], -1), *out["text_agreement"].unbind(-1)
    )
    expected = F.cross_entropy(out["logits"][0], target) + kd.loss
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert module.classifier.head.local_view.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.towers.parameters())


def test_the_video_text_term_needs_a_trainable_image_tower(clip_file, episode_dataset, tmp_path):
    from mmfsar.tasks.pipelines import build_training

    common = ["model=clip_mdmf", f"model.clip.pretrained={clip_file}", MDMF_TASKS, *data(episode_dataset)]
    frozen = compose_pretrain([*common, "model.clip.freeze=true", "model.video_text_weight=0.5"], tmp_path)
    with pytest.raises(ConfigError, match="video_text_weight > 0 trains the image tower, which is frozen"):
        build_training(frozen)
    run = build_training(compose_pretrain([*common, "model.video_text_weight=0.5"], tmp_path))
    module, task = run.module, next(iter(run.datamodule.train_dataloader()["source"]))
    logged = {}
    module.log_dict = lambda metrics, **kwargs: logged.update(metrics)
    module.log = lambda *args, **kwargs: None
    loss = module.training_step({"source": task}, 0)
    frames = module.towers(task).frames
    logits = F.normalize(frames.mean(1), dim=-1) @ module.base_text.T / 0.01
    video_text = F.cross_entropy(logits, task["label"])
    torch.testing.assert_close(logged["train/video_text"], video_text.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.detach(), logged["train/ce"] + logged["train/kd"] + 0.5 * video_text.detach(), rtol=1e-4, atol=1e-5)
    loss.backward()
    assert module.towers.image.visual.conv1.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- presets and the whole chain


def test_tiny_presets_build_stage_after_stage(episode_dataset, tmp_path):
    """clip -> clip_mdmf -> eval as their headers say: each stage builds (files checked, tasks and
    episodes drawn, model built from the previous export) and exports; no training step runs."""
    from mmfsar.tasks.pipelines import build_evaluation, build_training, export_trained

    def stage(name: str, extra: list[str]) -> Path:
        cfg = compose_pretrain([f"experiment=clip_mdmf_tiny/{name}", *data(episode_dataset), *extra], tmp_path / name)
        run = build_training(cfg)
        return export_trained(cfg, run)

    clip = stage("clip", [PRETRAIN_TASKS])
    payload = torch.load(clip, weights_only=True)
    assert payload["encoder"]["_target_"] == "mmfsar.models.clip_towers.ClipTowers" and payload["encoder"]["pretrained"] is None
    assert any(k.startswith("text.model.") for k in payload["state_dict"]) and "classifier" not in payload
    mdmf = stage("clip_mdmf", [f"model.init_from={clip}", MDMF_TASKS])
    payload = torch.load(mdmf, weights_only=True)
    assert payload["encoder"]["freeze_image"] is True and payload["classifier"]["config"]["heads"] == 4
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="eval",
            overrides=["experiment=clip_mdmf_tiny/eval", f"encoder={mdmf}", *data(episode_dataset)[:3], "fewshot.n_query=2",
                       "fewshot.episodes=3", f"paths.output_dir={tmp_path / 'eval'}"],
        )  # fmt: skip
    _, datamodule, module = build_evaluation(cfg)
    assert isinstance(module.classifier, ClipMDMFClassifier)
    assert module.classifier.class_names == datamodule.episodes.class_names  # the novel classes, bound before encoding


def test_the_paper_preset_builds_with_a_local_checkpoint(clip_file, episode_dataset, tmp_path):
    """experiment=clip_mdmf/clip_mdmf (its architecture swapped for the tiny one, whose checkpoint
    the test wrote): 224-px frames with CLIP's normalisation, the image tower trained, class names
    as prompts, the optimiser stepped every 16 tasks."""
    from mmfsar.tasks.pipelines import build_training

    cfg = compose_pretrain(
        ["experiment=clip_mdmf/clip_mdmf", "model/encoder@model.clip=clip_tiny", f"model.clip.pretrained={clip_file}", MDMF_TASKS,
         *data(episode_dataset)],
        tmp_path,
    )  # fmt: skip
    assert cfg.trainer.accumulate_grad_batches == 16 and cfg.data.frames.num_frames == 8
    run = build_training(cfg)
    assert run.module.towers.image.img_size == 224 and not run.module.towers.freeze_image
    assert list(run.datamodule.modalities["rgb"].mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert run.module.towers.text.template == "a photo of {}" and run.module.towers.text_source == "names"


@pytest.fixture(scope="module")
def chain(episode_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The entry points as the presets' headers run them, on the tiny dataset: the CLIP
    pretraining (2 batches), CLIP-MDMF from its export (3 tasks, features cached), and
    lit_main_eval.py on CLIP-MDMF's export (its own head, 10 novel-class episodes)."""
    out = tmp_path_factory.mktemp("clip_mdmf_chain")
    home = out / "home"
    common = [*tiny(episode_dataset, batches=None), "data.val_episodes.n_query=2"]
    clip, mdmf = out / "clip" / "encoder.pt", out / "mdmf" / "encoder.pt"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # tiny models on shared cores: threads only contend
        run_entry(
            "lit_main_pretrain.py", "experiment=clip_mdmf_tiny/clip", PRETRAIN_TASKS, *common, f"hydra.run.dir={out / 'clip'}",
            home=home,
        )  # fmt: skip
        run_entry(
            "lit_main_pretrain.py", "experiment=clip_mdmf_tiny/clip_mdmf", f"model.init_from={clip}", MDMF_TASKS, *common,
            f"hydra.run.dir={out / 'mdmf'}", home=home,
        )  # fmt: skip
        run_entry(
            "lit_main_eval.py", "experiment=clip_mdmf_tiny/eval", "data=folder", f"data.root={episode_dataset}",
            f"encoder={mdmf}", "fewshot.n_query=3", "fewshot.episodes=10", "data.num_workers=0",
            "++trainer.enable_progress_bar=false", f"hydra.run.dir={out / 'eval'}", home=home,
        )  # fmt: skip
    return {"root": episode_dataset, **{k: out / k for k in ("clip", "mdmf", "eval")}}


def test_the_chain_trains_exports_and_evaluates_with_the_novel_classes_texts(chain):
    """lit_main_eval.py on the CLIP-MDMF export uses its head, prompted with the novel classes'
    texts; its per-episode accuracies are what the export's towers and head give in this process
    on the same saved episodes."""
    from hydra.utils import instantiate

    from mmfsar.data.datamodules import FewShotDataModule
    from mmfsar.data.modalities import build_modalities
    from mmfsar.fewshot import solve_episodes
    from mmfsar.fewshot.engine import episode_positions
    from mmfsar.models.base import build_encoder, build_exported_classifier, load_export

    info = torch.load(chain["mdmf"] / "encoder.pt", weights_only=True)["info"]
    assert info["val_acc"] is not None and (chain["clip"] / "encoder.pt").is_file()
    result = json.loads((chain["eval"] / "results.json").read_text())
    assert result["classifier"] == "ClipMDMFClassifier" and result["episodes"] == 10

    payload = load_export(chain["mdmf"] / "encoder.pt")
    encoder, classifier = build_encoder(payload).eval(), build_exported_classifier(payload)
    episodes_file = Path(result["episode_file"])
    dm = FewShotDataModule(
        root=chain["root"], modalities=build_modalities(payload["modalities"]), frames=instantiate(payload["frames"]),
        episode_file=episodes_file, eval_batch_size=1000, num_workers=0,
    )  # fmt: skip
    dm.setup("test")
    classifier.bind_classes(dm.episodes.class_names, root=chain["root"], encoder=encoder)
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        frames = encoder({"rgb": batch["rgb"]}).frames
    bank = torch.zeros(len(dm.clips), 1, *frames.shape[1:])
    bank[batch["index"], 0] = frames
    positions = episode_positions(dm.episodes, [r.clip_id for r in dm.clips.records])
    accuracy = solve_episodes(classifier, bank, positions, dm.episodes.settings.k_shot, classes=dm.episodes.classes)
    assert accuracy.tolist() == pytest.approx(result["per_episode"], abs=1e-6)
    assert 0 <= result["mean"] <= 100 and math.isfinite(result["ci95"])


def test_bench_clip_mdmf_runs(episode_dataset: Path):
    from test_benchmarks import run_benchmark

    report = run_benchmark("bench_clip_mdmf.py", "--root", str(episode_dataset))
    assert report["step"]["cached_ms"] > 0 and report["step"]["uncached_over_cached"] > 0
    assert report["eval"]["episodes"] == 200 and report["eval"]["solve_over_encode"] > 0

"""Data modules and ClipDataset: documented tensor layout, split / domain discipline, early errors."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfsar.data.datamodules import (
    DistillDataModule,
    FewShotDataModule,
    PretrainDataModule,
    TrainingDataModule,
)
from mmfsar.data.dataset import UNLABELLED, ClipDataset, ClipViews
from mmfsar.errors import ConfigError, DataError
from mmfsar.data.meta import DatasetFolder
from mmfsar.data.readers import FrameReader
from mmfsar.data.transforms import ClipAugmentation, ClipParams, UniformSegments

ALL = ("rgb", "flow", "pose", "pose_keypoints", "depth")
TINY_EPISODES = {"n_way": 2, "k_shot": 1, "n_query": 2, "episodes": 6, "seed": 0}


def annotations(root: Path) -> dict[str, dict]:
    with (root / "annotations.csv").open() as f:
        return {row["clip_id"]: row for row in csv.DictReader(f)}


def fewshot(root, make_modalities, *names, **kw) -> FewShotDataModule:
    kw = {"episodes": TINY_EPISODES, "eval_batch_size": 4, "num_workers": 0, **kw}
    return FewShotDataModule(root=root, modalities=make_modalities(*(names or ALL)), frames=UniformSegments(8), **kw)


def training(root, make_modalities, *names, cls=TrainingDataModule, **kw) -> TrainingDataModule:
    kw = {"val_episodes": TINY_EPISODES, "batch_size": 3, "eval_batch_size": 4, "num_workers": 0, **kw}
    return cls(root=root, modalities=make_modalities(*(names or ("rgb", "flow"))), frames=UniformSegments(4), **kw)


def test_batches_have_the_documented_layout(tiny_dataset, make_modalities):
    dm = fewshot(tiny_dataset, make_modalities)
    dm.setup("test")
    assert dm.channels == {"rgb": 3, "flow": 2, "pose": 15, "pose_keypoints": 3, "depth": 1}
    batches = list(dm.test_dataloader())
    assert [len(b["clip_id"]) for b in batches] == [4, 2]  # 2 novel classes x 3 target clips
    b = batches[0]
    expected = {
        "rgb": (4, 3, 8, 64, 64),
        "flow": (4, 2, 8, 64, 64),
        "pose": (4, 15, 8, 64, 64),
        "pose_keypoints": (4, 3, 8, 15),
        "depth": (4, 1, 8, 64, 64),
    }
    for name, shape in expected.items():
        assert b[name].shape == shape, name
        assert b[name].dtype == torch.float32 and torch.isfinite(b[name]).all()
    assert b["label"].dtype == torch.int64 and b["index"].tolist() == [0, 1, 2, 3]
    assert b["domain"] == ["target"] * 4
    # value ranges of the documented normalisations
    assert -2.1 < float(b["rgb"].min()) and float(b["rgb"].max()) < 2.5  # (x - .45) / .225
    assert 0 <= float(b["depth"].min()) and float(b["depth"].max()) < 1.0  # metres / 10, walls at ~8 m
    assert float(b["pose"].max()) <= 1.0 and float(b["pose"].min()) >= 0
    assert b["pose_keypoints"][:, 2].min() >= 0 and b["pose_keypoints"][:, 2].max() <= 1  # confidence
    assert b["pose_keypoints"][:, :2].abs().max() < 1.5  # x, y in [-1, 1] of the crop (+ detector misses)
    # the test loader lists every clip of the split once, in clip-id order, labelled by meta order
    ann = annotations(tiny_dataset)
    novel = sorted(c for c, r in ann.items() if r["split"] == "novel" and r["domain"] == "target")
    ids = [c for b in batches for c in b["clip_id"]]
    assert ids == novel == dm.episodes.clip_ids
    classes = DatasetFolder.open(tiny_dataset).meta.classes_of("novel")
    assert [int(x) for b in batches for x in b["label"]] == [classes.index(ann[c]["class"]) for c in ids]


def test_a_clip_is_the_same_frames_of_every_stream(tiny_dataset, make_modalities):
    """All modalities of a clip use the same frame numbers (compared with the raw arrays)."""
    folder = DatasetFolder.open(tiny_dataset)
    mods = make_modalities(depth={"size": 32}, flow={"size": 32, "scale": 1.0}, pose_keypoints={})
    for m in mods.values():
        m.bind(folder)
    rec = folder.records[5]
    ds = ClipDataset([rec], mods, UniformSegments(8), train=False, labels=None)
    item = ds[0]
    idx = UniformSegments(8)(rec.start_frame, rec.end_frame, jitter=False)
    raw = {s: np.load(tiny_dataset / s / f"{rec.video}.npy") for s in ("depth", "flow", "pose")}
    np.testing.assert_allclose(item["depth"][0].numpy(), raw["depth"][idx] / 10000.0, rtol=1e-6)
    np.testing.assert_allclose(item["flow"].permute(1, 2, 3, 0).numpy(), raw["flow"][idx].astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(item["pose_keypoints"][2].numpy(), raw["pose"][idx][..., 2], rtol=1e-6)
    assert item["label"] == UNLABELLED and item["clip_id"] == rec.clip_id


def test_short_clips_repeat_frames_and_min_frames_rejects_them(tiny_dataset, make_modalities):
    folder = DatasetFolder.open(tiny_dataset)
    mods = {k: m.bind(folder) for k, m in make_modalities(depth={"size": 32}).items()}
    rec = folder.records[0]
    short = dataclasses.replace(rec, end_frame=rec.start_frame + 3)
    raw = np.load(tiny_dataset / "depth" / f"{rec.video}.npy")
    s = rec.start_frame
    for train in (False, True):
        ds = ClipDataset([short], mods, UniformSegments(8), train=train, labels=None,
                         augmentation=ClipAugmentation(min_scale=1.0, flip_prob=0.0))  # fmt: skip
        out = ds[0]["depth"][0].numpy() * 10000.0
        np.testing.assert_allclose(out, raw[[s, s, s, s + 1, s + 1, s + 2, s + 2, s + 2]], rtol=1e-6)
    ds = ClipDataset([short], mods, UniformSegments(8, min_frames=4), train=False, labels=None)
    with pytest.raises(DataError, match=rf"clip '{rec.clip_id}' has 3 frames, fewer than data.frames.min_frames=4"):
        ds[0]


def test_frame_range_beyond_the_stored_video_names_the_clip(tiny_dataset, make_modalities):
    folder = DatasetFolder.open(tiny_dataset)
    rec = folder.records[0]
    n = len(np.load(tiny_dataset / "flow" / f"{rec.video}.npy", mmap_mode="r"))
    bad = dataclasses.replace(rec, end_frame=n + 10)
    for name in ("flow", "rgb"):
        m = make_modalities(name)[name].bind(folder)
        with pytest.raises(DataError, match=rf"clip '{rec.clip_id}', {name}: .*{rec.video}"):
            m(bad, UniformSegments(8)(bad.start_frame, bad.end_frame, jitter=False), ClipParams())


def test_training_modules_only_train_on_base_classes_and_never_see_novel(tiny_dataset, make_modalities):
    dm = training(tiny_dataset, make_modalities, unlabelled_target=True)
    dm.setup("fit")
    ann = annotations(tiny_dataset)
    meta = DatasetFolder.open(tiny_dataset).meta
    base, val = meta.classes_of("base"), meta.classes_of("val")
    loaders = dm.train_dataloader()
    assert set(loaders) == {"source", "target"}
    seen: dict[str, list[str]] = {}
    for key, loader in loaders.items():
        ids = []
        for b in loader:
            assert b["rgb"].shape == (3, 3, 4, 64, 64) and b["flow"].shape == (3, 2, 4, 64, 64)
            for cid, label, domain in zip(b["clip_id"], b["label"].tolist(), b["domain"]):
                row = ann[cid]
                assert row["split"] == "base" and row["domain"] == domain
                if key == "source":
                    assert domain == "source" and label == base.index(row["class"])
                else:
                    assert domain == "target" and label == UNLABELLED
            ids += b["clip_id"]
        seen[key] = ids
    for key in ("source", "target"):  # an epoch is every base clip of the domain once (9 = 3 batches of 3)
        assert sorted(seen[key]) == sorted(c for c, r in ann.items() if r["split"] == "base" and r["domain"] == key)
    val_ids = []
    for b in dm.val_dataloader():
        for cid, label in zip(b["clip_id"], b["label"].tolist()):
            assert ann[cid]["split"] == "val" and ann[cid]["domain"] == "target"
            assert label == val.index(ann[cid]["class"])
        val_ids += b["clip_id"]
    assert sorted(val_ids) == sorted(c for c, r in ann.items() if r["split"] == "val" and r["domain"] == "target")
    assert val_ids == dm.val_episodes.clip_ids  # episode positions index the val loader order
    everything = seen["source"] + seen["target"] + val_ids
    assert not [c for c in everything if ann[c]["split"] == "novel"]


def test_stage_defaults(tiny_dataset, make_modalities):
    pre = training(tiny_dataset, make_modalities, "rgb", cls=PretrainDataModule)
    dis = training(tiny_dataset, make_modalities, "rgb", cls=DistillDataModule)
    pre.setup("fit")
    dis.setup("fit")
    assert set(pre.train_dataloader()) == {"source"} and set(dis.train_dataloader()) == {"target"}
    with pytest.raises(ConfigError, match="enable labelled_source and/or unlabelled_target"):
        training(tiny_dataset, make_modalities, "rgb", labelled_source=False)


def test_training_is_random_and_evaluation_is_deterministic(tiny_dataset, make_modalities):
    dm = training(tiny_dataset, make_modalities, "depth")
    dm.setup("fit")
    torch.manual_seed(0)
    ds = dm.train_sets["source"]
    a, b = ds[0]["depth"], ds[0]["depth"]
    assert a.shape == b.shape == (1, 4, 64, 64) and not torch.equal(a, b)
    v = dm.val_set
    assert torch.equal(v[0]["depth"], v[0]["depth"])


def test_fixed_training_views_are_the_same_in_every_loader_and_process(tiny_dataset, make_modalities):
    """After ``configure_training(views=K, seed)``, a training load is one of K views per clip:
    view v of a clip is the same tensor whether it comes from the training loader (any worker,
    any global RNG state) or from ``frozen_loader`` (which frozen models encode, each clip's
    frames read once for all its views); views of one clip differ; another seed gives other views."""
    dm = training(tiny_dataset, make_modalities, "rgb", "flow", num_workers=2)
    dm.setup("fit")
    everything = ClipViews.collate(list(dm.frozen_loader("source", ["rgb", "flow"], views=3, seed=7)))
    clips = len(dm.train_sets["source"])
    assert everything["index"].tolist() == [i for i in range(clips) for _ in range(3)]
    assert everything["view"].tolist() == [0, 1, 2] * clips
    per_view = [{k: v[everything["view"] == view] for k, v in everything.items()} for view in range(3)]
    assert not torch.equal(per_view[0]["rgb"], per_view[1]["rgb"]) and not torch.equal(per_view[1]["rgb"], per_view[2]["rgb"])
    dm.configure_training(views=3, seed=7, modalities=["rgb", "flow"])
    seen = set()
    for seed in range(3):  # global RNG state and workers change which views are drawn, not what they are
        torch.manual_seed(seed)
        for batch in dm.train_dataloader()["source"]:
            for j, (i, v) in enumerate(zip(batch["index"].tolist(), batch["view"].tolist())):
                assert torch.equal(batch["rgb"][j], per_view[v]["rgb"][i]) and torch.equal(batch["flow"][j], per_view[v]["flow"][i])
                seen.add(v)
    assert seen == {0, 1, 2}
    other = next(iter(dm.frozen_loader("source", ["rgb"], views=3, seed=8)))
    assert not torch.equal(other["rgb"][0], per_view[0]["rgb"][0])
    dm.configure_training(views=0, seed=0, modalities=["rgb"])  # fresh augmentations, RGB only
    batch = next(iter(dm.train_dataloader()["source"]))
    assert "view" not in batch and "flow" not in batch and "rgb" in batch


def test_workers_give_the_same_evaluation_batches(tiny_dataset, make_modalities):
    plain = fewshot(tiny_dataset, make_modalities, "rgb", "pose")
    workers = fewshot(tiny_dataset, make_modalities, "rgb", "pose", num_workers=2)
    plain.setup()
    workers.setup()
    for a, b in zip(plain.test_dataloader(), workers.test_dataloader(), strict=True):
        assert a["clip_id"] == b["clip_id"]
        assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["pose"], b["pose"])


def test_fewshot_module_uses_only_its_split_and_domain(tiny_dataset, make_modalities):
    ann = annotations(tiny_dataset)
    for split, domain in (("novel", "target"), ("val", "source")):
        dm = fewshot(tiny_dataset, make_modalities, "rgb", split=split, domain=domain)
        dm.setup("test")
        ids = [c for b in dm.test_dataloader() for c in b["clip_id"]]
        assert len(ids) == 6
        assert {(ann[c]["split"], ann[c]["domain"]) for c in ids} == {(split, domain)}
        assert set(dm.episodes.clip_ids) == set(ids)
    with pytest.raises(ConfigError, match="fewshot.split must be 'novel' or 'val', got 'base'"):
        fewshot(tiny_dataset, make_modalities, "rgb", split="base")
    dm = fewshot(tiny_dataset, make_modalities, "rgb", domain="studio")
    with pytest.raises(DataError, match=r"no clips of domain\(s\) \['studio'\]"):
        dm.setup()


def test_episode_file_round_trip_and_wrong_split(tiny_dataset, make_modalities, tmp_path):
    first = fewshot(tiny_dataset, make_modalities, "rgb")
    first.setup()
    path = tmp_path / "episodes.json"
    first.episodes.save(path)
    again = fewshot(tiny_dataset, make_modalities, "rgb", episode_file=path, episodes={"n_way": 99})
    again.setup()
    assert again.episodes.hash == first.episodes.hash
    assert [r.clip_id for r in again.clips.records] == first.episodes.clip_ids
    val = fewshot(tiny_dataset, make_modalities, "rgb", episode_file=path, split="val")
    with pytest.raises(DataError, match="6 clips of the episode file are not in the evaluated split"):
        val.setup()


def test_a_val_class_without_clips_in_the_domain_is_named(tiny_dataset_copy, make_modalities):
    ann = tiny_dataset_copy / "annotations.csv"
    rows = ann.read_text().splitlines()
    ann.write_text("\n".join(r for r in rows if not r.startswith("target_both_raise")) + "\n")
    dm = training(tiny_dataset_copy, make_modalities, "rgb", val_episodes={"n_way": 2, "k_shot": 1, "n_query": 1})
    with pytest.raises(DataError, match=r"(?s)data.val_episodes.n_way=2 but the split has only 1 classes.*class 'both_raise' has 0 clips"):
        dm.setup()


def test_episodes_that_cannot_be_drawn_fail_at_setup(tiny_dataset, make_modalities):
    dm = fewshot(tiny_dataset, make_modalities, "rgb", episodes={"n_way": 3, "k_shot": 1, "n_query": 1})
    with pytest.raises(DataError, match=r"(?s)novel episodes, domain 'target' .*fewshot.n_way=3 but the split has only 2 classes"):
        dm.setup()
    dm = fewshot(tiny_dataset, make_modalities, "rgb", episodes={"n_way": 2, "k_shot": 1, "n_query": 3})
    with pytest.raises(DataError, match=r"class 'arm_lower' has 3 clips, fewer than k_shot \+ n_query = 1 \+ 3 = 4"):
        dm.setup()
    dm = training(tiny_dataset, make_modalities, "rgb", val_episodes=None)  # default: 5-way 1-shot 5-query
    with pytest.raises(DataError, match=r"(?s)val episodes, domain 'target' .*data.val_episodes.n_way=5 but the split has only 0"):
        dm.setup()


def test_missing_files_fail_before_training_naming_clip_and_file(tiny_dataset_copy, make_modalities):
    root = tiny_dataset_copy
    (root / "flow" / "source_arm_raise_001.npy").unlink()
    (root / "rgb" / "source_arm_swing_002.mp4").unlink()
    (root / "rgb" / "target_arm_wave_000.mp4").unlink()
    dm = training(root, make_modalities, "rgb", "flow")
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "problems with the files" in msg
    assert f"clip 'source_arm_raise_001', flow: npy: file for video 'source_arm_raise_001' not found: {root}/flow/source_arm_raise_001.npy" in msg
    assert f"clip 'source_arm_swing_002', rgb: video: file for video 'source_arm_swing_002' not found: {root}/rgb/source_arm_swing_002.mp4" in msg
    dm = fewshot(root, make_modalities, "rgb", "flow")
    with pytest.raises(DataError, match=r"clip 'target_arm_wave_000', rgb: .* not found: .*target_arm_wave_000\.mp4"):
        dm.setup()


def test_broken_files_fail_before_training_naming_clip_and_file(tiny_dataset_copy, make_modalities):
    """Truncated, empty or garbage videos, a clip range past the end of its stream and an .npy
    that is not an array fail in ``setup`` (containers opened, headers read), before any step."""
    import numpy as np

    root = tiny_dataset_copy
    video = root / "rgb" / "source_arm_raise_000.mp4"
    video.write_bytes(video.read_bytes()[:300])  # truncated
    (root / "rgb" / "source_arm_swing_000.mp4").write_bytes(b"")  # empty
    (root / "rgb" / "source_arm_circle_out_000.mp4").write_bytes(b"not a video at all" * 50)  # garbage
    (root / "flow" / "source_arm_swing_001.npy").write_bytes(b"\x93NUMPY garbage")
    flow = np.load(root / "flow" / "source_arm_circle_out_001.npy")
    np.save(root / "flow" / "source_arm_circle_out_001.npy", flow[:3])  # shorter than the clip's range
    dm = training(root, make_modalities, "rgb", "flow")
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    msg = str(err.value)
    for clip, file in [
        ("source_arm_raise_000", "rgb/source_arm_raise_000.mp4"),
        ("source_arm_swing_000", "rgb/source_arm_swing_000.mp4"),
        ("source_arm_circle_out_000", "rgb/source_arm_circle_out_000.mp4"),
        ("source_arm_swing_001", "flow/source_arm_swing_001.npy"),
    ]:
        assert f"clip {clip!r}" in msg and str(root / file) in msg, (clip, msg)
    assert f"clip 'source_arm_circle_out_001', flow: frames [" in msg and f"{root}/flow/source_arm_circle_out_001.npy has 3 frames" in msg


def test_non_finite_values_are_a_load_error_and_a_validator_problem(tiny_dataset_copy, make_modalities):
    import numpy as np

    from mmfsar.data.validate import validate_dataset

    root = tiny_dataset_copy
    path = root / "flow" / "target_arm_lower_000.npy"
    np.save(path, np.full_like(np.load(path), np.nan))
    dm = fewshot(root, make_modalities, "flow")
    dm.setup()
    position = [r.clip_id for r in dm.clips.records].index("target_arm_lower_000")
    with pytest.raises(DataError, match=rf"clip 'target_arm_lower_000', flow .*{path} holds NaN or inf values"):
        dm.clips[position]
    report = validate_dataset(root, make_modalities("flow"), progress=False)
    assert any(f"{path} holds NaN or inf values" in p for p in report.problems), report.problems


def test_bad_annotations_fail_at_setup_naming_the_problem(tiny_dataset_copy, make_modalities):
    path = tiny_dataset_copy / "annotations.csv"
    rows = path.read_text().splitlines()
    rows.append("target_x_000,fly_away,target,novel,target_arm_wave_000,0,8")
    rows.append("target_y_000,arm_swing,target,novel,target_arm_swing_000,0,8")
    path.write_text("\n".join(rows) + "\n")
    dm = fewshot(tiny_dataset_copy, make_modalities, "rgb")
    with pytest.raises(DataError) as err:
        dm.setup()
    assert "clip 'target_x_000': unknown class 'fly_away' (not in meta.json classes)" in str(err.value)
    assert "clip 'target_y_000': split 'novel' but class 'arm_swing' is in split 'base'" in str(err.value)


def test_a_dataset_without_the_modality_is_an_error(tiny_dataset_alt_formats, make_modalities, tmp_path):
    import json
    import shutil

    root = Path(shutil.copytree(tiny_dataset_alt_formats, tmp_path / "ds", ignore=shutil.ignore_patterns("rgb")))
    meta = json.loads((root / "meta.json").read_text())
    del meta["modalities"]["pose"]
    (root / "meta.json").write_text(json.dumps(meta))
    dm = fewshot(root, make_modalities, "pose")
    with pytest.raises(DataError, match=r"the dataset has no modality 'pose'; meta.json lists \['depth', 'flow', 'rgb'\]"):
        dm.setup()


def test_alt_formats_give_the_same_tensors_as_default_formats(tiny_dataset, tiny_dataset_alt_formats, make_modalities):
    """The format is a storage detail: the same clips give (nearly) the same model inputs."""
    out = {}
    for root in (tiny_dataset, tiny_dataset_alt_formats):
        dm = fewshot(root, make_modalities, "rgb", "flow", "depth", "pose")
        dm.setup()
        out[root] = next(iter(dm.test_dataloader()))
    a, b = out[tiny_dataset], out[tiny_dataset_alt_formats]
    assert a["clip_id"] == b["clip_id"]
    assert torch.equal(a["depth"], b["depth"]) and torch.equal(a["pose"], b["pose"])
    assert (a["flow"] - b["flow"]).abs().mean() < 0.05  # scale 4 output px: ~1 quantisation step
    assert (a["rgb"] - b["rgb"]).abs().mean() < 8 / 255 / 0.225


def test_the_episode_dataset_supports_5way_1shot_5query(episode_dataset, make_modalities):
    five = {"n_way": 5, "k_shot": 1, "n_query": 5, "episodes": 10, "seed": 0}
    for split in ("val", "novel"):
        dm = fewshot(episode_dataset, make_modalities, "rgb", split=split, episodes=five)
        dm.setup()
        assert len(dm.clips) == 30 and dm.episodes.tensor.shape == (10, 5, 6)
    dm = training(episode_dataset, make_modalities, "rgb", val_episodes=None, unlabelled_target=True)
    dm.setup()
    assert len(dm.val_episodes) == 200 and {k: len(v) for k, v in dm.train_sets.items()} == {"source": 18, "target": 18}
    meta = DatasetFolder.open(episode_dataset).meta
    rec = DatasetFolder.open(episode_dataset).records[0]
    assert 8 <= rec.num_frames <= 12 and len(meta.classes_of("val")) == 5
    assert FrameReader.create("npy", episode_dataset / "depth").length(rec.video) >= rec.end_frame


def test_wrong_array_shapes_are_an_error_naming_the_clip(tiny_dataset_copy, make_modalities):
    flow = np.load(tiny_dataset_copy / "flow" / "target_arm_wave_001.npy")
    np.save(tiny_dataset_copy / "flow" / "target_arm_wave_001.npy", flow[..., :1])  # (T, 32, 32, 1)
    dm = fewshot(tiny_dataset_copy, make_modalities, "flow")
    dm.setup()  # existence is all setup checks; the shape is seen when the clip is read
    pos = [r.clip_id for r in dm.clips.records].index("target_arm_wave_001")
    with pytest.raises(DataError, match=r"clip 'target_arm_wave_001', flow of video 'target_arm_wave_001': "
                                        r"expected float flow \(T, H, W, 2\), got float16 \(8, 32, 32, 1\)"):  # fmt: skip
        dm.clips[pos]
    dm.clips[(pos + 1) % len(dm.clips)]  # the other clips are fine


def test_prepare_data_reuses_or_refuses_a_generated_dataset(tiny_dataset, tiny_config, make_modalities):
    dm = fewshot(tiny_dataset, make_modalities, "rgb", generator=tiny_config.to_dict())
    before = (tiny_dataset / "meta.json").stat().st_mtime_ns
    dm.prepare_data()
    assert (tiny_dataset / "meta.json").stat().st_mtime_ns == before
    dm = fewshot(tiny_dataset, make_modalities, "rgb", generator={**tiny_config.to_dict(), "seed": 5})
    with pytest.raises(DataError, match=r"generated with other settings .*'seed': \(0, 5\)"):
        dm.prepare_data()

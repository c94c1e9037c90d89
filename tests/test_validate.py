"""``validate_dataset`` and the ``python -m mmfsar.data.validate`` CLI: every problem at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmfsar.data.episodes import EpisodeSettings
from mmfsar.data.meta import DatasetFolder
from mmfsar.data.transforms import UniformSegments
from mmfsar.data.validate import validate_dataset

REPO = Path(__file__).resolve().parents[1]
TINY_EPISODES = EpisodeSettings(n_way=2, k_shot=1, n_query=2, episodes=10)
CLI_EPISODES = ["fewshot.n_way=2", "fewshot.k_shot=1", "fewshot.n_query=2"]


def validate(root, make_modalities, names=("rgb", "flow", "pose", "depth"), **kw):
    kw = {"episodes": TINY_EPISODES, "progress": False, **kw}
    return validate_dataset(root, make_modalities(*names), **kw)


def corrupt(root: Path) -> list[str]:
    """Break a copy of the tiny dataset in every way the validator knows; return one expected
    message fragment per problem."""
    (root / "pose" / "source_arm_raise_001.npy").unlink()
    mp4 = root / "rgb" / "source_arm_swing_002.mp4"
    mp4.write_bytes(mp4.read_bytes()[:4000])
    flow = np.load(root / "flow" / "target_arm_circle_in_001.npy")
    np.save(root / "flow" / "target_arm_circle_in_001.npy", flow[..., 0])  # (T, 32, 32): no x/y axis
    pose = np.load(root / "pose" / "target_arm_lower_002.npy")
    np.save(root / "pose" / "target_arm_lower_002.npy", pose[:, :14])  # a joint short
    n = len(np.load(root / "depth" / "target_arm_wave_001.npy"))
    with (root / "annotations.csv").open("a") as f:
        f.write("source_zzz_000,fly_away,source,base,source_arm_swing_000,0,8\n")  # unknown class
        f.write("source_www_000,arm_raise,source,val,source_arm_raise_000,0,8\n")  # split != meta
        f.write("target_long_000,arm_wave,target,novel,target_arm_wave_001,2,200\n")  # beyond the video
        f.write("bad_row,arm_swing,source,base,source_arm_swing_000,x,8\n")  # not an integer
        f.write("source_arm_swing_000,arm_swing,source,base,source_arm_swing_000,0,8\n")  # duplicate id
    return [
        f"clip 'source_arm_raise_001', pose: npy: file for video 'source_arm_raise_001' not found: {root}/pose/source_arm_raise_001.npy",
        f"clip 'source_arm_swing_002', rgb: cannot decode video {root}/rgb/source_arm_swing_002.mp4",
        "clip 'target_arm_circle_in_001', flow of video 'target_arm_circle_in_001': expected float flow (T, H, W, 2), got float16",
        "clip 'target_arm_lower_002', pose of video 'target_arm_lower_002': expected keypoints (T, 15, 2|3), got float32",
        "clip 'source_zzz_000': unknown class 'fly_away' (not in meta.json classes)",
        "clip 'source_www_000': split 'val' but class 'arm_raise' is in split 'base' in meta.json",
        "val classes, domain 'source': class 'arm_raise' has 1 clips, fewer than k_shot + n_query = 1 + 2 = 3",
        *[
            f"clip 'target_long_000', {m}: frames [2, 200) requested but {root}/{m}/target_arm_wave_001{ext} has {n} frames"
            for m, ext in (("rgb", ".mp4"), ("flow", ".npy"), ("pose", ".npy"), ("depth", ".npy"))
        ],
        f"{root}/annotations.csv:47: clip 'bad_row': start/end frame not integers",
        f"{root}/annotations.csv: duplicate clip ids ['source_arm_swing_000']",
    ]


def test_intact_datasets_have_no_problems(tiny_dataset, tiny_dataset_alt_formats, make_modalities):
    for root in (tiny_dataset, tiny_dataset_alt_formats):
        report = validate(root, make_modalities, names=("rgb", "flow", "pose", "pose_keypoints", "depth"))
        assert report.ok and report.problems == [] and report.clips == 42
        assert str(report).endswith("OK: no problems found")
        assert report.notes == []  # no clip shorter than 8 frames


def test_every_problem_is_reported_at_once(tiny_dataset_copy, make_modalities):
    expected = corrupt(tiny_dataset_copy)
    report = validate(tiny_dataset_copy, make_modalities)
    assert not report.ok
    for fragment in expected:
        matches = [p for p in report.problems if fragment in p]
        assert len(matches) == 1, (fragment, report.problems)
    assert len(report.problems) == len(expected), "\n".join(report.problems)
    text = str(report)
    assert f"{len(expected)} problem(s):" in text and "fly_away" in text
    assert report.clips == 46  # 42 + 4 well-formed extra rows


def test_without_decoding_only_existence_and_lengths_are_checked(tiny_dataset_copy, make_modalities):
    corrupt(tiny_dataset_copy)
    report = validate(tiny_dataset_copy, make_modalities, decode=False)
    text = "\n".join(report.problems)
    assert "expected float flow" not in text and "expected keypoints" not in text  # shapes need decoding
    assert "source_arm_raise_001.npy" in text and "cannot decode video" in text and "frames [2, 200)" in text


def test_episode_problems_are_checked_for_val_and_novel_of_every_domain(tiny_dataset, make_modalities):
    report = validate(tiny_dataset, make_modalities, names=("pose",), episodes=EpisodeSettings(n_way=3, k_shot=2, n_query=2))
    expected = [
        f"{split} classes, domain {domain!r}: fewshot.n_way=3 but the split has only 0 classes with at least "
        "fewshot.k_shot + fewshot.n_query = 4 clips (2 classes in all)"
        for split in ("val", "novel")
        for domain in ("source", "target")
    ] + [
        f"{split} classes, domain {domain!r}: class {c!r} has 3 clips, fewer than k_shot + n_query = 2 + 2 = 4"
        for split, classes in (("val", ["arm_circle_in", "both_raise"]), ("novel", ["arm_lower", "arm_wave"]))
        for domain in ("source", "target")
        for c in classes
    ]
    assert sorted(report.problems) == sorted(expected)


def test_short_clips_are_a_note_not_a_problem(tiny_dataset, make_modalities):
    lengths = [r.num_frames for r in DatasetFolder.open(tiny_dataset).records]
    report = validate(tiny_dataset, make_modalities, names=("depth",), frames=UniformSegments(20))
    assert report.ok
    short = sum(n < 20 for n in lengths)
    assert 0 < short < len(lengths)
    assert report.notes == [
        f"{short} clips have fewer than 20 frames: their frames are repeated evenly (documented short-clip "
        "rule); set data.frames.min_frames to reject them instead"
    ]


def test_meta_and_annotation_files(tiny_dataset_copy, make_modalities):
    (tiny_dataset_copy / "annotations.csv").rename(tiny_dataset_copy / "clips.csv")
    report = validate(tiny_dataset_copy, make_modalities)
    assert report.problems == [f"annotation file not found: {tiny_dataset_copy}/annotations.csv"]
    assert validate(tiny_dataset_copy, make_modalities, annotation_file="clips.csv").ok
    meta = tiny_dataset_copy / "meta.json"
    raw = json.loads(meta.read_text())
    raw["modalities"]["flow"]["format"] = "flo"
    meta.write_text(json.dumps(raw))
    report = validate(tiny_dataset_copy, make_modalities, annotation_file="clips.csv")
    assert report.problems == ["modality 'flow': unknown storage format 'flo'; known formats: "
                               "['flow_xy', 'frames', 'npy', 'video']"]  # fmt: skip
    meta.write_text(meta.read_text()[:-20])
    report = validate(tiny_dataset_copy, make_modalities)
    assert len(report.problems) == 1 and report.problems[0].startswith(f"{meta}: not valid JSON")
    meta.unlink()
    assert validate(tiny_dataset_copy, make_modalities).problems == [
        f"dataset meta file not found: {meta} (see DATA_STRUCTURE.md)"
    ]


# ------------------------------------------------------------------------------------------------
# the CLI
# ------------------------------------------------------------------------------------------------


def run_cli(*overrides: str) -> subprocess.CompletedProcess:
    if not (REPO / "configs" / "fewshot" / "classifier" / "prototype.yaml").is_file():
        pytest.skip("configs/fewshot/classifier/prototype.yaml (used by fewshot/default.yaml) not there yet")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mmfsar.data.validate", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def test_cli_exit_status_and_messages(tiny_dataset, tiny_dataset_copy):
    ok = run_cli(f"data.root={tiny_dataset}", *CLI_EPISODES)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"dataset {tiny_dataset}: 42 clips checked" in ok.stdout and "OK: no problems found" in ok.stdout
    expected = corrupt(tiny_dataset_copy)
    bad = run_cli(f"data.root={tiny_dataset_copy}", *CLI_EPISODES, "modality=[rgb,flow,pose,depth]")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"{len(expected)} problem(s):" in bad.stdout
    for fragment in expected:
        assert fragment in bad.stdout, fragment
    assert "Traceback" not in bad.stdout + bad.stderr

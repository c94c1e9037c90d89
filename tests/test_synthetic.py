"""The synthetic generator: documented classes and layout, determinism, atomicity, reuse rules."""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from mmfsar.errors import ConfigError, DataError
from mmfsar.data.meta import DatasetFolder
from mmfsar.data.synthetic import SyntheticConfig, ensure_synthetic, generate
from mmfsar.data.synthetic.actions import ACTIONS, JOINTS, SPLIT_OF_ACTION

gen = importlib.import_module("mmfsar.data.synthetic.generate")  # the package re-exports a function of that name
REPO = Path(__file__).resolve().parents[1]
MINI = dict(clips_per_class=2, classes_per_split={"base": 1, "val": 1, "novel": 1})  # 12 clips


def documented_classes() -> dict[str, list[str]]:
    """The class table of DATA_STRUCTURE.md: ``| base (18) | arm_swing, ... |``."""
    out = {}
    for line in (REPO / "DATA_STRUCTURE.md").read_text().splitlines():
        m = re.match(r"\|\s*(base|val|novel) \((\d+)\)\s*\|(.*)\|\s*$", line)
        if m:
            names = [n.strip() for n in m.group(3).split(",")]
            assert len(names) == int(m.group(2)), line
            out[m.group(1)] = names
    return out


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# what is generated
# ------------------------------------------------------------------------------------------------


def test_classes_are_the_documented_table():
    doc = documented_classes()
    assert {k: len(v) for k, v in doc.items()} == {"base": 18, "val": 7, "novel": 10}
    assert sorted(ACTIONS) == sorted(n for names in doc.values() for n in names)  # 35 classes
    assert {a: SPLIT_OF_ACTION[a] for a in ACTIONS} == {n: s for s, names in doc.items() for n in names}
    # meta lists base, then val, then novel classes; classes_per_split keeps the first n of each
    classes = SyntheticConfig().classes()
    assert [c.split for c in classes] == ["base"] * 18 + ["val"] * 7 + ["novel"] * 10
    for split in ("base", "val", "novel"):
        assert sorted(c.name for c in classes if c.split == split) == sorted(doc[split])
    small = SyntheticConfig(classes_per_split={"base": 2, "val": 1, "novel": 3}).classes()
    assert [(c.name, c.split) for c in small] == [
        (c.name, c.split) for split, n in (("base", 2), ("val", 1), ("novel", 3))
        for c in [c for c in classes if c.split == split][:n]
    ]  # fmt: skip


def test_default_config_is_the_documented_default_dataset():
    cfg = OmegaConf.load(REPO / "configs" / "data" / "synthetic.yaml")
    assert SyntheticConfig.from_mapping(cfg.generator).to_dict() == SyntheticConfig().to_dict()
    plan = gen._clip_plan(SyntheticConfig())
    assert len(plan) == 35 * 2 * 20
    per = Counter((rec.label_name, rec.domain) for _, rec, _ in plan)
    assert set(per.values()) == {20} and len(per) == 70  # every class has 20 clips in each domain
    assert len({rec.clip_id for _, rec, _ in plan}) == len(plan)
    for _, rec, total in plan:
        assert 16 <= rec.num_frames <= 24 and 0 <= rec.start_frame <= 3
        assert rec.end_frame <= total <= rec.end_frame + 3 and rec.video == rec.clip_id
    lengths = Counter(rec.num_frames for _, rec, _ in plan)
    assert set(lengths) == set(range(16, 25))  # the whole documented range occurs
    meta = gen.dataset_meta(SyntheticConfig())
    assert meta.frame_size == (64, 64) and meta.joints == JOINTS and len(JOINTS) == 15 and meta.fps == 12.0
    assert {k: v["format"] for k, v in meta.modalities.items()} == {
        "rgb": "video", "flow": "npy", "pose": "npy", "depth": "npy", "skeleton": "npy"
    }  # fmt: skip
    assert meta.modalities["depth"]["units_per_meter"] == 1000.0 and meta.modalities["pose"]["frame_size"] == [64, 64]


def test_tiny_dataset_meta_and_annotations_are_consistent(tiny_dataset, tiny_config):
    folder = DatasetFolder.open(tiny_dataset)  # raises on any unknown class / split mismatch
    classes = SyntheticConfig().classes()
    for split in ("base", "val", "novel"):
        n = tiny_config.classes_per_split[split]
        assert folder.meta.classes_of(split) == [c.name for c in classes if c.split == split][:n]
    assert Counter((r.label_name, r.domain) for r in folder.records) == {
        (c, d): 3 for c in folder.meta.split_of for d in ("source", "target")
    }
    assert json.loads((tiny_dataset / "meta.json").read_text())["generator"] == {"version": gen.GENERATOR_VERSION, **tiny_config.to_dict()}
    for m in ("rgb", "flow", "pose", "depth", "skeleton"):
        assert len(list((tiny_dataset / m).iterdir())) == 42
    assert sorted(p.name for p in tiny_dataset.iterdir() if not p.name.startswith(".")) == [
        "annotations.csv", "depth", "flow", "meta.json", "pose", "protocols", "rgb", "skeleton", "text"
    ]  # fmt: skip
    assert sorted(p.name for p in (tiny_dataset / "text").iterdir()) == ["descriptions.csv", "features.json", "features.npy"]
    # the stored arrays are what DATA_STRUCTURE.md says
    rec = folder.records[0]
    flow = np.load(tiny_dataset / "flow" / f"{rec.video}.npy")
    depth = np.load(tiny_dataset / "depth" / f"{rec.video}.npy")
    pose = np.load(tiny_dataset / "pose" / f"{rec.video}.npy")
    assert flow.dtype == np.float16 and flow.shape[1:] == (32, 32, 2)
    assert depth.dtype == np.uint16 and depth.shape[1:] == (32, 32)
    assert 0.002 < (depth == 0).mean() < 0.03  # ~1% sensor holes
    assert pose.dtype == np.float32 and pose.shape[1:] == (15, 3)
    assert 0 <= pose[..., 2].min() and pose[..., 2].max() <= 1
    assert 0 < pose[..., :2].mean() < 64


def test_the_target_domain_has_camera_motion(tiny_dataset):
    """Target clips have camera shake and pan (0.3-1 px vs at most 0.4 px): the median flow of a frame,
    which is the wall's, is larger."""
    folder = DatasetFolder.open(tiny_dataset)
    wall_motion = {"source": [], "target": []}
    for rec in folder.records:
        flow = np.load(tiny_dataset / "flow" / f"{rec.video}.npy").astype(np.float32)
        wall_motion[rec.domain].append(np.median(np.linalg.norm(flow, axis=-1), axis=(1, 2)).mean())
    assert np.mean(wall_motion["target"]) > 2 * np.mean(wall_motion["source"])


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------


def test_generation_is_deterministic_and_independent_of_workers(tmp_path):
    a = generate(SyntheticConfig(**MINI), tmp_path / "a", workers=1, progress=False)
    b = generate(SyntheticConfig(**MINI), tmp_path / "b", workers=2, progress=False)
    c = generate(SyntheticConfig(**MINI, seed=1), tmp_path / "c", workers=1, progress=False)
    fa, fb, fc = all_files(a), all_files(b), all_files(c)
    assert len(fa) == 2 + 5 * 12 + 3 + 3  # annotations, meta; 5 streams x 12 clips; 3 protocols; class text
    assert fa == fb  # byte for byte: npy, mp4, annotations, meta
    assert fa["annotations.csv"] != fc["annotations.csv"]  # other seed: other frame ranges
    for name in fa:
        if name.endswith(".npy") and not name.startswith("text/"):  # class text does not depend on the seed
            assert not np.array_equal(np.load(a / name), np.load(c / name)), name


# ------------------------------------------------------------------------------------------------
# interrupted generation
# ------------------------------------------------------------------------------------------------


def _fail_on_clip_5(job):
    """A render job that fails for clip number 5 (module level: picklable for worker processes)."""
    if job[2] == 5:
        raise RuntimeError("disk full")
    _REAL_RENDER(job)


_REAL_RENDER = gen._render_and_write


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_generation_leaves_nothing_behind(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(gen, "_render_and_write", _fail_on_clip_5)
    root = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="disk full"):
        generate(SyntheticConfig(**MINI), root, workers=workers, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither root nor the hidden partial folder
    monkeypatch.setattr(gen, "_render_and_write", _REAL_RENDER)
    ensure_synthetic(root, SyntheticConfig(**MINI), workers=workers)
    assert (root / "meta.json").is_file() and len(DatasetFolder.open(root).records) == 12


def _start_generator(root: Path) -> subprocess.Popen:
    """A generator in its own process group, big enough (280 clips) to be caught mid-way."""
    code = (
        # as in a terminal: Ctrl-C raises KeyboardInterrupt even if this test process (or a
        # library it ran) ignores SIGINT, which a child would otherwise inherit
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from mmfsar.data.synthetic import SyntheticConfig, generate\n"
        "cfg = SyntheticConfig(clips_per_class=20, classes_per_split={'base': 3, 'val': 2, 'novel': 2})\n"
        f"generate(cfg, {str(root)!r}, workers=2, progress=False)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stderr=subprocess.DEVNULL)


def _wait_for_partial(parent: Path, proc: subprocess.Popen, clips: int = 4) -> Path:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the generator ended before it could be interrupted"
        for p in parent.glob(".ds.partial-*"):
            if len(list((p / "rgb").glob("*.mp4"))) >= clips:
                return p
        time.sleep(0.05)
    raise AssertionError("no partial dataset appeared")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_an_interrupted_generation_never_looks_complete(tmp_path, sig):
    root = tmp_path / "ds"
    proc = _start_generator(root)
    try:
        partial = _wait_for_partial(tmp_path, proc)
        assert partial.name == f".ds.partial-{proc.pid}"
        os.killpg(proc.pid, sig)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not root.exists()
    assert not list(tmp_path.rglob("meta.json"))
    if sig == signal.SIGINT:
        assert not partial.exists()  # cleaned up on the way out
    else:
        assert partial.exists()  # nobody could clean up; the next run does
    # a later run succeeds (and removes the dead generator's partial folder)
    ensure_synthetic(root, SyntheticConfig(**MINI), workers=1)
    assert DatasetFolder.open(root).records and not partial.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


# ------------------------------------------------------------------------------------------------
# reuse rules
# ------------------------------------------------------------------------------------------------


def test_ensure_synthetic_reuses_an_identical_dataset(tiny_dataset, tiny_config):
    before = (tiny_dataset / "meta.json").stat().st_mtime_ns
    t = time.monotonic()
    assert ensure_synthetic(tiny_dataset, tiny_config.to_dict()) == tiny_dataset
    assert ensure_synthetic(tiny_dataset, tiny_config) == tiny_dataset
    assert time.monotonic() - t < 1.0
    assert (tiny_dataset / "meta.json").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "change, key, found, wanted",
    [
        ({"seed": 1}, "seed", 0, 1),
        ({"clips_per_class": 4}, "clips_per_class", 3, 4),
        ({"formats": {"depth": "png16"}}, "formats", None, None),
    ],
)
def test_ensure_synthetic_refuses_other_settings_naming_the_key(tiny_dataset, tiny_config, change, key, found, wanted):
    settings = {**tiny_config.to_dict(), **change}
    with pytest.raises(DataError, match="generated with other settings") as err:
        ensure_synthetic(tiny_dataset, settings)
    msg = str(err.value)
    assert str(tiny_dataset) in msg and "data.generator key: (found, requested)" in msg
    diff = ast.literal_eval(re.search(r"= (\{.*\})\)\. Delete", msg).group(1))
    assert list(diff) == [key]  # exactly the differing key
    if found is not None:
        assert diff[key] == (found, wanted)
    else:
        assert diff[key][0] != diff[key][1]


def test_incomplete_or_occupied_folders_are_refused(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"junk exists but has no meta.json: not a complete dataset"):
        ensure_synthetic(junk, SyntheticConfig(**MINI))
    assert (junk / "notes.txt").read_text() == "mine"
    with pytest.raises(DataError, match=r"junk already exists"):
        generate(SyntheticConfig(**MINI), junk)
    empty = tmp_path / "empty"
    empty.mkdir()
    ensure_synthetic(empty, SyntheticConfig(**MINI), workers=1)
    assert (empty / "meta.json").is_file()


def test_bad_generator_settings():
    with pytest.raises(ConfigError, match=r"unknown keys \['colour'\]"):
        SyntheticConfig.from_mapping({"colour": "red"})
    with pytest.raises(ConfigError, match=r"data.generator.formats.rgb='gif' is not supported"):
        SyntheticConfig.from_mapping({"formats": {"rgb": "gif"}})
    with pytest.raises(ConfigError, match=r"unknown domain 'studio'"):
        SyntheticConfig.from_mapping({"domains": ["source", "studio"]})
    with pytest.raises(ConfigError, match=r"classes_per_split.val=8: only 7 available"):
        SyntheticConfig.from_mapping({"classes_per_split": {"val": 8}}).classes()
    with pytest.raises(ConfigError, match="min_frames <= max_frames"):
        SyntheticConfig.from_mapping({"min_frames": 30})
    # partial mappings are completed with the defaults
    cfg = SyntheticConfig.from_mapping({"formats": {"rgb": "frames"}, "classes_per_split": {"base": 2}})
    assert cfg.formats == {"rgb": "frames", "flow": "npy", "pose": "npy", "depth": "npy", "skeleton": "npy"}
    assert cfg.classes_per_split == {"base": 2, "val": 7, "novel": 10}

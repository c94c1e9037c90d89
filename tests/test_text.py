"""Class text: synthetic action descriptions, bag-of-words features, the text files and their importer."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmfsar.data.meta import ClassInfo, DatasetMeta
from mmfsar.data.synthetic.actions import ACTIONS, PROP_OF_ACTION
from mmfsar.data.text import (
    ACTION_DESCRIPTIONS,
    TEXT_DIR,
    BagOfWordsTextEncoder,
    TextEncoder,
    add_arguments,
    class_text_features,
    describe_action,
    import_class_text,
    read_class_text,
    run,
    tokenize,
    write_class_text,
)
from mmfsar.errors import DataError

NAMES = sorted(ACTIONS)


@pytest.fixture(scope="module")
def features() -> dict[str, np.ndarray]:
    feats = class_text_features(NAMES, ACTION_DESCRIPTIONS, BagOfWordsTextEncoder())
    return dict(zip(NAMES, feats))


def cos(features: dict[str, np.ndarray], a: str, b: str) -> float:
    return float(features[a] @ features[b])  # rows are unit vectors


# ---------------------------------------------------------------------------------- descriptions
def test_every_action_has_a_description():
    assert set(ACTION_DESCRIPTIONS) == set(ACTIONS)
    for name in ACTIONS:
        text = describe_action(name)
        assert len(text.split()) >= 8 and text.endswith("."), name


def test_descriptions_follow_the_parametric_definition():
    objects = {"stick", "ball", "box"}
    for name in ACTIONS:
        words = set(re.findall(r"[a-z]+", describe_action(name).lower()))
        assert words & objects == ({PROP_OF_ACTION[name]} if name in PROP_OF_ACTION else set()), name
        if name.startswith("arm_"):
            assert "one arm" in describe_action(name).lower(), name
        if name.startswith("both_"):
            assert "together" in words or "both hands" in describe_action(name).lower(), name
        if name.startswith("alt_"):
            assert "alternation" in words, name


def test_describe_unknown_action():
    with pytest.raises(ValueError, match="no description for action 'moonwalk'"):
        describe_action("moonwalk")


# ------------------------------------------------------------------------------------- features
def test_tokens_share_stems():
    assert tokenize("Swings, swinging, swing") == ["swing"] * 3
    assert tokenize("the arm circles") == tokenize("arms circling")
    assert tokenize("raised raise raises") == ["rais"] * 3


def test_features_shape_norm_and_protocol(features):
    enc = BagOfWordsTextEncoder(dim=64)
    assert isinstance(enc, TextEncoder)
    out = enc.encode(["one arm swings", "both legs kick"])
    assert out.shape == (2, 64) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0)
    assert np.allclose([np.linalg.norm(v) for v in features.values()], 1.0)


def test_features_are_deterministic_in_process(features):
    again = BagOfWordsTextEncoder().encode([ACTION_DESCRIPTIONS[n] for n in NAMES])
    assert np.array_equal(again, np.stack([features[n] for n in NAMES]))
    other_seed = BagOfWordsTextEncoder(seed=1).encode([ACTION_DESCRIPTIONS[n] for n in NAMES])
    assert not np.array_equal(other_seed, again)


def test_features_do_not_depend_on_the_python_hash_seed(features):
    code = (
        "import sys, numpy as np; from mmfsar.data.text import *; "
        "names = sorted(ACTION_DESCRIPTIONS); "
        "f = BagOfWordsTextEncoder().encode([ACTION_DESCRIPTIONS[n] for n in names]); "
        "sys.stdout.write(f.tobytes().hex())"
    )
    expected = np.stack([features[n] for n in NAMES]).tobytes().hex()
    for hash_seed in ("1", "987"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout == expected, f"features differ with PYTHONHASHSEED={hash_seed}"


@pytest.mark.parametrize(
    "name, similar, unrelated",
    [
        ("arm_swing", "both_swing", "squat"),
        ("arm_circle_out", "arm_circle_in", "march"),
        ("swing_bat", "arm_swing", "jump"),
        ("march", "approach", "arm_wave"),
        ("leg_kick", "punch_kick", "both_flap"),
        ("push_box", "both_push", "bend_side"),
        ("alt_swing", "both_swing", "leg_kick"),
    ],
)
def test_shared_body_parts_and_motions_are_more_similar(features, name, similar, unrelated):
    assert cos(features, name, similar) > cos(features, name, unrelated) + 0.1


def test_similarity_ordering_holds_for_other_seeds():
    for seed in (1, 2):
        feats = dict(zip(NAMES, class_text_features(NAMES, ACTION_DESCRIPTIONS, BagOfWordsTextEncoder(seed=seed))))
        assert cos(feats, "arm_swing", "both_swing") > cos(feats, "arm_swing", "squat")


def test_class_text_features_missing_description():
    with pytest.raises(DataError, match=r"no description for class\(es\) \['twirl'\]"):
        class_text_features(["arm_swing", "twirl"], ACTION_DESCRIPTIONS, BagOfWordsTextEncoder())


def test_encoder_bad_settings():
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        BagOfWordsTextEncoder(dim=0)
    with pytest.raises(ValueError, match="seed"):
        BagOfWordsTextEncoder(seed=-1)
    with pytest.raises(ValueError, match="list of texts"):
        BagOfWordsTextEncoder().encode("one arm")


# ---------------------------------------------------------------------------------------- files
CLASSES = ["arm_swing", "squat", "march", "twist"]


def test_round_trip_in_requested_order(tmp_path):
    descriptions = {c: ACTION_DESCRIPTIONS[c] for c in CLASSES}
    enc = BagOfWordsTextEncoder(dim=32)
    feats = class_text_features(CLASSES, descriptions, enc)
    write_class_text(tmp_path, descriptions=descriptions, features=feats, classes=CLASSES, encoder=enc.settings())
    asked = ["twist", "arm_swing"]
    text = read_class_text(tmp_path, asked, need="both")
    assert text.classes == asked
    assert text.descriptions == {c: ACTION_DESCRIPTIONS[c] for c in asked}
    assert text.features.dtype == np.float32
    assert np.array_equal(text.features, feats[[3, 0]])
    assert text.encoder == enc.settings()
    info = json.loads((tmp_path / TEXT_DIR / "features.json").read_text())
    assert info["classes"] == CLASSES and info["dim"] == 32


def test_missing_class_is_named(tmp_path):
    feats = np.eye(len(CLASSES), 8, dtype=np.float32)
    write_class_text(tmp_path, features=feats, classes=CLASSES, encoder={"name": "test"})
    with pytest.raises(DataError, match=r"no text features for class\(es\) \['jump'\]"):
        read_class_text(tmp_path, ["squat", "jump"])
    with pytest.raises(DataError, match="descriptions.csv not found"):
        read_class_text(tmp_path, ["squat"], need="descriptions")
    write_class_text(tmp_path, descriptions={"squat": "Squatting down."})
    with pytest.raises(DataError, match=r"no description for class\(es\) \['march'\]"):
        read_class_text(tmp_path, ["squat", "march"], need="descriptions")
    # not needed: the descriptions present are returned, features too
    text = read_class_text(tmp_path, ["squat", "march"])
    assert text.descriptions == {"squat": "Squatting down."} and text.features.shape == (2, 8)


def test_no_text_at_all(tmp_path):
    with pytest.raises(DataError, match="features.npy not found"):
        read_class_text(tmp_path, ["squat"])


def test_features_not_matching_their_json_are_rejected(tmp_path):
    write_class_text(tmp_path, features=np.ones((4, 3)), classes=CLASSES)
    np.save(tmp_path / TEXT_DIR / "features.npy", np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(DataError, match="checksum"):
        read_class_text(tmp_path, CLASSES)


def test_writer_rejects_bad_features(tmp_path):
    with pytest.raises(DataError, match=r"expected \(4, D\)"):
        write_class_text(tmp_path, features=np.ones((3, 5)), classes=CLASSES)
    with pytest.raises(DataError, match="non-finite"):
        write_class_text(tmp_path, features=np.full((4, 2), np.nan), classes=CLASSES)
    with pytest.raises(DataError, match="more than once"):
        write_class_text(tmp_path, features=np.ones((2, 2)), classes=["squat", "squat"])


# ------------------------------------------------------------------------------------- importer
@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A dataset folder with only meta.json: all the importer reads."""
    root = tmp_path / "ds"
    root.mkdir()
    splits = ["base", "base", "val", "novel"]
    DatasetMeta(name="ds", fps=12.0, classes=[ClassInfo(c, s) for c, s in zip(CLASSES, splits)], modalities={}).save(
        root
    )
    return root


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "description"])
        writer.writerows(rows)
    return path


def test_import_descriptions_computes_features(dataset, tmp_path):
    rows = [(c, ACTION_DESCRIPTIONS[c]) for c in reversed(CLASSES)] + [("extra", "Not in the dataset.")]
    csv_file = _write_csv(tmp_path / "desc.csv", rows)
    result = import_class_text(dataset, descriptions_csv=csv_file, encoder=BagOfWordsTextEncoder(dim=16, seed=3))
    assert result.ok and any("extra" in n for n in result.notes)
    text = read_class_text(dataset, CLASSES, need="both")
    expected = BagOfWordsTextEncoder(dim=16, seed=3).encode([ACTION_DESCRIPTIONS[c] for c in CLASSES])
    assert np.array_equal(text.features, expected)
    assert text.encoder["seed"] == 3 and text.encoder["dim"] == 16
    assert json.loads((dataset / TEXT_DIR / "features.json").read_text())["classes"] == CLASSES  # meta order


def test_import_with_a_missing_class_writes_nothing(dataset, tmp_path):
    csv_file = _write_csv(tmp_path / "desc.csv", [(c, ACTION_DESCRIPTIONS[c]) for c in CLASSES if c != "march"])
    with pytest.raises(DataError, match=r"no description for class\(es\) \['march'\]"):
        import_class_text(dataset, descriptions_csv=csv_file)
    assert not (dataset / TEXT_DIR / "features.npy").exists()
    assert not (dataset / TEXT_DIR / "descriptions.csv").exists()


def test_import_npy_with_class_list_reorders_rows(dataset, tmp_path):
    order = ["twist", "march", "arm_swing", "squat", "extra"]
    array = np.arange(len(order) * 3, dtype=np.float64).reshape(len(order), 3)
    np.save(tmp_path / "llm.npy", array)
    (tmp_path / "llm.txt").write_text("\n".join(order) + "\n")  # the sidecar class list
    import_class_text(dataset, features_npy=tmp_path / "llm.npy")
    text = read_class_text(dataset, CLASSES)
    assert np.array_equal(text.features, array[[2, 3, 1, 0]].astype(np.float32))
    assert text.encoder["name"] == "imported"
    with pytest.raises(DataError, match="which class is each row"):
        np.save(tmp_path / "bare.npy", array)
        import_class_text(dataset, features_npy=tmp_path / "bare.npy")


def test_cli_command(dataset, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    csv_file = _write_csv(tmp_path / "desc.csv", [(c, ACTION_DESCRIPTIONS[c]) for c in CLASSES])
    features = np.random.default_rng(0).normal(size=(4, 6))
    np.save(tmp_path / "f.npy", features)
    (tmp_path / "f.json").write_text(json.dumps(CLASSES))
    args = parser.parse_args([str(dataset), "--from", "csv", str(csv_file), "--features", str(tmp_path / "f.npy")])
    result = run(args)
    assert result.ok and "text/features.npy" in result.done
    text = read_class_text(dataset, CLASSES, need="both")
    assert np.array_equal(text.features, features.astype(np.float32))
    args = parser.parse_args([str(dataset), "--from", "npy", str(tmp_path / "f.npy"), "--features", "x.npy"])
    with pytest.raises(DataError, match="--features goes with --from csv"):
        run(args)
    with pytest.raises(DataError, match="not a numpy .npy array file"):
        run(parser.parse_args([str(dataset), "--from", "npy", str(csv_file), "--classes", str(tmp_path / "f.json")]))
    with pytest.raises(DataError, match="no meta.json"):
        run(parser.parse_args([str(tmp_path / "nowhere"), "--from", "csv", str(csv_file)]))

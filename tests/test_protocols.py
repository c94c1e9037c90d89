"""Clip-level protocols: the synthetic dataset's protocol files, their reader, the protocol data
module, linear evaluation / exemplar matching on hand-made features, and supervised skeleton
training followed by linear evaluation through the entry points."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import run_entry, tiny
from mmfsar.data.meta import DatasetMeta, read_protocol, write_protocol
from mmfsar.errors import ConfigError, DataError
from mmfsar.tasks.protocol import ExemplarMatching, LinearProbe, topk_accuracy


def _clips(root: Path) -> list[dict[str, str]]:
    with (root / "annotations.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_synthetic_protocol_membership(episode_dataset: Path) -> None:
    """xsub: the last 30% of each class's clips per domain (k >= round(0.7 n)) test; xdomain: the target
    domain tests; oneshot: base and val classes train, each novel class's first target clip is its
    exemplar, its other target clips test, its source clips are not in the protocol."""
    meta = DatasetMeta.load(episode_dataset)
    assert sorted(meta.extra["protocols"]) == ["oneshot", "xdomain", "xsub"]
    clips = _clips(episode_dataset)
    n = 6  # clips per class and domain of episode_dataset
    xsub = read_protocol(episode_dataset, meta, "xsub")
    xdomain = read_protocol(episode_dataset, meta, "xdomain")
    oneshot = read_protocol(episode_dataset, meta, "oneshot")
    assert len(xsub) == len(xdomain) == len(clips)
    for c in clips:
        k = int(c["clip_id"].rsplit("_", 1)[1])
        assert xsub[c["clip_id"]] == ("test" if k >= 4 else "train")  # round(0.7 * 6) = 4
        assert xdomain[c["clip_id"]] == ("train" if c["domain"] == "source" else "test")
        if c["split"] != "novel":
            assert oneshot[c["clip_id"]] == "train"
        elif c["domain"] == "source":
            assert c["clip_id"] not in oneshot
        else:
            assert oneshot[c["clip_id"]] == ("exemplar" if k == 0 else "test")
    exemplar_classes = [c["class"] for c in clips if oneshot.get(c["clip_id"]) == "exemplar"]
    assert sorted(exemplar_classes) == sorted(meta.classes_of("novel"))  # exactly one exemplar per novel class
    assert sum(s == "test" for s in xsub.values()) == 2 * len(clips) // n  # two test clips per class and domain


def test_read_protocol_errors(tmp_path: Path, episode_dataset: Path) -> None:
    meta = DatasetMeta.load(episode_dataset)
    with pytest.raises(DataError, match=r"no protocol 'ntu60_xsub'.*oneshot"):
        read_protocol(episode_dataset, meta, "ntu60_xsub")
    meta.extra["protocols"] = {"p": {"file": write_protocol(tmp_path, "p", {"a": "train", "b": "test"})}}
    assert read_protocol(tmp_path, meta, "p") == {"a": "train", "b": "test"}
    assert not list((tmp_path / "protocols").glob("*.tmp*"))  # written atomically, no leftovers
    (tmp_path / "protocols" / "p.csv").write_text("clip_id,subset\na,train\nb,validation\n")
    with pytest.raises(DataError, match=r"p\.csv:3: clip 'b': unknown subset 'validation'"):
        read_protocol(tmp_path, meta, "p")
    (tmp_path / "protocols" / "p.csv").write_text("clip_id,subset\na,train\na,test\n")
    with pytest.raises(DataError, match="more than once"):
        read_protocol(tmp_path, meta, "p")
    (tmp_path / "protocols" / "p.csv").write_text("clip,split\na,train\n")
    with pytest.raises(DataError, match="expected the columns clip_id,subset"):
        read_protocol(tmp_path, meta, "p")


def test_protocol_datamodule(episode_dataset: Path, make_modalities) -> None:
    from mmfsar.data.datamodules import ProtocolDataModule

    dm = ProtocolDataModule(root=episode_dataset, modalities=make_modalities("skeleton"), protocol="xsub", num_workers=0)
    dm.setup()
    meta = DatasetMeta.load(episode_dataset)
    assert dm.base_classes == meta.classes_of_all()  # every class of the protocol, meta order
    assert dm.val_episodes is None
    assert len(dm.train_sets["source"]) == len(dm.positions["train"]) == 13 * 2 * 4
    assert len(dm.val_set) == len(dm.positions["test"]) == 13 * 2 * 2
    assert dm.train_sets["source"].train and not dm.val_set.train and not dm.clips.train
    ids = [r.clip_id for r in dm.clips.records]
    assert ids == sorted(ids)
    assert {ids[i] for i in dm.positions["test"].tolist()} == {r.clip_id for r in dm.val_set.records}
    with pytest.raises(ConfigError, match=r"data.val_episodes=.*set data.val_episodes=null"):
        ProtocolDataModule(root=episode_dataset, modalities=make_modalities("skeleton"), protocol="xsub",
                           val_episodes={"n_way": 5})  # fmt: skip
    with pytest.raises(ConfigError, match="data.unlabelled_target"):
        ProtocolDataModule(root=episode_dataset, modalities=make_modalities("skeleton"), protocol="xsub", unlabelled_target=True)


def test_topk_accuracy_hand_values() -> None:
    scores = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 2, 2, 1])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(50.0)  # rows 0 and 2
    assert topk_accuracy(scores, labels, 2) == pytest.approx(100.0)  # row 1: 2 is second; row 3: 1 is second
    assert topk_accuracy(scores, labels, 5) == pytest.approx(100.0)  # k capped at 3 classes


def test_exemplar_matching_hand_values() -> None:
    support = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0]])  # class 0: (1, 0); class 2: two exemplars along y
    labels = torch.tensor([0, 2, 2])
    query = torch.tensor([[3.0, 4.0], [1.0, -1.0]])
    s = ExemplarMatching().scores(support, labels, query, num_classes=3)
    assert s[0, 0] == pytest.approx(3 / 5) and s[0, 2] == pytest.approx(4 / 5)  # cosines to (1, 0) and (0, 1)
    assert s[1, 0] == pytest.approx(1 / math.sqrt(2)) and s[1, 2] == pytest.approx(-1 / math.sqrt(2))
    assert torch.isinf(s[:, 1]).all() and (s[:, 1] < 0).all()  # no exemplar: never predicted


def test_linear_probe_fits_and_masks_absent_classes() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]]) * 10 + 100  # offset: standardised away
    y = torch.arange(3).repeat_interleave(20)
    x = centres[y] + torch.randn(60, 3, generator=g)
    probe = LinearProbe(weight_decay=1e-3)
    logits = probe.scores(x, y, centres + 0.5, num_classes=4)
    assert logits[:, :3].argmax(1).tolist() == [0, 1, 2]
    assert torch.isinf(logits[:, 3]).all()
    # the penalty is the optimum's: the gradient of mean CE + wd/2 |W|^2 vanishes at the fit
    again = probe.scores(x, y, centres + 0.5, num_classes=4)
    assert torch.equal(logits, again)  # deterministic
    with pytest.raises(ValueError, match="weight_decay"):
        LinearProbe(weight_decay=-1)


def test_skeleton_training_and_linear_evaluation(episode_dataset: Path, tmp_path: Path) -> None:
    """``experiment=skeleton_tiny/{joint,bone}`` on the xsub protocol (validated by top-1 on the
    test clips), then linear evaluation of each stream and of both (averaged scores), the trained
    head's top-1 (equal to the exported checkpoint's validation) and the one-shot protocol: well above chance (1/13 classes) after a few epochs (printed: the figures of this run)."""
    home = tmp_path / "home"
    runs = {}
    for stream, epochs, batches in (("joint", 5, None), ("bone", 1, 2)):  # bone: only for the multi-stream plumbing
        runs[stream] = tmp_path / stream
        out = run_entry(
            "lit_main_pretrain.py", f"experiment=skeleton_tiny/{stream}", f"hydra.run.dir={runs[stream]}",
            *[o for o in tiny(episode_dataset, batches=batches, epochs=epochs) if not o.startswith("data.val_episodes")],
            "data.batch_size=16", home=home,
        )  # fmt: skip
        assert (runs[stream] / "encoder.pt").is_file(), out[-2000:]
    metrics = list(csv.DictReader((runs["joint"] / "csv" / "metrics.csv").open()))
    val = [float(r["val/acc"]) for r in metrics if r.get("val/acc")]
    assert len(val) == 5 and max(val) > 100 / 13 * 2
    print("val/acc", val)

    evals = {}
    for name, encoders in (("joint", [runs["joint"]]), ("both", [runs["joint"], runs["bone"]])):
        files = ",".join(str(r / "encoder.pt") for r in encoders)
        run_entry(
            "lit_main_eval.py", "--config-name", "eval_protocol", "data=folder", f"data.root={episode_dataset}",
            f"encoder=[{files}]", f"hydra.run.dir={tmp_path / ('eval_' + name)}", "data.num_workers=0",
            "++trainer.enable_progress_bar=false", home=home,
        )  # fmt: skip
        evals[name] = json.loads((tmp_path / f"eval_{name}" / "results.json").read_text())
    joint = evals["joint"]
    print("linear", joint["top1"], joint["top5"], "both", evals["both"]["top1"])
    assert joint["protocol"] == "xsub" and joint["classifier"] == "LinearProbe" and joint["test_clips"] == 52
    assert joint["top1"] > 100 / 13 * 2 and joint["top5"] >= joint["top1"]
    both = evals["both"]
    assert [s["modalities"] for s in both["per_stream"]] == [["skeleton"], ["skeleton_bone"]]
    assert both["per_stream"][0]["top1"] == joint["top1"]  # the same stream, the same probe

    run_entry(
        "lit_main_eval.py", "--config-name", "eval_protocol", "protocol=head", "data=folder", f"data.root={episode_dataset}",
        f"encoder={runs['joint'] / 'encoder.pt'}", f"hydra.run.dir={tmp_path / 'head'}", "data.num_workers=0",
        "++trainer.enable_progress_bar=false", home=home,
    )  # fmt: skip
    head = json.loads((tmp_path / "head" / "results.json").read_text())
    assert head["classifier"] == "TrainedHead"
    assert head["top1"] == pytest.approx(max(val), abs=1e-3)  # the exported checkpoint's validation: the same clips, the same head

    run_entry(
        "lit_main_eval.py", "--config-name", "eval_protocol", "protocol=oneshot", "data=folder", f"data.root={episode_dataset}",
        f"encoder={runs['joint'] / 'encoder.pt'}", f"hydra.run.dir={tmp_path / 'oneshot'}", "data.num_workers=0",
        "++trainer.enable_progress_bar=false", home=home,
    )  # fmt: skip
    oneshot = json.loads((tmp_path / "oneshot" / "results.json").read_text())
    assert oneshot["classifier"] == "ExemplarMatching" and oneshot["support_clips"] == 5 and oneshot["classes"] == 5
    assert oneshot["test_clips"] == 25
    print("oneshot", oneshot["top1"])

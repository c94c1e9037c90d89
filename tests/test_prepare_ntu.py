"""NTU RGB+D skeletons (mmfsar.prepare.ntu): the ``.skeleton`` parser on files written here in
the published format, body selection by motion energy, file-name ids, protocols, and the importer."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mmfsar.data.meta import DatasetMeta, read_annotations
from mmfsar.data.skeleton import NTU25, layout_of
from mmfsar.errors import DataError
from mmfsar.prepare.ntu import (
    NTU120_ONESHOT_EXEMPLARS,
    NTU120_ONESHOT_NOVEL,
    NTU120_XSUB_TRAIN,
    NtuIds,
    add_arguments,
    few_shot_split,
    import_ntu_skeletons,
    load_ntu_skeleton,
    motion_energy,
    parse_ntu_name,
    protocol_subsets,
    read_skeleton_file,
    run,
)

BODY_A, BODY_B, BODY_C = "72057594037931101", "72057594037931102", "72057594037931103"


def pose(offset=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A body (25, 3): joint j at (0.01 j, 0.02 j, 3) plus ``offset``."""
    j = np.arange(25, dtype=np.float64)[:, None]
    return np.concatenate([0.01 * j, 0.02 * j, np.full_like(j, 3.0)], axis=1) + np.asarray(offset)


def skeleton_text(frames: list[list[tuple[str, np.ndarray]]], joint_count: int = 25) -> str:
    """The published ``.skeleton`` format; ``frames`` lists (body id, joints (25, 3)) per frame."""
    lines = [str(len(frames))]
    for bodies in frames:
        lines.append(str(len(bodies)))
        for body_id, xyz in bodies:
            lines.append(f"{body_id} 0 1 1 1 1 0 0.01 -0.02 2")
            lines.append(str(joint_count))
            for x, y, z in xyz[:joint_count]:
                lines.append(f"{float(x)!r} {float(y)!r} {float(z)!r} 250.1 200.2 1000.5 600.5 0.1 0.2 0.3 0.9 2")
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -------------------------------------------------------------------------------------- parser
def test_two_bodies_and_a_frame_without_bodies(tmp_path):
    a0, b0, a2 = pose(), pose((1.0, 0, 0)), pose((0.3, 0, 0))
    path = write(
        tmp_path / "S001C001P001R001A050.skeleton", skeleton_text([[(BODY_A, a0), (BODY_B, b0)], [], [(BODY_A, a2)]])
    )
    seq = read_skeleton_file(path)
    assert seq.body_ids == (BODY_A, BODY_B) and seq.num_frames == 3
    assert seq.present.tolist() == [[True, True], [False, False], [True, False]]
    np.testing.assert_allclose(seq.joints[0, 1], b0, rtol=1e-6)
    np.testing.assert_allclose(seq.joints[2, 0], a2, rtol=1e-6)
    # energy of A: x takes two values 0.3 apart over its 2 frames: variance 0.15^2 per joint, 25 joints;
    # B is present in one frame only: variance 0
    np.testing.assert_allclose(motion_energy(seq.joints, seq.present), [25 * 0.15**2, 0.0], rtol=1e-5)
    out = load_ntu_skeleton(path)
    assert out.shape == (3, 2, 25, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], a0, rtol=1e-6)  # the moving body first
    np.testing.assert_allclose(out[0, 1], b0, rtol=1e-6)
    assert not out[1].any() and not out[2, 1].any()  # frame without bodies, B absent: zeros


def test_least_moving_of_three_bodies_is_dropped(tmp_path):
    frames = []
    for t in range(4):  # X moves 0.1 / frame in x, Y 0.5 / frame in y, Z stands still
        frames.append([(BODY_C, pose((2, 0, 0))), (BODY_A, pose((0.1 * t, 0, 0))), (BODY_B, pose((0, 0.5 * t, 0)))])
    path = write(tmp_path / "S001C001P001R001A001.skeleton", skeleton_text(frames))
    seq = read_skeleton_file(path)
    # variance of (0, 1, 2, 3) is 1.25: energies 0, 25 * 0.01 * 1.25, 25 * 0.25 * 1.25
    np.testing.assert_allclose(motion_energy(seq.joints, seq.present), [0.0, 0.3125, 7.8125], rtol=1e-4, atol=1e-9)
    out = load_ntu_skeleton(path)
    for t in range(4):
        np.testing.assert_allclose(out[t, 0], pose((0, 0.5 * t, 0)), rtol=1e-6)
        np.testing.assert_allclose(out[t, 1], pose((0.1 * t, 0, 0)), rtol=1e-6)
    with pytest.raises(DataError, match=":2: frame 1 has 3 bodies, more than max_bodies=2"):
        read_skeleton_file(path, max_bodies=2)


def _one_body_lines() -> list[str]:
    return skeleton_text([[(BODY_A, pose())]]).splitlines()


@pytest.mark.parametrize(
    "edit, message",
    [
        # lines: 1 frame count, 2 body count, 3 body attributes, 4 joint count, 5..29 joints
        (lambda ls: ls[:14], r":15: file ends early .*joint of body 1 of frame 1"),
        (lambda ls: ls[:2], r":3: file ends early .*attributes of body 1"),
        (lambda ls: ls[:3] + ["24"] + ls[4:28], r":4: body 1 of frame 1 has 24 joints, expected 25"),
        (lambda ls: ls[:8] + ["nan 0.1 3.0" + ls[8][ls[8].index(" 250.1") :]] + ls[9:], r":9: body 1 of frame 1: NaN"),
        (lambda ls: ls[:8] + [ls[8].replace("250.1", "abc")] + ls[9:], r":9: .*non-numeric value"),
        (lambda ls: ls[:8] + [ls[8] + " 7"] + ls[9:], r":9: .*expected 12 values, got 13"),
        (lambda ls: ls[:2] + [ls[2] + " 1"] + ls[3:], r":3: .*expected 10 values, got 11"),
        (lambda ls: ["two"] + ls[1:], r":1: expected the frame count \(an integer\), got 'two'"),
        (lambda ls: ls + ["1"], r":30: unexpected content after the last frame"),
    ],
)
def test_parser_errors_name_file_and_line(tmp_path, edit, message):
    path = write(tmp_path / "S001C001P001R001A001.skeleton", "\n".join(edit(_one_body_lines())) + "\n")
    with pytest.raises(DataError, match=message) as info:
        read_skeleton_file(path)
    assert str(path) in str(info.value)


def test_empty_and_all_zero_sequences(tmp_path):
    empty = write(tmp_path / "S001C001P001R001A001.skeleton", "0\n")
    with pytest.raises(DataError, match="no frames"):
        load_ntu_skeleton(empty)
    no_body = write(tmp_path / "S001C001P001R001A002.skeleton", "2\n0\n0\n")
    with pytest.raises(DataError, match="all-zero skeleton sequence") as info:
        load_ntu_skeleton(no_body)
    assert str(no_body) in str(info.value)
    zeros = write(tmp_path / "S001C001P001R001A003.skeleton", skeleton_text([[(BODY_A, np.zeros((25, 3)))]]))
    with pytest.raises(DataError, match="all-zero"):
        load_ntu_skeleton(zeros)


# ------------------------------------------------------------------------------ names, protocols
def test_parse_ntu_name():
    assert parse_ntu_name("S001C002P003R002A013") == NtuIds(1, 2, 3, 2, 13)
    assert parse_ntu_name("/data/nturgb+d_skeletons/S018C001P045R001A061.skeleton").setup == 18
    assert parse_ntu_name("S018C001P045R001A061.skeleton.npy").action == 61
    for bad in ("S01C002P003R002A013", "S001C002P003R002A013_rgb", "video.mp4", "S001C004P003R002A013",
                "S001C002P003R002A121", "S000C002P003R002A013"):  # fmt: skip
        with pytest.raises(DataError, match=repr(bad)):
            parse_ntu_name(bad)


def test_protocol_membership_by_hand():
    names = {
        "S001C001P001R001A001": "NTU-60, subject 1 (train), camera 1 (test), novel A1, not an exemplar (camera 1)",
        "S001C003P008R001A001": "NTU-60, subject 8 (train), camera 3 (train), the published A1 exemplar",
        "S017C002P003R002A060": "NTU-60, subject 3 (test), camera 2 (train), A60 auxiliary",
        "S018C003P008R001A061": "NTU-120 only (setup 18, even), subject 8, the published A61 exemplar",
        "S019C001P044R001A062": "NTU-120 only (setup 19, odd), subject 44 (test), A62 auxiliary",
        "S001C002P045R001A115": "setup 1 but action 115: NTU-120 only; subject 45 (train); novel A115",
        "S032C002P103R002A120": "setup 32 (even), subject 103 (train), A120 auxiliary",
    }
    assert protocol_subsets("ntu60_xsub", names) == {
        "S001C001P001R001A001": "train", "S001C003P008R001A001": "train", "S017C002P003R002A060": "test",
    }  # fmt: skip
    assert protocol_subsets("ntu60_xview", names) == {
        "S001C001P001R001A001": "test", "S001C003P008R001A001": "train", "S017C002P003R002A060": "train",
    }  # fmt: skip
    assert protocol_subsets("ntu120_xsub", names) == {
        "S001C001P001R001A001": "train", "S001C003P008R001A001": "train", "S017C002P003R002A060": "test",
        "S018C003P008R001A061": "train", "S019C001P044R001A062": "test", "S001C002P045R001A115": "train",
        "S032C002P103R002A120": "train",
    }  # fmt: skip
    assert protocol_subsets("ntu120_xset", names) == {
        "S001C001P001R001A001": "test", "S001C003P008R001A001": "test", "S017C002P003R002A060": "test",
        "S018C003P008R001A061": "train", "S019C001P044R001A062": "test", "S001C002P045R001A115": "test",
        "S032C002P103R002A120": "train",
    }  # fmt: skip
    assert protocol_subsets("ntu120_oneshot", names) == {
        "S001C001P001R001A001": "test", "S001C003P008R001A001": "exemplar", "S017C002P003R002A060": "train",
        "S018C003P008R001A061": "exemplar", "S019C001P044R001A062": "train", "S001C002P045R001A115": "test",
        "S032C002P103R002A120": "train",
    }  # fmt: skip
    with pytest.raises(DataError, match="unknown NTU protocol 'ntu60_xset'"):
        protocol_subsets("ntu60_xset", names)


def test_protocol_constants():
    assert len(NTU120_XSUB_TRAIN) == 53 and {1, 38, 45, 103} <= NTU120_XSUB_TRAIN and 106 not in NTU120_XSUB_TRAIN
    assert sorted(NTU120_ONESHOT_NOVEL) == [1 + 6 * k for k in range(20)]
    assert len(NTU120_ONESHOT_EXEMPLARS) == 20
    assert {"S001C003P008R001A055", "S018C003P008R001A115"} <= NTU120_ONESHOT_EXEMPLARS
    splits = [few_shot_split(a) for a in range(1, 121)]
    assert (splits.count("base"), splits.count("val"), splits.count("novel")) == (80, 20, 20)
    assert [few_shot_split(a) for a in (1, 2, 4, 7, 10, 115, 118, 120)] == [
        "novel", "base", "val", "novel", "val", "novel", "val", "base"]  # fmt: skip


# ------------------------------------------------------------------------------------- importer
GOOD = {  # sample -> frames
    "S001C001P001R001A001": 3,  # novel A1
    "S001C003P008R001A001": 2,  # novel A1, the exemplar
    "S001C002P003R002A004": 2,  # val A4
    "S002C001P002R001A002": 4,  # base A2
    "S018C002P045R001A061": 3,  # NTU-120 only, novel A61 (its exemplar is not imported)
}
BROKEN = "S001C001P007R001A003"


def moving_body(frames: int) -> list[list[tuple[str, np.ndarray]]]:
    return [[(BODY_A, pose((0.05 * t, 0, 0)))] for t in range(frames)]


def write_ntu_folder(src: Path) -> None:
    for i, (name, frames) in enumerate(GOOD.items()):
        write(src / f"part{i % 2}" / f"{name}.skeleton", skeleton_text(moving_body(frames)))
    lines = skeleton_text(moving_body(2)).splitlines()
    write(src / "part0" / f"{BROKEN}.skeleton", "\n".join(lines[:20]) + "\n")  # truncated in frame 1


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_import_skeleton_folder(tmp_path):
    src, out = tmp_path / "src", tmp_path / "ntu"
    write_ntu_folder(src)
    result = import_ntu_skeletons(out, src, workers=1, progress=False)
    assert sorted(result.done) == sorted(GOOD) and result.skipped == []
    assert len(result.problems) == 1
    assert f"{BROKEN}.skeleton:21: file ends early" in result.problems[0]
    # outputs: one array per good file, nothing temporary left
    assert sorted(p.name for p in (out / "skeleton").iterdir()) == sorted(f"{n}.npy" for n in GOOD)
    assert not list((out / ".prepare" / "tmp").iterdir())
    arr = np.load(out / "skeleton" / "S002C001P002R001A002.npy")
    assert arr.shape == (4, 2, 25, 3) and arr.dtype == np.float32
    np.testing.assert_allclose(arr[3, 0], pose((0.15, 0, 0)), rtol=1e-6)
    assert not arr[:, 1].any()
    # annotations: one clip per sample over all its frames, class-disjoint few-shot splits
    rows = {r.clip_id: r for r in read_annotations(out / "annotations.csv")}
    assert sorted(rows) == sorted(GOOD)
    fields = [(r.label_name, r.split, r.domain, r.video, r.start_frame, r.end_frame) for r in rows.values()]
    assert ("A004", "val", "source", "S001C002P003R002A004", 0, 2) in fields
    assert ("A061", "novel", "source", "S018C002P045R001A061", 0, 3) in fields
    assert ("A002", "base", "source", "S002C001P002R001A002", 0, 4) in fields
    # protocols: NTU-120 data present, so all five; NTU-60 ones without the S018 clip
    prot = {p.stem: {r["clip_id"]: r["subset"] for r in read_csv(p)} for p in (out / "protocols").glob("*.csv")}
    assert sorted(prot) == ["ntu120_oneshot", "ntu120_xset", "ntu120_xsub", "ntu60_xsub", "ntu60_xview"]
    assert prot["ntu60_xsub"] == {"S001C001P001R001A001": "train", "S001C003P008R001A001": "train",
                                  "S001C002P003R002A004": "test", "S002C001P002R001A002": "train"}  # fmt: skip
    assert (
        prot["ntu60_xview"]["S001C001P001R001A001"] == "test" and prot["ntu60_xview"]["S001C002P003R002A004"] == "train"
    )
    assert prot["ntu120_xset"] == {"S001C001P001R001A001": "test", "S001C003P008R001A001": "test",
                                   "S001C002P003R002A004": "test", "S002C001P002R001A002": "train",
                                   "S018C002P045R001A061": "train"}  # fmt: skip
    assert prot["ntu120_oneshot"] == {"S001C001P001R001A001": "test", "S001C003P008R001A001": "exemplar",
                                      "S001C002P003R002A004": "train", "S002C001P002R001A002": "train",
                                      "S018C002P045R001A061": "test"}  # fmt: skip
    assert any("S018C003P008R001A061" in n for n in result.notes)  # the A61 exemplar is missing
    # meta.json
    meta = DatasetMeta.load(out)
    assert meta.fps == 30 and meta.name == "ntu"
    assert [(c.name, c.split) for c in meta.classes] == [("A001", "novel"), ("A002", "base"), ("A004", "val"),
                                                          ("A061", "novel")]  # fmt: skip
    assert meta.modalities["skeleton"]["format"] == "npy" and meta.modalities["skeleton"]["dir"] == "skeleton"
    assert layout_of(meta) == NTU25
    assert meta.extra["protocols"]["ntu60_xsub"]["file"] == "protocols/ntu60_xsub.csv"
    assert all((out / p["file"]).is_file() for p in meta.extra["protocols"].values())

    # a second run skips what is done and reports the broken file again; fixing it imports it
    again = import_ntu_skeletons(out, src, workers=1, progress=False)
    assert again.done == [] and sorted(again.skipped) == sorted(GOOD) and len(again.problems) == 1
    write(src / "part0" / f"{BROKEN}.skeleton", skeleton_text(moving_body(2)))
    fixed = import_ntu_skeletons(out, src, workers=1, progress=False)
    assert fixed.done == [BROKEN] and fixed.ok
    assert {c.name for c in DatasetMeta.load(out).classes} == {"A001", "A002", "A003", "A004", "A061"}
    # a file broken now loses its earlier output
    write(src / "part1" / "S001C003P008R001A001.skeleton", "1\n1\n")
    broke = import_ntu_skeletons(out, src, workers=1, progress=False)
    assert len(broke.problems) == 1 and not (out / "skeleton" / "S001C003P008R001A001.npy").exists()
    assert "S001C003P008R001A001" not in {r.clip_id for r in read_annotations(out / "annotations.csv")}


def test_import_ntu60_only_writes_ntu60_protocols(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write(src / "S001C002P001R001A002.skeleton", skeleton_text(moving_body(2)))
    write(src / "S001C001P002R001A001.skeleton", skeleton_text(moving_body(2)))
    write(src / "notes.skeleton", skeleton_text(moving_body(2)))
    result = import_ntu_skeletons(out, src, workers=1, progress=False, domain="target")
    assert sorted(result.done) == ["S001C001P002R001A001", "S001C002P001R001A002"]
    assert len(result.problems) == 1 and "notes.skeleton" in result.problems[0]
    assert sorted(p.name for p in (out / "protocols").iterdir()) == ["ntu60_xsub.csv", "ntu60_xview.csv"]
    assert {r.domain for r in read_annotations(out / "annotations.csv")} == {"target"}
    with pytest.raises(DataError, match="unknown NTU protocol"):
        import_ntu_skeletons(out, src, protocols="ntu60_xsub,xview", workers=1, progress=False)
    again = import_ntu_skeletons(out, src, protocols=["ntu60_xview"], workers=1, progress=False)
    assert sorted(again.skipped) == sorted(result.done)
    assert [p.name for p in (out / "protocols").iterdir()] == ["ntu60_xview.csv"]
    assert list(DatasetMeta.load(out).extra["protocols"]) == ["ntu60_xview"]


def test_import_npy_arrays(tmp_path):
    src, out = tmp_path / "npy", tmp_path / "out"
    src.mkdir()
    three = np.zeros((4, 3, 25, 3), np.float32)  # slot 2 moves most, slot 0 a little, slot 1 not at all
    for t in range(4):
        three[t, 0] = pose((0.1 * t, 0, 0))
        three[t, 1] = pose((1, 0, 0))
        three[t, 2] = pose((0, 0.5 * t, 0))
    np.save(src / "S001C001P001R001A001.npy", three)
    np.save(src / "S001C001P001R001A002.skeleton.npy", three[:, :1])
    np.save(src / "S001C001P001R001A003.npy", three[0])  # rank 3
    np.save(src / "S001C001P001R001A004.npy", three[:, :, :24])  # 24 joints
    nan = three.copy()
    nan[2, 0, 3, 1] = np.nan
    np.save(src / "S001C001P001R001A005.npy", nan)
    np.save(src / "S001C001P001R001A006.npy", three[:, :2].transpose(3, 0, 2, 1))  # (C, T, V, M)
    result = import_ntu_skeletons(out, src, fmt="npy", workers=1, progress=False)
    assert sorted(result.done) == ["S001C001P001R001A001", "S001C001P001R001A002"]
    problems = "\n".join(result.problems)
    for name, why in (("A003.npy", "expected joints"), ("A004.npy", "24 joints"), ("A005.npy", "NaN"),
                      ("A006.npy", "transpose")):  # fmt: skip
        assert any(name in p and why in p for p in result.problems), (name, problems)
    arr = np.load(out / "skeleton" / "S001C001P001R001A001.npy")
    np.testing.assert_array_equal(arr[:, 0], three[:, 2])
    np.testing.assert_array_equal(arr[:, 1], three[:, 0])
    one = np.load(out / "skeleton" / "S001C001P001R001A002.npy")
    assert one.shape == (4, 2, 25, 3) and not one[:, 1].any()


def test_cli_arguments_and_refusals(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write(src / "S001C001P001R001A001.skeleton", skeleton_text(moving_body(2)))
    write(src / "S001C001P002R001A001.skeleton", skeleton_text(moving_body(2)))
    ignore = write(tmp_path / "missing.txt", "S001C001P002R001A001\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(out), str(src), "--from", "ntu", "--protocols", "ntu60_xview", "--name", "NTU",
                              "--ignore", str(ignore), "--workers", "1"])  # fmt: skip
    result = run(args)
    assert result.ok and result.done == ["S001C001P001R001A001"]
    assert [p.name for p in (out / "protocols").iterdir()] == ["ntu60_xview.csv"]
    assert json.loads((out / "meta.json").read_text())["name"] == "NTU"
    with pytest.raises(DataError, match="no \\*.npy files"):
        import_ntu_skeletons(out, src, fmt="npy", progress=False)
    with pytest.raises(DataError, match="skeleton folder not found"):
        import_ntu_skeletons(out, tmp_path / "nowhere", progress=False)
    meta = json.loads((out / "meta.json").read_text())
    meta["modalities"]["rgb"] = {"format": "video", "dir": "rgb"}
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"already holds a dataset with streams \['rgb'\]"):
        import_ntu_skeletons(out, src, progress=False)

"""Class text of a dataset: descriptions, text features that need no downloaded weights, their files.

Text-guided methods use one text per class: MMCL (METHODS.md 4) refines the class scores with an
MLP on precomputed text features; CLIP-MDMF (METHODS.md 5) encodes class texts with CLIP. Text is
a dataset asset stored beside the annotations (DATA_STRUCTURE.md)::

    text/descriptions.csv   columns class,description (one row per class)
    text/features.npy       (C, D) float32, one row per class
    text/features.json      {"classes": [...row order...], "dim": D, "encoder": {...}, "sha256": ...}

``features.json`` says which class each row is, which encoder made the rows (with its settings, so
they can be remade) and the checksum of ``features.npy``, so a pair left inconsistent by a crash or
a hand edit is an error, never a silent mismatch.

The synthetic dataset's classes are parametric actions (``data/synthetic/actions.py``); their
descriptions (:data:`ACTION_DESCRIPTIONS`) are written from the parametric definitions with one
consistent vocabulary (body part, one arm / both arms together / in alternation, motion verb,
direction, object held), so that a bag-of-words encoder gives classes that share body parts or
motions more similar features. :class:`BagOfWordsTextEncoder` is that encoder: hashed word and
word-bigram counts, deterministic across machines and Python processes (``hashlib``, never
``hash()``), a stand-in for an LLM / CLIP text encoder where no weights can be downloaded. Features
of a real text encoder are brought in with ``python -m mmfsar.prepare text OUT --from npy FILE``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from mmfsar.data.meta import DatasetMeta
from mmfsar.errors import DataError

if TYPE_CHECKING:
    from mmfsar.prepare.common import StageResult

__all__ = [
    "ACTION_DESCRIPTIONS",
    "TEXT_DIR",
    "DESCRIPTIONS_FILE",
    "FEATURES_FILE",
    "FEATURES_INFO_FILE",
    "TextEncoder",
    "BagOfWordsTextEncoder",
    "ClassText",
    "describe_action",
    "tokenize",
    "class_text_features",
    "read_descriptions_csv",
    "write_class_text",
    "read_class_text",
    "import_class_text",
    "add_arguments",
    "run",
]

TEXT_DIR = "text"
DESCRIPTIONS_FILE = "descriptions.csv"
FEATURES_FILE = "features.npy"
FEATURES_INFO_FILE = "features.json"
DESCRIPTION_COLUMNS = ("class", "description")

# --------------------------------------------------------------------------------- descriptions
# From the tracks each action sets in data/synthetic/actions.py. "{side}_arm" is the in-plane
# shoulder angle (0 hanging, pi overhead): a sideways movement; "arm_fwd" / "leg_fwd" move the
# limb towards the camera. The prop classes reuse their motion's sentence and name the object.
ACTION_DESCRIPTIONS: dict[str, str] = {
    # one arm
    "arm_swing": "One arm swings sideways out from the body and back, up to shoulder height, "
    "while the other arm hangs still.",
    "arm_circle_out": "One arm circles outwards from the shoulder in full turns with a straight elbow.",
    "arm_circle_in": "One arm circles inwards from the shoulder in full turns with a straight elbow.",
    "arm_raise": "One arm is raised once sideways from hanging at the side up over the head.",
    "arm_lower": "One arm is lowered once sideways from over the head down to hang at the side.",
    "arm_push": "One arm pushes forwards towards the camera again and again, the elbow straightening "
    "as the hand reaches out and bending as it pulls back.",
    "arm_wave": "One arm is held up above the shoulder and the hand waves from side to side by bending "
    "the elbow.",
    "arm_shake": "One arm is held out sideways at shoulder height and shakes quickly up and down with "
    "small movements and a straight elbow.",
    # both arms together (mirror-symmetric)
    "both_swing": "Both arms swing sideways out from the body and back together, mirror-symmetric, "
    "up to shoulder height.",
    "both_circle_out": "Both arms circle outwards from the shoulders together in full turns with straight "
    "elbows.",
    "both_raise": "Both arms are raised once together sideways from hanging at the sides up over the head.",
    "both_push": "Both arms push forwards towards the camera together again and again, the elbows "
    "straightening as the hands reach out and bending as they pull back.",
    "both_wave": "Both arms are held up above the shoulders and both hands wave from side to side by "
    "bending the elbows.",
    "both_flap": "Both arms are held out sideways with straight elbows and flap quickly up and down "
    "together like wings.",
    # both arms in alternation
    "alt_swing": "Both arms swing sideways out from the body and back in alternation: one arm rises "
    "while the other arm falls.",
    "alt_push": "Both arms push forwards towards the camera in alternation, one arm reaching out while "
    "the other arm pulls back, like punching.",
    "alt_circle": "Both arms circle outwards from the shoulders in alternation, half a turn apart, with "
    "straight elbows.",
    # legs
    "leg_kick": "One leg kicks forwards towards the camera again and again, the knee straightening "
    "during the kick.",
    "leg_side_raise": "One leg is lifted sideways away from the body and lowered again with a straight "
    "knee.",
    "march": "Marching on the spot: marching steps with the legs lifting in alternation, each knee rising "
    "high while the other leg stands.",
    "squat": "Squatting down and standing up again: both knees bend, the hips lower, and both arms "
    "reach forwards for balance.",
    "jump": "Jumping up and down on the spot with both feet, the arms lifting slightly sideways at each "
    "jump.",
    "jumping_jack": "Jumping jacks: both arms are raised sideways over the head while both legs spread "
    "apart, then arms and legs come back together.",
    # whole body
    "bend_side": "The torso bends sideways from the hips to the left and to the right while the arms "
    "hang.",
    "bend_forward": "The torso bends forwards from the hips and straightens again, both arms hanging "
    "forwards.",
    "approach": "Walking towards the camera: the body comes closer with marching steps, the legs "
    "lifting in alternation.",
    "recede": "Walking away from the camera: the body moves further away with marching steps, the legs "
    "lifting in alternation.",
    "walk_across": "Walking sideways across the view from one side to the other with quick steps in "
    "alternation, both arms swinging in alternation.",
    "twist": "Both arms are held out sideways at shoulder height and the torso twists, one arm moving "
    "forwards while the other arm moves back.",
    "punch_kick": "One arm punches forwards towards the camera and the opposite leg kicks forwards in "
    "alternation with the punch.",
    # the same motions with a handheld object
    "swing_bat": "One arm holding a stick swings it sideways out from the body and back, up to shoulder "
    "height, like a bat.",
    "throw_ball": "One arm holding a ball pushes forwards towards the camera again and again, the elbow "
    "straightening as the hand reaches out to throw the ball.",
    "lift_box": "Both arms holding a box between the hands are raised once together from the sides up "
    "over the head.",
    "wave_flag": "One arm holding a stick is held up above the shoulder and the hand waves the stick "
    "from side to side like a flag by bending the elbow.",
    "push_box": "Both arms push a box forwards towards the camera together again and again, the elbows "
    "straightening as the hands reach out.",
}  # fmt: skip


def describe_action(name: str) -> str:
    """The English description of synthetic action class ``name``."""
    try:
        return ACTION_DESCRIPTIONS[name]
    except KeyError:
        raise ValueError(
            f"no description for action {name!r}; known actions: {sorted(ACTION_DESCRIPTIONS)}"
        ) from None


# -------------------------------------------------------------------------------------- encoders
@runtime_checkable
class TextEncoder(Protocol):
    """Maps texts to one feature row each. ``settings()`` is recorded in ``features.json``."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), D) float32."""
        ...

    def settings(self) -> dict[str, Any]:
        """JSON-serialisable name and settings, enough to rebuild the encoder."""
        ...


# Function words carry no meaning about the movement; words like "one", "both", "other", "again",
# "once", "up", "down" do, so they stay.
STOP_WORDS = frozenset(
    "a an the and or of to from at in on by with as is are be been being it its this that these those "
    "then while into onto each for so very".split()
)
_WORD = re.compile(r"[a-z]+")
_KEEP_DOUBLE = frozenset("lsz")


def _stem(word: str) -> str:
    """A small fixed suffix stripper (no dictionary), so ``swings`` / ``swinging`` / ``swing``,
    ``circles`` / ``circling`` and ``raise`` / ``raised`` share a token. Deliberately crude and
    frozen: changing it changes every feature, so it is versioned with the encoder."""
    if len(word) > 5 and word.endswith("ing"):
        word = word[:-3]
    elif len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    elif len(word) > 4 and word.endswith("es") and not word.endswith("ses"):
        word = word[:-2]
    elif len(word) > 4 and word.endswith("ed"):
        word = word[:-2]
    elif len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiou" and word[-1] not in _KEEP_DOUBLE:
        word = word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """Lower-cased, stop words removed, stemmed word tokens of ``text``."""
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


class BagOfWordsTextEncoder:
    """Hashed bag of words and word bigrams, L2-normalised: text features without any weights.

    Each token (and each pair of consecutive tokens, which keeps "one arm" apart from "other arm")
    adds ``1 + log(count)`` to one of ``dim`` buckets with a ± sign, both read from a keyed BLAKE2b
    digest of the token: signed feature hashing (Weinberger et al., 2009), a random projection of
    the sparse count vector that keeps inner products in expectation, so the cosine of two texts
    grows with the words and word pairs they share. ``seed`` keys the hash (another seed is another
    projection). Nothing depends on the process (``hash()`` is salted per process), the machine or
    the other texts of the call.

    Args:
        dim: feature size.
        seed: hash key, ``0 <= seed < 2**64``.
        bigram_weight: weight of a bigram relative to a word.
    """

    VERSION = 1  # of the tokenizer, stemmer and hashing: bump when any of them changes

    def __init__(self, *, dim: int = 512, seed: int = 0, bigram_weight: float = 1.0) -> None:
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"BagOfWordsTextEncoder: dim must be a positive integer, got {dim!r}")
        if not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"BagOfWordsTextEncoder: seed must be an integer in [0, 2**64), got {seed!r}")
        if not bigram_weight >= 0:
            raise ValueError(f"BagOfWordsTextEncoder: bigram_weight must be >= 0, got {bigram_weight!r}")
        self.dim = dim
        self.seed = seed
        self.bigram_weight = float(bigram_weight)
        self._key = seed.to_bytes(8, "little")

    def settings(self) -> dict[str, Any]:
        return {
            "name": "bag_of_words",
            "version": self.VERSION,
            "dim": self.dim,
            "seed": self.seed,
            "bigram_weight": self.bigram_weight,
        }

    def _bucket(self, term: str) -> tuple[int, float]:
        digest = hashlib.blake2b(term.encode("utf-8"), digest_size=16, key=self._key).digest()
        return int.from_bytes(digest[:8], "little") % self.dim, 1.0 if digest[8] & 1 else -1.0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise ValueError("BagOfWordsTextEncoder.encode takes a list of texts, got a single string")
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"BagOfWordsTextEncoder.encode: text {row} is {type(text).__name__}, not str")
            tokens = tokenize(text)
            terms: Counter[str] = Counter(tokens)
            if self.bigram_weight > 0:
                terms.update(f"{a} {b}" for a, b in zip(tokens, tokens[1:]))
            for term, count in terms.items():
                bucket, sign = self._bucket(term)
                weight = 1.0 if " " not in term else self.bigram_weight
                out[row, bucket] += sign * weight * (1.0 + math.log(count))
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)


def class_text_features(names: Sequence[str], descriptions: Mapping[str, str], encoder: TextEncoder) -> np.ndarray:
    """Feature rows (len(names), D) float32 of the classes ``names``, in that order."""
    missing = [n for n in names if not str(descriptions.get(n, "")).strip()]
    if missing:
        raise DataError(f"no description for class(es) {missing}")
    feats = np.asarray(encoder.encode([descriptions[n] for n in names]))
    if feats.ndim != 2 or feats.shape[0] != len(names):
        raise ValueError(
            f"text encoder {type(encoder).__name__} returned shape {feats.shape} for {len(names)} texts; "
            "expected (num_texts, dim)"
        )
    if not np.isfinite(feats).all():
        raise ValueError(f"text encoder {type(encoder).__name__} returned non-finite features")
    return feats.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class ClassText:
    """Text of the classes a method asked for, in the order it asked.

    ``descriptions`` holds the classes that have one (all of ``classes`` when descriptions were
    required); ``features`` row ``i`` belongs to ``classes[i]`` (None when the dataset has no
    features and they were not required); ``encoder`` is the ``encoder`` entry of
    ``features.json``.
    """

    classes: list[str]
    descriptions: dict[str, str]
    features: np.ndarray | None
    encoder: dict[str, Any] | None = None


def read_descriptions_csv(path: str | Path) -> dict[str, str]:
    """``class,description`` rows of a CSV (a header row is required); every bad row is reported."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"description file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in DESCRIPTION_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; expected a header row {','.join(DESCRIPTION_COLUMNS)}"
        )
    out: dict[str, str] = {}
    line_of: dict[str, int] = {}
    problems = []
    for line, row in enumerate(reader, start=2):
        name, desc = (row.get("class") or "").strip(), (row.get("description") or "").strip()
        if not name:
            problems.append(f"{path}:{line}: empty class name")
        elif not desc:
            problems.append(f"{path}:{line}: class {name!r} has an empty description")
        elif name in out:
            problems.append(f"{path}:{line}: class {name!r} listed again (first on line {line_of[name]})")
        else:
            out[name], line_of[name] = desc, line
    if problems:
        raise DataError("\n".join(problems))
    if not out:
        raise DataError(f"{path}: no descriptions")
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _npy_bytes(features: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, features, allow_pickle=False)
    return buf.getvalue()


def _load_npy(path: Path, data: bytes | None = None) -> np.ndarray:
    data = path.read_bytes() if data is None else data
    if not data.startswith(b"\x93NUMPY"):
        raise DataError(f"{path}: not a numpy .npy array file")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable .npy array ({exc})") from exc


def _write_atomic(root: Path, path: Path, data: bytes) -> None:
    from mmfsar.prepare.common import atomic_file  # crash-safe outputs of the prepare commands

    with atomic_file(root, path) as tmp:
        tmp.write_bytes(data)


def _check_features(features: np.ndarray, classes: Sequence[str], where: str) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] != len(classes) or features.shape[1] == 0:
        raise DataError(
            f"{where}: features have shape {features.shape}, expected ({len(classes)}, D) for {len(classes)} classes"
        )
    if not np.issubdtype(features.dtype, np.number) or np.iscomplexobj(features):
        raise DataError(f"{where}: features must be real numbers, got dtype {features.dtype}")
    features = features.astype(np.float32)
    if not np.isfinite(features).all():
        rows = sorted({classes[i] for i in np.nonzero(~np.isfinite(features))[0]})
        raise DataError(f"{where}: non-finite feature values for class(es) {rows[:10]}")
    dup = [c for c, k in Counter(classes).items() if k > 1]
    if dup:
        raise DataError(f"{where}: class(es) listed more than once: {dup[:10]}")
    return features


def write_class_text(
    root: str | Path,
    *,
    descriptions: Mapping[str, str] | None = None,
    features: np.ndarray | None = None,
    classes: Sequence[str] | None = None,
    encoder: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``root/text/`` files: the descriptions, and/or the features (row ``i`` = ``classes[i]``)
    with ``features.json`` (classes, dim, ``encoder`` settings, checksum). Each file is replaced
    atomically; ``features.json`` is written last and carries the checksum of ``features.npy``, so a
    crash between the two leaves a pair the reader rejects. Returns the paths written."""
    root = Path(root)
    folder = root / TEXT_DIR
    written: list[Path] = []
    if descriptions is None and features is None:
        raise ValueError("write_class_text: nothing to write (give descriptions and/or features)")
    if descriptions is not None:
        bad = [c for c, d in descriptions.items() if not str(c).strip() or not str(d).strip()]
        if bad:
            raise DataError(f"empty class name or description for {bad[:10]}")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(DESCRIPTION_COLUMNS)
        writer.writerows([str(c).strip(), " ".join(str(d).split())] for c, d in descriptions.items())
        _write_atomic(root, folder / DESCRIPTIONS_FILE, buf.getvalue().encode("utf-8"))
        written.append(folder / DESCRIPTIONS_FILE)
    if features is not None:
        if classes is None:
            raise ValueError("write_class_text: features need `classes`, the class of each row")
        classes = [str(c) for c in classes]
        features = _check_features(features, classes, "write_class_text")
        data = _npy_bytes(features)
        info = {
            "classes": classes,
            "dim": int(features.shape[1]),
            "encoder": dict(encoder or {"name": "unknown"}),
            "sha256": _sha256(data),
        }
        _write_atomic(root, folder / FEATURES_FILE, data)
        _write_atomic(root, folder / FEATURES_INFO_FILE, (json.dumps(info, indent=1) + "\n").encode("utf-8"))
        written += [folder / FEATURES_FILE, folder / FEATURES_INFO_FILE]
    return written


def _read_features(folder: Path) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    npy, info_path = folder / FEATURES_FILE, folder / FEATURES_INFO_FILE
    if not info_path.is_file():
        raise DataError(f"{npy} has no {FEATURES_INFO_FILE} beside it saying which class each row is")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{info_path}: not valid JSON ({exc})") from exc
    classes = info.get("classes") if isinstance(info, dict) else None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{info_path}: 'classes' must be a list of class names")
    data = npy.read_bytes()
    if info.get("sha256") not in (None, _sha256(data)):
        raise DataError(
            f"{npy} does not match the checksum in {info_path} (written by another run or edited by hand); "
            "import the text again"
        )
    features = _check_features(_load_npy(npy, data), classes, str(npy))
    if "dim" in info and info["dim"] != features.shape[1]:
        raise DataError(f"{info_path}: dim {info['dim']} but {npy} has {features.shape[1]} columns")
    return classes, features, dict(info.get("encoder") or {})


def read_class_text(root: str | Path, classes: Sequence[str], *, need: str = "features") -> ClassText:
    """The text of ``classes`` (in that order) from ``root/text/``.

    ``need`` is what the method cannot do without: ``"features"`` (MMCL's refinement),
    ``"descriptions"`` (a text encoder run at training time, e.g. CLIP) or ``"both"``; every
    requested class must have it, else a :class:`DataError` names the classes without text. What
    is not needed is returned when present (descriptions of the classes that have one; features
    when every class has a row).
    """
    if need not in ("features", "descriptions", "both"):
        raise ValueError(f"read_class_text: need must be 'features', 'descriptions' or 'both', got {need!r}")
    classes = [str(c) for c in classes]
    folder = Path(root) / TEXT_DIR
    how = f"write them with `python -m mmfsar.prepare text {root} --from csv|npy FILE`"
    desc_path, feat_path = folder / DESCRIPTIONS_FILE, folder / FEATURES_FILE

    descriptions: dict[str, str] = {}
    if desc_path.is_file():
        all_desc = read_descriptions_csv(desc_path)
        descriptions = {c: all_desc[c] for c in classes if c in all_desc}
    if need in ("descriptions", "both"):
        if not desc_path.is_file():
            raise DataError(f"{desc_path} not found: the classes have no descriptions; {how}")
        missing = [c for c in classes if c not in descriptions]
        if missing:
            raise DataError(f"{desc_path}: no description for class(es) {missing}; {how}")

    features = encoder = None
    if feat_path.is_file():
        feat_classes, all_features, encoder = _read_features(folder)
        row_of = {c: i for i, c in enumerate(feat_classes)}
        missing = [c for c in classes if c not in row_of]
        if not missing:
            features = all_features[[row_of[c] for c in classes]]
        elif need in ("features", "both"):
            raise DataError(f"{feat_path}: no text features for class(es) {missing}; {how}")
    elif need in ("features", "both"):
        raise DataError(f"{feat_path} not found: the classes have no text features; {how}")
    return ClassText(classes=classes, descriptions=descriptions, features=features, encoder=encoder)


# -------------------------------------------------------------------------------------- importer
def _read_class_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"class list not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
        raw = raw.get("classes") if isinstance(raw, dict) else raw
        if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
            raise DataError(f"{path}: expected a JSON list of class names or an object with 'classes'")
        return raw
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _feature_classes(features_npy: Path, features_classes: Sequence[str] | str | Path | None) -> list[str]:
    if features_classes is None:
        for sidecar in (features_npy.with_suffix(".json"), features_npy.with_suffix(".txt")):
            if sidecar.is_file():
                return _read_class_list(sidecar)
        raise DataError(
            f"{features_npy}: which class is each row? Give a class list (--classes FILE: one name per line, "
            f"or a JSON list), or put it beside the array as {features_npy.with_suffix('.json').name} / "
            f"{features_npy.with_suffix('.txt').name}"
        )
    if isinstance(features_classes, (str, Path)):
        return _read_class_list(Path(features_classes))
    return [str(c) for c in features_classes]


def import_class_text(
    out: str | Path,
    *,
    descriptions_csv: str | Path | None = None,
    features_npy: str | Path | None = None,
    features_classes: Sequence[str] | str | Path | None = None,
    encoder: TextEncoder | None = None,
) -> StageResult:
    """Bring class text into dataset ``out``: descriptions from a ``class,description`` CSV and/or
    features from an ``.npy`` (C, D) whose row classes come from ``features_classes`` (names, or a
    file: one name per line or a JSON list; default: a ``.json`` / ``.txt`` beside the array).

    Every class of ``out/meta.json`` must be covered (else a :class:`DataError` names the classes
    without text, and nothing is written); rows of other classes are dropped with a note. When only
    descriptions are given, the features are computed from them with ``encoder`` (default
    :class:`BagOfWordsTextEncoder`). Files are written in ``meta.json``'s class order. Returns a
    ``StageResult`` (``summary()``, ``ok``) like the other prepare commands.
    """
    from mmfsar.prepare.common import StageResult, require_dataset

    root = Path(out)
    require_dataset(root)
    if descriptions_csv is None and features_npy is None:
        raise DataError("nothing to import: give a descriptions CSV and/or a features .npy")
    meta = DatasetMeta.load(root)
    classes = [c.name for c in meta.classes]
    result = StageResult("text")

    descriptions = None
    if descriptions_csv is not None:
        found = read_descriptions_csv(descriptions_csv)
        missing = [c for c in classes if c not in found]
        if missing:
            raise DataError(f"{descriptions_csv}: no description for class(es) {missing} of {root / 'meta.json'}")
        extra = [c for c in found if c not in set(classes)]
        if extra:
            result.notes.append(f"{len(extra)} description(s) of classes not in meta.json left out: {extra[:10]}")
        descriptions = {c: found[c] for c in classes}

    features, encoder_info = None, None
    if features_npy is not None:
        features_npy = Path(features_npy)
        if not features_npy.is_file():
            raise DataError(f"features file not found: {features_npy}")
        array = _load_npy(features_npy)
        row_classes = _feature_classes(features_npy, features_classes)
        array = _check_features(array, row_classes, str(features_npy))
        row_of = {c: i for i, c in enumerate(row_classes)}
        missing = [c for c in classes if c not in row_of]
        if missing:
            raise DataError(f"{features_npy}: no feature row for class(es) {missing} of {root / 'meta.json'}")
        extra = [c for c in row_classes if c not in set(classes)]
        if extra:
            result.notes.append(f"{len(extra)} feature row(s) of classes not in meta.json left out: {extra[:10]}")
        features = array[[row_of[c] for c in classes]]
        encoder_info = {"name": "imported", "source": str(features_npy.resolve())}
    elif descriptions is not None:
        encoder = encoder if encoder is not None else BagOfWordsTextEncoder()
        features = class_text_features(classes, descriptions, encoder)
        encoder_info = encoder.settings()
        result.notes.append(f"features computed from the descriptions with {encoder_info}")

    written = write_class_text(
        root, descriptions=descriptions, features=features, classes=classes, encoder=encoder_info
    )
    result.done = [str(p.relative_to(root)) for p in written]
    result.notes.append(f"{len(classes)} classes, features {features.shape[0]}x{features.shape[1]} float32")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m mmfsar.prepare text OUT --from csv|npy FILE [--features FILE]``."""
    p.add_argument("out", type=Path, help="dataset folder (with meta.json)")
    p.add_argument("file", type=Path, help="the descriptions CSV (class,description) or the features .npy (C, D)")
    p.add_argument("--from", dest="fmt", choices=("csv", "npy"), required=True,
                   help="csv: class descriptions (features are computed from them unless --features is given); "
                        "npy: precomputed text features")  # fmt: skip
    p.add_argument("--features", type=Path, help="with --from csv: precomputed features (.npy) to store instead "
                   "of computing them from the descriptions")  # fmt: skip
    p.add_argument("--classes", type=Path, help="class of each row of the .npy: one name per line or a JSON list "
                   "(default: FILE.json / FILE.txt beside the array)")  # fmt: skip
    p.add_argument("--dim", type=int, default=512, help="bag-of-words feature size when computing features (512)")
    p.add_argument("--seed", type=int, default=0, help="bag-of-words hash seed when computing features (0)")


def run(args: argparse.Namespace) -> StageResult:
    """Run the ``text`` command from parsed :func:`add_arguments` arguments."""
    if args.fmt == "npy" and args.features is not None:
        raise DataError("--features goes with --from csv; with --from npy, FILE is the features array")
    descriptions_csv = args.file if args.fmt == "csv" else None
    features_npy = args.file if args.fmt == "npy" else args.features
    try:
        encoder = BagOfWordsTextEncoder(dim=args.dim, seed=args.seed)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return import_class_text(
        args.out,
        descriptions_csv=descriptions_csv,
        features_npy=features_npy,
        features_classes=args.classes,
        encoder=encoder,
    )

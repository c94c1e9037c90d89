"""Shared machinery of the preparation commands: crash-safe outputs, resume state, parallel jobs,
the final validation.

**Crash safety.** Every output (a ``.npy``/``.mp4`` file or a folder of frames) is written under
``<dataset>/.prepare/tmp/`` and moved into place with one ``os.replace`` when it is complete, so a
killed run never leaves a half-written file where a reader would find it. Temporary entries carry
the writer's process id; those of processes that no longer exist are deleted by the next run.

**Resume.** When all outputs of one video are in place, a small JSON *marker*
``<dataset>/.prepare/<stage>/<video>.json`` records the settings and the input they were made
from. A later run skips a video whose marker matches its current settings and input, and redoes
it otherwise: a video whose marker is missing (interrupted run), or that was made with other
settings or from a since-changed input.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from tqdm.auto import tqdm

from mmfsar.errors import DataError
from mmfsar.data.meta import ANNOTATION_FILE, META_FILE, ClipRecord, DatasetMeta, read_annotations, write_annotations

STATE_DIR = ".prepare"
CATALOG_FILE = "annotations.all.csv"  # every clip found by `videos`; `splits` selects from it
_counter = itertools.count()


# --------------------------------------------------------------------------------------- results
@dataclass
class StageResult:
    """What one command did: videos written, skipped (already done), and every problem."""

    stage: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, limit: int = 20) -> str:
        lines = [f"{self.stage}: {len(self.done)} written, {len(self.skipped)} already done (skipped)"]
        lines += [f"  note: {n}" for n in self.notes]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  - {p}" for p in self.problems[:limit]]
            if len(self.problems) > limit:
                lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


# ------------------------------------------------------------------------------- atomic outputs
def tmp_dir(root: Path) -> Path:
    d = Path(root) / STATE_DIR / "tmp"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _tmp_name(root: Path, final: Path, suffix: str = "") -> Path:
    # the pid prefix lets a later run tell temporaries of dead processes from live ones
    return tmp_dir(root) / f"{os.getpid()}-{next(_counter)}-{final.name}{suffix}"


@contextmanager
def atomic_file(root: Path, final: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``final`` only if the block completes.

    ``suffix`` is appended to the temporary name (writers that choose the container from the
    extension need it to end like ``final``).
    """
    tmp = _tmp_name(root, final, suffix)
    try:
        yield tmp
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(root: Path, final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; it takes the place of ``final`` if the block completes.

    An existing ``final`` (left by an interrupted earlier run: its marker is missing) is removed
    just before the move.
    """
    tmp = _tmp_name(root, final)
    tmp.mkdir()
    try:
        yield tmp
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.is_dir():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(root: Path, path: Path, obj: Any, sort_keys: bool = True) -> None:
    with atomic_file(root, path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=sort_keys))


def save_meta(root: Path, meta: DatasetMeta) -> None:
    """``meta.json``, replaced atomically (a crash never leaves it half-written)."""
    write_json_atomic(Path(root), Path(root) / META_FILE, meta.to_dict(), sort_keys=False)


def save_annotations(root: Path, name: str, records: Iterable[ClipRecord]) -> None:
    with atomic_file(Path(root), Path(root) / name) as tmp:
        write_annotations(tmp, records)


def clean_stale_temporaries(root: Path) -> int:
    """Delete temporaries left by killed runs (their process id no longer exists)."""
    d = Path(root) / STATE_DIR / "tmp"
    if not d.is_dir():
        return 0
    removed = 0
    for p in d.iterdir():
        pid = p.name.split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue  # another live run is writing it
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------- markers
class StageState:
    """Resume markers of one stage: ``<root>/.prepare/<stage>/<video>.json``."""

    def __init__(self, root: Path, stage: str) -> None:
        self.root = Path(root)
        self.dir = self.root / STATE_DIR / stage

    def path(self, video: str) -> Path:
        return self.dir / f"{video}.json"

    def load(self, video: str) -> dict[str, Any] | None:
        p = self.path(video)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # unreadable marker: redo the video

    def is_done(self, video: str, settings: Mapping[str, Any], source: Mapping[str, Any]) -> bool:
        m = self.load(video)
        return m is not None and m.get("settings") == dict(settings) and m.get("source") == dict(source)

    def save(self, video: str, settings: Mapping[str, Any], source: Mapping[str, Any], **info: Any) -> None:
        write_json_atomic(self.root, self.path(video), {"settings": dict(settings), "source": dict(source), **info})


def signature(path: Path) -> dict[str, Any]:
    """Identity of an input file or folder: size and modification time (cheap, no hashing)."""
    st = path.stat()
    if path.is_dir():
        return {"path": str(path), "entries": len(os.listdir(path)), "mtime_ns": st.st_mtime_ns}
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def settings_hash(settings: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------- parallel jobs
def _init_worker() -> None:
    try:
        import cv2

        cv2.setNumThreads(1)  # parallelism comes from the worker processes
    except ImportError:  # pragma: no cover
        pass


def _mp_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` (``spawn`` where unavailable), never plain ``fork``: forking a process whose
    OpenCV / BLAS thread pools are running can deadlock the child on a lock held by a thread that
    did not survive the fork."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _call(fn: Callable[[Any], Any], job: Any) -> tuple[bool, Any]:
    """Run one job, turning an exception into a message (so nothing unpicklable crosses back)."""
    try:
        return True, fn(job)
    except DataError as exc:
        return False, str(exc)
    except Exception as exc:  # noqa: BLE001 - report every failure, keep the other videos going
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return False, tb


def run_jobs(
    fn: Callable[[Any], Any],
    jobs: Sequence[Any],
    *,
    workers: int,
    desc: str,
    progress: bool = True,
    unit: str = "video",
) -> Iterator[tuple[Any, bool, Any]]:
    """Yield ``(job, ok, result or error message)`` as jobs finish, with a progress bar.

    ``workers > 1`` runs the jobs in a ``ProcessPoolExecutor`` (``fn`` and the jobs must be
    picklable); at most ``2 * workers`` jobs are in flight, so huge job lists cost no memory.
    ``workers <= 1`` runs them in this process, in order.
    """
    bar = tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress, file=sys.stderr)
    workers = min(workers, len(jobs))  # no idle processes to start
    try:
        if workers <= 1:
            _init_worker()
            for job in jobs:
                ok, res = _call(fn, job)
                bar.update()
                yield job, ok, res
            return
        with ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_init_worker) as pool:
            pending: dict[Any, Any] = {}
            it = iter(jobs)
            try:
                for job in itertools.islice(it, 2 * workers):
                    pending[pool.submit(_call, fn, job)] = job
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        job = pending.pop(fut)
                        ok, res = fut.result()
                        bar.update()
                        yield job, ok, res
                        for nxt in itertools.islice(it, 1):
                            pending[pool.submit(_call, fn, nxt)] = nxt
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    finally:
        bar.close()


# ------------------------------------------------------------------------------ dataset helpers
def load_meta(root: Path) -> DatasetMeta:
    return DatasetMeta.load(root)


def catalog_records(root: Path) -> list[ClipRecord]:
    """All clips of the dataset: the catalogue written by ``videos``, else ``annotations.csv``."""
    root = Path(root)
    path = root / CATALOG_FILE
    if not path.is_file():
        path = root / ANNOTATION_FILE
    return read_annotations(path)


def dataset_videos(root: Path) -> list[str]:
    """Source videos of the dataset (unique, in first-seen order of the catalogue)."""
    return list(dict.fromkeys(r.video for r in catalog_records(root)))


def require_dataset(root: Path) -> None:
    root = Path(root)
    if not (root / META_FILE).is_file():
        raise DataError(
            f"{root}: no {META_FILE}; run `python -m mmfsar.prepare videos SRC {root}` first "
            "(or write the files of DATA_STRUCTURE.md by hand)"
        )


def most_common(values: Iterable[Any]) -> Any:
    from collections import Counter

    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else None

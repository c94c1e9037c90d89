"""``python -m mmfsar.prepare <command> ...``: turn raw data into the mmfsar layout.

Commands (each is a plug-in: a function adding its arguments and one running it, registered in
:data:`COMMANDS`) write into the dataset folder ``OUT`` and end with the validator's report on it;
the exit status is 1 when the command or the validator found a problem::

    python -m mmfsar.prepare videos SRC OUT [--csv F] [--fps 15] [--short-side 128] [--frames]
    python -m mmfsar.prepare flow OUT [--method dis|farneback|tvl1] [--format npy|flow_xy] [--workers 2]
    python -m mmfsar.prepare pose OUT SRC --from coco|openpose|npy [--layout auto|coco17|FILE.json]
    python -m mmfsar.prepare splits OUT --train F [--val F] [--test F] [--style auto|cmn|arn|otam]
    python -m mmfsar.prepare skeleton OUT SRC [--from ntu|npy] [--protocols auto|ntu60_xsub,...] [--ignore F]
    python -m mmfsar.prepare text OUT FILE --from csv|npy [--features F.npy] [--classes F]
    python -m mmfsar.prepare validate OUT

See DATA_STRUCTURE.md, "Preparing real datasets".
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mmfsar.errors import DataError


@dataclass(frozen=True)
class Command:
    """A subcommand: its arguments and what it runs (returns a result with ``summary()``/``ok``, or None)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register the decorated function as subcommand ``name``."""

    def deco(run: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
        COMMANDS[name] = Command(name, help, add_arguments, run)
        return run

    return deco


def _workers(value: str) -> int:
    n = int(value)
    return n if n > 0 else max(1, os.cpu_count() or 1)


def _size(value: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 240x320), got {value!r}") from None
    return h, w


def _option(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, raw


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation (run at the end of every command)")
    g.add_argument("--check", choices=("decode", "files", "none"), default="decode",
                   help="decode: read the frames evaluation samples from every clip (default); "
                        "files: existence and lengths only; none: skip")  # fmt: skip
    g.add_argument("--n-way", type=int, help="also check that val/novel classes give N-way episodes")
    g.add_argument("--k-shot", type=int, default=1)
    g.add_argument("--n-query", type=int, default=1)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------------ videos
def _videos_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, nargs="?", help="class-per-folder tree SRC/<class>/<video>.<ext> "
                   "(with --csv: the folder its relative paths start from)")  # fmt: skip
    p.add_argument("out", type=Path, help="dataset folder to write")
    p.add_argument("--csv", type=Path, help="CSV with columns path[,class,video,clip_id,domain,split,"
                   "start_frame,end_frame | start_time,end_time] instead of scanning SRC")  # fmt: skip
    p.add_argument("--video", choices=("reencode", "keep", "none"), default="reencode",
                   help="reencode: constant-fps H.264 mp4 (default); keep: link/copy the files unchanged; "
                        "none: no video (needs --frames)")  # fmt: skip
    p.add_argument("--fps", type=float, help="stored frame rate (default: the sources' common rate)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--short-side", type=int, help="resize so the shorter side has this many pixels")
    size.add_argument("--size", type=_size, help="resize every video to HxW")
    p.add_argument("--frames", action="store_true", help="also write JPEG frames")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality (0 lossless .. 51; default 18)")
    p.add_argument("--preset", default="veryfast", help="x264 speed preset (default veryfast)")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--domain", default="source", help="domain of every clip (CSV column 'domain' overrides)")
    p.add_argument("--name", help="dataset name in meta.json (default: OUT's folder name)")
    p.add_argument("--workers", type=_workers, default=2, help="worker processes (0: one per CPU)")


@command("videos", "raw videos (class folders or a CSV) -> RGB stream, annotations, meta.json", _videos_arguments)
def run_videos(a: argparse.Namespace):
    from mmfsar.prepare.videos import VideoSettings, prepare_videos

    s = VideoSettings(a.video, a.fps, a.short_side, a.size, a.frames, a.crf, a.preset, a.jpeg_quality)
    return prepare_videos(a.out, src=a.src, csv_file=a.csv, settings=s, domain=a.domain, name=a.name,
                          workers=a.workers, progress=not a.quiet)  # fmt: skip


# -------------------------------------------------------------------------------------------- flow
def _flow_arguments(p: argparse.ArgumentParser) -> None:
    from mmfsar.prepare.flow import FLOW_METHODS, FLOW_STORES

    p.add_argument("out", type=Path, help="dataset folder (with an rgb stream)")
    p.add_argument("--method", choices=sorted(FLOW_METHODS), default="dis",
                   help="dis (default), farneback, or tvl1 (needs opencv-contrib)")  # fmt: skip
    p.add_argument("--opt", type=_option, action="append", metavar="KEY=VALUE",
                   help="method option, e.g. preset=fast (dis) or winsize=21 (farneback)")  # fmt: skip
    p.add_argument("--format", choices=sorted(FLOW_STORES), default="npy",
                   help="npy: float16 (T, H, W, 2); flow_xy: x_/y_ JPEGs quantised to [-bound, bound]")  # fmt: skip
    p.add_argument("--bound", type=float, default=20.0, help="flow_xy clipping bound in pixels (default 20)")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--short-side", type=int, help="compute flow on frames resized to this short side")
    p.add_argument("--stream", default="rgb", help="RGB stream to read (default rgb)")
    p.add_argument("--all", action="store_true", help="every video of the catalogue, not only annotations.csv's")
    p.add_argument("--workers", type=_workers, default=2, help="worker processes (0: one per CPU)")


@command("flow", "optical flow for every video, aligned with the RGB frames (resumable)", _flow_arguments)
def run_flow(a: argparse.Namespace):
    from mmfsar.prepare.flow import prepare_flow

    return prepare_flow(a.out, method=a.method, options=dict(a.opt or []), store=a.format, bound=a.bound,
                        jpeg_quality=a.jpeg_quality, short_side=a.short_side, stream=a.stream,
                        all_videos=a.all, workers=a.workers, progress=not a.quiet)  # fmt: skip


# -------------------------------------------------------------------------------------------- pose
def _pose_arguments(p: argparse.ArgumentParser) -> None:
    from mmfsar.prepare.pose import KEYPOINT_FORMATS, layouts_help

    p.add_argument("out", type=Path, help="dataset folder")
    p.add_argument(
        "src", type=Path, help="keypoint folder mirroring the video ids (SRC/<video>/ or SRC/<video>.npy|.json)"
    )
    p.add_argument("--from", dest="fmt", choices=sorted(KEYPOINT_FORMATS), required=True)
    p.add_argument("--layout", default="auto", help=f"auto (from the number of joints), {layouts_help()}, "
                   "or a JSON file with 'joints' and 'edges'")  # fmt: skip
    p.add_argument("--start-index", type=int, default=0, help="number of the first frame's file (default 0)")
    p.add_argument("--frames", choices=("source", "stored"), default="source",
                   help="keypoints are numbered by the source video's frames (default) or the stored ones")  # fmt: skip
    p.add_argument("--coords", choices=("source", "stored"), default="source",
                   help="keypoints are in pixels of the source video (default) or of the stored frames")  # fmt: skip
    p.add_argument("--all", action="store_true", help="every video of the catalogue, not only annotations.csv's")
    p.add_argument("--workers", type=_workers, default=1)


@command("pose", "import keypoints (COCO JSON, OpenPose JSON, numpy) into the pose stream", _pose_arguments)
def run_pose(a: argparse.Namespace):
    from mmfsar.prepare.pose import import_pose

    return import_pose(a.out, a.src, fmt=a.fmt, layout=a.layout, start_index=a.start_index, frames=a.frames,
                       coords=a.coords, all_videos=a.all, workers=a.workers, progress=not a.quiet)  # fmt: skip


# ------------------------------------------------------------------------------------------ splits
def _splits_arguments(p: argparse.ArgumentParser) -> None:
    from mmfsar.prepare.splits import SPLIT_STYLES

    p.add_argument("out", type=Path, help="dataset folder")
    p.add_argument("--train", type=Path, required=True, help="list of the base classes' videos")
    p.add_argument("--val", type=Path, help="list of the val classes' videos")
    p.add_argument("--test", type=Path, help="list of the novel classes' videos")
    p.add_argument("--style", choices=("auto", *sorted(SPLIT_STYLES)), default="auto",
                   help="cmn/arn: 'class name/video_id' lines, otam: 'trainN/video_id' (auto: detect)")  # fmt: skip


@command("splits", "import few-shot split lists (CMN / ARN / OTAM) into base / val / novel", _splits_arguments)
def run_splits(a: argparse.Namespace):
    from mmfsar.prepare.splits import import_splits

    return import_splits(a.out, train=a.train, val=a.val, test=a.test, style=a.style)


# ---------------------------------------------------------------------------------------- skeleton
def _skeleton_arguments(p: argparse.ArgumentParser) -> None:
    from mmfsar.prepare.ntu import add_arguments

    add_arguments(p)


@command("skeleton", "import NTU RGB+D skeletons (.skeleton files or (T, M, 25, 3) arrays) as a new dataset "
         "with the published protocols", _skeleton_arguments)  # fmt: skip
def run_skeleton(a: argparse.Namespace):
    from mmfsar.prepare.ntu import run

    return run(a)


# -------------------------------------------------------------------------------------------- text
def _text_arguments(p: argparse.ArgumentParser) -> None:
    from mmfsar.data.text import add_arguments

    add_arguments(p)


@command("text", "class descriptions (CSV) and / or text features (.npy) into text/", _text_arguments)
def run_text(a: argparse.Namespace):
    from mmfsar.data.text import run

    return run(a)


# ---------------------------------------------------------------------------------------- validate
def _validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="dataset folder")
    p.add_argument(
        "--stream", dest="stream_only", metavar="STREAM", action="append", help="check only this stream (repeatable)"
    )


@command("validate", "only the validator's report", _validate_arguments)
def run_validate(a: argparse.Namespace):
    return None


# ------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mmfsar.prepare",
        description="Prepare a real dataset in the mmfsar layout (DATA_STRUCTURE.md). Every command "
        "ends with the validator's report and exits with status 1 if anything is wrong.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        _common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command].run(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished videos are kept; run the same command again to resume", file=sys.stderr)
        return 130
    if result is not None:
        print(result.summary())
    ok = result is None or result.ok
    if args.check != "none" and (args.out / "meta.json").is_file():
        from mmfsar.data.episodes import EpisodeSettings
        from mmfsar.prepare.check import check_dataset

        episodes = None
        if args.n_way:
            episodes = EpisodeSettings(n_way=args.n_way, k_shot=args.k_shot, n_query=args.n_query)
        try:
            report = check_dataset(args.out, decode=args.check == "decode", streams=getattr(args, "stream_only", None),
                                   episodes=episodes, progress=not args.quiet)  # fmt: skip
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(report)
        ok = ok and report.ok
    return 0 if ok else 1

"""Around every task: config printing, clean-up of loggers, and failure reporting."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Sequence

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mmfsar.utils.logging_utils import RankedLogger

log = RankedLogger(__name__)


def finish_loggers() -> None:
    """Close the W&B run if one is open, so the next job of a multirun starts its own."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Run a task so that loggers are always finished and the output folder is reported,
    also when it fails (a failing job of a multirun must not leave W&B runs open)."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except Exception:
            log.exception("task failed")
            raise
        finally:
            finish_loggers()
            out = cfg.get("paths", {}).get("output_dir")
            if out:
                log.info(f"output dir: {out}")

    return wrapped


@rank_zero_only
def print_config_tree(cfg: DictConfig, order: Sequence[str] = (), save_to: str | Path | None = None) -> None:
    """Print the composed config as a rich tree (and save it beside the run's outputs)."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), guide_style="dim")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=False) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        with open(save_to, "w") as f:
            rich.print(tree, file=f)

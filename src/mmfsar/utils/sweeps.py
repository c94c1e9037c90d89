"""Hyper-parameter searches read the val classes only.

A Hydra sweeper other than the basic grid sweeper (hydra-optuna-sweeper, and the Nevergrad and
Ax sweepers alike) *optimises* what the entry point returns: ``lit_main_pretrain.py`` and
``lit_main_distill.py`` return ``val/acc`` (episodes over the val classes, which is all their
validation ever reads), ``lit_main_eval.py`` returns the mean accuracy over ``fewshot.split``.
With ``fewshot.split=novel`` a search would pick its settings on the novel classes, the test
classes of the few-shot protocols (METHODS.md: class-disjoint base / val / novel splits; DESIGN.md:
novel classes are touched by the final evaluation alone). Such a search is refused with
:class:`~mmfsar.errors.ConfigError`, at two points:

* :func:`refuse_novel_objective` is the Optuna sweeper's ``custom_search_space`` hook in
  ``hydra/sweeper=optuna_val``: the sweeper calls it in the sweep's own process for every trial
  before launching it, so a refused search starts no job (nor waits in a SLURM queue);
* :func:`check_sweep_objective` runs in the job (the start of ``pipelines.evaluate``) and covers
  any searching sweeper, the plugin's own ``hydra/sweeper=optuna`` included.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmfsar.errors import ConfigError

SPLIT_KEY = "fewshot.split"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def searching_sweeper(hydra_cfg: DictConfig | None) -> str | None:
    """The sweeper's ``_target_`` when ``hydra_cfg`` (the ``hydra`` node, or a config holding one)
    is a multirun under a sweeper that optimises the return value, else None. Every sweeper but
    Hydra's basic one counts as searching: failing closed keeps an unknown plugin off the novel
    classes, and the grids of the basic sweeper need no objective."""
    if hydra_cfg is None:
        return None
    if "hydra" in hydra_cfg:
        hydra_cfg = hydra_cfg.hydra
    mode = OmegaConf.select(hydra_cfg, "mode", default=None)  # hydra.types.RunMode, or its name
    if getattr(mode, "name", mode) != "MULTIRUN":
        return None
    target = OmegaConf.select(hydra_cfg, "sweeper._target_", default=None)
    return None if target in (None, BASIC_SWEEPER) else str(target)


def _refuse(split: Any, sweeper: str) -> None:
    if str(split) == "novel":
        raise ConfigError(
            f"{SPLIT_KEY}=novel under the sweeper {sweeper}: the search would optimise the accuracy on the novel "
            f"classes, which only the final evaluation may read. Search on the val classes ({SPLIT_KEY}=val), then "
            f"evaluate the chosen setting once on the novel classes without a searching sweeper"
        )


def check_sweep_objective(cfg: DictConfig, hydra_cfg: DictConfig | None = None) -> None:
    """Refuse a job whose return value a searching sweeper optimises when it is the accuracy on
    the novel classes (an evaluation with ``fewshot.split=novel``).

    ``cfg``: the composed job config; ``hydra_cfg``: its ``hydra`` node (default: ``HydraConfig``
    when Hydra runs the job; outside Hydra nothing is a sweep). Training configs have no
    ``fewshot`` node: their objective, ``val/acc``, reads the val classes by construction."""
    if hydra_cfg is None:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    sweeper = searching_sweeper(hydra_cfg)
    if sweeper is not None:
        _refuse(OmegaConf.select(cfg, SPLIT_KEY, default=None), sweeper)


def _param(values: dict[str, Any], key: str) -> Any:
    """``values[key]`` also when the override was written ``+key`` / ``++key``, else None."""
    for name, value in values.items():
        if name.lstrip("+") == key:
            return value
    return None


def refuse_novel_objective(config: DictConfig, trial: Any) -> None:
    """The Optuna sweeper's ``custom_search_space`` hook (``hydra.sweeper.custom_search_space``):
    called with the sweep's config and each ``optuna.trial.Trial`` before the trial is launched;
    refuses it when its ``fewshot.split`` (searched, fixed on the command line, or the config's)
    is ``novel``. Adds nothing to the search space."""
    split = _param(trial.params, SPLIT_KEY)
    if split is None:
        split = _param(trial.user_attrs, SPLIT_KEY)
    if split is None:
        split = OmegaConf.select(config, SPLIT_KEY, default=None)
    target = OmegaConf.select(config, "hydra.sweeper._target_", default="optuna")
    _refuse(split, str(target))

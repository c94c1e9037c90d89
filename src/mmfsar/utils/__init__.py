"""Run plumbing shared by the entry points (as in the lightning-hydra-template)."""

from mmfsar.utils.instantiators import instantiate_callbacks, instantiate_loggers
from mmfsar.utils.logging_utils import RankedLogger
from mmfsar.utils.paths import CONFIG_DIR, PROJECT_ROOT
from mmfsar.utils.run import finish_loggers, print_config_tree, task_wrapper

__all__ = [
    "CONFIG_DIR",
    "PROJECT_ROOT",
    "RankedLogger",
    "finish_loggers",
    "instantiate_callbacks",
    "instantiate_loggers",
    "print_config_tree",
    "task_wrapper",
]

import logging
from typing import Any, Mapping

from lightning.pytorch.utilities import rank_zero_only


class RankedLogger(logging.LoggerAdapter):
    """A logger that speaks on rank zero only (or on the given rank), prefixing the rank."""

    def __init__(self, name: str = __name__, rank_zero_only: bool = True, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(logging.getLogger(name), extra or {})
        self.rank_zero_only = rank_zero_only

    def log(self, level: int, msg: str, *args: Any, rank: int | None = None, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        current = getattr(rank_zero_only, "rank", 0)
        msg, kwargs = self.process(msg, kwargs)
        msg = f"[rank: {current}] {msg}"
        if self.rank_zero_only:
            if current == 0:
                self.logger.log(level, msg, *args, **kwargs)
        elif rank is None or current == rank:
            self.logger.log(level, msg, *args, **kwargs)

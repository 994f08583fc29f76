"""A module logger that imports `logging` at its first message, not at import.

The format layer warns only on rare paths (repair after a crash, a failed
tidy-up at close), yet every `vhdblkctl info` imports the modules that hold
those warnings: loading `logging` up front was about a tenth of that
command's start-up.  Messages go to `logging.getLogger(name)`, so the
daemon's logging configuration applies to them as to any other logger.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

# Run once, just before the first lazy logger is looked up: the command line puts its
# logging set-up here, so a command that never warns never loads `logging` at all.
before_first: Callable[[], None] | None = None


class LazyLogger:
    """`logging.getLogger(name)`, looked up when the first message is logged."""

    __slots__ = ("_logger", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger: logging.Logger | None = None

    def _get(self) -> logging.Logger:
        if self._logger is None:
            global before_first
            if before_first is not None:
                setup, before_first = before_first, None
                setup()
            import logging

            self._logger = logging.getLogger(self.name)
        return self._logger

    # stacklevel=2: the record names the caller's line, not this module's.
    def debug(self, msg: str, *args: object) -> None:
        self._get().debug(msg, *args, stacklevel=2)

    def info(self, msg: str, *args: object) -> None:
        self._get().info(msg, *args, stacklevel=2)

    def warning(self, msg: str, *args: object) -> None:
        self._get().warning(msg, *args, stacklevel=2)

    def error(self, msg: str, *args: object) -> None:
        self._get().error(msg, *args, stacklevel=2)

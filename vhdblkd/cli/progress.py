"""A one-line terminal progress bar for long image operations.

It draws only when its stream is a terminal: in pipes, logs and tests the
output stays clean, so scripts can parse stdout and stderr carries errors only.
Redraws happen in steps of a tenth of a percent, never on a
timer, so the bar costs nothing measurable on fast copies.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO

from .sizes import format_size

BAR_WIDTH = 30


class ProgressBar:
    """Callable as `progress(done, total)` (bytes); use as a context manager to end the line."""

    def __init__(self, label: str, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = _is_tty(self._stream)
        self.enabled = enabled
        self._label = label
        self._last_step = -1
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        step = 1000 if total <= 0 else min(1000, max(0, done * 1000 // total))
        if step == self._last_step:
            return
        self._last_step = step
        self._drawn = True
        # "\x1b[K" clears what a longer previous line left to the right.
        self._stream.write("\r" + render(self._label, done, total) + "\x1b[K")
        self._stream.flush()

    def finish(self) -> None:
        """End the bar's line so later output starts on a fresh one."""
        if self.enabled and self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish()


def render(label: str, done: int, total: int) -> str:
    """The bar's text for `done` of `total` bytes, e.g. "create [#####-----]  50% 1 GiB / 2 GiB"."""
    if total <= 0:
        fraction = 1.0
    else:
        fraction = min(max(done / total, 0.0), 1.0)
    filled = int(fraction * BAR_WIDTH)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    return f"{label} [{bar}] {int(fraction * 100):3d}% {format_size(done)} / {format_size(total)}"


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())

"""A per-example time limit for fuzz targets (SIGALRM; main thread only).

A hang is a bug like a crash: the target must answer every input quickly.
The limit is generous so a slow CI machine never trips it on a healthy run.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class FuzzTimeout(BaseException):
    """Raised inside a target that ran past its time limit (a BaseException: no layer may swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach only the main thread; callers elsewhere rely on socket timeouts
        return

    def expired(signum: int, frame: FrameType | None) -> None:
        raise FuzzTimeout(f"fuzz target ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

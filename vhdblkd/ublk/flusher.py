"""A queue's FLUSH requests, run on a thread of their own and answered back through the queue's ring.

A backend flush is an fsync of the image (and of its parents' writes): on
a real disk milliseconds, during which a queue thread that flushed inline
would serve none of its other tags.  So the queue thread hands a FLUSH's
tag to this thread and goes on.  Only the queue thread may issue commands
for its queue (it is that queue's daemon in the kernel), so the answer
comes back the other way: the flusher leaves (tags, result) in `done` and
writes an eventfd the queue's ring has a read queued on; the queue thread,
woken by that read's completion, commits the tags and queues the read again.

The tags waiting when a flush starts all share it: each arrived before it,
so the writes each must cover had completed before it too.  A flush covers
every write completed before it began, which is what FLUSH promises.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Flusher:
    """One queue's flush thread, started at its first FLUSH."""

    def __init__(self, flush: Callable[[], int], name: str) -> None:
        self._flush = flush
        self._name = name
        self.event = os.eventfd(0, os.EFD_CLOEXEC)  # written when `done` has something
        self.done: queue.SimpleQueue[tuple[list[int], int]] = queue.SimpleQueue()
        self._todo: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, tag: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._todo.put(tag)

    def finished(self) -> list[tuple[list[int], int]]:
        """Every flush done since the last call: (its tags, 0 or -errno)."""
        out = []
        while True:
            try:
                out.append(self.done.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        """End the thread after the flush in hand (tags not answered are the kernel's to issue again)."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None
        if self.event >= 0:
            os.close(self.event)
            self.event = -1

    def _run(self) -> None:
        while True:
            first = self._todo.get()
            if first is None:
                return
            tags = [first]
            stop = False
            while True:
                try:
                    tag = self._todo.get_nowait()
                except queue.Empty:
                    break
                if tag is None:
                    stop = True
                    break
                tags.append(tag)
            try:
                result = self._flush()
            except Exception:  # noqa: BLE001 - a bug in the handler must not wedge the tags
                log.exception("%s: flush failed", self._name)
                result = -errno.EIO
            self.done.put((tags, result))
            os.eventfd_write(self.event, 1)
            if stop:
                return

"""The flush thread: tags handed over come back with the flush's result, an eventfd tells the queue."""

from __future__ import annotations

import errno
import os
import select
import threading

from vhdblkd.ublk.flusher import Flusher


def _wait(fd: int) -> None:
    assert select.select([fd], [], [], 10)[0], "the flusher never signalled"
    os.eventfd_read(fd)


def test_tags_come_back_with_the_result() -> None:
    calls: list[int] = []

    def flush() -> int:
        calls.append(1)
        return 0

    f = Flusher(flush, "t")
    try:
        f.submit(3)
        _wait(f.event)
        assert f.finished() == [([3], 0)] and calls == [1]
        assert f.finished() == []
    finally:
        f.close()


def test_tags_waiting_together_share_one_flush() -> None:
    gate = threading.Event()
    entered = threading.Event()
    calls: list[int] = []

    def flush() -> int:
        calls.append(1)
        entered.set()
        gate.wait(10)
        return -errno.EIO

    f = Flusher(flush, "t")
    try:
        f.submit(1)
        assert entered.wait(10)
        for tag in (2, 5, 7):  # arrive while the first flush runs: one more flush covers them all
            f.submit(tag)
        gate.set()
        done: list[tuple[list[int], int]] = []
        while sum(len(tags) for tags, _ in done) < 4:
            _wait(f.event)
            done += f.finished()
        assert done == [([1], -errno.EIO), ([2, 5, 7], -errno.EIO)] and len(calls) == 2
    finally:
        f.close()


def test_a_failing_flush_is_eio_and_close_ends_the_thread() -> None:
    def flush() -> int:
        raise RuntimeError("bug")

    f = Flusher(flush, "t")
    f.submit(0)
    _wait(f.event)
    assert f.finished() == [([0], -errno.EIO)]
    f.close()
    assert f.event == -1

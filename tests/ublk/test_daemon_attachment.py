"""The daemon's ublk attachment: a flush failing after STOP_DEV does not hide that the device is gone.

The attachment manager flushes around `disconnect` itself and keeps the
image open when that fails; it must learn that the disconnect happened, or
a second detach would stop a device that no longer exists.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from vhdblkd.backend import MemoryBackend
from vhdblkd.daemon.ublk_device import UblkAttachment, UblkTransport
from vhdblkd.errors import BackendError
from vhdblkd.ublk.queue import QueueStats


class FailingFlush(MemoryBackend):
    def flush(self) -> None:
        raise BackendError("fdatasync: no space left", errno.ENOSPC)


class StoppedDevice:
    """Stands in for UblkDevice (the daemon's view only: id, queues, stop)."""

    dev_id = 7
    path = "/dev/ublkb7"

    def __init__(self) -> None:
        self.stops = 0
        self.queues: list[Any] = []

    def stop(self) -> None:
        self.stops += 1


def test_disconnect_returns_once_the_device_is_gone(tmp_path: Path) -> None:
    transport = UblkTransport(name_dir=tmp_path)
    (tmp_path / "ublkb7").write_text("vhdblkd:x\n")
    dev = StoppedDevice()
    att = UblkAttachment(transport, FailingFlush(1 << 20), dev)  # type: ignore[arg-type]  # the stand-in above
    att.disconnect()  # logs both failed flushes, raises neither
    assert dev.stops == 1 and not (tmp_path / "ublkb7").exists()


def test_stats_sum_the_queues(tmp_path: Path) -> None:
    dev = StoppedDevice()
    for reads in (3, 4):
        q = type("Q", (), {})()
        q.stats = QueueStats()
        q.stats.reads = reads
        dev.queues.append(q)
    att = UblkAttachment(UblkTransport(name_dir=tmp_path), MemoryBackend(1 << 20), dev)  # type: ignore[arg-type]  # the stand-in above
    assert att.stats()["reads"] == 7 and att.connections == 2

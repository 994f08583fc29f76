"""A queue's counters: what each completed request adds (the names `vhdblkctl list` shows for NBD too)."""

from __future__ import annotations

import errno

from vhdblkd.ublk import constants as c
from vhdblkd.ublk.queue import QueueStats, _count


def test_each_op_bumps_its_counter() -> None:
    stats = QueueStats()
    for op, result in ((c.UBLK_IO_OP_READ, 4096), (c.UBLK_IO_OP_READ, 512), (c.UBLK_IO_OP_WRITE, 8192),
                       (c.UBLK_IO_OP_WRITE_ZEROES, 0), (c.UBLK_IO_OP_FLUSH, 0), (c.UBLK_IO_OP_DISCARD, 0),
                       (c.UBLK_IO_OP_WRITE, -errno.ENOSPC), (c.UBLK_IO_OP_READ, -errno.EIO)):
        _count(stats, op, result)
    assert stats.as_dict() == {"reads": 2, "writes": 2, "bytes_read": 4608, "bytes_written": 8192, "flushes": 1,
                               "trims": 1, "errors": 2, "requests": 8, "enters": 0}


def test_the_list_columns_are_there() -> None:
    # vhdblkctl list reads these keys from every attachment's stats.
    assert {"reads", "writes", "flushes", "bytes_read", "bytes_written", "errors"} <= set(QueueStats().as_dict())

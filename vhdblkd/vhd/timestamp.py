"""VHD timestamps: seconds since 2000-01-01 00:00:00 UTC in a 32-bit field."""

from __future__ import annotations

import time

from vhdblkd.vhd import constants as c


def vhd_mtime(unix_seconds: int) -> int:
    """A Unix time as VHD timestamp, clamped to the field."""
    return max(0, min(0xFFFFFFFF, unix_seconds - c.VHD_EPOCH_OFFSET))


def vhd_now() -> int:
    return vhd_mtime(int(time.time()))


def vhd_timestamp_to_iso(timestamp: int) -> str:
    # time.gmtime, not datetime: importing datetime is a fiftieth of `vhdblkctl info`.
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(c.VHD_EPOCH_OFFSET + timestamp))

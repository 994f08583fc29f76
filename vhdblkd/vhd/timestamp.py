"""VHD timestamps: seconds since 2000-01-01 00:00:00 UTC in a 32-bit field."""

from __future__ import annotations

import datetime
import time

from vhdblkd.vhd import constants as c

VHD_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)


def vhd_mtime(unix_seconds: int) -> int:
    """A Unix time as VHD timestamp, clamped to the field."""
    return max(0, min(0xFFFFFFFF, unix_seconds - c.VHD_EPOCH_OFFSET))


def vhd_now() -> int:
    return vhd_mtime(int(time.time()))


def vhd_timestamp_to_iso(timestamp: int) -> str:
    moment = VHD_EPOCH + datetime.timedelta(seconds=timestamp)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

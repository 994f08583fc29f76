"""Is an nbd device in use?  A detach of a mounted or held device would lose data.

Three looks, most informative first: mounts (of the disk or a partition)
in /proc/self/mountinfo, holders in sysfs (device-mapper, md, ...), and
finally an O_EXCL open, which fails with EBUSY while anything has claimed
the disk or one of its partitions.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def _dev_numbers(sys_block: Path) -> set[str]:
    """major:minor of the disk and of each of its partitions."""
    numbers: set[str] = set()
    try:
        numbers.add((sys_block / "dev").read_text().strip())
        for child in sys_block.iterdir():
            dev = child / "dev"
            if child.name.startswith(sys_block.name) and dev.exists():
                numbers.add(dev.read_text().strip())
    except OSError:
        pass
    return numbers


def _mountpoints(numbers: set[str], mountinfo: Path) -> list[str]:
    points: list[str] = []
    try:
        text = mountinfo.read_text()
    except OSError:
        return points
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[2] in numbers:
            points.append(fields[4].replace("\\040", " "))
    return points


def _holders(sys_block: Path) -> list[str]:
    names: list[str] = []
    for d in [sys_block, *(c for c in _children(sys_block))]:
        try:
            names.extend(sorted(os.listdir(d / "holders")))
        except OSError:
            pass
    return names


def _children(sys_block: Path) -> list[Path]:
    try:
        return [c for c in sys_block.iterdir() if c.name.startswith(sys_block.name)]
    except OSError:
        return []


def mounted_on(
    name: str, *, sys_root: Path = Path("/sys/block"), mountinfo: Path = Path("/proc/self/mountinfo")
) -> list[str]:
    """Where the disk `name` (nbd0) or one of its partitions is mounted."""
    return _mountpoints(_dev_numbers(sys_root / name), mountinfo)


def device_in_use(
    name: str,
    *,
    sys_root: Path = Path("/sys/block"),
    mountinfo: Path = Path("/proc/self/mountinfo"),
    dev_root: Path = Path("/dev"),
) -> str | None:
    """A reason the disk `name` (nbd0) is busy ("mounted on /mnt"), or None when it is free."""
    sys_block = sys_root / name
    points = _mountpoints(_dev_numbers(sys_block), mountinfo)
    if points:
        return "mounted on " + ", ".join(points)
    holders = _holders(sys_block)
    if holders:
        return "held by " + ", ".join(holders)
    node = dev_root / name
    try:
        fd = os.open(node, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return "open by another program (in use by a filesystem, swap or device mapper)"
        return None  # no node (e.g. in tests) or another error: nothing claims it that we can see
    os.close(fd)
    return None

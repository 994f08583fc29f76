"""Is an nbd device in use?  A detach of a mounted or held device would lose data.

Three looks, most informative first: mounts (of the disk or a partition)
in /proc/self/mountinfo, holders in sysfs (device-mapper, md, ...), and
finally an O_EXCL open, which fails with EBUSY while anything has claimed
the disk or one of its partitions.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

BACKEND_PREFIX = "vhdblkd:"
UBLK_NAMES = Path("/run/vhdblkd/ublk")
EXIT_IN_USE = 3


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


def _our_name(sys_block: Path, ublk_names: Path) -> str | None:
    """NAME when the disk is connected and carries vhdblkd:NAME (nbd backend, or the ublk name file)."""
    try:
        if int((sys_block / "size").read_text()) == 0:
            return None  # an nbd device nobody serves
        source = sys_block / "backend" if sys_block.name.startswith("nbd") else ublk_names / sys_block.name
        identifier = source.read_text().strip()
    except (OSError, ValueError):
        return None
    return identifier[len(BACKEND_PREFIX) :] if identifier.startswith(BACKEND_PREFIX) else None


def busy_devices(
    *,
    sys_root: Path = Path("/sys/block"),
    mountinfo: Path = Path("/proc/self/mountinfo"),
    dev_root: Path = Path("/dev"),
    ublk_names: Path = UBLK_NAMES,
) -> list[tuple[str, str, str]]:
    """(disk, attachment name, reason) for every vhdblkd device in use, served now or left waiting."""
    found: list[tuple[str, str, str]] = []
    try:
        disks = sorted(d for d in sys_root.iterdir() if d.name.startswith(("nbd", "ublkb")))
    except OSError:
        return found
    for sys_block in disks:
        name = _our_name(sys_block, ublk_names)
        if name is None:
            continue
        reason = device_in_use(sys_block.name, sys_root=sys_root, mountinfo=mountinfo, dev_root=dev_root)
        if reason is not None:
            found.append((sys_block.name, name, reason))
    return found


def main() -> int:
    busy = busy_devices()
    for disk, name, reason in busy:
        print(f"  /dev/{disk} ({name}): {reason}")
    return EXIT_IN_USE if busy else 0


if __name__ == "__main__":
    sys.exit(main())

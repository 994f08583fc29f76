"""Busy checks on a fake /sys/block and mountinfo."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhdblkd.daemon.inuse import busy_devices, device_in_use, mounted_on

MOUNTINFO = """\
22 1 0:21 / / rw,relatime - hostfs hostfs rw
30 22 43:1 / /srv/my\\040data rw,relatime - ext4 /dev/nbd0p1 rw
31 22 43:32 / /mnt/other rw,relatime - ext4 /dev/nbd1 rw
"""


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    root = tmp_path / "sys"
    for disk, minor in (("nbd0", 0), ("nbd1", 32), ("nbd2", 64), ("nbd3", 96)):
        d = root / disk
        (d / "holders").mkdir(parents=True)
        (d / "dev").write_text(f"43:{minor}\n")
    p1 = root / "nbd0" / "nbd0p1"
    (p1 / "holders").mkdir(parents=True)
    (p1 / "dev").write_text("43:1\n")
    (root / "nbd2" / "holders" / "dm-0").mkdir()
    (tmp_path / "mountinfo").write_text(MOUNTINFO)
    (tmp_path / "dev").mkdir()
    return root


@pytest.mark.parametrize(
    ("index", "reason"),
    [
        (0, "mounted on /srv/my data"),  # a partition's mount counts for the disk
        (1, "mounted on /mnt/other"),
        (2, "held by dm-0"),
        (3, None),
        (9, None),  # unknown to sysfs, no node: nothing claims it
    ],
)
def test_device_in_use(sysfs: Path, index: int, reason: str | None) -> None:
    tmp = sysfs.parent
    assert device_in_use(f"nbd{index}", sys_root=sysfs, mountinfo=tmp / "mountinfo", dev_root=tmp / "dev") == reason


def test_mounted_on(sysfs: Path) -> None:
    info = sysfs.parent / "mountinfo"
    assert mounted_on("nbd0", sys_root=sysfs, mountinfo=info) == ["/srv/my data"]
    assert mounted_on("nbd3", sys_root=sysfs, mountinfo=info) == []


def test_busy_devices_lists_only_vhdblkd_devices_in_use(sysfs: Path) -> None:
    tmp = sysfs.parent
    served = {"nbd0": "vhdblkd:data", "nbd1": "", "nbd2": "vhdblkd:held", "nbd3": "vhdblkd:free"}
    for disk, backend in served.items():
        (sysfs / disk / "size").write_text("131072\n")
        (sysfs / disk / "backend").write_text(backend + "\n")
    # nbd1 is mounted but served by someone else (nbd-client): not ours to guard.
    ublk = sysfs / "ublkb0"
    (ublk / "holders").mkdir(parents=True)
    (ublk / "dev").write_text("259:0\n")
    (ublk / "size").write_text("8\n")
    names = tmp / "ublk-names"
    names.mkdir()
    (names / "ublkb0").write_text("vhdblkd:fast\n")
    idle = sysfs / "nbd4"  # disconnected (size 0) with an old identifier
    (idle / "holders").mkdir(parents=True)
    (idle / "dev").write_text("43:128\n")
    (idle / "size").write_text("0\n")
    (idle / "backend").write_text("vhdblkd:old\n")
    info = tmp / "mountinfo"
    info.write_text(MOUNTINFO + "32 22 259:0 / /fast rw - ext4 /dev/ublkb0 rw\n33 22 43:128 / /old rw - ext4 x rw\n")
    busy = busy_devices(sys_root=sysfs, mountinfo=info, dev_root=tmp / "dev", ublk_names=names)
    assert busy == [
        ("nbd0", "data", "mounted on /srv/my data"),
        ("nbd2", "held", "held by dm-0"),
        ("ublkb0", "fast", "mounted on /fast"),
    ]


def test_busy_devices_without_sysfs_is_empty(tmp_path: Path) -> None:
    assert busy_devices(sys_root=tmp_path / "none", mountinfo=tmp_path / "none", dev_root=tmp_path) == []

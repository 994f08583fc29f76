"""A full systemd boot in user-mode Linux with the shipped unit, udev rule and module config.

The vhdtab entry is attached at boot, an fstab line with
x-systemd.after=vhdblkd.service mounts it by its /dev/disk/by-vhd name, a
unit writes a file, and `systemctl poweroff` must leave that file in the
image, which must check clean on the host.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from .test_daemon import VHDBLKCTL, assert_clean, fs_file
from .uml import REPO_ROOT, BootResult

PACKAGING = REPO_ROOT / "packaging"

TEST_UNIT = """\
[Unit]
Description=vhdblkd boot test
Requires=mnt-data.mount
After=mnt-data.mount vhdblkd.service

[Service]
Type=oneshot
Environment=PATH={venv}:/usr/sbin:/usr/bin:/sbin:/bin
ExecStart=/bin/sh -c '\\
  echo "written at boot" >/mnt/data/boot.txt && sync; \\
  findmnt -n -o SOURCE,TARGET /mnt/data >/srv/test/findmnt; \\
  readlink -f /dev/disk/by-vhd/data >/srv/test/by-vhd; \\
  vhdblkctl list --json >/srv/test/list.json; \\
  systemctl show -p ActiveState -p StatusText vhdblkd >/srv/test/vhdblkd.show; \\
  echo ok >/srv/test/result; \\
  systemctl poweroff --no-block'
"""

VENV_DROPIN = f"""\
[Service]
ExecStart=
ExecStart={REPO_ROOT}/.venv/bin/vhdblkd -v run
"""


def test_boot_attach_mount_write_poweroff(tmp_path: Path, systemd_guest: Callable[..., BootResult]) -> None:
    srv = tmp_path / "srv"
    srv.mkdir()
    raw = tmp_path / "data.raw"
    with raw.open("wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True, timeout=60)
    image = srv / "data.vhd"
    subprocess.run([VHDBLKCTL, "convert", "--to", "dynamic", str(raw), str(image)], check=True, timeout=120)

    files = {
        "/etc/systemd/system/vhdblkd.service": (PACKAGING / "systemd" / "vhdblkd.service").read_text(),
        "/etc/systemd/system/vhdblkd.service.d/venv.conf": VENV_DROPIN,
        "/etc/udev/rules.d/61-vhdblkd.rules": (PACKAGING / "udev" / "61-vhdblkd.rules").read_text(),
        "/etc/modules-load.d/vhdblkd.conf": (PACKAGING / "modules-load.d" / "vhdblkd.conf").read_text(),
        "/etc/modprobe.d/vhdblkd.conf": (PACKAGING / "modprobe.d" / "vhdblkd.conf").read_text(),
        "/etc/vhdblkd/vhdtab": "# attached at boot\ndata /srv/test/data.vhd\n",
        "/etc/fstab": "/dev/disk/by-vhd/data /mnt/data ext4 defaults,x-systemd.after=vhdblkd.service 0 0\n",
        "/etc/systemd/system/vhdtest.service": TEST_UNIT.format(venv=REPO_ROOT / ".venv" / "bin"),
    }
    boot = systemd_guest(
        "mkdir -p $NEWROOT/mnt/data",
        host_dir=srv,
        files=files,
        enable=("vhdblkd.service", "vhdtest.service"),
        timeout=300,
    )
    assert boot.result == "ok\n", boot.console[-6000:]
    assert boot.read("findmnt").split() == ["/dev/nbd0", "/mnt/data"]
    assert boot.read("by-vhd").strip() == "/dev/nbd0"
    assert "ActiveState=active" in boot.read("vhdblkd.show")
    assert "StatusText=1 attached: data=/dev/nbd0" in boot.read("vhdblkd.show")
    # Powered off: the unit stopped after the unmount, flushed and detached.
    assert_clean(image)
    assert fs_file(image, "/boot.txt", tmp_path) == "written at boot\n"

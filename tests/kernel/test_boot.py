"""A real systemd boot (user-mode Linux) with the packaged unit, udev rule and module config.

One boot checks the packaging end to end:

* an fstab line mounts /dev/disk/by-vhd/data with
  x-systemd.requires=vhdblkd.service during early boot, with no ordering
  cycle (vhdblkd.service has DefaultDependencies=no);
* systemd-modules-load loads nbd with the packaged options, the service
  reaches "active" through Type=notify, `systemctl reload` (SIGHUP) keeps it
  running, and udev names the device after the attachment;
* at `systemctl poweroff` the mount goes first, then the daemon flushes and
  detaches: a file written at boot is in the VHD afterwards, read on the host.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .uml import REPO_ROOT, BootResult, boot_systemd, check_unit

pytestmark = pytest.mark.kernel

PACKAGING = REPO_ROOT / "packaging"
VENV_BIN = REPO_ROOT / ".venv" / "bin"
MARKER = "made on the host before boot\n"
WRITTEN = "written while booted, flushed at poweroff\n"

CHECK_SCRIPT = r"""#!/bin/bash
# Runs in the booted guest once multi-user.target is reached.
out=/srv/test/result.tmp
: >"$out"
kv() { printf '%s=%s\n' "$1" "$2" >>"$out"; }
kv active "$(systemctl show -P ActiveState vhdblkd.service)"
kv type "$(systemctl show -P Type vhdblkd.service)"
kv status_text "$(systemctl show -P StatusText vhdblkd.service)"
kv nbds_max "$(cat /sys/module/nbd/parameters/nbds_max 2>&1)"
kv max_part "$(cat /sys/module/nbd/parameters/max_part 2>&1)"
kv link "$(readlink -f /dev/disk/by-vhd/data)"
kv mount_source "$(findmnt -n -o SOURCE /mnt/vhd)"
dev=$(readlink -f /dev/disk/by-vhd/data)
kv backend "$(cat /sys/block/${dev#/dev/}/backend 2>&1)"
kv marker "$(cat /mnt/vhd/marker 2>&1)"
kv fsck "$(systemctl show -P ActiveState,Result "$(systemd-escape -p --template=systemd-fsck@.service /dev/disk/by-vhd/data)" | tr '\n' ' ')"
kv mount_after "$(systemctl show -P After mnt-vhd.mount | tr ' ' '\n' | grep -x vhdblkd.service)"
kv failed "$(systemctl list-units --failed --no-legend --plain | awk '{print $1}' | tr '\n' ' ')"
printf 'written while booted, flushed at poweroff\n' >/mnt/vhd/written
systemctl reload vhdblkd.service
kv reload_rc "$?"
sleep 1
kv active_after_reload "$(systemctl show -P ActiveState vhdblkd.service)"
vhdblkctl list >/srv/test/list.out 2>&1
kv list_rc "$?"
kv verify "$(systemd-analyze verify vhdblkd.service /run/systemd/generator/mnt-vhd.mount 2>&1 | tr '\n' ' ')"
# A crash: Restart=on-failure brings the daemon back, the state file in the
# preserved RuntimeDirectory names the device, and the mounted file system
# carries on through RECONFIGURE.
pid1=$(systemctl show -P MainPID vhdblkd.service)
kill -KILL "$pid1"
for i in $(seq 100); do
    pid2=$(systemctl show -P MainPID vhdblkd.service)
    [ "$pid2" != 0 ] && [ "$pid2" != "$pid1" ] && [ "$(systemctl show -P ActiveState vhdblkd.service)" = active ] && break
    sleep 0.3
done
kv restarted "$( [ "$pid2" != 0 ] && [ "$pid2" != "$pid1" ] && echo yes)"
kv active_after_crash "$(systemctl show -P ActiveState vhdblkd.service)"
printf 'written after a daemon crash\n' >/mnt/vhd/after-crash
sync -f /mnt/vhd/after-crash
kv sync_rc "$?"
kv link_after_crash "$(readlink -f /dev/disk/by-vhd/data)"
mv "$out" /srv/test/result
"""


def _make_image(srv: Path) -> Path:
    """A dynamic VHD holding an ext4 with a marker file, made with mke2fs -d and vhdblkctl."""
    content = srv / "content"
    content.mkdir()
    (content / "marker").write_text(MARKER)
    raw = srv / "data.raw"
    with raw.open("wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(raw)], check=True, timeout=60)
    image = srv / "data.vhd"
    subprocess.run([str(VENV_BIN / "vhdblkctl"), "convert", str(raw), str(image)], check=True, timeout=120)
    raw.unlink()
    shutil.rmtree(content)
    return image


def _file_in_image(image: Path, inner: str, tmp: Path) -> str:
    raw = tmp / "readback.raw"
    raw.unlink(missing_ok=True)
    subprocess.run([str(VENV_BIN / "vhdblkctl"), "convert", "--to", "raw", str(image), str(raw)], check=True, timeout=120)
    done = subprocess.run(["debugfs", "-R", f"cat {inner}", str(raw)], capture_output=True, text=True, timeout=60)
    return done.stdout


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> tuple[BootResult, Path]:
    from .conftest import _require_uml

    _require_uml()
    srv = tmp_path_factory.mktemp("boot") / "srv"
    srv.mkdir()
    image = _make_image(srv)
    (srv / "check.sh").write_text(CHECK_SCRIPT)
    files = {
        "/etc/vhdblkd/vhdtab": "# NAME IMAGE [OPTIONS]\ndata /srv/test/data.vhd\n",
        "/etc/fstab": (
            "/dev/disk/by-vhd/data /mnt/vhd ext4 "
            "x-systemd.requires=vhdblkd.service,x-systemd.device-timeout=90s 0 2\n"
        ),
        "/etc/systemd/system/vhdblkd.service": (PACKAGING / "systemd/vhdblkd.service").read_text(),
        "/etc/modules-load.d/vhdblkd.conf": (PACKAGING / "modules-load.d/vhdblkd.conf").read_text(),
        "/etc/modprobe.d/vhdblkd.conf": (PACKAGING / "modprobe.d/vhdblkd.conf").read_text(),
        "/etc/udev/rules.d/61-vhdblkd.rules": (PACKAGING / "udev/61-vhdblkd.rules").read_text(),
        "/etc/systemd/system/vhdblkd-boot-check.service": check_unit(
            "vhdblkd boot checks", "/srv/test/check.sh", after=("multi-user.target", "vhdblkd.service")
        ),
    }
    # The unit's ExecStart is /usr/bin/vhdblkd, as for a system-wide install;
    # in the guest's overlay that path leads to the project's venv.
    setup = (
        f'ln -sf {VENV_BIN / "vhdblkd"} "$NEWROOT/usr/bin/vhdblkd"\n'
        f'ln -sf {VENV_BIN / "vhdblkctl"} "$NEWROOT/usr/bin/vhdblkctl"\n'
    )
    result = boot_systemd(
        setup,
        host_dir=srv,
        files=files,
        enable=["vhdblkd.service", "vhdblkd-boot-check.service"],
        timeout=300,
    )
    return result, image


def _results(booted: tuple[BootResult, Path]) -> dict[str, str]:
    result, _ = booted
    text = result.result
    assert text is not None, f"the guest never wrote its results\n--- console ---\n{result.console[-8000:]}"
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_service_came_up_through_notify(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    assert r["type"] == "notify"
    assert r["active"] == "active", r
    assert r["failed"].strip() == "", r


def test_modules_load_options(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    assert (r["nbds_max"], r["max_part"]) == ("32", "31")


def test_fstab_mount_by_vhd_name_at_boot(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    assert r["link"].startswith("/dev/nbd"), r
    assert r["mount_source"] == r["link"], r
    assert r["backend"] == "vhdblkd:data", r
    assert r["marker"] == MARKER.strip()
    assert r["mount_after"] == "vhdblkd.service"
    assert sorted(r["fsck"].split()) == ["active", "success"], r["fsck"]  # fstab pass 2: checked before mounting
    assert "ordering cycle" not in booted[0].console.lower()


def test_reload_keeps_service(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    assert r["reload_rc"] == "0"
    assert r["active_after_reload"] == "active"
    assert r["list_rc"] == "0", booted[0].read("list.out")
    assert "data" in booted[0].read("list.out")


def test_unit_and_generated_mount_verify(booted: tuple[BootResult, Path]) -> None:
    assert _results(booted)["verify"].strip() == ""


def test_crash_restart_keeps_the_mount(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    assert r["restarted"] == "yes", r
    assert r["active_after_crash"] == "active", r
    assert r["sync_rc"] == "0", r
    assert r["link_after_crash"] == r["link"], r


def test_poweroff_unmounts_then_flushes(booted: tuple[BootResult, Path], tmp_path: Path) -> None:
    result, image = booted
    _results(booted)
    console = result.console
    unmounted = console.find("mnt-vhd.mount: Deactivated successfully")
    stopped = console.find("vhdblkd.service: Deactivated successfully")
    assert unmounted != -1 and stopped != -1, console[-8000:]
    assert unmounted < stopped, "the daemon stopped before the mount was gone"
    assert _file_in_image(image, "/written", tmp_path) == WRITTEN
    assert _file_in_image(image, "/after-crash", tmp_path) == "written after a daemon crash\n"

"""The QEMU harness itself: what a script in the Debian 6.12 guest sees and what comes back.

One guest boot (a module-scoped fixture) runs every in-guest check and leaves
a file per check in a share; each test asserts on its own files.  That is
also the pattern for other tests on this kernel (see qemu.py's docstring).
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import guest, qemu_image
from .uml import REPO_ROOT, GuestError, GuestResult

pytestmark = pytest.mark.kernel  # and debian_kernel, from the debian_guest fixture (conftest)

SCRIPT = r"""
set -u
uname -r >"$SHARE/uname"
pwd >"$SHARE/cwd"
command -v python >"$SHARE/python"
cat "$OUTSIDE/from-host.txt" >"$SHARE/seen"
echo "only in the overlay" >"$OUTSIDE/guest-wrote" && cat "$OUTSIDE/guest-wrote" >"$SHARE/overlay-read"
cat /proc/mounts >"$SHARE/mounts"
ls /sys/block | grep -c '^nbd' >"$SHARE/nbd-count"
modprobe ublk_drv && stat -c %F /dev/ublk-control >"$SHARE/ublk-control"
seq 1 50000
echo "to stderr" >&2
exit 7
"""


@dataclass(frozen=True)
class Booted:
    result: GuestResult
    share: Path
    outside: Path


@pytest.fixture(scope="module")
def booted(debian_guest: Callable[..., GuestResult], tmp_path_factory: pytest.TempPathFactory) -> Booted:
    share = tmp_path_factory.mktemp("share")
    outside = tmp_path_factory.mktemp("outside")  # under the host's /tmp, not shared
    (outside / "from-host.txt").write_text("written on the host\n")
    result = guest.run_in_guest(
        SCRIPT,
        kernel="debian",
        shares=[share],
        modules=("nbd",),
        env={"SHARE": str(share), "OUTSIDE": str(outside)},
        timeout=300,
    )
    return Booted(result, share, outside)


def test_exit_status_and_both_streams_come_back_whole(booted: Booted) -> None:
    result = booted.result
    assert result.returncode == 7, result.console
    # ~290 kB: more than a pipe holds, so the host must read while the guest writes.
    assert result.stdout == "".join(f"{i}\n" for i in range(1, 50001))
    assert result.stderr == "to stderr\n"
    with pytest.raises(GuestError, match="exited 7"):
        result.check()


def test_boots_debians_612_kernel(booted: Booted) -> None:
    version = (booted.share / "uname").read_text().strip()
    assert version == qemu_image.kernel_version()
    assert version.startswith("6.12.") and version.endswith("+deb12-amd64")


def test_script_runs_in_the_checkout_with_the_venv(booted: Booted) -> None:
    assert (booted.share / "cwd").read_text().strip() == str(REPO_ROOT)
    assert (booted.share / "python").read_text().strip() == str(REPO_ROOT / ".venv" / "bin" / "python")


def test_host_tmp_is_visible_and_never_written(booted: Booted) -> None:
    assert (booted.share / "seen").read_text() == "written on the host\n"
    # The guest could write outside the shares (the overlay), but the host never sees it.
    assert (booted.share / "overlay-read").read_text() == "only in the overlay\n"
    assert not (booted.outside / "guest-wrote").exists()
    mounts = [line.split() for line in (booted.share / "mounts").read_text().splitlines()]
    by_point = {m[1]: m[2] for m in mounts}
    assert by_point["/"] == "overlay"
    assert "/tmp" not in by_point  # nothing hides the host's /tmp
    assert by_point[str(booted.share)] == "9p"


def test_modules_load_and_modprobe_ublk_drv_gives_the_control_device(booted: Booted) -> None:
    assert (booted.share / "nbd-count").read_text().strip() == "16"  # nbd loaded with nbds_max=16
    assert (booted.share / "ublk-control").read_text().strip() == "character special file"


def test_a_wedged_guest_is_killed_at_the_timeout(debian_guest: Callable[..., GuestResult]) -> None:
    with pytest.raises(GuestError, match="did not finish within 15 s") as caught:
        debian_guest("echo started; sleep 600", timeout=15)
    workdir = str(caught.value).split(", ", 1)[1].split(")", 1)[0]
    assert workdir.startswith("/") and not Path(workdir).exists()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert workdir.encode() not in cmdline, f"QEMU {pid} of the timed-out guest is still running"


def test_a_module_that_does_not_load_fails_the_run(debian_guest: Callable[..., GuestResult]) -> None:
    with pytest.raises(GuestError, match="modprobe no_such_driver failed in the guest"):
        debian_guest("true", modules=("no_such_driver",), timeout=300)


def test_a_boot_that_crashes_before_the_script_is_retried_and_a_later_failure_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from . import qemu

    outcomes: list[BaseException | str] = [qemu._BootCrash("Oops: int3"), qemu._BootCrash("Oops: int3"), "ran"]
    calls: list[int] = []

    def once(*args: object) -> object:
        calls.append(1)
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(qemu, "_run_once", once)
    assert qemu.run_in_guest("true") == "ran" and len(calls) == 3

    outcomes[:] = [qemu._BootCrash("Kernel panic")] * qemu.BOOT_ATTEMPTS
    with pytest.raises(GuestError, match=f"crashed before the script in {qemu.BOOT_ATTEMPTS} boots") as caught:
        qemu.run_in_guest("true")
    assert not isinstance(caught.value, qemu._BootCrash)

    calls.clear()
    outcomes[:] = [GuestError("ended without running the script to its end"), "ran"]
    with pytest.raises(GuestError, match="without running the script"):
        qemu.run_in_guest("true")
    assert len(calls) == 1


def test_same_interface_runs_uml(tmp_path: Path) -> None:
    why = guest.unavailable("uml")
    if why is not None:
        pytest.fail(why, pytrace=False)
    result = guest.run_in_guest(f"uname -r >{tmp_path}/uname; echo out; exit 3", kernel="uml", timeout=120)
    assert isinstance(result, GuestResult)
    assert (result.returncode, result.stdout) == (3, "out\n")
    assert (tmp_path / "uname").read_text().startswith("6.1.")


# --- the cached boot artifacts (host side) ---------------------------------------


def test_vmlinux_is_the_bzimages_kernel(debian_guest: object) -> None:
    version = qemu_image.kernel_version()
    elf = qemu_image.vmlinux(version).read_bytes()
    assert elf[:4] == b"\x7fELF" and struct.unpack_from("<H", elf, 18)[0] == 62  # EM_X86_64
    assert b"Linux version " + version.encode() in elf


def test_initramfs_reads_back_with_cpio(
    debian_guest: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu_image, "CACHE_DIR", tmp_path / "cache")
    path = qemu_image.initramfs(qemu_image.kernel_version())
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], stdin=path.open("rb"), capture_output=True, text=True, check=True
    ).stdout.splitlines()
    modes = {line.split()[-1]: line.split()[0] for line in listing}
    assert modes["init"] == "-rwxr-xr-x" and modes["bin/busybox"] == "-rwxr-xr-x"
    assert modes["dev/console"].startswith("c")
    for name in qemu_image.INITRAMFS_MODULES:
        ko = subprocess.run(
            ["cpio", "-i", "--to-stdout", "--quiet", f"lib/modules/{name}.ko"],
            stdin=path.open("rb"),
            capture_output=True,
            check=True,
        ).stdout
        assert ko[:4] == b"\x7fELF", name  # stored decompressed: busybox insmod needs no xz
    init = subprocess.run(
        ["cpio", "-i", "--to-stdout", "--quiet", "init"], stdin=path.open("rb"), capture_output=True, check=True
    ).stdout
    assert init.decode() == qemu_image._init_script()


def test_initramfs_is_cached_and_rebuilt_when_an_input_changes(
    debian_guest: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu_image, "CACHE_DIR", tmp_path / "cache")
    version = qemu_image.kernel_version()
    first = qemu_image.initramfs(version)
    built = first.stat().st_mtime_ns
    assert qemu_image.initramfs(version) == first and first.stat().st_mtime_ns == built
    busybox = tmp_path / "busybox"
    busybox.write_bytes(qemu_image.BUSYBOX.read_bytes())
    monkeypatch.setattr(qemu_image, "BUSYBOX", busybox)
    second = qemu_image.initramfs(version)
    assert second != first and second.exists() and first.exists()  # the old one may still be booting
    os.utime(first, (0, 0))
    os.utime(busybox, ns=(0, busybox.stat().st_mtime_ns + 1))
    third = qemu_image.initramfs(version)
    assert third not in (first, second) and not first.exists()  # stale: dropped

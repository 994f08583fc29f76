"""Run code on Debian's own 6.12 kernel (nbd and ublk_drv) in a QEMU guest.

User-mode Linux (uml.py) has no ublk driver, so ublk tests, and a smoke test
of nbd on the distro kernel, boot bookworm-backports' linux-image-6.12 under
QEMU over the host's own root file system.  `.ci/setup` installs QEMU,
busybox-static and that kernel (.ci/guest-kernel); the guest's modules are
the host's /lib/modules/<version>.  ../shared/QEMU-TESTING.md has the recipe
and the measured costs.

    run_in_guest(script, *, timeout=300, shares=(), modules=(), env=None,
                 mem="2G", smp=2, keep=False) -> GuestResult

runs `script` with the host's bash as root in a fresh guest and returns the
same `GuestResult` as uml.run_in_guest (returncode, stdout, stderr, console,
workdir; `.check()` asserts exit 0).  `guest.run_in_guest(script,
kernel="uml"|"debian")` picks either harness with one signature.

What the script sees:
* `/` is the host's root, read-only over virtio-9p with a tmpfs overlay on
  top: the checkout, its `.venv`, the host's /tmp (not hidden, not cleaned)
  are all there, and the script may write anywhere, but such writes vanish
  at power-off.  cwd is the repository root, the venv first on PATH.
* Writes that the host must see go to a read-write share: `$GUEST_WORKDIR`
  (a fresh host temp dir, removed afterwards unless `keep`) and every host
  directory in `shares` (e.g. pytest's tmp_path), each mounted at its own
  host path.  Put images there; /run (tmpfs) is for sockets and scratch.
* `modules` are modprobe'd first (MODULE_OPTIONS gives nbd its device
  count); one that does not load raises GuestError.  `modprobe` itself
  works in the script too (e.g. `modprobe ublk_drv`).
* proc, sys, devtmpfs, devpts, /dev/shm and lo are up; no udev, no systemd.

Costs (TCG, these machines): about 5 s from QEMU's start to the command,
then every exec is ~0.1 s and Python ~10x slower than on the host (start
1-2 s, importing vhdblkd + pyroute2 5-7 s).  So one boot should run many
checks: write one script (or one Python program) that does them all and
leaves a result file per check in a share, run it from a module-scoped
fixture, and let each test assert on its own file.  tests/kernel/test_qemu.py
is an example.

The kernel is booted uncompressed (vmlinux, pulled out of the bzImage once)
with a tiny initramfs (busybox + the 9p and overlay modules), both cached
(qemu_image.py) and rebuilt when their inputs change.  KVM is used when /dev/kvm
is real; on hosts where it is PVM (kvm_pvm loaded) a stock kernel cannot run
under it, so TCG.  Output comes back through two virtio serial ports (FIFOs
on the host), the exit status in a file in the work share; the guest powers
off through sysrq, and a host-side timeout kills a guest that does not.
"""

from __future__ import annotations

import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .qemu_image import BUSYBOX, initramfs, kernel_version, vmlinux
from .uml import REPO_ROOT, VENV_BIN, GuestError, GuestResult

QEMU = "qemu-system-x86_64"
# Mitigations, allocation zeroing and crypto self-tests cost a third of the boot under TCG;
# a throwaway test guest needs none of them.
KERNEL_ARGS = "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off init_on_alloc=0 nowatchdog audit=0 cryptomgr.notests"
MODULE_OPTIONS = {"nbd": "nbds_max=16 max_part=16"}
_TAIL = 12000


@dataclass(frozen=True)
class DebianResult(GuestResult):
    """A GuestResult plus when the script started, in seconds of guest uptime."""

    boot_seconds: float = 0.0


def debian_available() -> str | None:
    """None when the QEMU guest can run, else why not (for a clear test failure)."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is missing: install Debian's qemu-system-x86 (bash .ci/setup)"
    if not BUSYBOX.exists():
        return f"{BUSYBOX} is missing: install Debian's busybox-static (bash .ci/setup)"
    try:
        kernel_version()
    except GuestError as exc:
        return str(exc)
    if os.geteuid() != 0:
        return "QEMU guest tests run as root (9p passthrough of /, module loading, mounts)"
    return None


def accel() -> list[str]:
    """KVM where /dev/kvm is real KVM, TCG where it is PVM (a stock kernel cannot run there) or absent."""
    pvm = Path("/sys/module/kvm_pvm").exists()
    if not pvm and os.access("/dev/kvm", os.R_OK | os.W_OK) and os.environ.get("VHDBLKD_GUEST_ACCEL") != "tcg":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


# --- one run --------------------------------------------------------------------


def _boot_sh(workdir: Path, shares: list[Path]) -> str:
    """Per-run second stage in the initramfs: extra shares, mounts moved, switch_root."""
    lines = []
    for i, share in enumerate(shares):
        lines.append(f'mount -t 9p -o $O,cache=mmap share{i} "/newroot"{shlex.quote(str(share))} || die "share {i}"')
    lines += [
        "mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm",
        "ip link set lo up",
        "mount --move /dev /newroot/dev && mount --move /proc /newroot/proc && mount --move /sys /newroot/sys",
        "mount -t tmpfs -o mode=0755 tmpfs /newroot/run",
        f"exec switch_root /newroot /bin/bash {shlex.quote(str(workdir / 'stage2.sh'))}",
    ]
    return "\n".join(lines) + "\n"


def _stage2(workdir: Path, modules: Iterable[str], env: Mapping[str, str]) -> str:
    """PID 1 after switch_root (the host's bash): run the script, record its status, power off."""
    w = shlex.quote(str(workdir))
    loads = "".join(
        f"modprobe {m} {MODULE_OPTIONS.get(m, '')} 2>>{w}/modprobe.err || echo {m} >>{w}/modprobe.failed\n"
        for m in modules
    )
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    return f"""\
{exports}{loads}for p in /sys/class/virtio-ports/*; do
    read -r name <"$p/name"
    case $name in stdout) OUT=/dev/${{p##*/}};; stderr) ERR=/dev/${{p##*/}};; esac
done
cd {shlex.quote(str(REPO_ROOT))}
read -r up _ </proc/uptime; echo "$up" >{w}/boot-seconds
echo GUEST: running script
bash {w}/script.sh >"$OUT" 2>"$ERR" </dev/null
echo $? >{w}/rc.tmp
sync; mv {w}/rc.tmp {w}/rc; sync
echo GUEST: powering off
echo o >/proc/sysrq-trigger
sleep 30
"""


def _opt(path: Path) -> str:
    """A path as a QEMU option value (commas doubled)."""
    return str(path).replace(",", ",,")


def _qemu_cmd(version: str, workdir: Path, shares: list[Path], mem: str, smp: int) -> list[str]:
    fs = "security_model=none,multidevs=remap"
    cmd = [
        QEMU, "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none", "-monitor", "none",
        *accel(), "-m", mem, "-smp", str(smp),
        "-kernel", str(vmlinux(version)), "-initrd", str(initramfs(version)),
        "-append", f"{KERNEL_ARGS} vhdblkd.work={workdir}",
        "-serial", f"file:{_opt(workdir)}/console.log",
        "-virtfs", f"local,path=/,mount_tag=hostroot,readonly=on,{fs}",
        "-virtfs", f"local,path={_opt(workdir)},mount_tag=work,{fs}",
        *(a for i, s in enumerate(shares) for a in ("-virtfs", f"local,path={_opt(s)},mount_tag=share{i},{fs}")),
        "-device", "virtio-serial-pci",
    ]  # fmt: skip
    for name in ("stdout", "stderr"):
        cmd += ["-chardev", f"pipe,id={name},path={_opt(workdir)}/{name}"]
        cmd += ["-device", f"virtserialport,chardev={name},name={name}"]
    return cmd


def _pump(proc: subprocess.Popen[bytes], fifos: dict[str, int], deadline: float) -> tuple[dict[str, bytes], bool]:
    """Read the guest's stdout/stderr FIFOs until QEMU exits or the deadline passes."""
    data = {name: b"" for name in fifos}
    poll = select.poll()
    names = {fd: name for name, fd in fifos.items()}
    for fd in names:
        poll.register(fd, select.POLLIN)

    def drain(fd: int) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            data[names[fd]] += chunk

    in_time = True
    while proc.poll() is None:
        left = deadline - time.monotonic()
        if left <= 0:
            in_time = False
            _kill(proc)
            break
        for fd, _ in poll.poll(min(left, 0.5) * 1000):
            drain(fd)
    for fd in names:
        drain(fd)
    return data, in_time


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(text: str) -> str:
    return text if len(text) <= _TAIL else "...\n" + text[-_TAIL:]


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace") if path.exists() else ""


# A guest kernel that dies before the script starts is the emulator's fault, not the
# code under test's: under multi-threaded TCG, Linux's live patching of its own text
# (static keys, int3 then the new bytes) now and then traps on a stale translation
# ("Oops: int3" in an initcall, about 1.8 s into the boot).  Such a boot is retried;
# a crash once the script runs is never retried, since it may be ours.
BOOT_ATTEMPTS = 3
_BOOT_CRASH = ("Kernel panic", "Oops:", "BUG:")


class _BootCrash(GuestError):
    """The guest kernel died before stage 2 ran (no boot-seconds file)."""


def run_in_guest(
    script: str,
    *,
    timeout: float = 300,
    shares: Iterable[Path | str] = (),
    modules: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    mem: str = "2G",
    smp: int = 2,
    keep: bool = False,
) -> DebianResult:
    """Run `script` (bash) as root in a fresh QEMU guest on Debian's 6.12 kernel (see the module doc).

    Raises GuestError with the console and output if the guest does not finish
    within `timeout` seconds (QEMU is killed) or never ran the script to its end.
    A kernel crash before the script starts is retried, up to BOOT_ATTEMPTS boots.
    """
    share_dirs = [Path(s).resolve() for s in shares]
    for share in share_dirs:
        if not share.is_dir():
            raise GuestError(f"share {share} is not a directory")
    modules = tuple(modules)
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        try:
            return _run_once(script, timeout, share_dirs, modules, env, mem, smp, keep)
        except _BootCrash as exc:
            if attempt == BOOT_ATTEMPTS:
                raise GuestError(f"the guest kernel crashed before the script in {attempt} boots; the last:\n{exc}") from None
            print(f"qemu guest: boot {attempt} crashed before the script ran; booting again", file=sys.stderr)
    raise AssertionError("unreachable")


def _run_once(
    script: str,
    timeout: float,
    share_dirs: list[Path],
    modules: tuple[str, ...],
    env: Mapping[str, str] | None,
    mem: str,
    smp: int,
    keep: bool,
) -> DebianResult:
    version = kernel_version()
    workdir = Path(tempfile.mkdtemp(prefix="vhdblkd-qemu-"))
    try:
        (workdir / "script.sh").write_text(script)
        (workdir / "boot.sh").write_text(_boot_sh(workdir, share_dirs))
        full_env = {
            "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "GUEST_WORKDIR": str(workdir),
            "GUEST_KERNEL": "debian",
            **(env or {}),
        }
        (workdir / "stage2.sh").write_text(_stage2(workdir, modules, full_env))
        fifos = {}
        for name in ("stdout", "stderr"):
            for end in ("in", "out"):
                os.mkfifo(workdir / f"{name}.{end}")
            fifos[name] = os.open(workdir / f"{name}.out", os.O_RDONLY | os.O_NONBLOCK)
        cmd = _qemu_cmd(version, workdir, share_dirs, mem, smp)
        deadline = time.monotonic() + timeout
        try:
            with open(workdir / "qemu.log", "wb") as log:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
                try:
                    data, in_time = _pump(proc, fifos, deadline)
                finally:
                    if proc.poll() is None:
                        _kill(proc)
        finally:
            for fd in fifos.values():
                os.close(fd)
        stdout = data["stdout"].decode("utf-8", "replace")
        stderr = data["stderr"].decode("utf-8", "replace")
        console = _read(workdir / "console.log") + _read(workdir / "qemu.log")
        rc_path = workdir / "rc"
        if not rc_path.exists():
            why = f"did not finish within {timeout} s" if not in_time else "ended without running the script to its end"
            started = (workdir / "boot-seconds").exists()
            crashed = not started and in_time and any(mark in console for mark in _BOOT_CRASH)
            raise (_BootCrash if crashed else GuestError)(
                f"QEMU guest ({version}, {workdir}) {why}\n--- stdout ---\n{_tail(stdout)}\n"
                f"--- stderr ---\n{_tail(stderr)}\n--- console ---\n{_tail(console)}"
            )
        failed = _read(workdir / "modprobe.failed").split()
        if failed:  # the script ran without a driver it asked for: its own errors would only mislead
            raise GuestError(
                f"modprobe {' '.join(failed)} failed in the guest ({version}):\n{_read(workdir / 'modprobe.err')}"
            )
        boot = _read(workdir / "boot-seconds").strip()
        return DebianResult(
            int(rc_path.read_text().strip()), stdout, stderr, console, workdir, float(boot) if boot else 0.0
        )
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

"""Run code against a real Linux nbd driver inside user-mode Linux (UML).

The host kernel has no nbd driver, so kernel tests boot Debian's
`linux.uml` with the host's own root file system (hostfs) as the guest's
root: the repository, its `.venv` and the test's temporary files are
visible inside unchanged.  See /work/shared/KERNEL-TESTING.md for the
recipes this module automates.

Two entry points:

* `run_in_guest(script)`: PID 1 is a small sh script that mounts proc, sys,
  dev and a tmpfs on /run, loads the requested modules (nbd with
  nbds_max=16 max_part=16) with insmod, runs `script` with bash (cwd =
  repository root, the venv first on PATH) and powers off.  Returns a
  `GuestResult`.  The host has no /lib/modules, so `modprobe` does not work
  in this guest (load modules through the `modules` argument).
* `boot_systemd(setup_script)`: PID 1 builds an overlay over the host root,
  mounts a host directory at /srv/test inside it, installs files, runs
  `setup_script` against the new root, pivots and execs systemd.  A unit
  written by the test (see `check_unit`) checks things, writes
  `/srv/test/result` and powers off.  Returns a `BootResult`.  A failed boot
  (emergency or rescue mode) powers off at once.

Every UML process runs under a seccomp filter that works around UML 6.1's
XSAVE bug on AVX-512/AMX hosts, and every guest process is told not to use
AVX (see "the AMX/XSAVE workaround" below); without it the guest's init
dies at once on such machines.

Both raise `GuestError` (an AssertionError, so pytest shows it as a test
failure) with the console log when the guest does not come back in time or
never ran the script.  A non-zero exit of the user's script is *not* raised:
call `GuestResult.check()` to assert success.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = REPO_ROOT / ".venv" / "bin"
UML_KERNEL = "linux.uml"
UML_MODULES = Path("/usr/lib/uml/modules")
# Module options: enough devices for several attachments per test, partitions allowed.
MODULE_OPTIONS = {"nbd": "nbds_max=16 max_part=16"}
SYSTEMD_MOUNT = "/srv/test"
# Where each script's console/output is truncated to in error messages.
_TAIL = 12000


class GuestError(AssertionError):
    """The guest did not boot, run the script, or power off in time."""


@dataclass(frozen=True)
class GuestResult:
    """What came back from `run_in_guest`."""

    returncode: int
    stdout: str
    stderr: str
    console: str
    workdir: Path

    def check(self) -> GuestResult:
        """Assert the script exited 0; on failure show its output and the console."""
        if self.returncode != 0:
            raise GuestError(
                f"guest script exited {self.returncode}\n"
                f"--- stdout ---\n{_tail(self.stdout)}\n--- stderr ---\n{_tail(self.stderr)}\n"
                f"--- console ---\n{_tail(self.console)}"
            )
        return self


@dataclass(frozen=True)
class BootResult:
    """What came back from `boot_systemd`: the console and the shared host directory."""

    console: str
    host_dir: Path

    @property
    def result(self) -> str | None:
        """Content of /srv/test/result as the guest left it, or None if never written."""
        path = self.host_dir / "result"
        return path.read_text() if path.exists() else None

    def read(self, name: str) -> str:
        return (self.host_dir / name).read_text()


# --- the AMX/XSAVE workaround ---------------------------------------------------
#
# UML 6.1 saves a guest process's FPU state with PTRACE_GETREGSET(NT_X86_XSTATE)
# into an 832-byte buffer and writes it back with PTRACE_SETREGSET.  Hosts whose
# CPUs have large XSAVE areas (AVX-512, AMX) accept the short read but refuse the
# short write with EFAULT ("userspace - ptrace set fp regs failed, errno = 14"),
# and the guest's init dies at once.  UML probes XSTATE support once, with that
# same GETREGSET; a seccomp filter that fails exactly that call (EIO) makes UML
# fall back to PTRACE_GETFPREGS/SETFPREGS (the 512-byte FXSAVE area: x87+SSE).
# AVX state is then not kept reliably at all (even a single-threaded insmod
# built with AVX2 string functions corrupts its own strings), so every guest
# process is told not to use AVX: glibc through GLIBC_TUNABLES (given on the
# kernel command line, which puts it in PID 1's environment; systemd guests
# also get it as DefaultEnvironment) and OpenSSL through OPENSSL_ia32cap.

_AUDIT_ARCH_X86_64 = 0xC000003E
_NR_PTRACE = 101
_PTRACE_GETREGSET = 0x4204
_NT_X86_XSTATE = 0x202
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO_EIO = 0x00050000 | 5
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
GUEST_GLIBC_TUNABLES = (
    "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,"
    "-FMA,-FMA4,-AVX_Fast_Unaligned_Load"
)
# Word 1 bit 60 = CPUID.1:ECX.AVX; word 2 = CPUID.7:EBX (AVX2, AVX512F/DQ/IFMA/CD/BW/VL).
GUEST_OPENSSL_IA32CAP = "~0x1000000000000000:~0xD0230020"
GUEST_ENV = {"GLIBC_TUNABLES": GUEST_GLIBC_TUNABLES, "OPENSSL_ia32cap": GUEST_OPENSSL_IA32CAP}


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _xstate_filter() -> bytes:
    ld_abs, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    return b"".join(
        [
            _bpf(ld_abs, 0, 0, 4),  # seccomp_data.arch
            _bpf(jeq, 0, 7, _AUDIT_ARCH_X86_64),
            _bpf(ld_abs, 0, 0, 0),  # .nr
            _bpf(jeq, 0, 5, _NR_PTRACE),
            _bpf(ld_abs, 0, 0, 16),  # .args[0], low word: the request
            _bpf(jeq, 0, 3, _PTRACE_GETREGSET),
            _bpf(ld_abs, 0, 0, 32),  # .args[2], low word: the regset type
            _bpf(jeq, 0, 1, _NT_X86_XSTATE),
            _bpf(ret, 0, 0, _SECCOMP_RET_ERRNO_EIO),
            _bpf(ret, 0, 0, _SECCOMP_RET_ALLOW),
        ]
    )


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _no_xstate_preexec() -> Callable[[], None]:
    """A preexec_fn installing the filter; buffers are built before the fork."""
    libc = ctypes.CDLL(None, use_errno=True)
    prog = _xstate_filter()
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.addressof(buf))

    def install() -> None:
        keep = (buf, fprog)  # referenced so the filter memory lives until exec
        if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(keep[1]), 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"installing the UML seccomp filter: {os.strerror(err)}")

    return install


def _tail(text: str) -> str:
    return text if len(text) <= _TAIL else "...\n" + text[-_TAIL:]


def uml_available() -> str | None:
    """None when UML and its modules are usable, else why not (for a clear test failure)."""
    if shutil.which(UML_KERNEL) is None:
        return f"{UML_KERNEL} is missing: install Debian's user-mode-linux and kmod (bash .ci/setup)"
    try:
        module_dir()
    except GuestError as exc:
        return str(exc)
    if shutil.which("insmod") is None:
        return "insmod is missing: install Debian's kmod package (bash .ci/setup)"
    if os.geteuid() != 0:
        return "kernel tests run user-mode Linux as root (module loading, mounts, nbd)"
    return None


def module_dir() -> Path:
    """/usr/lib/uml/modules/<version>: the one folder there, named after the UML kernel."""
    if not UML_MODULES.is_dir():
        raise GuestError(f"{UML_MODULES} is missing: install Debian's user-mode-linux")
    versions = sorted(p for p in UML_MODULES.iterdir() if (p / "modules.dep").exists())
    if not versions:
        raise GuestError(f"no module tree with modules.dep under {UML_MODULES}")
    return versions[-1]


def _find_module(name: str) -> Path:
    base = module_dir()
    for path in sorted(base.rglob("*.ko*")):
        stem = path.name.split(".ko")[0]
        if stem.replace("-", "_") == name.replace("-", "_"):
            return path
    raise GuestError(f"no {name}.ko under {base}")


def _insmod_lines(modules: Iterable[str]) -> str:
    """insmod lines (kmod's modprobe cannot see the UML tree without a host /lib/modules)."""
    lines = []
    for name in modules:
        path = _find_module(name)
        opts = MODULE_OPTIONS.get(name, "")
        lines.append(f"insmod {shlex.quote(str(path))} {opts} || echo 'GUEST: insmod {name} failed'")
    return "\n".join(lines)


def _env_lines(env: Mapping[str, str] | None) -> str:
    base = {
        "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "VHDBLKD_IN_UML": "1",
        **GUEST_ENV,
    }
    base.update(env or {})
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in base.items())


_MOUNTS = """\
mount -t proc proc /proc
mount -t sysfs sys /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
"""


def _run_uml(init: Path, workdir: Path, mem: str, timeout: float) -> tuple[str, bool]:
    """Boot UML with `init` as PID 1; returns (console, finished_in_time)."""
    console_path = workdir / "console.log"
    cmd = [
        UML_KERNEL,
        f"mem={mem}",
        "root=/dev/root",
        "rootfstype=hostfs",
        "rootflags=/",
        "rw",
        f"init={init}",
        f"umid=vhdblkd-{workdir.name}",
        f"uml_dir={workdir}",
        "con=null",
        "con0=null,fd:1",
        *(f"{k}={v}" for k, v in GUEST_ENV.items()),
    ]
    env = dict(os.environ)
    env["TMPDIR"] = str(workdir)  # UML's memory backing file
    with open(console_path, "wb") as console:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_no_xstate_preexec(),
        )
        in_time = True
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            in_time = False
            _kill_group(proc)
    return console_path.read_bytes().decode("utf-8", "replace"), in_time


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="vhdblkd-uml-"))


def run_in_guest(
    script: str,
    *,
    timeout: float = 180,
    mem: str = "1G",
    modules: Iterable[str] = ("nbd",),
    env: Mapping[str, str] | None = None,
    keep: bool = False,
) -> GuestResult:
    """Run `script` (bash) as root inside a fresh UML guest with the given modules loaded.

    cwd is the repository root; the project's venv is first on PATH; `$GUEST_WORKDIR`
    is a host temp dir visible in the guest (the script may leave files there;
    it is removed afterwards unless `keep`).  Raises GuestError with the console
    log if the guest does not finish within `timeout` seconds.
    """
    workdir = _new_workdir()
    try:
        (workdir / "script.sh").write_text(script)
        init = workdir / "init.sh"
        init.write_text(
            "#!/bin/sh\n"
            + _MOUNTS
            + _insmod_lines(modules)
            + "\n"
            + _env_lines({**(env or {}), "GUEST_WORKDIR": str(workdir)})
            + f"\ncd {shlex.quote(str(REPO_ROOT))}\n"
            + "echo GUEST: running script\n"
            + f"bash {workdir}/script.sh >{workdir}/stdout 2>{workdir}/stderr </dev/null\n"
            + f"echo $? >{workdir}/rc.tmp\n"
            + f"sync\nmv {workdir}/rc.tmp {workdir}/rc\nsync\n"
            + "echo GUEST: powering off\n"
            + "echo o >/proc/sysrq-trigger\n"
            + "sleep 30\n"
        )
        init.chmod(0o755)
        console, in_time = _run_uml(init, workdir, mem, timeout)
        rc_path = workdir / "rc"
        stdout = _read(workdir / "stdout")
        stderr = _read(workdir / "stderr")
        if not rc_path.exists():
            why = f"did not finish within {timeout} s" if not in_time else "ended without running the script to its end"
            raise GuestError(
                f"UML guest {why}\n--- stdout ---\n{_tail(stdout)}\n--- stderr ---\n{_tail(stderr)}\n"
                f"--- console ---\n{_tail(console)}"
            )
        return GuestResult(int(rc_path.read_text().strip()), stdout, stderr, console, workdir)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace") if path.exists() else ""


# Units that only slow a test boot down or wait for hardware/network the guest lacks.
DEFAULT_MASK = (
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "systemd-networkd-wait-online.service",
    "NetworkManager-wait-online.service",
    "systemd-timesyncd.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
    "logrotate.timer",
    "cron.service",
    "ssh.service",
    "postgresql.service",
    "postgresql@.service",
    # binfmt_misc is a module in UML; its mount can fail under load and nothing here runs foreign binaries.
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
)


def boot_systemd(
    setup_script: str = "",
    *,
    files: Mapping[str, str | bytes] | None = None,
    enable: Iterable[str] = (),
    mask: Iterable[str] = DEFAULT_MASK,
    host_dir: Path,
    timeout: float = 240,
    mem: str = "1G",
    modules: Iterable[str] = ("overlay",),
    env: Mapping[str, str] | None = None,
    keep: bool = False,
) -> BootResult:
    """Boot real systemd in UML on a throwaway overlay of the host root.

    * `host_dir` (a host directory, e.g. pytest's tmp_path / "srv") is mounted
      at /srv/test inside the new root; everything the host must see afterwards
      (result files, images flushed at shutdown) goes there.
    * `files` maps absolute paths inside the new root to contents; they are
      written into the overlay (unit files, /etc/vhdtab, modprobe config, ...).
      An executable bit is set on files under */bin/*, */sbin/* and *.sh.
    * `enable` lists unit names to enable for multi-user.target (symlinks in
      /etc/systemd/system/multi-user.target.wants/).  Units the host enabled
      there are dropped, the default target is multi-user.target, and `mask`
      (DEFAULT_MASK: gettys, timers, slow services) is masked.
    * Every service gets the guest's AVX workaround environment
      (DefaultEnvironment) and the journal is forwarded to the console, so
      service logs are in `BootResult.console`.  `check_unit()` builds a
      oneshot unit that runs a check script and then powers off.
    * `setup_script` (bash) runs before the pivot with `$NEWROOT` naming the new
      root's mount point and `$TESTDIR` the host dir as mounted inside it.
    * /lib/modules/<version> inside the overlay is the UML module tree, so
      `modprobe nbd` and systemd-modules-load work; nbd.ko is NOT preloaded.

    The boot is over when the guest powers off (a test unit runs `systemctl
    poweroff --no-block` after writing /srv/test/result).  Raises GuestError
    with the console if that does not happen within `timeout` seconds.
    """
    workdir = _new_workdir()
    shared = host_dir.resolve()
    shared.mkdir(parents=True, exist_ok=True)
    try:
        staging = workdir / "root"
        staging.mkdir()
        for rel, content in (files or {}).items():
            target = staging / rel.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
            if "/bin/" in rel or "/sbin/" in rel or rel.endswith(".sh"):
                target.chmod(0o755)
        wants = staging / "etc/systemd/system/multi-user.target.wants"
        for unit in enable:
            wants.mkdir(parents=True, exist_ok=True)
            (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")
        masked = staging / "etc/systemd/system"
        masked.mkdir(parents=True, exist_ok=True)
        for unit in mask:
            link = masked / unit
            if not link.exists() and not link.is_symlink():
                link.symlink_to("/dev/null")
        for rel, content in _systemd_test_config().items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        (workdir / "setup.sh").write_text(setup_script)
        version = module_dir().name
        nr = "/run/ov/m"
        init = workdir / "init.sh"
        init.write_text(
            "#!/bin/sh\n"
            + _MOUNTS
            + _insmod_lines(modules)
            + "\n"
            + _env_lines({**(env or {}), "NEWROOT": nr, "TESTDIR": SYSTEMD_MOUNT})
            + f"""
mkdir -p /run/ov && mount -t tmpfs tmpfs /run/ov && mkdir -p /run/ov/u /run/ov/w {nr}
mount -t overlay overlay -o lowerdir=/,upperdir=/run/ov/u,workdir=/run/ov/w {nr} || echo 'GUEST: overlay failed'
# Only the test's units start: drop what the host enabled, boot to multi-user.
rm -rf {nr}/etc/systemd/system/multi-user.target.wants {nr}/etc/systemd/system/graphical.target.wants
ln -sf /lib/systemd/system/multi-user.target {nr}/etc/systemd/system/default.target
cp -a {workdir}/root/. {nr}/
mkdir -p {nr}{SYSTEMD_MOUNT} {nr}/lib/modules/{version}
mount -t hostfs -o {shared} hostfs {nr}{SYSTEMD_MOUNT}
mount -t hostfs -o {UML_MODULES}/{version} hostfs {nr}/lib/modules/{version}
# The guest has no machine-id of its own; give it one so journald and units start cleanly.
rm -f {nr}/etc/machine-id && echo 0123456789abcdef0123456789abcdef >{nr}/etc/machine-id
cd {shlex.quote(str(REPO_ROOT))}
bash {workdir}/setup.sh >{shared}/setup.out 2>&1 || echo "GUEST: setup script failed: $?"
echo GUEST: pivoting into systemd
umount /dev/pts /dev/shm
umount /proc /sys /dev
cd {nr} && mkdir -p old && pivot_root . old
exec chroot . /lib/systemd/systemd --log-target=console --show-status=false
"""
        )
        init.chmod(0o755)
        console, in_time = _run_uml(init, workdir, mem, timeout)
        if not in_time:
            raise GuestError(f"systemd guest did not power off within {timeout} s\n--- console ---\n{_tail(console)}")
        return BootResult(console, shared)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


_GIVE_UP = (
    "[Service]\nExecStartPre=\nExecStart=\n"
    "ExecStart=/bin/sh -c 'echo GUEST: boot failed, entering %n; systemctl --failed --no-pager; "
    "systemctl start --no-block --job-mode=replace-irreversibly poweroff.target'\n"
    "StandardInput=null\nStandardOutput=journal+console\n"
)


def _systemd_test_config() -> dict[str, str]:
    """Guest-only systemd settings: the AVX workaround for every service, logs on the console."""
    env = " ".join(f'"{k}={v}"' for k, v in GUEST_ENV.items())
    return {
        "etc/systemd/system.conf.d/50-uml-test.conf": f"[Manager]\nDefaultEnvironment={env}\nShowStatus=no\n",
        # A failed boot must end the run quickly, with the reason on the console,
        # instead of waiting on a rescue shell nobody can type into.
        "etc/systemd/system/emergency.service.d/50-uml-test.conf": _GIVE_UP,
        "etc/systemd/system/rescue.service.d/50-uml-test.conf": _GIVE_UP,
        # Debian's tmpfiles.d/tmp.conf empties /tmp at boot (`D /tmp`); the guest's
        # /tmp is the host's, where the checkout and its venv may live (CI may run
        # from /tmp).  Same path, so this file replaces it: keep /tmp as it is.
        "etc/tmpfiles.d/tmp.conf": "d /tmp 1777 root root -\n",
        "etc/systemd/journald.conf.d/50-uml-test.conf": (
            "[Journal]\nStorage=volatile\nForwardToConsole=yes\nMaxLevelConsole=info\nTTYPath=/dev/console\n"
        ),
    }


def check_unit(description: str, script: str, *, after: Iterable[str] = ("multi-user.target",)) -> str:
    """A oneshot unit that runs `script` (an absolute path inside the guest), then powers off.

    Install it with `files` and list it in `enable`; it is ordered after `after`
    and powers the guest off even when the script fails.
    """
    order = " ".join(after)
    return (
        f"[Unit]\nDescription={description}\nAfter={order}\n\n"
        f"[Service]\nType=oneshot\nExecStart=/bin/bash {script}\n"
        "ExecStopPost=/bin/systemctl start --no-block --job-mode=replace-irreversibly poweroff.target\n"
        "StandardOutput=journal+console\n"
        "StandardError=journal+console\nTimeoutStartSec=5min\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )


def wait_for(path: Path, timeout: float) -> bool:
    """Poll for `path` to exist (for host-side helpers that watch a running guest)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.2)
    return path.exists()

"""Runs INSIDE the user-mode-Linux guest (tests/kernel/test_netlink.py starts it).

Drives the real nbd driver through vhdblkd.nbd.netlink with vhdblkd's own
server on the other end of socketpairs, and prints one JSON line per check:
{"check": name, "ok": bool, "detail": str}.  The host-side test asserts on
these lines, so one boot covers many checks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from vhdblkd.backend import MemoryBackend
from vhdblkd.errors import KernelError
from vhdblkd.nbd.netlink import NbdEvents, NbdNetlink
from vhdblkd.nbd.server import Export, serve_connection

MiB = 1024 * 1024


def report(check: str, ok: bool, detail: str = "") -> None:
    print(json.dumps({"check": check, "ok": ok, "detail": detail}), flush=True)


def run(*cmd: str, timeout: float = 120) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class Served:
    """A socketpair whose far end vhdblkd's server answers from `export` in a thread."""

    def __init__(self, export: Export) -> None:
        self.kernel_end, self.server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.thread = threading.Thread(target=self._serve, args=(export,), daemon=True)
        self.thread.start()

    def _serve(self, export: Export) -> None:
        serve_connection(self.server_end, export, handshake=False)

    def hand_over(self) -> int:
        """The fd for the kernel; our copy is closed after connect (the kernel holds its own)."""
        return self.kernel_end.fileno()

    def close_kernel_copy(self) -> None:
        self.kernel_end.close()

    def kill(self) -> None:
        """The server side dies: the kernel sees EOF on this connection."""
        self.server_end.shutdown(socket.SHUT_RDWR)
        self.thread.join(30)
        self.server_end.close()


def wait_until(cond: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def check(name: str) -> Callable[[Callable[[], str]], Callable[[], None]]:
    def wrap(fn: Callable[[], str]) -> Callable[[], None]:
        def runner() -> None:
            try:
                report(name, True, fn() or "")
            except Exception:  # noqa: BLE001 - every failure becomes a report line
                report(name, False, traceback.format_exc())

        return runner

    return wrap


nl = NbdNetlink()


@check("filesystem")
def filesystem() -> str:
    export = Export(MemoryBackend(64 * MiB), "fs")
    served = Served(export)
    index = nl.connect(
        [served.hand_over()], export.size, block_size=4096, server_flags=export.flags,
        backend_identifier="vhdblkd:fs-test", timeout=60,
    )
    served.close_kernel_copy()
    dev = f"/dev/nbd{index}"
    backend_attr = Path(f"/sys/block/nbd{index}/backend").read_text().strip()
    assert backend_attr == "vhdblkd:fs-test", backend_attr
    status = dict(nl.status())
    assert status.get(index) is True, status
    assert dict(nl.status(index)).get(index) is True
    mnt = Path("/run/nbd-mnt")
    mnt.mkdir(exist_ok=True)
    run("mkfs.ext4", "-q", "-F", dev)
    run("mount", dev, str(mnt))
    payload = os.urandom(3 * MiB)
    (mnt / "data.bin").write_bytes(payload)
    run("umount", str(mnt))
    run("mount", dev, str(mnt))
    assert (mnt / "data.bin").read_bytes() == payload, "file read back differs"
    run("umount", str(mnt))
    run("sync")
    nl.disconnect(index)
    served.thread.join(30)
    assert not served.thread.is_alive(), "server did not see the disconnect"
    served.server_end.close()
    assert wait_until(lambda: dict(nl.status()).get(index) is False), nl.status()
    return f"{dev} backend={backend_attr}"


@check("busy_index")
def busy_index() -> str:
    export = Export(MemoryBackend(8 * MiB), "busy")
    first = Served(export)
    index = nl.connect([first.hand_over()], export.size, server_flags=export.flags)
    first.close_kernel_copy()
    second = Served(export)
    fast = NbdNetlink(busy_backoff=(0.01,))
    try:
        fast.connect([second.hand_over()], export.size, index=index, server_flags=export.flags)
    except KernelError as exc:
        message = str(exc)
    else:
        raise AssertionError("connecting an index in use succeeded")
    finally:
        second.close_kernel_copy()
        second.kill()
    assert f"/dev/nbd{index}" in message and "in use" in message, message
    nl.disconnect(index)
    first.thread.join(30)
    first.server_end.close()
    try:
        nl.reconfigure(index, [], backend_identifier="nope")
    except KernelError as exc:
        return f"{message} | {exc}"
    raise AssertionError("reconfiguring a disconnected device succeeded")


@check("multi_conn")
def multi_conn() -> str:
    export = Export(MemoryBackend(32 * MiB), "multi")
    servers = [Served(export), Served(export)]
    index = nl.connect(
        [s.hand_over() for s in servers], export.size, server_flags=export.flags,
        backend_identifier="vhdblkd:multi",
    )
    for s in servers:
        s.close_kernel_copy()
    dev = f"/dev/nbd{index}"
    payload = os.urandom(8 * MiB)
    src = Path("/run/multi.bin")
    src.write_bytes(payload)
    run("dd", f"if={src}", f"of={dev}", "bs=1M", "oflag=direct", "conv=fsync", "status=none")
    out = Path("/run/multi.out")
    run("dd", f"if={dev}", f"of={out}", "bs=1M", "count=8", "iflag=direct", "status=none")
    assert out.read_bytes() == payload, "read back differs"
    alive = sum(s.thread.is_alive() for s in servers)
    assert alive == 2, f"{alive} of 2 server connections are up"
    # The guest has one CPU, hence one hardware queue: the kernel sends on the
    # first socket and falls back to the second when the first dies.
    servers[0].kill()
    payload2 = os.urandom(4 * MiB)
    src.write_bytes(payload2)
    run("dd", f"if={src}", f"of={dev}", "bs=1M", "oflag=direct", "conv=fsync", "status=none")
    run("dd", f"if={dev}", f"of={out}", "bs=1M", "count=4", "iflag=direct", "status=none")
    assert out.read_bytes() == payload2, "read back through the second connection differs"
    connected = dict(nl.status()).get(index)
    nl.disconnect(index)
    servers[1].thread.join(30)
    servers[1].server_end.close()
    assert connected is True, f"status after losing one of two connections: {connected}"
    return f"{dev}: two connections; I/O went on over the second after the first died"


@check("reconfigure_after_link_dead")
def reconfigure_after_link_dead() -> str:
    backend = MemoryBackend(16 * MiB)
    export = Export(backend, "re")
    events = NbdEvents()
    first = Served(export)
    index = nl.connect(
        [first.hand_over()], export.size, server_flags=export.flags,
        backend_identifier="vhdblkd:re", dead_conn_timeout=60,
    )
    first.close_kernel_copy()
    dev = f"/dev/nbd{index}"
    first.kill()
    dead: list[int] = []
    deadline = time.monotonic() + 20
    while index not in dead and time.monotonic() < deadline:
        dead += events.wait(1.0)
    assert index in dead, f"no LINK_DEAD for {index}: {dead}"
    # A writer that must wait for the new connection instead of failing.
    pattern = bytes(range(256)) * 4096  # 1 MiB
    src = Path("/run/re.bin")
    src.write_bytes(pattern)
    writer = subprocess.Popen(
        ["dd", f"if={src}", f"of={dev}", "bs=1M", "seek=2", "oflag=direct", "conv=fsync", "status=none"],
        stderr=subprocess.PIPE, text=True,
    )
    time.sleep(2)
    assert writer.poll() is None, f"writer did not wait: rc={writer.returncode} {writer.stderr.read() if writer.stderr else ''}"
    second = Served(export)
    nl.reconfigure(index, [second.hand_over()], backend_identifier="vhdblkd:re")
    second.close_kernel_copy()
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, f"dd failed after reconfigure: {err}"
    assert bytes(backend.read(2 * MiB, MiB)) == pattern, "data written after reconnect differs"
    nl.disconnect(index)
    second.thread.join(30)
    second.server_end.close()
    events.close()
    return f"{dev}: LINK_DEAD seen, writer finished after reconfigure"


def udev_links(syspath: str) -> list[str]:
    out = run("udevadm", "test", "--action=change", syspath, timeout=60)
    links: list[str] = []
    for line in out.splitlines():
        if line.startswith("DEVLINKS="):
            links += line.split("=", 1)[1].split()
    return sorted(links)


@check("udev_rule")
def udev_rule() -> str:
    # The guest's root is the host's: hide the host's rules.d under a tmpfs
    # (in the guest only) and put the packaged rule there.
    rules = Path("/etc/udev/rules.d")
    run("mount", "-t", "tmpfs", "tmpfs", str(rules))
    rule = Path(__file__).resolve().parents[2] / "packaging/udev/61-vhdblkd.rules"
    (rules / rule.name).write_text(rule.read_text())
    export = Export(MemoryBackend(16 * MiB), "udev")
    served = [Served(export), Served(export)]
    index = nl.connect([served[0].hand_over()], export.size, server_flags=export.flags,
                       backend_identifier="vhdblkd:data.01")
    bad = nl.connect([served[1].hand_over()], export.size, server_flags=export.flags,
                     backend_identifier="vhdblkd:../evil")
    for s in served:
        s.close_kernel_copy()
    try:
        dev = f"/dev/nbd{index}"
        run("sgdisk", "-n", "1:2048:+4M", "-n", "2:0:0", dev)
        run("blockdev", "--rereadpt", dev)
        assert wait_until(lambda: Path(f"/sys/block/nbd{index}/nbd{index}p2").exists()), "no partitions"
        disk = udev_links(f"/sys/block/nbd{index}")
        part = udev_links(f"/sys/block/nbd{index}/nbd{index}p2")
        evil = udev_links(f"/sys/block/nbd{bad}")
        assert "/dev/disk/by-vhd/data.01" in disk, disk
        assert "/dev/disk/by-vhd/data.01-part2" in part, part
        assert not [link for link in evil if "by-vhd" in link], evil
    finally:
        nl.disconnect(index)
        nl.disconnect(bad)
        for s in served:
            s.thread.join(30)
            s.server_end.close()
        run("umount", str(rules))
    after = udev_links(f"/sys/block/nbd{index}")
    assert not [link for link in after if "by-vhd" in link], after
    return f"disk {disk}; partition {part}"


CHECKS = {
    "filesystem": filesystem,
    "busy_index": busy_index,
    "multi_conn": multi_conn,
    "reconfigure_after_link_dead": reconfigure_after_link_dead,
    "udev_rule": udev_rule,
}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(CHECKS):
        CHECKS[name]()

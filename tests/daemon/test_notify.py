"""sd_notify messages through a datagram socket named by $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhdblkd.daemon.notify import Notifier, watchdog_interval


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(5)

    def messages(self) -> list[str]:
        """Everything queued so far."""
        out: list[str] = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(5)
        return out


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify")
    yield ns
    ns.sock.close()


def test_messages(notify_socket: NotifySocket) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(notify_socket.path)})
    assert n.enabled
    n.ready("2 attached: a=/dev/nbd0\nb=/dev/nbd1")
    n.reloading()
    n.status("x")
    n.stopping()
    n.watchdog()
    assert notify_socket.messages() == [
        "READY=1\nSTATUS=2 attached: a=/dev/nbd0 b=/dev/nbd1",
        "RELOADING=1\nSTATUS=reloading the configuration",
        "STATUS=x",
        "STOPPING=1\nSTATUS=flushing and detaching",
        "WATCHDOG=1",
    ]


def test_abstract_socket_address() -> None:
    name = f"vhdblkd-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    with s:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready("ok")
        assert s.recv(100) == b"READY=1\nSTATUS=ok"


def test_without_notify_socket_nothing_happens() -> None:
    n = Notifier({})
    assert not n.enabled
    n.ready("x")  # no error


def test_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    ns = NotifySocket(tmp_path / "gone")
    n = Notifier({"NOTIFY_SOCKET": str(ns.path)})
    ns.sock.close()
    os.unlink(ns.path)
    n.stopping()


@pytest.mark.parametrize(
    ("env", "seconds"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "nonsense"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], seconds: float | None) -> None:
    assert watchdog_interval(env) == seconds


def test_descriptors_go_to_the_store_and_a_barrier_waits_for_them(tmp_path: Path) -> None:
    from .fakes import FakeServiceManager

    manager = FakeServiceManager(tmp_path / "store")
    a, b = socket.socketpair()
    try:
        n = Notifier({"NOTIFY_SOCKET": str(manager.path)})
        assert n.store_fds([("vhdblkd-nbd0-0", a.fileno())])
        assert n.barrier(timeout=10)  # returns once everything before it was read
        assert list(manager.store) == ["vhdblkd-nbd0-0"]
        # The stored copy is the same socket: what goes in at b comes out of it.
        b.sendall(b"ping")
        assert os.read(manager.store["vhdblkd-nbd0-0"], 4) == b"ping"
        n.remove_fds(["vhdblkd-nbd0-0"])
        assert n.barrier(timeout=10)
        assert manager.store == {}
        assert not Notifier({}).store_fds([("x", a.fileno())]) and not Notifier({}).barrier()
    finally:
        a.close()
        b.close()
        manager.close()


def test_inherited_fds_are_named_and_only_for_this_process() -> None:
    import subprocess
    import sys

    child = (
        "import os, sys; from vhdblkd.daemon.notify import inherited_fds; "
        "env = dict(os.environ); env['LISTEN_PID'] = str(os.getpid()); "
        "found = inherited_fds(env, os.getpid()); "
        "print(sorted(found.items()), sorted(k for k in env if k.startswith('LISTEN_')), "
        "inherited_fds({'LISTEN_PID': '1', 'LISTEN_FDS': '2'}, os.getpid()))"
    )
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()

    def place() -> None:  # as systemd does: the descriptors from 3 on
        os.dup2(r1, 3)
        os.dup2(r2, 4)

    env = {**os.environ, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "vhdblkd-nbd0-0:vhdblkd-nbd1-0"}
    # close_fds=False: dup2 in the child leaves 3 and 4 open across exec.
    done = subprocess.run(
        [sys.executable, "-c", child], env=env, preexec_fn=place, capture_output=True, text=True, timeout=60,
        close_fds=False,
    )
    for fd in (r1, w1, r2, w2):
        os.close(fd)
    assert done.stdout.strip() == "[('vhdblkd-nbd0-0', 3), ('vhdblkd-nbd1-0', 4)] [] {}", done.stderr

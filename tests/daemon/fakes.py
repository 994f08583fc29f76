"""Test doubles for the daemon: a fake kernel that speaks NBD like the driver, and a counting image."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vhdblkd.backend import MemoryBackend
from vhdblkd.errors import ImageLocked, KernelError

REQUEST = struct.Struct(">IHHQQI")
REPLY = struct.Struct(">IIQ")
REQUEST_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3


@dataclass
class FakeDevice:
    index: int
    socks: list[socket.socket]
    size: int
    block_size: int
    timeout: int
    dead_conn_timeout: int
    server_flags: int
    backend_identifier: str
    cookie: int = 0
    dead: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _request(self, type_: int, offset: int = 0, length: int = 0, payload: bytes = b"", conn: int = 0) -> bytes:
        with self.lock:
            self.cookie += 1
            sock = self.socks[conn]
            sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, type_, self.cookie, offset, length) + payload)
            magic, error, cookie = REPLY.unpack(_recv_exact(sock, REPLY.size))
            assert magic == REPLY_MAGIC and cookie == self.cookie
            if error:
                raise OSError(error, os.strerror(error))
            return _recv_exact(sock, length) if type_ == CMD_READ else b""

    def write(self, offset: int, data: bytes, conn: int = 0) -> None:
        self._request(CMD_WRITE, offset, len(data), data, conn)

    def read(self, offset: int, length: int, conn: int = 0) -> bytes:
        return self._request(CMD_READ, offset, length, conn=conn)

    def flush(self, conn: int = 0) -> None:
        self._request(CMD_FLUSH, conn=conn)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed the socket")
        buf += chunk
    return bytes(buf)


class FakeKernel:
    """Takes the socketpair ends as the driver does (its own reference) and sends DISC on disconnect."""

    def __init__(self, max_devices: int = 8) -> None:
        self.devices: dict[int, FakeDevice] = {}
        self.max_devices = max_devices
        self.log: list[tuple[str, Any]] = []
        self.fail_connect: KernelError | None = None
        self.closed = False

    def connect(
        self,
        sock_fds: Sequence[int],
        size_bytes: int,
        *,
        index: int | None,
        block_size: int,
        timeout: int,
        dead_conn_timeout: int,
        server_flags: int,
        backend_identifier: str,
    ) -> int:
        if self.fail_connect is not None:
            raise self.fail_connect
        if index is None:
            index = next(i for i in range(self.max_devices) if i not in self.devices)
        elif index in self.devices:
            raise KernelError(f"/dev/nbd{index} is busy")
        socks = [socket.socket(fileno=os.dup(fd)) for fd in sock_fds]
        self.devices[index] = FakeDevice(
            index, socks, size_bytes, block_size, timeout, dead_conn_timeout, server_flags, backend_identifier
        )
        self.log.append(("connect", index))
        return index

    def disconnect(self, index: int) -> None:
        dev = self.devices.pop(index, None)
        if dev is None:
            raise KernelError(f"/dev/nbd{index} is not connected")
        self.log.append(("disconnect", index))
        for sock in dev.socks:
            with dev.lock:
                try:
                    sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def reconfigure(self, index: int, sock_fds: Sequence[int], *, backend_identifier: str) -> None:
        dev = self.devices.get(index)
        if dev is None:
            raise KernelError(f"/dev/nbd{index} is not connected")
        if dev.backend_identifier != backend_identifier:
            raise KernelError(f"/dev/nbd{index} belongs to {dev.backend_identifier}, not {backend_identifier}")
        # As the driver does: each new socket takes the place of a dead one.
        dead = sorted(dev.dead) or list(range(len(dev.socks)))
        if len(sock_fds) > len(dead):
            raise KernelError(f"/dev/nbd{index}: more sockets than dead connections")
        for slot, fd in zip(dead, sock_fds, strict=False):
            dev.socks[slot].close()
            dev.socks[slot] = socket.socket(fileno=os.dup(fd))
            dev.dead.discard(slot)
        self.log.append(("reconfigure", index))

    def kill_connection(self, index: int, conn: int) -> None:
        """What the driver does when a request times out: shut that socket down and wait for a new one."""
        dev = self.devices[index]
        dev.socks[conn].shutdown(socket.SHUT_RDWR)
        dev.dead.add(conn)

    def orphan(self, index: int, size: int, backend_identifier: str) -> None:
        """A device left by a daemon that died: connected, its sockets dead."""
        a, b = socket.socketpair()
        b.close()
        self.devices[index] = FakeDevice(index, [a], size, 512, 30, 60, 0, backend_identifier)

    def status(self) -> list[tuple[int, bool]]:
        return [(i, True) for i in sorted(self.devices)]

    def backend_of(self, index: int) -> str | None:
        """What /sys/block/nbdN/backend would say."""
        dev = self.devices.get(index)
        return None if dev is None else dev.backend_identifier

    def close(self) -> None:
        self.closed = True


class FakeImage(MemoryBackend):
    """A MemoryBackend that records flushes and close, with a path-keyed write lock like the real one."""

    def __init__(self, path: str, size: int, read_only: bool, events: list[str], locks: dict[str, str]) -> None:
        super().__init__(size, read_only)
        self.path = path
        self.events = events
        self.closed = False
        self._locks = locks
        self.disk_type = "dynamic"
        if not read_only:
            if path in locks:
                raise ImageLocked(f"{path} is locked by {locks[path]}")
            locks[path] = f"pid {os.getpid()}"

    def flush(self) -> None:
        super().flush()
        self.events.append(f"flush {self.path}")

    def close(self) -> None:
        self.events.append(f"close {self.path}")
        self.closed = True
        self._locks.pop(self.path, None)


class FakeOpener:
    """Opens any existing file as a FakeImage of 1 MiB; records every image it made."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.size = size
        self.events: list[str] = []
        self.images: list[FakeImage] = []
        self.locks: dict[str, str] = {}

    def __call__(self, path: str, *, read_only: bool, allow_unsafe_parent: bool,
                 strict_parent_timestamp: bool = False) -> FakeImage:
        with open(path, "rb") as f:
            if f.read(8) == b"corrupt!":
                from vhdblkd.errors import CorruptImage

                raise CorruptImage(f"{path}: footer cookie: expected b'conectix', found b'corrupt!'")
        image = FakeImage(path, self.size, read_only, self.events, self.locks)
        self.images.append(image)
        return image


@dataclass
class ServiceRig:
    """A Service wired to fakes, with its files under one temporary directory."""

    root: Path
    kernel: FakeKernel
    opener: FakeOpener
    busy: dict[int, str]
    service: Any  # vhdblkd.daemon.service.Service
    intent: list[Any]  # [Intent]: what the service is told when it stops

    @property
    def config(self) -> Path:
        return self.root / "vhdtab"

    @property
    def control(self) -> Path:
        return self.root / "run" / "control.sock"

    @property
    def state(self) -> Path:
        return self.root / "run" / "state.json"

    def image(self, name: str, content: bytes = b"conectix") -> str:
        p = self.root / "images" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(content)
        return str(p)


def make_rig(
    root: Path,
    notify_env: dict[str, str] | None = None,
    *,
    sync: Any = None,
    kernel: FakeKernel | None = None,
    inherited: dict[str, int] | None = None,
) -> ServiceRig:
    """A service on fakes; pass the `kernel` (and `inherited` descriptors) of an earlier rig to play its successor."""
    from vhdblkd.daemon.attachments import AttachmentManager
    from vhdblkd.daemon.intent import Intent
    from vhdblkd.daemon.notify import Notifier
    from vhdblkd.daemon.service import Service

    kernel = kernel or FakeKernel()
    opener = FakeOpener()
    busy: dict[int, str] = {}
    intent = [Intent.STOP]
    transport = make_transport(kernel)

    def manager(t: Any, on_change: Any) -> AttachmentManager:
        return AttachmentManager(
            t, opener=opener, busy=busy_check(busy), sync=sync or (lambda name: None), on_change=on_change
        )

    service = Service(
        config=root / "vhdtab",
        control=root / "run" / "control.sock",
        state_dir=root / "run",
        transport=transport,
        notifier=Notifier(notify_env or {}),
        make_manager=manager,
        intent=lambda: (intent[0], "chosen by the test"),
        inherited=inherited,
    )
    return ServiceRig(root, kernel, opener, busy, service, intent)


def make_transport(kernel: FakeKernel) -> Any:
    from vhdblkd.daemon.nbd_device import NbdTransport

    return NbdTransport(kernel, read_backend=kernel.backend_of, drain_seconds=5)


def busy_check(busy: dict[int, str]) -> Any:
    """The manager's busy check (by kernel name, nbd3) over a dict keyed by device index."""
    return lambda name: busy.get(int(name.removeprefix("nbd")))


def eventually(check: Any, attempts: int = 400) -> None:
    """Retry `check` (an assertion) a bounded number of times: counters are bumped after the reply is sent."""
    for _ in range(attempts - 1):
        try:
            check()
            return
        except AssertionError:
            threading.Event().wait(0.01)
    check()


class FakeServiceManager:
    """The service manager's end of $NOTIFY_SOCKET: keeps FDSTORE=1 descriptors by name, answers BARRIER=1."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.store: dict[str, int] = {}
        self.messages: list[str] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 16)
            except OSError:
                return
            text = data.decode()
            self.messages.append(text)
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    self.store.setdefault(fields.get("FDNAME", "stored"), fd)
                continue
            if fields.get("FDSTOREREMOVE") == "1":
                old = self.store.pop(fields.get("FDNAME", ""), None)
                if old is not None:
                    os.close(old)
            for fd in fds:  # BARRIER=1: closing its descriptor says everything before was read
                os.close(fd)

    def hand_back(self) -> dict[str, int]:
        """What the next start gets ($LISTEN_FDS): a copy of every stored descriptor."""
        return {name: os.dup(fd) for name, fd in self.store.items()}

    def close(self) -> None:
        self.sock.close()
        for fd in self.store.values():
            os.close(fd)
        self.store.clear()

"""The NBD transport: an image served to /dev/nbdN over socketpairs handed to the kernel by netlink.

attach: make `connections` socketpairs, serve our end of each in a thread,
hand the other ends to the kernel (CONNECT).  adopt: serve sockets a
stopping daemon handed over (the kernel notices nothing), or give a device
whose sockets died fresh ones (RECONFIGURE).  A connection the kernel drops
while the device lives (a request timed out) is replaced through
RECONFIGURE.  disconnect: DISCONNECT, then let the threads answer what they
have read (they flush on DISC/EOF).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..backend import Backend
from ..errors import DaemonError, KernelError
from ..nbd.server import Export, serve_connection
from .transport import LiveDevice
from .vhdtab import VhdtabEntry

log = logging.getLogger(__name__)

# How long a disconnect waits for the serving threads after DISCONNECT before
# it stops them (they still answer what they read and flush), and how long a
# handover waits for them to stop between two requests.
DRAIN_SECONDS = 30.0
# A connection the kernel drops is replaced through RECONFIGURE; one that
# keeps dropping within the window is given up after this many tries.
RECONNECT_ATTEMPTS = 5
RECONNECT_WINDOW_SECONDS = 10.0
RECONNECT_BACKOFF_SECONDS = 1.0

# serve(sock, export, stop, pause) -> True when it paused between two requests.
Serve = Callable[[socket.socket, Export, threading.Event, threading.Event], bool]


class NbdControl(Protocol):
    """What the transport needs of the kernel's nbd netlink interface (`nbd.netlink.NbdNetlink`)."""

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
    ) -> int: ...

    def disconnect(self, index: int) -> None: ...

    def reconfigure(self, index: int, sock_fds: Sequence[int], *, backend_identifier: str) -> None: ...

    def status(self) -> list[tuple[int, bool]]: ...

    def close(self) -> None: ...


def default_serve(sock: socket.socket, export: Export, stop: threading.Event, pause: threading.Event) -> bool:
    return serve_connection(sock, export, handshake=False, stop=stop, pause=pause)


def sysfs_backend(index: int, sys_root: Path = Path("/sys/block")) -> str | None:
    """/sys/block/nbdN/backend: the identifier the device was connected with (absent when not connected)."""
    try:
        return (sys_root / f"nbd{index}" / "backend").read_text().strip() or None
    except OSError:
        return None


def fd_name(index: int, slot: int) -> str:
    """The name a handed-over socket carries in the service manager's store."""
    return f"vhdblkd-nbd{index}-{slot}"


class NbdDevice:
    def __init__(self, transport: NbdTransport, export: Export, index: int, sockets: list[socket.socket]) -> None:
        self._transport = transport
        self.export = export
        self.index = index
        self.sockets = sockets
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()
        self.pause = threading.Event()
        self.ending = False  # set before DISCONNECT or a pause: a connection ending is then expected
        self.paused: list[bool] = [False] * len(sockets)
        self.reconnects = 0

    @property
    def path(self) -> str:
        return f"/dev/nbd{self.index}"

    @property
    def kernel_name(self) -> str:
        return f"nbd{self.index}"

    @property
    def connections(self) -> int:
        return len(self.sockets)

    @property
    def backend_identifier(self) -> str:
        return self._transport.backend_identifier(self.export.name)

    def stats(self) -> dict[str, int]:
        stats = self.export.stats
        if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
            return dataclasses.asdict(stats)
        return dict(vars(stats))

    def record(self) -> dict[str, Any]:
        return {"index": self.index, "backend_identifier": self.backend_identifier, "connections": self.connections}

    def start(self) -> None:
        for slot in range(len(self.sockets)):
            thread = threading.Thread(
                target=self._serve_one, args=(slot,), name=f"nbd-{self.export.name}-{slot}", daemon=True
            )
            self.threads.append(thread)
            thread.start()

    def _serve_one(self, slot: int) -> None:
        failures = 0
        serve = self._transport.serve
        while True:
            started = time.monotonic()
            try:
                self.paused[slot] = serve(self.sockets[slot], self.export, self.stop, self.pause)
            except Exception:  # a bug in the server: log it, the other connections go on
                log.exception("serving %s failed", self.export.name)
            if self.stop.is_set() or self.ending or self.index < 0:
                return
            # The kernel dropped this connection (a request timed out, or the
            # server gave up on it) while the device lives on: it holds the
            # I/O for dead_conn_timeout, so hand it a fresh socket.
            failures = failures + 1 if time.monotonic() - started < RECONNECT_WINDOW_SECONDS else 1
            if failures > RECONNECT_ATTEMPTS:
                log.error("%s: connection %d keeps failing; giving up on it", self.path, slot)
                return
            log.warning("%s: connection %d ended unexpectedly; reconnecting", self.path, slot)
            if failures > 1:
                self.stop.wait(RECONNECT_BACKOFF_SECONDS)
                if self.stop.is_set() or self.ending:
                    return
            if not self._reconnect(slot):
                return

    def _reconnect(self, slot: int) -> bool:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._transport.control.reconfigure(self.index, [theirs.fileno()], backend_identifier=self.backend_identifier)
        except KernelError as exc:
            log.error("%s: cannot give the kernel a new connection: %s", self.path, exc)
            ours.close()
            return False
        finally:
            theirs.close()
        old, self.sockets[slot] = self.sockets[slot], ours
        old.close()
        self.reconnects += 1
        log.info("%s: connection %d re-established", self.path, slot)
        return True

    def _join(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def stop_threads(self) -> None:
        """Make the serving threads return (they still answer what they read), then close our sockets."""
        drain = self._transport.drain_seconds
        if not self._join(drain):
            log.warning("%s: connections still busy %.0f s after disconnect; stopping them", self.path, drain)
            self.stop.set()
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
            self._join(drain)
        for sock in self.sockets:
            sock.close()

    def disconnect(self) -> None:
        self.ending = True
        try:
            self._transport.control.disconnect(self.index)
        except KernelError as exc:
            log.error("%s: DISCONNECT failed (%s); closing our side of its sockets", self.path, exc)
            self.stop.set()
        self.stop_threads()

    def handover(self) -> Sequence[tuple[str, int]] | None:
        self.ending = True
        self.pause.set()
        if not self._join(self._transport.drain_seconds) or not all(self.paused):
            log.warning("%s: not every connection stopped between two requests; not handing it over", self.path)
            return None
        return [(fd_name(self.index, slot), sock.fileno()) for slot, sock in enumerate(self.sockets)]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    def release(self) -> None:
        # Shut our receive side: the kernel's next send fails and it queues the
        # request again at once (for the next daemon) instead of waiting for its
        # timeout; what it sent before is still read and answered.  Then our
        # ends close and the kernel holds the device's I/O for dead_conn_timeout.
        self.ending = True
        self.stop.set()
        self.stop_threads()


class NbdTransport:
    name = "nbd"

    def __init__(
        self,
        control: NbdControl,
        *,
        serve: Serve = default_serve,
        read_backend: Callable[[int], str | None] = sysfs_backend,
        drain_seconds: float = DRAIN_SECONDS,
    ) -> None:
        self.control = control
        self.serve = serve
        self.drain_seconds = drain_seconds
        self._read_backend = read_backend

    @staticmethod
    def backend_identifier(name: str) -> str:
        """The identifier a udev rule turns into /dev/disk/by-vhd/NAME."""
        return f"vhdblkd:{name}"

    def _export(self, image: Backend, entry: VhdtabEntry, count: int) -> Export:
        if count > 1 and not image.can_multi_conn:
            log.warning("%s: the image cannot serve several connections safely; using 1", entry.name)
        return Export(image, entry.name)

    def attach(self, image: Backend, entry: VhdtabEntry) -> NbdDevice:
        count = entry.connections if image.can_multi_conn else 1
        export = self._export(image, entry, entry.connections)
        return self._bring_up(export, entry, count, None)

    def adopt(
        self, image: Backend, entry: VhdtabEntry, record: Mapping[str, Any], inherited: MutableMapping[str, int]
    ) -> NbdDevice:
        index = int(record["index"])
        count = int(record.get("connections", entry.connections))
        export = self._export(image, entry, count)
        fds = [inherited.pop(fd_name(index, slot), -1) for slot in range(count)]
        if all(fd >= 0 for fd in fds):
            # Handed over between two requests: serve on from the next one.
            socks = [socket.socket(fileno=fd) for fd in fds]
            for sock in socks:
                sock.setblocking(True)
            device = NbdDevice(self, export, index, socks)
            device.start()
            return device
        for fd in fds:  # an incomplete set: close it, so the old sockets die and can be replaced
            if fd >= 0:
                os.close(fd)
        return self._bring_up(export, entry, count, index)

    def drop(self, record: Mapping[str, Any]) -> None:
        self.control.disconnect(int(record["index"]))

    def _bring_up(self, export: Export, entry: VhdtabEntry, count: int, adopt_index: int | None) -> NbdDevice:
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(count)]
        theirs = [p[1] for p in pairs]
        device = NbdDevice(self, export, -1, [p[0] for p in pairs])
        identifier = self.backend_identifier(entry.name)
        device.start()  # before the kernel has the sockets: it reads the partition table at once
        try:
            if adopt_index is not None:
                self.control.reconfigure(adopt_index, [s.fileno() for s in theirs], backend_identifier=identifier)
                device.index = adopt_index
            else:
                device.index = self.control.connect(
                    [s.fileno() for s in theirs],
                    export.size,
                    index=entry.device_index,
                    block_size=entry.block_size,
                    timeout=entry.timeout_seconds,
                    dead_conn_timeout=entry.dead_conn_timeout_seconds,
                    server_flags=export.flags,
                    backend_identifier=identifier,
                )
        except BaseException:
            device.stop.set()
            for sock in theirs:
                sock.close()
            device.stop_threads()
            raise
        finally:
            # The kernel holds its own reference to each socket it took.
            for sock in theirs:
                sock.close()
        return device

    def live_devices(self) -> list[LiveDevice]:
        try:
            known = self.control.status()
        except KernelError as exc:
            raise DaemonError(f"cannot ask the kernel which nbd devices exist: {exc}") from None
        return [LiveDevice(f"/dev/nbd{i}", i, self._read_backend(i) if up else None, up) for i, up in known]

    def close(self) -> None:
        self.control.close()

"""Attachments: an image, its NBD export, the kernel device and the threads serving it.

attach: open the image (locked), make `connections` socketpairs, start a
serving thread on our end of each, then hand the other ends to the kernel.
detach: write back the device's page cache, flush the image (the kernel's
DISCONNECT sends no FLUSH), DISCONNECT, let the serving threads answer what
they have read (they flush again on DISC/EOF), close the image.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..backend import Backend
from ..errors import DaemonError, KernelError, VhdblkError
from ..nbd.server import Export, serve_connection
from .inuse import device_in_use, device_path, mounted_on
from .kernel import Kernel, backend_identifier
from .state import StateRecord
from .vhdtab import VhdtabEntry

log = logging.getLogger(__name__)

# How long a detach waits for the serving threads after DISCONNECT before it
# stops them (they still answer what they read and flush).
DRAIN_SECONDS = 30.0
SYNC_SECONDS = 30.0
# A connection the kernel drops is replaced through RECONFIGURE; one that
# keeps dropping within the window is given up after this many tries.
RECONNECT_ATTEMPTS = 5
RECONNECT_WINDOW_SECONDS = 10.0
RECONNECT_BACKOFF_SECONDS = 1.0


class ImageOpener(Protocol):
    def __call__(self, path: str, *, read_only: bool, allow_unsafe_parent: bool,
                 strict_parent_timestamp: bool) -> Backend: ...


Serve = Callable[[socket.socket, Export, threading.Event], None]
BusyCheck = Callable[[int], str | None]
DeviceSync = Callable[[int], None]


def default_opener(path: str, *, read_only: bool, allow_unsafe_parent: bool,
                   strict_parent_timestamp: bool) -> Backend:
    from ..vhd.image import open_image

    image: Backend = open_image(path, read_only=read_only, allow_unsafe_parent=allow_unsafe_parent,
                                strict_parent_timestamp=strict_parent_timestamp)
    return image


def default_serve(sock: socket.socket, export: Export, stop: threading.Event) -> None:
    serve_connection(sock, export, handshake=False, stop=stop)


def sync_device(index: int) -> None:
    """Write back what the kernel holds for /dev/nbdN and FLUSH it (bounded: runs in a thread).

    A file system still mounted on it (a forced detach, or SIGTERM without
    an unmount first) gets a sync(2) so its dirty data lands before the
    device goes; then an fsync of the device writes back its own page cache.
    """
    path = device_path(index)

    def work() -> None:
        if mounted_on(index):
            os.sync()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            log.warning("fsync of %s failed: %s", path, exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=work, name=f"sync-nbd{index}", daemon=True)
    thread.start()
    thread.join(SYNC_SECONDS)
    if thread.is_alive():
        log.warning("fsync of %s did not finish in %.0f s; detaching anyway", path, SYNC_SECONDS)


@dataclass(eq=False)
class Attachment:
    entry: VhdtabEntry
    image: Backend
    export: Export
    index: int
    from_vhdtab: bool
    connections: int
    started: float
    sockets: list[socket.socket] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    detaching: bool = False  # set before DISCONNECT: a connection ending is then expected
    reconnects: int = 0

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def device(self) -> str:
        return device_path(self.index)

    @property
    def real_image(self) -> str:
        return os.path.realpath(self.entry.image)

    def describe(self) -> dict[str, Any]:
        stats = self.export.stats
        counters = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(vars(stats))
        disk_type = getattr(self.image, "disk_type", None)
        return {
            "name": self.name,
            "device": self.device,
            "image": self.entry.image,
            "type": None if disk_type is None else str(getattr(disk_type, "name", disk_type)).lower(),
            "size": self.image.size,
            "read_only": self.image.read_only,
            "connections": self.connections,
            "from_vhdtab": self.from_vhdtab,
            "reconnects": self.reconnects,
            "options": self.entry.options,
            "stats": counters,
        }

    def record(self) -> StateRecord:
        return StateRecord(
            self.name, self.entry.image, self.index, backend_identifier(self.name), self.entry.options, self.from_vhdtab
        )


class AttachmentManager:
    def __init__(
        self,
        kernel: Kernel,
        *,
        opener: ImageOpener = default_opener,
        serve: Serve = default_serve,
        busy: BusyCheck = device_in_use,
        sync: DeviceSync = sync_device,
        on_change: Callable[[], None] | None = None,
        drain_seconds: float = DRAIN_SECONDS,
    ) -> None:
        self._kernel = kernel
        self._opener = opener
        self._serve = serve
        self._busy = busy
        self._sync = sync
        self._on_change = on_change
        self._drain = drain_seconds
        self._lock = threading.RLock()
        self._table: dict[str, Attachment] = {}

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._lock:
            yield

    def attachments(self) -> list[Attachment]:
        with self._lock:
            return sorted(self._table.values(), key=lambda a: a.index)

    def names(self) -> set[str]:
        with self._lock:
            return set(self._table)

    def get(self, name: str) -> Attachment | None:
        with self._lock:
            return self._table.get(name)

    def find(self, key: str) -> Attachment:
        """By name, device (/dev/nbd0 or nbd0) or image path."""
        with self._lock:
            if key in self._table:
                return self._table[key]
            for att in self._table.values():
                if key in (att.device, os.path.basename(att.device)):
                    return att
            real = os.path.realpath(key)
            for att in self._table.values():
                if att.real_image == real:
                    return att
        raise DaemonError(f"no attachment named {key!r} (give a device such as /dev/nbd0, a name or an image path)")

    def busy_reason(self, att: Attachment) -> str | None:
        return self._busy(att.index)

    def attach(self, entry: VhdtabEntry, *, from_vhdtab: bool) -> Attachment:
        with self._lock:
            self._check_free(entry)
            image = self._open(entry)
            try:
                att = self._connect(entry, image, from_vhdtab)
            except BaseException:
                image.close()
                raise
            self._table[entry.name] = att
        log.info("attached %s as %s (%s)", entry.image, att.device, entry.name)
        self._changed()
        return att

    def _check_free(self, entry: VhdtabEntry) -> None:
        if entry.name in self._table:
            raise DaemonError(f"the name {entry.name!r} is already attached as {self._table[entry.name].device}")
        real = os.path.realpath(entry.image)
        for att in self._table.values():
            if att.real_image == real:
                raise DaemonError(f"{entry.image} is already attached as {att.device} ({att.name})")
            if entry.device_index is not None and att.index == entry.device_index:
                raise DaemonError(f"{att.device} is already in use by {att.name} ({att.entry.image})")

    def _open(self, entry: VhdtabEntry) -> Backend:
        if not os.path.exists(entry.image):
            raise DaemonError(f"{entry.image}: no such file")
        try:
            return self._opener(entry.image, read_only=entry.read_only, allow_unsafe_parent=entry.allow_unsafe_parent,
                                strict_parent_timestamp=entry.strict_parent_timestamp)
        except VhdblkError:
            raise
        except OSError as exc:
            raise DaemonError(f"{entry.image}: cannot open: {exc.strerror or exc}") from None

    def adopt(self, entry: VhdtabEntry, index: int, *, from_vhdtab: bool) -> Attachment:
        """Take over a device a previous daemon left behind: fresh sockets through RECONFIGURE.

        The kernel holds the device's I/O for dead_conn_timeout after its
        sockets died; requests waiting then are re-sent on the new sockets.
        """
        with self._lock:
            self._check_free(entry)
            image = self._open(entry)
            try:
                att = self._connect(entry, image, from_vhdtab, adopt_index=index)
            except BaseException:
                image.close()
                raise
            self._table[entry.name] = att
        log.info("re-adopted %s as %s (%s)", entry.image, att.device, entry.name)
        self._changed()
        return att

    def _connect(
        self, entry: VhdtabEntry, image: Backend, from_vhdtab: bool, adopt_index: int | None = None
    ) -> Attachment:
        export = Export(image, entry.name)
        count = entry.connections
        if count > 1 and not image.can_multi_conn:
            log.warning("%s: the image cannot serve several connections safely; using 1", entry.name)
            count = 1
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(count)]
        ours = [p[0] for p in pairs]
        theirs = [p[1] for p in pairs]
        att = Attachment(entry, image, export, -1, from_vhdtab, count, time.time(), sockets=ours)
        for i in range(len(ours)):
            thread = threading.Thread(
                target=self._serve_one, args=(att, i), name=f"nbd-{entry.name}-{i}", daemon=True
            )
            att.threads.append(thread)
            thread.start()
        try:
            if adopt_index is not None:
                self._kernel.reconfigure(
                    adopt_index, [s.fileno() for s in theirs], backend_identifier=backend_identifier(entry.name)
                )
                att.index = adopt_index
            else:
                att.index = self._kernel.connect(
                    [s.fileno() for s in theirs],
                    image.size,
                    index=entry.device_index,
                    block_size=entry.block_size,
                    timeout=entry.timeout_seconds,
                    dead_conn_timeout=entry.dead_conn_timeout_seconds,
                    server_flags=export.flags,
                    backend_identifier=backend_identifier(entry.name),
                )
        except BaseException:
            att.stop.set()
            for sock in theirs:
                sock.close()
            self._join(att)
            raise
        finally:
            # The kernel holds its own reference to each socket it took.
            for sock in theirs:
                sock.close()
        return att

    def _serve_one(self, att: Attachment, slot: int) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                self._serve(att.sockets[slot], att.export, att.stop)
            except Exception:  # a bug in the server: log it, the other connections go on
                log.exception("serving %s failed", att.name)
            if att.stop.is_set() or att.detaching or att.index < 0:
                return
            # The kernel dropped this connection (a request timed out, or the
            # server gave up on it) while the device lives on: it holds the
            # I/O for dead_conn_timeout, so hand it a fresh socket.
            failures = failures + 1 if time.monotonic() - started < RECONNECT_WINDOW_SECONDS else 1
            if failures > RECONNECT_ATTEMPTS:
                log.error("%s: connection %d keeps failing; giving up on it", att.device, slot)
                return
            log.warning("%s: connection %d ended unexpectedly; reconnecting", att.device, slot)
            if failures > 1:
                att.stop.wait(RECONNECT_BACKOFF_SECONDS)
                if att.stop.is_set() or att.detaching:
                    return
            if not self._reconnect(att, slot):
                return

    def _reconnect(self, att: Attachment, slot: int) -> bool:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._kernel.reconfigure(att.index, [theirs.fileno()], backend_identifier=backend_identifier(att.name))
        except KernelError as exc:
            log.error("%s: cannot give the kernel a new connection: %s", att.device, exc)
            ours.close()
            return False
        finally:
            theirs.close()
        old, att.sockets[slot] = att.sockets[slot], ours
        old.close()
        att.reconnects += 1
        log.info("%s: connection %d re-established", att.device, slot)
        return True

    def _join(self, att: Attachment) -> None:
        deadline = time.monotonic() + self._drain
        for thread in att.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in att.threads):
            log.warning("%s: connections still busy %.0f s after disconnect; stopping them", att.name, self._drain)
            att.stop.set()
            for sock in att.sockets:
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
            for thread in att.threads:
                thread.join(self._drain)
        for sock in att.sockets:
            sock.close()

    def detach(self, key: str, *, force: bool = False) -> Attachment:
        with self._lock:
            att = self.find(key)
            if not force:
                reason = self._busy(att.index)
                if reason is not None:
                    raise DaemonError(
                        f"{att.device} ({att.name}) is in use: {reason}; unmount it first or detach with --force"
                    )
            self._teardown(att)
            del self._table[att.name]
        log.info("detached %s (%s) from %s", att.device, att.name, att.entry.image)
        self._changed()
        return att

    def _teardown(self, att: Attachment) -> None:
        self._sync(att.index)
        self._flush(att)
        att.detaching = True
        try:
            self._kernel.disconnect(att.index)
        except KernelError as exc:
            log.error("%s: DISCONNECT failed (%s); closing our side of its sockets", att.device, exc)
            att.stop.set()
        self._join(att)
        try:
            att.image.close()
        except (OSError, VhdblkError) as exc:
            log.error("%s: closing %s failed: %s", att.name, att.entry.image, exc)

    @staticmethod
    def _flush(att: Attachment) -> None:
        if att.image.read_only or not att.image.can_flush:
            return
        try:
            att.image.flush()
        except (OSError, VhdblkError) as exc:
            log.error("%s: flushing %s failed: %s", att.name, att.entry.image, exc)

    def shutdown(self) -> None:
        """Flush and detach everything, in use or not (the service is stopping)."""
        with self._lock:
            for att in self.attachments():
                self._teardown(att)
                del self._table[att.name]
                log.info("detached %s (%s)", att.device, att.name)
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

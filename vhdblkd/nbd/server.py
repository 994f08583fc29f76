"""NBD serving API: `Export`, `serve_connection` and a listening `SocketServer`.

`serve_connection` works on any connected stream socket: the kernel's
socketpair (no handshake) or a network client (handshake first).
`SocketServer` listens on a unix path or a TCP address, runs one thread per
client (several clients may share an export when it allows multi-conn) and
on `shutdown()` stops accepting, lets every connection answer what it has
read, flushes and closes.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
import time

from ..errors import ConfigError
from ..fsutil import remove_quietly
from .connection import serve_connection
from .export import Export, Stats, transmission_flags
from .negotiate import Catalog

__all__ = ["Catalog", "Export", "SocketServer", "Stats", "serve_connection", "transmission_flags"]

log = logging.getLogger(__name__)


class SocketServer:
    """Listens on `unix_path` or `tcp` (host, port) and serves an export (or a catalog of them)."""

    def __init__(
        self,
        export: Export | Catalog,
        *,
        unix_path: str | None = None,
        tcp: tuple[str, int] | None = None,
        backlog: int = 16,
        drain_seconds: float = 30.0,
    ) -> None:
        if (unix_path is None) == (tcp is None):
            raise ConfigError("give exactly one of a unix socket path or a TCP address to listen on")
        self.catalog = export if isinstance(export, Catalog) else Catalog.of(export)
        self.export = self.catalog.exports[0]  # the default export
        self.drain_seconds = drain_seconds
        self._unix_path = unix_path
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        self._accept_thread: threading.Thread | None = None
        self._closed = False
        if unix_path is not None:
            self._listener = self._bind_unix(unix_path)
        else:
            assert tcp is not None
            self._listener = self._bind_tcp(*tcp)
        self._listener.listen(backlog)

    @staticmethod
    def _bind_unix(path: str) -> socket.socket:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(path)
                except ConnectionRefusedError:
                    remove_quietly(path)  # a stale socket left by a server that died
                else:
                    raise ConfigError(f"{path}: another server is already listening on this socket")
                finally:
                    probe.close()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"{path}: cannot listen here: {exc.strerror}") from exc
        return sock

    @staticmethod
    def _bind_tcp(host: str, port: int) -> socket.socket:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ConfigError(f"{host}:{port}: cannot resolve: {exc}") from exc
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"{host}:{port}: cannot listen here: {exc.strerror}") from exc
        return sock

    @property
    def address(self) -> str | tuple[str, int]:
        """The bound address (the real port when 0 was asked for)."""
        name = self._listener.getsockname()
        if isinstance(name, str):
            return name
        return (str(name[0]), int(name[1]))

    def start(self) -> None:
        """Accept clients in a background thread."""
        self._accept_thread = threading.Thread(target=self.serve_forever, name="nbd-accept", daemon=True)
        self._accept_thread.start()

    def serve_forever(self) -> None:
        """Accept clients until `shutdown()`."""
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError as exc:
                if self._stop.is_set():
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept an NBD client: %s", exc)
                    self._stop.wait(0.1)
                    continue
                raise
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                # Replies are small and latency-bound; Nagle would hold them back.
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve_client, args=(conn, peer), name="nbd-conn", daemon=True)
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self._threads.add(thread)
                self._sockets.add(conn)
            thread.start()

    def _serve_client(self, conn: socket.socket, peer: object) -> None:
        log.info("NBD client connected: %s", peer or "unix socket")
        try:
            serve_connection(conn, self.catalog, handshake=True, stop=self._stop)
        finally:
            conn.close()
            with self._lock:
                self._threads.discard(threading.current_thread())
                self._sockets.discard(conn)
            log.info("NBD client disconnected: %s", peer or "unix socket")

    def shutdown(self) -> None:
        """Stop accepting, let connections answer what they have read, flush, and close."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            threads = list(self._threads)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
        except OSError as exc:
            log.debug("listener shutdown: %s", exc)
        self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join()
        deadline = time.monotonic() + self.drain_seconds
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            stuck = list(self._sockets)
        if stuck:
            # A client that stopped reading its replies would block us forever.
            log.warning("%d NBD connection(s) still busy after %.0f s; cutting them off", len(stuck), self.drain_seconds)
            for sock in stuck:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError as exc:
                    log.debug("shutdown of a stuck connection: %s", exc)
            for thread in threads:
                thread.join()
        if self._unix_path is not None:
            remove_quietly(self._unix_path)
        self._flush_exports()

    def _flush_exports(self) -> None:
        for export in self.catalog.exports:
            if not export.read_only and export.can_flush:
                export.backend.flush()

    def __enter__(self) -> SocketServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

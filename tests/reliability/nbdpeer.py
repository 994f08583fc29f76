"""A test NBD peer: serve_connection on one end of a socketpair, raw requests on the other.

The client side builds headers by hand (struct, not the codec) so it can send
what no well-behaved client would: bad magic, overflowing ranges, oversized
lengths, truncated payloads.
"""

from __future__ import annotations

import socket
import struct
import threading
from types import TracebackType

from vhdblkd.backend import Backend
from vhdblkd.nbd import constants as c
from vhdblkd.nbd.server import Export, serve_connection

HEADER = struct.Struct(">IHHQQI")
REPLY = struct.Struct(">IIQ")
TIMEOUT = 20.0  # seconds; only reached when the server is hung, which is itself the failure


class Peer:
    """The client end; the server runs serve_connection(handshake=False) in a thread."""

    def __init__(self, backend: Backend) -> None:
        self.export = Export(backend)
        self.sock, self._server_sock = socket.socketpair()
        self.sock.settimeout(TIMEOUT)
        self.errors: list[BaseException] = []
        self._cookie = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            serve_connection(self._server_sock, self.export, handshake=False)
        except BaseException as exc:  # noqa: BLE001 - anything escaping is a bug the test reports
            self.errors.append(exc)
        finally:
            self._server_sock.close()

    # --- raw requests -------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def header(self, type_: int, offset: int = 0, length: int = 0, flags: int = 0, *,
               magic: int = c.NBD_REQUEST_MAGIC, cookie: int | None = None) -> tuple[int, bytes]:
        if cookie is None:
            self._cookie += 1
            cookie = self._cookie
        return cookie, HEADER.pack(magic, flags, type_, cookie, offset, length)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def reply(self, cookie: int) -> int:
        magic, error, got = REPLY.unpack(self.recv_exact(REPLY.size))
        assert magic == c.NBD_SIMPLE_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        assert got == cookie, f"reply for cookie {got}, expected {cookie}"
        return int(error)

    def at_eof(self) -> bool:
        """True when the server has closed its end (after answering what it had).

        A server that closes with unread client bytes in its queue makes the
        kernel reset the stream instead of ending it; either way it closed.
        """
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # --- well-formed requests ------------------------------------------------------

    def request(self, type_: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b"") -> int:
        cookie, head = self.header(type_, offset, length, flags)
        self.sock.sendall(head + data)
        return self.reply(cookie)

    def read(self, offset: int, length: int) -> tuple[int, bytes]:
        cookie, head = self.header(c.NBD_CMD_READ, offset, length)
        self.sock.sendall(head)
        error = self.reply(cookie)
        return error, (self.recv_exact(length) if error == 0 else b"")

    def write(self, offset: int, data: bytes, fua: bool = False) -> int:
        flags = c.NBD_CMD_FLAG_FUA if fua else 0
        return self.request(c.NBD_CMD_WRITE, offset, len(data), flags, data)

    def flush(self) -> int:
        return self.request(c.NBD_CMD_FLUSH)

    def trim(self, offset: int, length: int) -> int:
        return self.request(c.NBD_CMD_TRIM, offset, length)

    def zeroes(self, offset: int, length: int, flags: int = 0) -> int:
        return self.request(c.NBD_CMD_WRITE_ZEROES, offset, length, flags)

    def close(self) -> None:
        """Send DISC (if the socket still takes it) and wait for the server to finish."""
        try:
            self.sock.sendall(self.header(c.NBD_CMD_DISC)[1])
        except OSError:
            pass
        self.join()

    def join(self) -> None:
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "serve_connection did not return"
        self.sock.close()
        assert not self.errors, f"serve_connection raised {self.errors!r}"

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.sock.close()
            self._thread.join(TIMEOUT)

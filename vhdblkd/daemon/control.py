"""The control socket: a root-only Unix socket speaking JSON lines.

Every client gets its own thread and a socket timeout, so a slow or stuck
client only ever blocks itself.  The peer's credentials (SO_PEERCRED) are
checked before anything is read: the file mode already keeps others out,
and the check also covers a socket whose mode was changed by hand.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import DaemonError, VhdblkError
from ..fsutil import remove_quietly
from .protocol import LineDecoder, ProtocolViolation, decode_request, encode, error_reply

log = logging.getLogger(__name__)

DEFAULT_CONTROL = Path("/run/vhdblkd/control.sock")
NOT_ROOT = "vhdblkctl must run as root (the control socket is root-only)"

Handler = Callable[[dict[str, Any]], dict[str, Any]]
PeerCheck = Callable[[socket.socket], str | None]

_UCRED = struct.Struct("3i")


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)


def root_only(sock: socket.socket) -> str | None:
    """Refuse anyone but root (and the daemon's own user, when it is not root)."""
    uid = peer_uid(sock)
    if uid in (0, os.geteuid()):
        return None
    return NOT_ROOT


class ControlServer:
    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        check_peer: PeerCheck = root_only,
        client_timeout: float = 30.0,
        max_line_bytes: int | None = None,
    ) -> None:
        self.path = path
        self._handler = handler
        self._check_peer = check_peer
        self._client_timeout = client_timeout
        self._max_line = max_line_bytes
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self._remove_stale()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # created 0600: no window where others may connect
        try:
            listener.bind(str(self.path))
        except OSError as exc:
            listener.close()
            raise DaemonError(f"cannot create the control socket {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        # A client with a timeout (vhdblkctl's) gets EAGAIN, not a wait, once the backlog is full:
        # many vhdblkctl calls at once (boot scripts) must queue rather than fail.
        listener.listen(socket.SOMAXCONN)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)
        self._thread.start()
        log.info("control socket listening at %s", self.path)

    def _remove_stale(self) -> None:
        if not os.path.lexists(self.path):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(self.path))
        except OSError:
            remove_quietly(self.path)  # nobody listens: a leftover from a crash
            return
        finally:
            probe.close()
        raise DaemonError(f"another vhdblkd is already listening on {self.path}")

    def stop(self) -> None:
        """Stop taking requests: close the listener and drop idle clients."""
        self._closing.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
            remove_quietly(self.path)
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            try:
                client.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closing.is_set():
            try:
                client, _ = listener.accept()
            except OSError as exc:
                if self._closing.is_set() or exc.errno in (errno.EBADF, errno.EINVAL):
                    return
                log.warning("control socket accept failed: %s", exc)
                continue
            threading.Thread(target=self._serve_client, args=(client,), name="control-client", daemon=True).start()

    def _serve_client(self, client: socket.socket) -> None:
        with self._lock:
            self._clients.add(client)
        try:
            client.settimeout(self._client_timeout)
            refusal = self._check_peer(client)
            if refusal is not None:
                log.warning("refused a control client: %s", refusal)
                client.sendall(encode(error_reply(refusal)))
                _drain(client)
                return
            self._request_loop(client)
        except TimeoutError:
            log.info("dropped a control client that stalled for %.0f s", self._client_timeout)
        except OSError as exc:
            log.debug("control client went away: %s", exc)
        finally:
            with self._lock:
                self._clients.discard(client)
            client.close()

    def _request_loop(self, client: socket.socket) -> None:
        decoder = LineDecoder() if self._max_line is None else LineDecoder(self._max_line)
        while not decoder.eof:
            data = client.recv(65536)
            try:
                lines = decoder.feed(data)
            except ProtocolViolation as exc:
                client.sendall(encode(error_reply(str(exc))))
                _drain(client)
                return
            for line in lines:
                client.sendall(encode(self._dispatch(line)))

    def _dispatch(self, line: bytes) -> dict[str, Any]:
        if self._closing.is_set():
            return error_reply("vhdblkd is shutting down")
        try:
            request = decode_request(line)
            return self._handler(request)
        except VhdblkError as exc:
            return error_reply(str(exc))
        except Exception as exc:  # a bug: keep the daemon up, log it, tell the client
            log.exception("control request failed: %s", line[:200])
            return error_reply(f"internal error: {type(exc).__name__}: {exc}")


def _drain(client: socket.socket, limit: int = 1 << 20) -> None:
    """Half-close and read what the client still sends (bounded), so it reads our error reply.

    Closing a Unix socket with unread input resets the peer, which would then
    lose the reply it has not read yet.
    """
    try:
        client.shutdown(socket.SHUT_WR)
        client.settimeout(1.0)
        while limit > 0:
            data = client.recv(65536)
            if not data:
                return
            limit -= len(data)
    except OSError:
        return

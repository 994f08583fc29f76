"""One NBD connection: optional handshake, then the transmission loop over a socket.

The loop reads each 28-byte header with `recv_into` into a reused buffer,
validates it with the codec's `check_header`, checks the request at the edge
(flags, range, read-only) and only then calls the backend.  READ and WRITE
run inline in the connection thread; FLUSH and the flush that emulates FUA
go to a helper thread so later reads are not stuck behind an fsync.  A lock
serialises replies from the two threads.  The caller owns the socket and
closes it after `serve_connection` returns (shut down by then).
"""

from __future__ import annotations

import errno
import logging
import queue
import socket
import threading

from ..backend import Backend, FuaMode
from ..errors import DiskFull, NbdError, OutOfRange, ReadOnlyImage, RemoteProtocolError, VhdblkError
from .codec import REQUEST_HEADER, SIMPLE_REPLY, check_header, command_name
from .constants import (
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOSPC,
    NBD_ENOTSUP,
    NBD_EPERM,
    NBD_MAX_PAYLOAD,
    NBD_REQUEST_SIZE,
    NBD_SIMPLE_REPLY_MAGIC,
)
from .export import Export, Stats
from .negotiate import Catalog, negotiate

log = logging.getLogger(__name__)

_FIRST_WRITE_BUFFER = 256 * 1024  # grows on demand up to NBD_MAX_PAYLOAD; most writes are <= 128 KiB
_STOP_POLL_SECONDS = 0.2
_RELAY_DRAIN_SECONDS = 30.0  # time the TLS relay gets to deliver the last replies
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # proto.md: map these to NBD_ENOSPC
_PERMISSION_ERRNOS = frozenset({errno.EPERM, errno.EROFS, errno.EACCES})


def serve_connection(
    sock: socket.socket, export: Export | Catalog, *, handshake: bool, stop: threading.Event | None = None
) -> None:
    """Serve one connected stream socket until DISC, EOF, a protocol error or `stop`.

    With `handshake` the fixed-newstyle negotiation runs first (network
    clients); without it the socket is already in the transmission phase (the
    kernel's socketpair).  On every way out the requests already received
    are answered and the backend is flushed, because the kernel never sends
    FLUSH before it disconnects.  A protocol error is logged and ends only
    this connection.  The socket is shut down on return (the peer sees EOF)
    but not closed: the caller owns the descriptor.
    """
    done = threading.Event()
    done_lock = threading.Lock()
    watcher: threading.Thread | None = None
    if stop is not None:
        watcher = threading.Thread(
            target=_watch_stop, args=(sock, stop, done, done_lock), name="nbd-stop-watch", daemon=True
        )
        watcher.start()
    serving = sock
    relay: threading.Thread | None = None
    try:
        if handshake:
            session = negotiate(sock, export if isinstance(export, Catalog) else Catalog.of(export))
            if session is None:
                return
            serving, relay, chosen = session.sock, session.relay, session.export
        else:
            assert isinstance(export, Export)
            chosen = export
        _Connection(serving, chosen).run()
    except RemoteProtocolError as exc:
        log.warning("closing NBD connection: client broke the protocol: %s", exc)
    except (BrokenPipeError, ConnectionResetError) as exc:
        log.info("NBD client went away: %s", exc)
    except OSError as exc:
        log.warning("closing NBD connection: socket error: %s", exc)
    finally:
        if serving is not sock:
            # The plain end of a TLS relay: closing it lets the relay send the last replies
            # and say goodbye before the connection underneath is shut down.
            serving.close()
            if relay is not None:
                relay.join(_RELAY_DRAIN_SECONDS)
        with done_lock:
            done.set()
            try:
                # The peer sees the end now; the descriptor stays the caller's to close.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError as exc:
                log.debug("shutdown of a finished NBD connection: %s", exc)


def _watch_stop(sock: socket.socket, stop: threading.Event, done: threading.Event, lock: threading.Lock) -> None:
    # Polling keeps this thread from outliving its connection when stop is never set.
    while not stop.wait(_STOP_POLL_SECONDS):
        if done.is_set():
            return
    with lock:
        if done.is_set():
            return
        try:
            # Ends the blocked recv with EOF; requests already read are still answered.
            sock.shutdown(socket.SHUT_RD)
        except OSError as exc:
            log.debug("shutdown of a stopping NBD connection failed: %s", exc)


def _errno_for(exc: Exception, what: str) -> int:
    """Map a backend failure to an NBD error; anything unexpected is a bug and logged as one."""
    if isinstance(exc, OSError):
        if exc.errno in _NO_SPACE_ERRNOS:
            log.warning("%s: no space: %s", what, exc)
            return NBD_ENOSPC
        if exc.errno in _PERMISSION_ERRNOS:
            log.warning("%s: not permitted: %s", what, exc)
            return NBD_EPERM
        log.error("%s: I/O error: %s", what, exc)
        return NBD_EIO
    if isinstance(exc, DiskFull):
        log.warning("%s: %s", what, exc)
        return NBD_ENOSPC
    if isinstance(exc, ReadOnlyImage):
        log.warning("%s: %s", what, exc)
        return NBD_EPERM
    if isinstance(exc, OutOfRange):
        log.warning("%s: %s", what, exc)
        return NBD_EINVAL
    if isinstance(exc, NbdError):
        log.warning("%s: %s", what, exc)
        return exc.errno
    if isinstance(exc, VhdblkError):
        log.error("%s: %s", what, exc)
        return NBD_EIO
    log.exception("%s: unexpected failure (a bug)", what)
    return NBD_EIO


class _Connection:
    """The transmission loop of one socket (see the module docstring)."""

    def __init__(self, sock: socket.socket, export: Export) -> None:
        self.sock = sock
        self.export = export
        self.backend: Backend = export.backend
        self.size = export.size
        self.read_only = export.read_only
        self.can_flush = export.can_flush
        self.fua_mode = export.can_fua
        self.send_lock = threading.Lock()
        self.stats = Stats()
        self._wbuf = bytearray(_FIRST_WRITE_BUFFER)
        self._wview = memoryview(self._wbuf)
        self._flushes: queue.SimpleQueue[int | None] | None = None
        self._flusher: threading.Thread | None = None

    # --- socket helpers -------------------------------------------------------

    def _recv_exact(self, view: memoryview) -> int:
        """Fill `view`; return how many bytes arrived before EOF."""
        total = 0
        need = len(view)
        while total < need:
            n = self.sock.recv_into(view[total:], need - total, socket.MSG_WAITALL)
            if n == 0:
                break
            total += n
        return total

    def _send(self, header: bytes, data: bytes | bytearray | memoryview | None = None, error: int = 0) -> None:
        with self.send_lock:
            if error:
                self.stats.errors += 1  # under the lock: the flush thread replies too
            if data is None:
                self.sock.sendall(header)
                return
            # One syscall for header and data; data may be a view into the image's mmap (no copy).
            sent = self.sock.sendmsg([header, data])
            total = len(header) + len(data)
            if sent < total:  # a signal or a full buffer split the message; send the rest
                if sent < len(header):
                    self.sock.sendall(header[sent:])
                    sent = len(header)
                self.sock.sendall(memoryview(data)[sent - len(header) :])

    def _reply(self, cookie: int, error: int) -> None:
        self._send(SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie), None, error)

    # --- flush helper thread -----------------------------------------------------

    def _queue_flush(self, cookie: int) -> None:
        if self._flushes is None:
            self._flushes = queue.SimpleQueue()
            self._flusher = threading.Thread(target=self._flush_loop, name="nbd-flush", daemon=True)
            self._flusher.start()
        self._flushes.put(cookie)

    def _flush_loop(self) -> None:
        assert self._flushes is not None
        pending = self._flushes
        while True:
            batch = [pending.get()]
            while not pending.empty():
                batch.append(pending.get_nowait())
            cookies = [c for c in batch if c is not None]
            if cookies:
                # One flush answers every request queued before it started: each one's
                # writes completed before it was queued.
                try:
                    self.backend.flush()
                    error = 0
                except Exception as exc:  # noqa: BLE001 - mapped to an NBD error and logged
                    error = _errno_for(exc, "FLUSH")
                self.stats.flushes += 1
                for cookie in cookies:
                    try:
                        self._reply(cookie, error)
                    except OSError as exc:
                        log.debug("FLUSH reply not delivered: %s", exc)
            if None in batch:
                return

    def _stop_flusher(self) -> None:
        if self._flushes is not None and self._flusher is not None:
            self._flushes.put(None)
            self._flusher.join()

    def _complete_write(self, cookie: int, fua: bool) -> None:
        """Reply to a finished write, flushing first when FUA is set and the backend can't do it natively."""
        if fua and self.fua_mode is not FuaMode.NATIVE and self.can_flush:
            self._queue_flush(cookie)
        else:
            self._reply(cookie, 0)

    # --- the loop -----------------------------------------------------------------

    def run(self) -> None:
        self.export.attach(self.stats)
        try:
            self._loop()
        finally:
            self._finish()

    def _finish(self) -> None:
        try:
            self._stop_flusher()
            if not self.read_only and self.can_flush:
                try:
                    self.backend.flush()
                except Exception as exc:  # noqa: BLE001 - logged; nobody is left to tell
                    _errno_for(exc, "flush at disconnect")
        finally:
            self.export.detach(self.stats)

    def _loop(self) -> None:
        header = bytearray(NBD_REQUEST_SIZE)
        hview = memoryview(header)
        recv_into = self.sock.recv_into
        unpack = REQUEST_HEADER.unpack_from
        read = self.backend.read
        size = self.size
        stats = self.stats
        while True:
            n = recv_into(hview, NBD_REQUEST_SIZE, socket.MSG_WAITALL)  # one syscall per header
            if n != NBD_REQUEST_SIZE:
                if n == 0:
                    return  # EOF between requests: a clean hang-up
                n += self._recv_exact(hview[n:])
                if n != NBD_REQUEST_SIZE:
                    raise RemoteProtocolError(f"stream ended inside a request header ({n} of {NBD_REQUEST_SIZE} bytes)")
            magic, flags, type_, cookie, offset, length = unpack(header)
            if type_ == NBD_CMD_READ:
                check_header(magic, type_, length)
                if flags & ~NBD_CMD_FLAG_FUA or length > NBD_MAX_PAYLOAD or offset + length > size:
                    self._reject(type_, flags, offset, length, cookie, NBD_EINVAL)
                    continue
                try:
                    data = read(offset, length)
                except Exception as exc:  # noqa: BLE001 - mapped to an NBD error and logged
                    self._reply(cookie, _errno_for(exc, f"READ {length}@{offset}"))
                    continue
                if len(data) != length:
                    log.error("backend returned %d bytes for a %d-byte READ at %d", len(data), length, offset)
                    self._reply(cookie, NBD_EIO)
                    continue
                # The header goes out only now that the data is in hand.
                self._send(SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie), data)
                stats.reads += 1
                stats.bytes_read += length
            elif type_ == NBD_CMD_WRITE:
                if length > NBD_MAX_PAYLOAD:
                    check_header(magic, NBD_CMD_READ, length)  # a bad magic outranks the size
                    # The payload can't be skipped safely: refuse, then end the connection in order.
                    log.warning("WRITE of %d bytes exceeds the payload limit; closing the connection", length)
                    self._reply(cookie, NBD_EINVAL)
                    return
                check_header(magic, type_, length)
                self._write(flags, cookie, offset, length)
            elif type_ == NBD_CMD_DISC:
                check_header(magic, type_, length)
                return
            else:
                check_header(magic, type_, length)
                self._other(type_, flags, cookie, offset, length)

    def _reject(self, type_: int, flags: int, offset: int, length: int, cookie: int, error: int) -> None:
        log.info("rejecting %s flags=%#x %d@%d: error %d", command_name(type_), flags, length, offset, error)
        self._reply(cookie, error)

    def _write(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if length > len(self._wbuf):
            self._wview.release()
            self._wbuf = bytearray(min(NBD_MAX_PAYLOAD, max(length, 2 * len(self._wbuf))))
            self._wview = memoryview(self._wbuf)
        payload = self._wview[:length]
        got = self._recv_exact(payload)  # straight into the pooled buffer: no per-request allocation
        if got != length:
            raise RemoteProtocolError(f"stream ended inside a WRITE payload ({got} of {length} bytes)")
        error = self._check_write(flags & ~NBD_CMD_FLAG_FUA, offset, length)
        if error:
            self._reject(NBD_CMD_WRITE, flags, offset, length, cookie, error)
            return
        if length == 0:
            self._reply(cookie, 0)
            return
        fua = bool(flags & NBD_CMD_FLAG_FUA)
        try:
            self.backend.write(offset, payload, fua and self.fua_mode is FuaMode.NATIVE)
        except Exception as exc:  # noqa: BLE001 - mapped to an NBD error and logged
            self._reply(cookie, _errno_for(exc, f"WRITE {length}@{offset}"))
            return
        self.stats.writes += 1
        self.stats.bytes_written += length
        self._complete_write(cookie, fua)

    def _check_write(self, other_flags: int, offset: int, length: int) -> int:
        if other_flags:
            return NBD_EINVAL
        if self.read_only:
            return NBD_EPERM
        if offset + length > self.size:
            # EINVAL, not proto.md's suggested ENOSPC: ENOSPC is kept to mean "the host disk is
            # full", so an out-of-range request never looks like a space problem to the client.
            return NBD_EINVAL
        return 0

    def _other(self, type_: int, flags: int, cookie: int, offset: int, length: int) -> None:
        fua = bool(flags & NBD_CMD_FLAG_FUA)
        if type_ == NBD_CMD_FLUSH:
            if flags & ~NBD_CMD_FLAG_FUA or not self.can_flush:
                self._reject(type_, flags, offset, length, cookie, NBD_EINVAL)
            else:
                # Every write received before this FLUSH has already completed inline.
                self._queue_flush(cookie)
            return
        if type_ == NBD_CMD_WRITE_ZEROES:
            error = self._check_write(flags & ~(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE), offset, length)
        elif type_ == NBD_CMD_TRIM:
            error = self._check_write(flags & ~NBD_CMD_FLAG_FUA, offset, length)
            if not error and not self.export.can_discard:
                error = NBD_EINVAL
        elif type_ == NBD_CMD_CACHE:
            error = NBD_EINVAL if flags & ~NBD_CMD_FLAG_FUA or offset + length > self.size else 0
        else:
            # ENOTSUP names the cause exactly: the command is understood as framed but not served
            # (BLOCK_STATUS needs structured replies, which are not negotiated).
            error = NBD_ENOTSUP
        if error:
            self._reject(type_, flags, offset, length, cookie, error)
            return
        if length == 0 or type_ == NBD_CMD_CACHE:
            self._reply(cookie, 0)  # CACHE is advisory; a no-op is a valid implementation
            return
        what = f"{command_name(type_)} {length}@{offset}"
        try:
            if type_ == NBD_CMD_TRIM:
                self.backend.discard(offset, length)
                self.stats.trims += 1
            else:
                may_trim = not flags & NBD_CMD_FLAG_NO_HOLE
                self.backend.write_zeroes(offset, length, may_trim, fua and self.fua_mode is FuaMode.NATIVE)
                self.stats.writes += 1
        except Exception as exc:  # noqa: BLE001 - mapped to an NBD error and logged
            self._reply(cookie, _errno_for(exc, what))
            return
        self._complete_write(cookie, fua)

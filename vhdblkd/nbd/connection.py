"""One NBD connection: optional handshake, then the transmission loop over a socket.

The loop reads what the codec's `RequestParser` asks for next with
`recv_into`: each 28-byte header into a reused buffer and a WRITE's payload
into a pooled buffer, and feeds it to the parser, which frames the request
(or raises the protocol error).  The request then goes to the
transport-independent request layer (`vhdblkd.request`): it checks the
request at the edge (flags, range, read-only), runs it on the backend and
names the errno of a failure, which this module only translates to NBD's
numbers.  A WRITE over the payload limit is answered EINVAL, and then the
connection ends (its payload cannot be skipped safely).  READ and WRITE run
inline in the connection thread; FLUSH and the flush that emulates FUA go to
a helper thread so later reads are not stuck behind an fsync.  A lock
serialises replies from the two threads.  The caller owns the socket and
closes it after `serve_connection` returns (shut down by then).
"""

from __future__ import annotations

import errno
import logging
import queue
import socket
import struct
import threading
from collections.abc import Callable

from ..backend import AllocationMap, Buffer
from ..errors import RemoteProtocolError
from ..request import FUA, NO_HOLE, Capabilities, Command, Request, RequestLayer, errno_for
from . import structured as sr
from .codec import COOKIE, SIMPLE_REPLY, OversizedWrite, RequestParser, command_name, nbd_error
from .constants import (
    NBD_CMD_BLOCK_STATUS,
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
    NBD_ENOTSUP,
    NBD_MAX_PAYLOAD,
    NBD_REQUEST_SIZE,
    NBD_SIMPLE_REPLY_MAGIC,
)
from .export import Export, Stats
from .negotiate import Catalog, negotiate
from .replies import StructuredReplies

log = logging.getLogger(__name__)

_FIRST_WRITE_BUFFER = 256 * 1024  # grows on demand up to NBD_MAX_PAYLOAD; most writes are <= 128 KiB
_STOP_POLL_SECONDS = 0.2
_PAUSE_POLL = struct.pack("ll", 0, 200_000)  # struct timeval: 0.2 s
_RELAY_DRAIN_SECONDS = 30.0  # time the TLS relay gets to deliver the last replies
# The NBD commands the request layer serves, besides READ and WRITE (inline in the loop);
# DISC and the rest stay here.
_COMMANDS = {
    NBD_CMD_WRITE: Command.WRITE,  # a zero-length one: no payload follows
    NBD_CMD_FLUSH: Command.FLUSH,
    NBD_CMD_TRIM: Command.TRIM,
    NBD_CMD_WRITE_ZEROES: Command.WRITE_ZEROES,
    NBD_CMD_CACHE: Command.CACHE,
}
# The request layer's flag bits are NBD's, and the only ones it ever allows are these two,
# so NBD flags pass through as they are: any other NBD bit (DF, REQ_ONE, FAST_ZERO) is
# refused exactly as the layer's UNKNOWN would be.
assert FUA == NBD_CMD_FLAG_FUA and NO_HOLE == NBD_CMD_FLAG_NO_HOLE


def serve_connection(
    sock: socket.socket,
    export: Export | Catalog,
    *,
    handshake: bool,
    stop: threading.Event | None = None,
    pause: threading.Event | None = None,
) -> bool:
    """Serve one connected stream socket until DISC, EOF, a protocol error, `stop` or `pause`.

    With `handshake` the fixed-newstyle negotiation runs first (network
    clients); without it the socket is already in the transmission phase (the
    kernel's socketpair).  On every way out the requests already received
    are answered and the backend is flushed, because the kernel never sends
    FLUSH before it disconnects.  A protocol error is logged and ends only
    this connection.  The socket is shut down on return (the peer sees EOF)
    but not closed: the caller owns the descriptor.

    `pause` (kernel sockets only) ends the loop between two requests instead:
    every request read is answered, the socket is left open and untouched,
    and True is returned, so another process can go on serving it from the
    very next request (a daemon restart hands its sockets over this way).
    """
    paused = False
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
                return False
            serving, relay = session.sock, session.relay
            _Connection(serving, session.export, session.structured, session.contexts).run()
        else:
            assert isinstance(export, Export)
            conn = _Connection(serving, export, pause=pause)
            conn.run()
            paused = conn.paused
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
            if not paused:
                try:
                    # The peer sees the end now; the descriptor stays the caller's to close.
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError as exc:
                    log.debug("shutdown of a finished NBD connection: %s", exc)
    return paused


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


class _Connection(StructuredReplies):
    """The transmission loop of one socket (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        export: Export,
        structured: bool = False,
        contexts: dict[int, str] | None = None,
        pause: threading.Event | None = None,
    ) -> None:
        self.sock = sock
        self.pause = pause or threading.Event()
        self.pausable = pause is not None
        self.paused = False
        if pause is not None:
            # An idle connection must notice a pause without a request arriving: a
            # receive timeout (set on the socket, so recv costs no extra poll) wakes it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _PAUSE_POLL)
        self.export = export
        self.structured = structured  # READ answers and its errors are structured replies
        self.contexts = dict(contexts or {})  # metadata context id -> name, for BLOCK_STATUS
        backend = export.backend
        self.allocation = backend.allocation if isinstance(backend, AllocationMap) else None
        # The export asked the backend once; every connection judges requests by those answers.
        caps = Capabilities(
            export.size, export.read_only, export.can_flush, export.can_fua, export.can_discard, NBD_MAX_PAYLOAD
        )
        self.layer = RequestLayer(export.backend, caps)
        self.send_lock = threading.Lock()
        self.stats = Stats()
        self.parser = RequestParser()
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
            try:
                n = self.sock.recv_into(view[total:], need - total, socket.MSG_WAITALL)
            except BlockingIOError:  # the pause poll's timeout inside a request: keep reading
                continue
            if n == 0:
                break
            total += n
        return total

    def _send(self, header: bytes | bytearray, data: bytes | bytearray | memoryview | None = None, error: int = 0) -> None:
        with self.send_lock:
            if error:
                self.stats.errors += 1  # under the lock: the flush thread replies too
            if data is None:
                self.sock.sendall(header)
                return
            # One syscall for header and data; data may be a view into the image's mmap (no copy).
            sent = self.sock.sendmsg([header, data])
            if sent < len(header) + len(data):
                self._send_rest(header, data, sent)

    def _send_rest(self, header: bytes | bytearray, data: Buffer, sent: int) -> None:
        """Finish a message a signal or a full buffer split (under the send lock)."""
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
                    self.layer.flush()
                    error = 0
                except Exception as exc:  # noqa: BLE001 - mapped to an NBD error and logged
                    error = nbd_error(errno_for(exc, "FLUSH"))
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
            caps = self.layer.caps
            if not caps.read_only and caps.can_flush:
                try:
                    self.layer.flush()
                except Exception as exc:  # noqa: BLE001 - logged; nobody is left to tell
                    errno_for(exc, "flush at disconnect")
        finally:
            self.export.detach(self.stats)

    def _loop(self) -> None:
        try:
            self._serve()
        except OversizedWrite as exc:
            # The payload can't be skipped safely: refuse it, then end the connection in order.
            log.warning("closing NBD connection: client broke the protocol: %s", exc)
            self._reply(exc.cookie, NBD_EINVAL)

    def _serve(self) -> None:  # noqa: C901 - READ and WRITE inline: the hot path, one frame per request
        header = bytearray(NBD_REQUEST_SIZE)
        hview = memoryview(header)
        recv_into: Callable[[memoryview, int, int], int] = self._recv_or_pause if self.pausable else self.sock.recv_into
        parse = self.parser.header
        layer = self.layer
        # The READ path compares the layer's limits inline and asks `check` only to name a refusal.
        # A command refused outright gets an end of -1, so the range test sends it to `check`.
        allowed, refused, end, longest = layer.limits(Command.READ)
        disallowed, end = ~allowed, -1 if refused else end
        read = layer.reader()
        allowed, refused, w_end, w_longest = layer.limits(Command.WRITE)
        w_disallowed, w_end = ~allowed, -1 if refused else w_end
        write = layer.writer()
        fua_flushes = layer.needs_flush(Command.WRITE, FUA, 1)
        recv_payload = self._recv_payload
        send = self._send
        send_lock = self.send_lock
        sendmsg = self.sock.sendmsg
        request = self._request
        stats = self.stats
        # READs shorter than this run inline: every READ without structured replies, and with them
        # every one too short to split into data and hole chunks (one OFFSET_DATA chunk each).
        structured = self.structured
        sparse = structured and self.allocation is not None
        inline_below = sr.SPARSE_READ_MIN if sparse else 1 << 64
        # Replies of the inline path are packed into reusable buffers (sendmsg and sendall copy
        # them before they return): the constant head is written once, and per request only the
        # cookie (a READ's chunk: cookie, length and offset).  No header object is made per request.
        read_head = bytearray(sr.DATA_CHUNK.size if structured else SIMPLE_REPLY.size)
        if structured:
            sr.DATA_CHUNK.pack_into(read_head, 0, sr.DATA_MAGIC_DONE, 0, 0, 0)
        else:
            SIMPLE_REPLY.pack_into(read_head, 0, NBD_SIMPLE_REPLY_MAGIC, 0, 0)
        read_head_size = len(read_head)
        write_head = bytearray(SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, 0))
        pack_tail = sr.DATA_TAIL.pack_into
        pack_cookie = COOKIE.pack_into
        while True:
            n = recv_into(hview, NBD_REQUEST_SIZE, socket.MSG_WAITALL)  # one syscall per header
            if n != NBD_REQUEST_SIZE and not self._rest_of_header(hview, n):
                return  # EOF between requests (a clean hang-up), or paused
            _, flags, type_, cookie, offset, length = parse(header)
            if type_ == NBD_CMD_READ and length < inline_below and (length or not structured):
                if flags & disallowed or offset + length > end or length > longest:
                    error = layer.check(Command.READ, offset, length, flags) or errno.EINVAL
                    self._reject("READ", flags, offset, length, cookie, nbd_error(error), True)
                    continue
                try:
                    data = read(offset, length)
                    if len(data) != length:
                        raise layer.short_read(data, offset, length)
                except Exception as exc:  # noqa: BLE001 - mapped to an NBD error and logged
                    self._read_failed(cookie, offset, length, nbd_error(errno_for(exc, f"READ {length}@{offset}")))
                    continue
                # The header goes out only now that the data is in hand, with it in one syscall;
                # data may be a view into the image's mmap (no copy).
                if structured:
                    pack_tail(read_head, 8, cookie, length + 8, offset)
                else:
                    pack_cookie(read_head, 8, cookie)
                with send_lock:
                    sent = sendmsg([read_head, data])
                    if sent != length + read_head_size:
                        self._send_rest(read_head, data, sent)
                stats.reads += 1
                stats.bytes_read += length
            elif type_ == NBD_CMD_WRITE and length:
                payload = recv_payload(length)  # read even when the WRITE is refused
                if flags & w_disallowed or offset + length > w_end or length > w_longest:
                    error = layer.check(Command.WRITE, offset, length, flags) or errno.EINVAL
                    self._reject("WRITE", flags, offset, length, cookie, nbd_error(error))
                    continue
                try:
                    write(offset, payload, flags)
                except Exception as exc:  # noqa: BLE001 - mapped to an NBD error and logged
                    self._reply(cookie, nbd_error(errno_for(exc, f"WRITE {length}@{offset}")))
                    continue
                stats.writes += 1
                stats.bytes_written += length
                if flags & FUA and fua_flushes:
                    self._queue_flush(cookie)  # every write received before this one has completed inline
                    continue
                pack_cookie(write_head, 8, cookie)
                send(write_head)
            elif not request(type_, flags, cookie, offset, length):
                return  # DISC

    def _read_failed(self, cookie: int, offset: int, length: int, error: int) -> None:
        if self.structured:  # proto.md: with structured replies a READ is never answered with a simple reply
            self._send(sr.error_chunk(cookie, error, f"READ {length}@{offset} failed"), None, error)
        else:
            self._reply(cookie, error)

    def _recv_or_pause(self, view: memoryview, nbytes: int, flags: int) -> int:
        """recv_into for a header of a connection that may pause: 0, as at EOF, once paused."""
        while True:
            if self.pause.is_set():
                self.paused = True  # between two requests: the next one stays in the socket
                return 0
            try:
                return self.sock.recv_into(view, nbytes, flags)
            except BlockingIOError:  # idle for the pause poll's timeout
                continue

    def _rest_of_header(self, hview: memoryview, n: int) -> bool:
        """Complete a header the first recv cut short; False at a clean EOF (or a pause) before it."""
        if n == 0:
            if not self.paused:
                self.parser.eof()
            return False
        n += self._recv_exact(hview[n:])
        if n != NBD_REQUEST_SIZE:
            self.parser.eof(n)  # raises: the stream ended inside a header
        return True

    def _recv_payload(self, length: int) -> memoryview:
        if length > len(self._wbuf):
            self._wview.release()
            self._wbuf = bytearray(min(NBD_MAX_PAYLOAD, max(length, 2 * len(self._wbuf))))
            self._wview = memoryview(self._wbuf)
        payload = self._wview[:length]
        # Straight into the pooled buffer (no per-request allocation), in one syscall when it is all there.
        try:
            got = self.sock.recv_into(payload, length, socket.MSG_WAITALL)
        except BlockingIOError:  # the pause poll's timeout
            got = 0
        if got != length:
            got += self._recv_exact(payload[got:])
            if got != length:
                self.parser.eof(got)  # raises: the stream ended inside the payload
        self.parser.payload(payload)
        return payload

    def _request(self, type_: int, flags: int, cookie: int, offset: int, length: int) -> bool:
        """Any request but a simple READ and a WRITE; False for DISC (the loop ends)."""
        if type_ == NBD_CMD_READ:
            req = Request(Command.READ, offset, length, flags)
            error = self.layer.validate(req)
            if error is not None:
                self._reject("READ", flags, offset, length, cookie, nbd_error(error), True)
            else:
                self._structured_read(req, cookie)
            return True
        command = _COMMANDS.get(type_)
        if command is None:
            if type_ == NBD_CMD_DISC:
                return False
            self._unlayered(type_, flags, cookie, offset, length)
            return True
        req = Request(command, offset, length, flags)
        error = self.layer.validate(req)
        if error is not None:
            self._reject(command.name, flags, offset, length, cookie, nbd_error(error))
            return True
        try:
            self.layer.execute(req)
        except Exception as exc:  # noqa: BLE001 - mapped to an NBD error and logged
            self._reply(cookie, nbd_error(errno_for(exc, f"{command.name} {length}@{offset}")))
            return True
        self._complete(req, cookie)
        return True

    def _complete(self, req: Request, cookie: int) -> None:
        """Count a finished FLUSH, TRIM, WRITE_ZEROES, CACHE or empty WRITE and reply, after a flush when it needs one."""
        if req.length:
            command = req.command
            if command is Command.WRITE_ZEROES:
                self.stats.writes += 1
            elif command is Command.TRIM:
                self.stats.trims += 1
        if self.layer.flush_after(req):
            # Every write received before this one has already completed inline.
            self._queue_flush(cookie)
        else:
            self._reply(cookie, 0)

    def _unlayered(self, type_: int, flags: int, cookie: int, offset: int, length: int) -> None:
        """A command the request layer does not serve: BLOCK_STATUS, or one this server lacks."""
        if type_ == NBD_CMD_BLOCK_STATUS and self.contexts:
            self._block_status(flags, cookie, offset, length)
            return
        # ENOTSUP names the cause exactly: the command is understood as framed but not served
        # (BLOCK_STATUS needs a metadata context, which was not negotiated).
        self._reject(command_name(type_), flags, offset, length, cookie, NBD_ENOTSUP)

    def _reject(
        self, name: str, flags: int, offset: int, length: int, cookie: int, error: int, read: bool = False
    ) -> None:
        log.info("rejecting %s flags=%#x %d@%d: error %d", name, flags, length, offset, error)
        if self.structured and (read or name == "BLOCK_STATUS"):
            # proto.md: with structured replies a READ is never answered with a simple reply.
            self._send(sr.error_chunk(cookie, error, f"{name} {length}@{offset} refused"), None, error)
        else:
            self._reply(cookie, error)

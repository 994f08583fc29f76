"""Sans-IO codec for the NBD transmission phase (simple replies only).

`RequestParser` is the state machine every connection runs: it says how many
bytes it needs next (`next_read_size`), and the socket loop reads exactly
that (a header into a reused buffer, a WRITE payload into its pooled buffer)
and hands it over.  `RequestDecoder.feed(data)` is a thin buffer over the
same parser for callers that have arbitrary chunks (tests, fuzzers): it
buffers bytes (``b""`` means end of stream) and returns every request
completed so far.  `encode_reply()` builds the 16-byte simple reply header.
Nothing here touches a socket, a file or a clock.

Framing rules:

* Only ``NBD_CMD_WRITE`` carries a payload.  Without structured replies or
  extended headers the request header has no payload-length field, so a
  command this module does not know cannot be framed if the client meant it
  to carry data; unknown types are therefore parsed as payload-less requests
  (the server answers them with an error) and a client that sent data after
  one has desynchronised the stream, which shows up as a bad magic on the
  next header.
* A WRITE longer than ``NBD_MAX_PAYLOAD`` is `OversizedWrite` (a
  `RemoteProtocolError` carrying the cookie): its payload is too big to
  buffer and skipping it silently would let a client stream unbounded data
  at us, so the server answers that cookie with EINVAL and closes.  Other commands may carry any 32-bit length
  (TRIM and WRITE_ZEROES legitimately exceed the payload limit; an oversized
  READ is answered with EINVAL by the server).
* After ``NBD_CMD_DISC`` the client must send nothing more.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import struct
from typing import Final

from ..errors import LocalProtocolError, RemoteProtocolError
from .constants import (
    NBD_CMD_DISC,
    NBD_CMD_NAMES,
    NBD_CMD_WRITE,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOMEM,
    NBD_ENOSPC,
    NBD_ENOTSUP,
    NBD_EOVERFLOW,
    NBD_EPERM,
    NBD_ESHUTDOWN,
    NBD_MAX_PAYLOAD,
    NBD_REQUEST_MAGIC,
    NBD_REQUEST_SIZE,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_SIMPLE_REPLY_SIZE,
)

Buffer = bytes | bytearray | memoryview

REQUEST_HEADER: Final = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY: Final = struct.Struct(">IIQ")  # magic, error, cookie
COOKIE: Final = struct.Struct(">Q")  # a reply's cookie, at byte 8 of both reply headers
assert REQUEST_HEADER.size == NBD_REQUEST_SIZE and SIMPLE_REPLY.size == NBD_SIMPLE_REPLY_SIZE

MAX_INCOMPLETE_SIZE: Final = NBD_REQUEST_SIZE + NBD_MAX_PAYLOAD

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF


def command_name(type_: int) -> str:
    return NBD_CMD_NAMES.get(type_, f"unknown command {type_}")


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """One transmission-phase request; `data` is the payload of a WRITE, else empty."""

    type: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: Buffer = b""

    def __post_init__(self) -> None:
        for field, value, limit in (
            ("type", self.type, _U16),
            ("flags", self.flags, _U16),
            ("cookie", self.cookie, _U64),
            ("offset", self.offset, _U64),
            ("length", self.length, _U32),
        ):
            if not 0 <= value <= limit:
                raise LocalProtocolError(f"request {field} {value} does not fit its field (0..{limit})")
        expected = self.length if self.type == NBD_CMD_WRITE else 0
        if len(self.data) != expected:
            raise LocalProtocolError(
                f"{command_name(self.type)} request carries {len(self.data)} data bytes, expected {expected}"
            )

    def pack(self) -> bytes:
        """The request as a client sends it (header plus WRITE payload)."""
        header = REQUEST_HEADER.pack(NBD_REQUEST_MAGIC, self.flags, self.type, self.cookie, self.offset, self.length)
        return header + bytes(self.data)


def encode_reply(cookie: int, error: int = 0) -> bytes:
    """The 16-byte simple reply header; a successful READ's data follows it."""
    if not 0 <= error <= _U32 or not 0 <= cookie <= _U64:
        raise LocalProtocolError(f"reply error {error} or cookie {cookie} does not fit its field")
    return SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


# proto.md lists the errors a reply may carry; the rest are mapped to the nearest one
# (EDQUOT and EFBIG are "no space", as proto.md suggests; EROFS and EACCES are EPERM).
_NBD_ERRORS: Final = {
    errno.EPERM: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_error(number: int) -> int:
    """The NBD reply error for a Linux errno (from vhdblkd.request); EIO when NBD has no nearer one."""
    return _NBD_ERRORS.get(number, NBD_EIO)


def decode_reply(buf: Buffer) -> tuple[int, int]:
    """Parse a simple reply header into (cookie, error); for clients and tests."""
    if len(buf) < NBD_SIMPLE_REPLY_SIZE:
        raise RemoteProtocolError(f"reply header truncated: {len(buf)} of {NBD_SIMPLE_REPLY_SIZE} bytes")
    magic, error, cookie = SIMPLE_REPLY.unpack_from(buf)
    if magic != NBD_SIMPLE_REPLY_MAGIC:
        raise RemoteProtocolError(f"bad reply magic: expected {NBD_SIMPLE_REPLY_MAGIC:#010x}, found {magic:#010x}")
    return cookie, error


class State(enum.Enum):
    # Members are singletons: identity hashing is correct, and C-level (Enum's own
    # __hash__ is Python code, run twice per TRANSITIONS lookup on every request).
    __hash__ = object.__hash__

    HEADER = "waiting for a request header"
    PAYLOAD = "waiting for a WRITE payload"
    DISCONNECTED = "client sent DISC"
    CLOSED = "end of stream"
    ERROR = "protocol error"


class Event(enum.Enum):
    __hash__ = object.__hash__  # as State's

    REQUEST = "request without payload"
    WRITE_HEADER = "WRITE header"
    PAYLOAD = "WRITE payload"
    DISC = "DISC request"
    DATA = "more bytes"
    EOF = "end of stream"


# The whole state machine; a pair missing here is a protocol violation.
TRANSITIONS: Final[dict[tuple[State, Event], State]] = {
    (State.HEADER, Event.REQUEST): State.HEADER,
    (State.HEADER, Event.WRITE_HEADER): State.PAYLOAD,
    (State.HEADER, Event.DISC): State.DISCONNECTED,
    (State.HEADER, Event.DATA): State.HEADER,
    (State.HEADER, Event.EOF): State.CLOSED,
    (State.PAYLOAD, Event.PAYLOAD): State.HEADER,
    (State.PAYLOAD, Event.DATA): State.PAYLOAD,
    (State.DISCONNECTED, Event.EOF): State.CLOSED,
    (State.CLOSED, Event.EOF): State.CLOSED,
}


class OversizedWrite(RemoteProtocolError):
    """A WRITE longer than the payload limit: answer `cookie` with EINVAL, then close the connection.

    The payload cannot be skipped safely (a client could stream unbounded
    data at us), so nothing after this header is read.
    """

    def __init__(self, cookie: int, length: int) -> None:
        super().__init__(f"WRITE of {length} bytes exceeds the {NBD_MAX_PAYLOAD}-byte payload limit")
        self.cookie = cookie


_HEADER: Final = State.HEADER
_PAYLOAD: Final = State.PAYLOAD
# Commands whose header changes the state (a WRITE waits for its payload; DISC ends the stream):
# any other header leaves the parser in HEADER, so the hot path skips the table for them.
_FRAMING: Final = frozenset({NBD_CMD_WRITE, NBD_CMD_DISC})
assert TRANSITIONS[(State.HEADER, Event.REQUEST)] is State.HEADER
# A WRITE's two steps, looked up once: every WRITE takes both.
_AFTER_WRITE_HEADER: Final = TRANSITIONS[(State.HEADER, Event.WRITE_HEADER)]
_AFTER_PAYLOAD: Final = TRANSITIONS[(State.PAYLOAD, Event.PAYLOAD)]
_unpack_header: Final = REQUEST_HEADER.unpack_from


class RequestParser:
    """The transmission phase's state machine over exact reads: the parser that serves connections.

    The caller reads `next_read_size` bytes (0: read nothing more) and passes
    them on: a 28-byte header to `header`, a WRITE's payload to `payload`,
    and the end of the stream to `eof`.  So a socket loop can receive a
    header into a reused buffer and a payload straight into its own pooled
    buffer, with no copy here.  Errors are `RemoteProtocolError`s and
    sticky: the state stays `ERROR`.
    """

    __slots__ = ("state", "next_read_size")

    def __init__(self) -> None:
        self.state = State.HEADER
        self.next_read_size = NBD_REQUEST_SIZE

    def _transition(self, event: Event) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            state, self.state = self.state, State.ERROR
            self.next_read_size = 0
            raise RemoteProtocolError(f"{event.value} is not allowed in state {state.name} ({state.value})") from None

    def _fail(self, error: RemoteProtocolError) -> RemoteProtocolError:
        self.state = State.ERROR
        self.next_read_size = 0
        return error

    def header(self, buf: Buffer) -> tuple[int, int, int, int, int, int]:
        """Parse a whole header: its fields as sent, (magic, flags, type, cookie, offset, length).

        Call it only in state HEADER (when `next_read_size` asks for a header);
        a header fed in another state is caught only if it changes the state.

        After a WRITE with data, `next_read_size` is its length: read that
        and pass it to `payload`.  After DISC it is 0.
        """
        fields: tuple[int, int, int, int, int, int] = _unpack_header(buf)
        # Only HEADER asks for a header (next_read_size), so a request that leaves the state
        # as it is needs no table lookup; the rest go through _frame, which checks the state.
        if fields[0] == NBD_REQUEST_MAGIC:
            if fields[2] not in _FRAMING:
                return fields
            if fields[2] == NBD_CMD_WRITE and 0 < fields[5] <= NBD_MAX_PAYLOAD and self.state is _HEADER:
                self.state = _AFTER_WRITE_HEADER
                self.next_read_size = fields[5]
                return fields
        self._frame(*fields)
        return fields

    def _frame(self, magic: int, flags: int, type_: int, cookie: int, offset: int, length: int) -> None:
        if self.state is not _HEADER:
            self._transition(Event.REQUEST)  # raises: a header is only read in HEADER
        if magic != NBD_REQUEST_MAGIC:
            raise self._fail(
                RemoteProtocolError(f"bad request magic: expected {NBD_REQUEST_MAGIC:#010x}, found {magic:#010x}")
            )
        if type_ == NBD_CMD_DISC:
            self._transition(Event.DISC)
            self.next_read_size = 0
        elif type_ == NBD_CMD_WRITE and length:
            if length > NBD_MAX_PAYLOAD:
                raise self._fail(OversizedWrite(cookie, length))
            self._transition(Event.WRITE_HEADER)
            self.next_read_size = length
        elif type_ != NBD_CMD_WRITE:
            self._transition(Event.REQUEST)

    def payload(self, data: Buffer) -> None:
        """The WRITE payload announced by the last header: exactly `next_read_size` bytes (the caller reads them)."""
        if self.state is not _PAYLOAD:
            self._transition(Event.PAYLOAD)  # raises: no WRITE awaits its payload
        self.state = _AFTER_PAYLOAD
        self.next_read_size = NBD_REQUEST_SIZE

    def eof(self, received: int = 0) -> None:
        """The stream ended `received` bytes into the next read; raises unless that is between requests."""
        if received or self.state is State.PAYLOAD:
            need, state = self.next_read_size, self.state
            raise self._fail(
                RemoteProtocolError(
                    f"stream ended inside a request: {received} of {need} bytes received ({state.name})"
                )
            )
        self._transition(Event.EOF)
        self.next_read_size = 0

    def more_data(self) -> None:
        """Bytes arrived: an error once the stream is over (after DISC or EOF)."""
        self._transition(Event.DATA)


class RequestDecoder:
    """Turns the client's byte stream into `Request`s: a buffer over `RequestParser`; errors are sticky."""

    def __init__(self) -> None:
        self.parser = RequestParser()
        self._buffer = bytearray()
        self._header: tuple[int, int, int, int, int, int] | None = None  # a WRITE's, awaiting its payload
        self._error: RemoteProtocolError | None = None  # deferred so requests completed before it are returned

    @property
    def state(self) -> State:
        return self.parser.state

    def feed(self, data: Buffer) -> list[Request]:
        """Buffer `data` (``b""`` = end of stream); return the requests it completed.

        A protocol error found after some requests completed in the same call
        is raised by the next call instead (as h11 does), so the caller can
        still answer the requests that preceded it; the state is `ERROR`
        from the moment it is found.
        """
        if self.state is State.ERROR:
            error, self._error = self._error, None
            if error is not None:
                raise error
            raise RemoteProtocolError("the request stream already failed; no further input is accepted")
        out: list[Request] = []
        try:
            self._feed(data, out)
        except RemoteProtocolError as exc:
            self.parser.state = State.ERROR
            if not out:
                raise
            self._error = exc
        return out

    def _feed(self, data: Buffer, out: list[Request]) -> None:
        parser = self.parser
        if not data:
            parser.eof(len(self._buffer))
            return
        parser.more_data()
        self._buffer += data
        while parser.next_read_size and len(self._buffer) >= parser.next_read_size:
            need = parser.next_read_size
            chunk = bytes(self._buffer[:need])
            del self._buffer[:need]
            if self._header is not None:
                parser.payload(chunk)
                _, flags, type_, cookie, offset, length = self._header
                self._header = None
                out.append(Request(type_, flags, cookie, offset, length, chunk))
                continue
            fields = parser.header(chunk)
            if parser.state is State.PAYLOAD:
                self._header = fields
                continue
            _, flags, type_, cookie, offset, length = fields
            out.append(Request(type_, flags, cookie, offset, length))
        if self._buffer:
            parser.more_data()  # bytes after DISC (or past the end) break the protocol
        if len(self._buffer) > MAX_INCOMPLETE_SIZE:  # unreachable while the parser caps payloads; kept as a guard
            raise RemoteProtocolError(f"{len(self._buffer)} bytes buffered without completing a request")

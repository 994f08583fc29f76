"""Sans-IO codec for the NBD transmission phase (simple replies only).

`RequestDecoder.feed(data)` buffers bytes (``b""`` means end of stream) and
returns every request completed so far; `encode_reply()` builds the 16-byte
simple reply header.  Nothing here touches a socket, a file or a clock.

Framing rules:

* Only ``NBD_CMD_WRITE`` carries a payload.  Without structured replies or
  extended headers the request header has no payload-length field, so a
  command this module does not know cannot be framed if the client meant it
  to carry data; unknown types are therefore parsed as payload-less requests
  (the server answers them with an error) and a client that sent data after
  one has desynchronised the stream, which shows up as a bad magic on the
  next header.
* A WRITE longer than ``NBD_MAX_PAYLOAD`` is a `RemoteProtocolError`: its
  payload is too big to buffer and skipping it silently would let a client
  stream unbounded data at us.  Other commands may carry any 32-bit length
  (TRIM and WRITE_ZEROES legitimately exceed the payload limit; an oversized
  READ is answered with EINVAL by the server).
* After ``NBD_CMD_DISC`` the client must send nothing more.

The server's hot path reuses `REQUEST_HEADER` and `check_header` so the
decoder here and the socket loop validate requests with the same code.
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
assert REQUEST_HEADER.size == NBD_REQUEST_SIZE and SIMPLE_REPLY.size == NBD_SIMPLE_REPLY_SIZE

MAX_INCOMPLETE_SIZE: Final = NBD_REQUEST_SIZE + NBD_MAX_PAYLOAD

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF


def command_name(type_: int) -> str:
    return NBD_CMD_NAMES.get(type_, f"unknown command {type_}")


def check_header(magic: int, type_: int, length: int) -> int:
    """Validate a request header's framing; return how many payload bytes follow it."""
    if magic != NBD_REQUEST_MAGIC:
        raise RemoteProtocolError(f"bad request magic: expected {NBD_REQUEST_MAGIC:#010x}, found {magic:#010x}")
    if type_ != NBD_CMD_WRITE:
        return 0
    if length > NBD_MAX_PAYLOAD:
        raise RemoteProtocolError(f"WRITE of {length} bytes exceeds the {NBD_MAX_PAYLOAD}-byte payload limit")
    return length


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
    HEADER = "waiting for a request header"
    PAYLOAD = "waiting for a WRITE payload"
    DISCONNECTED = "client sent DISC"
    CLOSED = "end of stream"
    ERROR = "protocol error"


class Event(enum.Enum):
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


class RequestDecoder:
    """Turns the client's byte stream into `Request`s; errors are sticky."""

    def __init__(self) -> None:
        self.state = State.HEADER
        self._buffer = bytearray()
        self._pending: tuple[int, int, int, int, int] | None = None  # header of a WRITE awaiting its payload
        self._error: RemoteProtocolError | None = None  # deferred so requests completed before it are returned

    def _transition(self, event: Event) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            state, self.state = self.state, State.ERROR
            raise RemoteProtocolError(f"{event.value} is not allowed in state {state.name} ({state.value})") from None

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
            self.state = State.ERROR
            if not out:
                raise
            self._error = exc
        return out

    def _feed(self, data: Buffer, out: list[Request]) -> None:
        if not data:
            if self._buffer or self.state is State.PAYLOAD:
                need = NBD_REQUEST_SIZE if self._pending is None else self._pending[4]
                raise RemoteProtocolError(
                    f"stream ended inside a request: {len(self._buffer)} of {need} bytes received ({self.state.name})"
                )
            self._transition(Event.EOF)
            return
        self._transition(Event.DATA)
        self._buffer += data
        while True:
            if self._pending is not None:
                type_, flags, cookie, offset, length = self._pending
                if len(self._buffer) < length:
                    break
                payload = bytes(self._buffer[:length])
                del self._buffer[:length]
                self._pending = None
                self._transition(Event.PAYLOAD)
                out.append(Request(type_, flags, cookie, offset, length, payload))
                continue
            if len(self._buffer) < NBD_REQUEST_SIZE:
                break
            if self.state is State.DISCONNECTED:
                self._transition(Event.DATA)
            magic, flags, type_, cookie, offset, length = REQUEST_HEADER.unpack_from(self._buffer)
            payload_length = check_header(magic, type_, length)
            del self._buffer[:NBD_REQUEST_SIZE]
            if payload_length:
                self._transition(Event.WRITE_HEADER)
                self._pending = (type_, flags, cookie, offset, length)
                continue
            self._transition(Event.DISC if type_ == NBD_CMD_DISC else Event.REQUEST)
            out.append(Request(type_, flags, cookie, offset, length))
        if self.state is State.DISCONNECTED and self._buffer:
            self._transition(Event.DATA)
        if len(self._buffer) > MAX_INCOMPLETE_SIZE:  # unreachable while check_header caps payloads; kept as a guard
            raise RemoteProtocolError(f"{len(self._buffer)} bytes buffered without completing a request")

"""Sans-IO server side of the fixed-newstyle NBD handshake.

`ServerHandshake.greeting()` is the server's opening (NBDMAGIC, IHAVEOPT,
handshake flags); `feed(data)` buffers the client's bytes and returns the
bytes to send back.  When `state` becomes `TRANSMISSION` the chosen export is
in `export` and any bytes the client sent after its last option are in
`trailing_data`.  `next_read_size` tells an I/O loop how many bytes would
complete the next message, so it never reads past the handshake.

Supported options: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY
(acknowledged only when the transmission side offers it), LIST/SET_META_CONTEXT
(the contexts each export names) and STARTTLS.  Export names are matched
exactly; the empty name selects the default export.

TLS: after STARTTLS is acknowledged the state is `TLS_UPGRADE`; the I/O
loop runs the TLS handshake and calls `tls_ready()`, which forgets what was
negotiated before (proto.md: no state survives STARTTLS) and resumes option
haggling.  With `TlsMode.REQUIRE` every option but STARTTLS and ABORT is
answered NBD_REP_ERR_TLS_REQD until then, and EXPORT_NAME (which cannot be
refused) ends the connection.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Mapping, Sequence
from typing import Final

from ..errors import LocalProtocolError, RemoteProtocolError
from . import metacontext
from .constants import (
    IHAVEOPT,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_MAX_PAYLOAD,
    NBD_MAX_STRING,
    NBD_MIN_BLOCK_SIZE,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_REPLY_MAGIC,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_PREFERRED_BLOCK_SIZE,
    NBD_REP_ACK,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    NBD_ZERO_PAD_LEN,
    NBDMAGIC,
)

Buffer = bytes | bytearray | memoryview

GREETING: Final = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS: Final = struct.Struct(">I")
OPTION_HEADER: Final = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY: Final = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")  # size, transmission flags
INFO_EXPORT: Final = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum

SERVER_HANDSHAKE_FLAGS: Final = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
KNOWN_CLIENT_FLAGS: Final = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
# The longest legitimate option is SET/LIST_META_CONTEXT: u32 name length, a
# name of at most NBD_MAX_STRING bytes, u32 count and up to MAX_QUERIES
# queries of at most NBD_MAX_STRING bytes each (INFO/GO are far shorter).
MAX_OPTION_LENGTH: Final = 4 + NBD_MAX_STRING + 4 + metacontext.MAX_QUERIES * (4 + NBD_MAX_STRING)
DEFAULT_BLOCK_SIZES: Final = (NBD_MIN_BLOCK_SIZE, NBD_PREFERRED_BLOCK_SIZE, NBD_MAX_PAYLOAD)


@dataclasses.dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake tells a client about one export."""

    name: str
    size: int
    flags: int
    description: str = ""
    contexts: tuple[str, ...] = ()  # metadata contexts BLOCK_STATUS can answer for
    block_sizes: tuple[int, int, int] = DEFAULT_BLOCK_SIZES  # minimum, preferred, maximum

    def __post_init__(self) -> None:
        if len(self.name.encode()) > NBD_MAX_STRING or len(self.description.encode()) > NBD_MAX_STRING:
            raise LocalProtocolError(f"export name or description longer than {NBD_MAX_STRING} bytes")
        if not 0 <= self.size < 1 << 64 or not 0 <= self.flags < 1 << 16:
            raise LocalProtocolError(f"export size {self.size} or flags {self.flags:#x} do not fit their fields")
        low, preferred, high = self.block_sizes
        # proto.md: powers of two, min <= 64 KiB, preferred >= min, max a multiple of min.
        if not all(v > 0 and v & (v - 1) == 0 for v in (low, preferred)) or low > 65536 or preferred < low or (
            high % low or high < preferred or high >= 1 << 32
        ):
            raise LocalProtocolError(f"block sizes {self.block_sizes} break the NBD_INFO_BLOCK_SIZE rules")


class TlsMode(enum.Enum):
    OFF = "off"  # STARTTLS refused with ERR_POLICY
    ON = "on"  # STARTTLS accepted; plain clients too
    REQUIRE = "require"  # nothing but STARTTLS and ABORT before the upgrade


class State(enum.Enum):
    CLIENT_FLAGS = "waiting for the client flags"
    OPTIONS = "option haggling"
    TLS_UPGRADE = "STARTTLS acknowledged; the TLS handshake is due"
    TRANSMISSION = "export chosen; transmission phase"
    ABORTED = "client aborted the handshake"
    CLOSED = "stream ended during the handshake"
    ERROR = "protocol error"


class Event(enum.Enum):
    CLIENT_FLAGS = "client flags"
    OPTION = "option"
    ABORT = "NBD_OPT_ABORT"
    CHOSEN = "export chosen"
    STARTTLS = "NBD_OPT_STARTTLS acknowledged"
    TLS_READY = "TLS established"
    EOF = "end of stream"


TRANSITIONS: Final[dict[tuple[State, Event], State]] = {
    (State.CLIENT_FLAGS, Event.CLIENT_FLAGS): State.OPTIONS,
    (State.CLIENT_FLAGS, Event.EOF): State.CLOSED,
    (State.OPTIONS, Event.OPTION): State.OPTIONS,
    (State.OPTIONS, Event.ABORT): State.ABORTED,
    (State.OPTIONS, Event.CHOSEN): State.TRANSMISSION,
    (State.OPTIONS, Event.EOF): State.CLOSED,
    (State.OPTIONS, Event.STARTTLS): State.TLS_UPGRADE,
    (State.TLS_UPGRADE, Event.TLS_READY): State.OPTIONS,
    (State.TLS_UPGRADE, Event.EOF): State.CLOSED,
    (State.ABORTED, Event.EOF): State.ABORTED,
}


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(NBD_OPT_REPLY_MAGIC, option, reply_type, len(data)) + data


class ServerHandshake:
    """Negotiates one connection against a fixed set of exports ("" = the default)."""

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        default: str | None = None,
        *,
        structured: bool = False,
        tls: TlsMode = TlsMode.OFF,
    ) -> None:
        self._exports = dict(exports)
        if default is not None:
            self._exports.setdefault("", self._exports[default])
        self._offer_structured = structured  # the transmission side can send structured replies
        self.tls_mode = tls
        self.state = State.CLIENT_FLAGS
        self.no_zeroes = False
        self.fixed_newstyle = False
        self.tls_active = False
        self.export: ExportInfo | None = None
        self.structured = False  # negotiated with NBD_OPT_STRUCTURED_REPLY
        self.meta_contexts: dict[int, str] = {}  # id -> name, for the chosen export
        self._meta_export: ExportInfo | None = None  # what the last SET_META_CONTEXT named
        self._meta_selected: dict[int, str] = {}
        self.trailing_data = b""
        self._buffer = bytearray()
        self._error: RemoteProtocolError | None = None  # deferred so replies produced before it are returned

    @staticmethod
    def greeting() -> bytes:
        return GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)

    @property
    def next_read_size(self) -> int:
        """Bytes still needed to complete the message being received (0 once negotiation ended)."""
        if self.state is State.CLIENT_FLAGS:
            return CLIENT_FLAGS.size - len(self._buffer)
        if self.state is not State.OPTIONS:
            return 0
        if len(self._buffer) < OPTION_HEADER.size:
            return OPTION_HEADER.size - len(self._buffer)
        length: int = OPTION_HEADER.unpack_from(self._buffer)[2]
        return OPTION_HEADER.size + min(length, MAX_OPTION_LENGTH + 1) - len(self._buffer)

    def _current_state(self) -> State:
        return self.state

    def tls_ready(self) -> None:
        """The TLS handshake after STARTTLS succeeded: forget earlier options and haggle on."""
        self._transition(Event.TLS_READY)
        self.tls_active = True
        self.structured = False
        self._meta_export = None
        self._meta_selected = {}

    def _transition(self, event: Event) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            state, self.state = self.state, State.ERROR
            raise RemoteProtocolError(f"{event.value} is not allowed in handshake state {state.name}") from None

    def feed(self, data: Buffer) -> bytes:
        """Buffer client bytes (``b""`` = end of stream); return what the server must send.

        A protocol error found after replies were produced in the same call is
        raised by the next call instead (as h11 does), so those replies can
        still be sent; the state is `ERROR` from the moment it is found.
        """
        if self.state is State.ERROR:
            error, self._error = self._error, None
            if error is not None:
                raise error
            raise RemoteProtocolError("the handshake already failed; no further input is accepted")
        out = bytearray()
        try:
            self._feed(data, out)
        except RemoteProtocolError as exc:
            self.state = State.ERROR
            if not out:
                raise
            self._error = exc
        return bytes(out)

    def _feed(self, data: Buffer, out: bytearray) -> None:  # noqa: C901  one message loop over the two handshake states
        if not data:
            if self._buffer and self.state in (State.CLIENT_FLAGS, State.OPTIONS):
                raise RemoteProtocolError(f"stream ended inside a handshake message ({len(self._buffer)} bytes)")
            self._transition(Event.EOF)
            return
        if self.state is State.TRANSMISSION:
            self.trailing_data += bytes(data)
            return
        if self.state is State.ABORTED:
            return  # the client must hang up after ABORT; whatever follows it is moot, however it is chunked
        if self.state is not State.CLIENT_FLAGS and self.state is not State.OPTIONS:
            raise RemoteProtocolError(f"client sent data in handshake state {self.state.name}")
        self._buffer += data
        while self.state in (State.CLIENT_FLAGS, State.OPTIONS):
            if self.state is State.CLIENT_FLAGS:
                if len(self._buffer) < CLIENT_FLAGS.size:
                    break
                (flags,) = CLIENT_FLAGS.unpack_from(self._buffer)
                del self._buffer[: CLIENT_FLAGS.size]
                if flags & ~KNOWN_CLIENT_FLAGS:
                    raise RemoteProtocolError(f"unknown client flags {flags:#x}")
                self.fixed_newstyle = bool(flags & NBD_FLAG_C_FIXED_NEWSTYLE)
                self.no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
                self._transition(Event.CLIENT_FLAGS)
                continue
            if len(self._buffer) < OPTION_HEADER.size:
                break
            magic, option, length = OPTION_HEADER.unpack_from(self._buffer)
            if magic != IHAVEOPT:
                raise RemoteProtocolError(f"bad option magic: expected {IHAVEOPT:#x}, found {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise RemoteProtocolError(f"option {option} carries {length} bytes, more than {MAX_OPTION_LENGTH}")
            if len(self._buffer) < OPTION_HEADER.size + length:
                break
            payload = bytes(self._buffer[OPTION_HEADER.size : OPTION_HEADER.size + length])
            del self._buffer[: OPTION_HEADER.size + length]
            out += self._option(option, payload)
        ended = self._current_state()  # re-read: the loop body changed it behind mypy's narrowing
        if ended is State.TRANSMISSION:
            self.trailing_data = bytes(self._buffer)
            self._buffer.clear()
        elif ended is State.ABORTED:
            self._buffer.clear()  # the client must hang up; whatever followed ABORT is moot
        elif ended is State.TLS_UPGRADE and self._buffer:
            # The I/O loop reads only up to the end of each option, so this is a test feeding
            # more; such bytes could only be the client's TLS hello, which is not ours to parse.
            raise RemoteProtocolError(f"{len(self._buffer)} bytes arrived behind STARTTLS before its reply")

    def _option(self, option: int, data: bytes) -> bytes:
        if option == NBD_OPT_ABORT:
            self._transition(Event.ABORT)
            return option_reply(option, NBD_REP_ACK)
        if self.tls_mode is TlsMode.REQUIRE and not self.tls_active and option != NBD_OPT_STARTTLS:
            if option == NBD_OPT_EXPORT_NAME:
                # EXPORT_NAME cannot be answered with an error: proto.md says hang up.
                raise RemoteProtocolError("client chose an export with NBD_OPT_EXPORT_NAME before STARTTLS; TLS is required")
            self._transition(Event.OPTION)
            return option_reply(option, NBD_REP_ERR_TLS_REQD, b"this server requires TLS: send NBD_OPT_STARTTLS first")
        if option == NBD_OPT_EXPORT_NAME:
            return self._export_name(data)
        if option == NBD_OPT_STARTTLS:
            return self._starttls(data)
        self._transition(Event.OPTION)
        return self._haggle(option, data)

    def _haggle(self, option: int, data: bytes) -> bytes:
        """The options that leave the handshake in OPTIONS."""
        if option == NBD_OPT_LIST:
            if data:
                return option_reply(option, NBD_REP_ERR_INVALID, b"LIST takes no data")
            names = sorted({info.name for info in self._exports.values()})
            replies = [option_reply(option, NBD_REP_SERVER, struct.pack(">I", len(n.encode())) + n.encode()) for n in names]
            return b"".join(replies) + option_reply(option, NBD_REP_ACK)
        if option in (NBD_OPT_INFO, NBD_OPT_GO):
            return self._info(option, data)
        if option == NBD_OPT_STRUCTURED_REPLY:
            if data:
                return option_reply(option, NBD_REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")
            if not self._offer_structured:
                return option_reply(option, NBD_REP_ERR_UNSUP, b"this connection speaks simple replies only")
            self.structured = True
            return option_reply(option, NBD_REP_ACK)
        if option in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
            return self._meta_context(option, data)
        return option_reply(option, NBD_REP_ERR_UNSUP, b"option not supported")

    def _starttls(self, data: bytes) -> bytes:
        self._transition(Event.OPTION)
        if data:
            return option_reply(NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID, b"STARTTLS takes no data")
        if self.tls_mode is TlsMode.OFF:
            return option_reply(NBD_OPT_STARTTLS, NBD_REP_ERR_POLICY, b"TLS is not configured on this server")
        if self.tls_active:
            return option_reply(NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID, b"TLS is already established")
        self._transition(Event.STARTTLS)
        return option_reply(NBD_OPT_STARTTLS, NBD_REP_ACK)

    def _meta_context(self, option: int, data: bytes) -> bytes:
        setting = option == NBD_OPT_SET_META_CONTEXT
        if setting:
            # proto.md: SET replaces the selection even when it fails.
            self._meta_export, self._meta_selected = None, {}
        if not self.structured:
            return option_reply(option, NBD_REP_ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first")
        try:
            raw_name, queries = metacontext.parse(data)
        except metacontext.BadMetaRequest as exc:
            return option_reply(option, NBD_REP_ERR_INVALID, str(exc).encode())
        name = self._decode_name(raw_name)
        info = self._exports.get(name) if name is not None else None
        if info is None:
            return option_reply(option, NBD_REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
        if setting:
            names = metacontext.for_set(info.contexts, queries)
            self._meta_export = info
            self._meta_selected = {metacontext.context_id(info.contexts, n): n for n in names}
            items: Sequence[tuple[int, str]] = sorted(self._meta_selected.items())
        else:
            items = [(0, n) for n in metacontext.for_list(info.contexts, queries)]  # LIST ids are reserved: 0
        out = b"".join(option_reply(option, NBD_REP_META_CONTEXT, struct.pack(">I", i) + n.encode()) for i, n in items)
        return out + option_reply(option, NBD_REP_ACK)

    def _choose(self, info: ExportInfo) -> None:
        self.export = info
        # Contexts count only when the last SET named the export chosen now (proto.md).
        self.meta_contexts = dict(self._meta_selected) if self._meta_export is info else {}
        self._transition(Event.CHOSEN)

    def _export_name(self, data: bytes) -> bytes:
        name = self._decode_name(data)
        info = self._exports.get(name) if name is not None else None
        if info is None:
            # No way to send an error after EXPORT_NAME: the spec says hang up.
            raise RemoteProtocolError(f"client asked for unknown export {name!r} with NBD_OPT_EXPORT_NAME")
        self._choose(info)
        pad = b"" if self.no_zeroes else bytes(NBD_ZERO_PAD_LEN)
        return EXPORT_NAME_REPLY.pack(info.size, info.flags) + pad

    @staticmethod
    def _decode_name(data: bytes) -> str | None:
        try:
            return data.decode()
        except UnicodeDecodeError:
            return None

    def _info(self, option: int, data: bytes) -> bytes:
        if len(data) < 6:
            return option_reply(option, NBD_REP_ERR_INVALID, b"INFO/GO data too short")
        (name_length,) = struct.unpack_from(">I", data)
        if name_length > len(data) - 6:
            return option_reply(option, NBD_REP_ERR_INVALID, b"export name length exceeds the option")
        name = self._decode_name(data[4 : 4 + name_length])
        (count,) = struct.unpack_from(">H", data, 4 + name_length)
        if len(data) != 4 + name_length + 2 + 2 * count:
            return option_reply(option, NBD_REP_ERR_INVALID, b"information request count does not match the length")
        if name is None:
            return option_reply(option, NBD_REP_ERR_INVALID, b"export name is not UTF-8")
        requests = set(struct.unpack_from(f">{count}H", data, 4 + name_length + 2))
        info = self._exports.get(name)
        if info is None:
            return option_reply(option, NBD_REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
        out = option_reply(option, NBD_REP_INFO, INFO_EXPORT.pack(NBD_INFO_EXPORT, info.size, info.flags))
        if NBD_INFO_NAME in requests:
            out += option_reply(option, NBD_REP_INFO, struct.pack(">H", NBD_INFO_NAME) + info.name.encode())
        if NBD_INFO_DESCRIPTION in requests and info.description:
            out += option_reply(
                option, NBD_REP_INFO, struct.pack(">H", NBD_INFO_DESCRIPTION) + info.description.encode()
            )
        # Sent even when not asked for: the server copes with any alignment
        # (the minimum is 1), so a client that ignores the item loses nothing.
        block_size = INFO_BLOCK_SIZE.pack(NBD_INFO_BLOCK_SIZE, *info.block_sizes)
        out += option_reply(option, NBD_REP_INFO, block_size)
        out += option_reply(option, NBD_REP_ACK)
        if option == NBD_OPT_GO:
            self._choose(info)
        return out

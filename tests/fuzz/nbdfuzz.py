"""NBD fuzz targets, shared by the hypothesis tests and the atheris entry point.

An input is `mode:u8 split_seed:u8 stream`:
  mode 0: the transmission codec (RequestDecoder);
  mode 1: the server handshake (ServerHandshake);
  mode 2: a live serve_connection(handshake=True) over a socketpair on an in-memory
          backend that reports its allocation (structured replies, block status).
  mode 3: the same transmission stream to the codec and to a live
          serve_connection(handshake=False) (`compare_live`).
Modes 0 and 1 feed the stream whole and split at points drawn from the
split seed: only NbdError may escape, and both feedings must agree on every
request (or reply byte) produced, on whether and where the stream failed,
and on the final state.  Mode 2 sends the stream, half-closes, reads every
reply to EOF: serve_connection must return without raising.  Mode 3 checks
that the connection serves what the codec parses: the same cookies
answered in the same order, and a protocol error at the same place.
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading

from tests.fuzz.guard import time_limit
from tests.nbd.sparsemem import SparseMemoryBackend
from vhdblkd.backend import FuaMode
from vhdblkd.errors import NbdError
from vhdblkd.nbd import constants as c
from vhdblkd.nbd.codec import OversizedWrite, Request, RequestDecoder
from vhdblkd.nbd.handshake import ExportInfo, ServerHandshake
from vhdblkd.nbd.server import Export, serve_connection

TIME_LIMIT = 20.0
LIVE_SIZE = 256 * 1024
EXPORTS = {"disk": ExportInfo("disk", 1 << 20, c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_SEND_FLUSH, "a disk",
                              (c.META_BASE_ALLOCATION, c.META_QEMU_ALLOCATION_DEPTH)),
           "ro": ExportInfo("ro", 4096, c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_READ_ONLY)}


def _splits(stream: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    if seed == 0:
        return [stream[i : i + 1] for i in range(len(stream))]  # one byte at a time
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(1, 12)))) \
        if len(stream) > 1 else []
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True) if b > a]


def _decode(chunks: list[bytes]) -> tuple[list[Request], bool, str]:
    dec = RequestDecoder()
    out: list[Request] = []
    failed = False
    for chunk in [*chunks, b""]:
        try:
            out.extend(dec.feed(chunk))
        except NbdError:
            failed = True
            break
    return out, failed, dec.state.name


def run_codec(stream: bytes, seed: int) -> None:
    whole = _decode([stream] if stream else [])
    split = _decode(_splits(stream, seed))
    assert whole[1:] == split[1:], f"whole feed gave {whole}, split feed {split}"
    if not whole[1]:
        assert whole[0] == split[0], f"whole feed gave {whole}, split feed {split}"
    else:
        # feed() drops the requests it completed in the call that then failed (see
        # tests/fuzz/test_fuzz_nbd.py::test_requests_before_an_error_are_not_lost), so a whole feed
        # may see fewer of them than a split one; what it does see must agree.
        assert split[0][: len(whole[0])] == whole[0], f"whole feed gave {whole}, split feed {split}"


def _negotiate(chunks: list[bytes]) -> tuple[bytes, bool, str, str | None, bytes]:
    hs = ServerHandshake(EXPORTS, default="disk", structured=True)
    out = bytearray(hs.greeting())
    failed = False
    for chunk in [*chunks, b""]:
        try:
            out += hs.feed(chunk)
        except NbdError:
            failed = True
            break
    name = hs.export.name if hs.export is not None else None
    return bytes(out), failed, hs.state.name, name, hs.trailing_data


def run_handshake(stream: bytes, seed: int) -> None:
    whole = _negotiate([stream] if stream else [])
    split = _negotiate(_splits(stream, seed))
    if whole[2] == "ABORTED" and split[2] == "ERROR":
        # Bytes after ABORT are dropped when they arrive with it but refused when they come later
        # (tests/fuzz/test_fuzz_nbd.py::test_bytes_after_abort_are_treated_alike); both end the handshake.
        assert whole[0] == split[0][: len(whole[0])]
        return
    if whole[1]:
        # As the codec, feed() drops the replies it built in the call that then failed.
        assert whole[1:] == split[1:] and whole[0] == split[0][: len(whole[0])], (whole[1:4], split[1:4])
        return
    assert whole == split, f"whole feed gave {whole[1:4]}, split feed {split[1:4]}"


def _serve_and_send(
    export: Export, stream: bytes, *, handshake: bool
) -> tuple[socket.socket, threading.Thread, threading.Thread, list[BaseException]]:
    """Serve `export` on one end of a socketpair and send `stream` whole, then half-close, from the other.

    Returns the client end (its reading is the caller's), the server and sender threads (started),
    and the list that collects whatever serve_connection raised.  The server thread closes its end.
    """
    server_sock, client = socket.socketpair()
    client.settimeout(TIME_LIMIT)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            serve_connection(server_sock, export, handshake=handshake)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's assertion
            errors.append(exc)
        finally:
            server_sock.close()

    def send() -> None:
        try:
            client.sendall(stream)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may hang up first; that is allowed

    server = threading.Thread(target=serve, daemon=True)
    sender = threading.Thread(target=send, daemon=True)
    server.start()
    sender.start()
    return client, server, sender, errors


def run_live(stream: bytes) -> None:
    export = Export(SparseMemoryBackend(LIVE_SIZE), "disk")
    client, server, sender, errors = _serve_and_send(export, stream, handshake=True)
    try:
        while client.recv(65536):
            pass
    except ConnectionResetError:
        pass  # closed with our bytes unread: a hang-up all the same
    sender.join(TIME_LIMIT)
    server.join(TIME_LIMIT)
    client.close()
    assert not server.is_alive(), "serve_connection did not return after the client hung up"
    assert not errors, f"serve_connection raised {errors!r}"


class InlineBackend(SparseMemoryBackend):
    """Answers every request on the connection thread (native FUA, no FLUSH), so replies keep request order."""

    @property
    def can_flush(self) -> bool:
        return False

    @property
    def can_fua(self) -> FuaMode:
        return FuaMode.NATIVE


Verdict = tuple[list[int], bool]  # cookies answered in order; whether it ended with a protocol error


def codec_verdict(stream: bytes) -> tuple[Verdict, list[int | None]]:
    """What the codec says a server must answer; with each answer's READ length (to frame the replies)."""
    dec = RequestDecoder()
    cookies: list[int] = []
    reads: list[int | None] = []
    for chunk in (stream, b""):
        try:
            requests = dec.feed(chunk)
        except OversizedWrite as exc:  # answered with EINVAL, then the connection ends
            return (cookies + [exc.cookie], True), reads + [None]
        except NbdError:
            return (cookies, True), reads
        for req in requests:
            if req.type == c.NBD_CMD_DISC:
                return (cookies, False), reads  # nothing after DISC is read
            cookies.append(req.cookie)
            reads.append(req.length if req.type == c.NBD_CMD_READ else None)
    return (cookies, False), reads


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def live_verdict(stream: bytes, reads: list[int | None]) -> Verdict:
    """What serve_connection(handshake=False) answers to `stream`, sent whole and then half-closed."""
    warnings = _Warnings()
    logger = logging.getLogger("vhdblkd.nbd.connection")
    logger.addHandler(warnings)
    export = Export(InlineBackend(LIVE_SIZE), "disk")
    client, server, sender, errors = _serve_and_send(export, stream, handshake=False)
    cookies: list[int] = []
    try:
        while True:
            header = _recv_exact(client, c.NBD_SIMPLE_REPLY_SIZE)
            if not header:
                break
            magic, error, cookie = struct.unpack(">IIQ", header)
            assert magic == c.NBD_SIMPLE_REPLY_MAGIC, f"bad reply magic {magic:#x} after {cookies}"
            read = reads[len(cookies)] if len(cookies) < len(reads) else None
            cookies.append(cookie)
            if not error and read is not None:
                assert len(_recv_exact(client, read)) == read, "READ data cut short"
    finally:
        sender.join(TIME_LIMIT)
        server.join(TIME_LIMIT)
        logger.removeHandler(warnings)
        client.close()
    assert not server.is_alive(), "serve_connection did not return after the client hung up"
    assert not errors, f"serve_connection raised {errors!r}"
    return cookies, any("broke the protocol" in m for m in warnings.messages)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        try:
            got = sock.recv(n - len(out))
        except ConnectionResetError:
            got = b""
        if not got:
            assert not out, f"reply cut short: {len(out)} of {n} bytes"
            return b""
        out += got
    return bytes(out)


def compare_live(stream: bytes) -> None:
    """The connection answers what the codec parses (mode 3)."""
    expected, reads = codec_verdict(stream)
    got = live_verdict(stream, reads)
    assert got == expected, f"the codec says {expected}, the connection answered {got}"


def transmission_streams(data: bytes) -> list[bytes]:
    """The transmission-phase bytes in a fuzz input: its stream, and for a handshake, what follows it."""
    stream = data[2:]
    out = [stream]
    if data and data[0] % 4 in (1, 2):
        hs = ServerHandshake(EXPORTS, default="disk")
        hs.greeting()
        try:
            hs.feed(stream)
        except NbdError:
            return out
        if hs.state.name == "TRANSMISSION" and hs.trailing_data:
            out.append(bytes(hs.trailing_data))
    return out


def run(data: bytes) -> None:
    """The fuzz target (module docstring)."""
    mode = data[0] % 4 if data else 0
    seed = data[1] if len(data) > 1 else 0
    stream = data[2:]
    with time_limit(TIME_LIMIT):
        if mode == 0:
            run_codec(stream, seed)
        elif mode == 1:
            run_handshake(stream, seed)
        elif mode == 2:
            run_live(stream)
        else:
            compare_live(stream)


# --- seeds ------------------------------------------------------------------------


def request(type_: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 1, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, flags, type_, cookie, offset, length) + data


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data


def info_request(name: bytes, *items: int) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(items)) + b"".join(struct.pack(">H", i) for i in items)


CLIENT_FLAGS = struct.pack(">I", c.NBD_FLAG_C_FIXED_NEWSTYLE | c.NBD_FLAG_C_NO_ZEROES)
REQUESTS = (request(c.NBD_CMD_WRITE, 512, 8, c.NBD_CMD_FLAG_FUA, 1, b"ABCDEFGH") + request(c.NBD_CMD_READ, 0, 4096, 0, 2)
            + request(c.NBD_CMD_FLUSH, cookie=3) + request(c.NBD_CMD_TRIM, 4096, 4096, 0, 4)
            + request(c.NBD_CMD_WRITE_ZEROES, 0, 100, c.NBD_CMD_FLAG_NO_HOLE, 5) + request(c.NBD_CMD_CACHE, 0, 512, 0, 6)
            + request(c.NBD_CMD_DISC, cookie=7))


# Requests the server refuses or answers oddly, each still framed alike by codec and connection.
ODD_REQUESTS = (request(c.NBD_CMD_WRITE, 0, 0, 0, 10) + request(c.NBD_CMD_WRITE, 1 << 40, 4, 0, 11, b"late")
                + request(c.NBD_CMD_READ, 0, 0, 0, 12) + request(c.NBD_CMD_READ, 0, 4096, c.NBD_CMD_FLAG_DF, 13)
                + request(c.NBD_CMD_READ, 0, c.NBD_MAX_PAYLOAD + 1, 0, 14) + request(0x77, 0, 8, 0, 15)
                + request(c.NBD_CMD_BLOCK_STATUS, 0, 4096, 0, 16)
                + request(c.NBD_CMD_WRITE_ZEROES, 0, 4096, c.NBD_CMD_FLAG_FAST_ZERO, 17)
                + request(c.NBD_CMD_WRITE, 8192, 3, c.NBD_CMD_FLAG_FUA | 0x8000, 18, b"abc")
                + request(c.NBD_CMD_WRITE, 100, 5, c.NBD_CMD_FLAG_FUA, 19, b"hello"))


def meta_request(name: bytes, *queries: bytes) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries)


STRUCTURED = (option(c.NBD_OPT_STRUCTURED_REPLY) + option(c.NBD_OPT_LIST_META_CONTEXT, meta_request(b"disk"))
              + option(c.NBD_OPT_LIST_META_CONTEXT, meta_request(b"", b"base:", b"qemu:"))
              + option(c.NBD_OPT_SET_META_CONTEXT, meta_request(b"", b"base:allocation", b"qemu:allocation-depth")))
SPARSE_REQUESTS = (request(c.NBD_CMD_WRITE, 70000, 8, 0, 1, b"ABCDEFGH") + request(c.NBD_CMD_READ, 0, 131072, 0, 2)
                   + request(c.NBD_CMD_BLOCK_STATUS, 0, 200000, 0, 3)
                   + request(c.NBD_CMD_BLOCK_STATUS, 4096, 100, c.NBD_CMD_FLAG_REQ_ONE, 4)
                   + request(c.NBD_CMD_BLOCK_STATUS, 0, 0, 0, 5) + request(c.NBD_CMD_READ, 1 << 30, 10, 0, 6)
                   + request(c.NBD_CMD_TRIM, 65536, 8192, 0, 7) + request(c.NBD_CMD_READ, 60000, 70000, 0, 8)
                   + request(c.NBD_CMD_DISC, cookie=9))


def seed_programs() -> dict[str, bytes]:
    go = option(c.NBD_OPT_GO, info_request(b"", c.NBD_INFO_NAME, c.NBD_INFO_BLOCK_SIZE))
    negotiation = (CLIENT_FLAGS + option(c.NBD_OPT_LIST) + option(c.NBD_OPT_STRUCTURED_REPLY)
                   + option(c.NBD_OPT_INFO, info_request(b"disk", c.NBD_INFO_DESCRIPTION)) + go)
    return {
        "codec-requests": bytes([0, 3]) + REQUESTS,
        "codec-bytewise": bytes([0, 0]) + REQUESTS,
        "codec-big-write": bytes([0, 5]) + request(c.NBD_CMD_WRITE, 0, 3000, 0, 9, b"w" * 3000),
        "handshake-go": bytes([1, 1]) + negotiation + REQUESTS,
        "handshake-export-name": bytes([1, 0]) + struct.pack(">I", c.NBD_FLAG_C_FIXED_NEWSTYLE)
        + option(c.NBD_OPT_EXPORT_NAME, b"ro") + REQUESTS,
        "handshake-abort": bytes([1, 2]) + CLIENT_FLAGS + option(c.NBD_OPT_ABORT),
        "live-go": bytes([2, 0]) + negotiation + REQUESTS,
        "live-export-name": bytes([2, 0]) + CLIENT_FLAGS + option(c.NBD_OPT_EXPORT_NAME, b"disk") + REQUESTS,
        "handshake-structured": bytes([1, 4]) + CLIENT_FLAGS + STRUCTURED + go + SPARSE_REQUESTS,
        "live-structured": bytes([2, 0]) + CLIENT_FLAGS + STRUCTURED + go + SPARSE_REQUESTS,
        "live-structured-bytewise": bytes([2, 1]) + CLIENT_FLAGS + STRUCTURED
        + option(c.NBD_OPT_EXPORT_NAME, b"disk") + SPARSE_REQUESTS,
        "same-requests": bytes([3, 0]) + REQUESTS,
        "same-odd-requests": bytes([3, 0]) + ODD_REQUESTS + request(c.NBD_CMD_DISC, cookie=99),
        "same-oversized-write": bytes([3, 0]) + ODD_REQUESTS
        + request(c.NBD_CMD_WRITE, 0, c.NBD_MAX_PAYLOAD + 1, 0, 20) + b"x" * 100,
        "same-bad-magic": bytes([3, 0]) + ODD_REQUESTS + b"\x25\x60\x95\x14" + bytes(24),
        "same-data-after-disc": bytes([3, 0]) + request(c.NBD_CMD_READ, 0, 512, 0, 1)
        + request(c.NBD_CMD_DISC, cookie=2) + request(c.NBD_CMD_READ, 0, 512, 0, 3),
        "same-truncated-payload": bytes([3, 0]) + request(c.NBD_CMD_WRITE, 0, 600, 0, 1, b"z" * 600)
        + request(c.NBD_CMD_WRITE, 4096, 600, 0, 2, b"z" * 599),
        "same-truncated-header": bytes([3, 0]) + request(c.NBD_CMD_FLUSH, cookie=1) + request(c.NBD_CMD_READ)[:27],
    }

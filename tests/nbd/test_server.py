"""The transmission loop over socketpairs with in-memory backends."""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from vhdblkd.backend import Buffer, FuaMode, MemoryBackend
from vhdblkd.errors import CorruptImage, DiskFull
from vhdblkd.nbd import constants as c
from vhdblkd.nbd.server import Export, serve_connection, transmission_flags

from .client import Client, recv_exact

SIZE = 1 << 20

pytestmark = pytest.mark.timeout(60)


class RecordingBackend(MemoryBackend):
    """A MemoryBackend that logs calls and can fail on demand."""

    def __init__(self, size: int = SIZE, read_only: bool = False, fua: FuaMode = FuaMode.EMULATE) -> None:
        super().__init__(size, read_only)
        self.fua = fua
        self.calls: list[tuple[object, ...]] = []
        self.fail: BaseException | None = None

    @property
    def can_fua(self) -> FuaMode:
        return self.fua

    def _maybe_fail(self) -> None:
        if self.fail is not None:
            raise self.fail

    def read(self, offset: int, length: int) -> Buffer:
        self._maybe_fail()
        return super().read(offset, length)

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self._maybe_fail()
        self.calls.append(("write", offset, len(data), fua))
        super().write(offset, data, fua)

    def flush(self) -> None:
        self._maybe_fail()
        self.calls.append(("flush",))
        super().flush()

    def discard(self, offset: int, length: int) -> None:
        self._maybe_fail()
        self.calls.append(("discard", offset, length))
        super().discard(offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        self._maybe_fail()
        self.calls.append(("write_zeroes", offset, length, may_trim, fua))
        super().write_zeroes(offset, length, may_trim, fua)


@contextmanager
def serving(
    backend: MemoryBackend, *, handshake: bool = False, stop: threading.Event | None = None
) -> Iterator[tuple[Client, threading.Thread]]:
    ours, theirs = socket.socketpair()
    export = Export(backend, "disk")
    thread = threading.Thread(target=serve_connection, args=(theirs, export), kwargs={"handshake": handshake, "stop": stop})
    thread.start()
    try:
        yield Client(ours), thread
    finally:
        ours.close()
        thread.join(timeout=30)
        assert not thread.is_alive()
        theirs.close()


def test_write_read_round_trip() -> None:
    backend = RecordingBackend()
    with serving(backend) as (client, _):
        assert client.call(c.NBD_CMD_WRITE, 4096, data=b"\xab" * 8192) == (0, b"")
        assert client.read(4096, 8192) == b"\xab" * 8192
        assert client.read(0, 4096) == bytes(4096)
        assert client.read(SIZE - 1, 1) == b"\x00"
        client.disconnect()


def test_flush_reaches_the_backend() -> None:
    backend = RecordingBackend()
    with serving(backend) as (client, _):
        client.call(c.NBD_CMD_WRITE, 0, data=b"x")
        assert client.call(c.NBD_CMD_FLUSH) == (0, b"")
        assert backend.calls[-1] == ("flush",)
        client.disconnect()


def test_trim_zeroes_and_cache() -> None:
    backend = RecordingBackend()
    with serving(backend) as (client, _):
        client.call(c.NBD_CMD_WRITE, 0, data=b"\xff" * 65536)
        assert client.call(c.NBD_CMD_TRIM, 0, 4096) == (0, b"")
        assert client.read(0, 4096) == bytes(4096)
        assert client.call(c.NBD_CMD_WRITE_ZEROES, 4096, 4096, flags=c.NBD_CMD_FLAG_NO_HOLE) == (0, b"")
        assert client.call(c.NBD_CMD_WRITE_ZEROES, 8192, 4096) == (0, b"")
        assert client.read(0, 16384) == bytes(12288) + b"\xff" * 4096
        assert client.call(c.NBD_CMD_CACHE, 0, SIZE) == (0, b"")
        client.disconnect()
    assert ("discard", 0, 4096) in backend.calls
    assert ("write_zeroes", 4096, 4096, False, False) in backend.calls
    assert ("write_zeroes", 8192, 4096, True, False) in backend.calls


def test_fua_emulated_flushes_before_the_reply() -> None:
    backend = RecordingBackend(fua=FuaMode.EMULATE)
    with serving(backend) as (client, _):
        assert client.call(c.NBD_CMD_WRITE, 0, data=b"a", flags=c.NBD_CMD_FLAG_FUA) == (0, b"")
        assert backend.calls == [("write", 0, 1, False), ("flush",)]
        client.call(c.NBD_CMD_WRITE_ZEROES, 0, 512, flags=c.NBD_CMD_FLAG_FUA)
        assert backend.calls[-2:] == [("write_zeroes", 0, 512, True, False), ("flush",)]
        client.disconnect()


def test_fua_native_passes_through() -> None:
    backend = RecordingBackend(fua=FuaMode.NATIVE)
    with serving(backend) as (client, _):
        client.call(c.NBD_CMD_WRITE, 0, data=b"a", flags=c.NBD_CMD_FLAG_FUA)
        assert backend.calls == [("write", 0, 1, True)]
        client.disconnect()


def test_disc_flushes() -> None:
    backend = RecordingBackend()
    with serving(backend) as (client, thread):
        client.call(c.NBD_CMD_WRITE, 0, data=b"a")
        client.disconnect()
        thread.join(timeout=30)
        assert backend.calls[-1] == ("flush",)
        assert client.sock.recv(1) == b""  # no reply to DISC


def test_eof_flushes() -> None:
    backend = RecordingBackend()
    with serving(backend) as (client, thread):
        client.call(c.NBD_CMD_WRITE, 0, data=b"a")
        client.sock.shutdown(socket.SHUT_WR)
        thread.join(timeout=30)
    assert backend.calls[-1] == ("flush",)


@pytest.mark.parametrize(
    ("type_", "offset", "length", "flags", "error"),
    [
        (c.NBD_CMD_READ, SIZE - 1, 2, 0, c.NBD_EINVAL),
        (c.NBD_CMD_READ, SIZE + 1, 0, 0, c.NBD_EINVAL),
        (c.NBD_CMD_READ, 2**64 - 1, 1, 0, c.NBD_EINVAL),
        (c.NBD_CMD_READ, 0, c.NBD_MAX_PAYLOAD + 1, 0, c.NBD_EINVAL),
        (c.NBD_CMD_READ, 0, 1, c.NBD_CMD_FLAG_DF, c.NBD_EINVAL),
        (c.NBD_CMD_READ, 0, 1, 0x8000, c.NBD_EINVAL),
        (c.NBD_CMD_TRIM, SIZE, 1, 0, c.NBD_EINVAL),
        (c.NBD_CMD_TRIM, 0, 1, c.NBD_CMD_FLAG_NO_HOLE, c.NBD_EINVAL),
        (c.NBD_CMD_WRITE_ZEROES, SIZE - 512, 1024, 0, c.NBD_EINVAL),
        (c.NBD_CMD_WRITE_ZEROES, 0, 512, c.NBD_CMD_FLAG_FAST_ZERO, c.NBD_EINVAL),
        (c.NBD_CMD_CACHE, SIZE, 1, 0, c.NBD_EINVAL),
        (c.NBD_CMD_FLUSH, 0, 0, c.NBD_CMD_FLAG_NO_HOLE, c.NBD_EINVAL),
        (c.NBD_CMD_BLOCK_STATUS, 0, 512, 0, c.NBD_ENOTSUP),
        (99, 0, 0, 0, c.NBD_ENOTSUP),
    ],
)
def test_rejected_at_the_edge(type_: int, offset: int, length: int, flags: int, error: int) -> None:
    backend = RecordingBackend()
    with serving(backend) as (client, _):
        assert client.call(type_, offset, length, flags=flags) == (error, b"")
        assert client.read(0, 1) == b"\x00"  # the connection survives
        client.disconnect()
    assert [call for call in backend.calls if call[0] != "flush"] == []


@pytest.mark.parametrize(
    ("offset", "size", "flags", "error"),
    [(SIZE - 1, 2, 0, c.NBD_EINVAL), (2**64 - 1, 1, 0, c.NBD_EINVAL), (0, 4, c.NBD_CMD_FLAG_NO_HOLE, c.NBD_EINVAL)],
)
def test_rejected_write_payload_is_consumed(offset: int, size: int, flags: int, error: int) -> None:
    backend = RecordingBackend()
    with serving(backend) as (client, _):
        # Payload bytes that look like a request header must not be parsed as one.
        payload = (struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_DISC, 9, 0, 0) * 2)[:size]
        assert client.call(c.NBD_CMD_WRITE, offset, data=payload, flags=flags) == (error, b"")
        assert client.read(0, 4) == bytes(4)
        client.disconnect()


@pytest.mark.parametrize(
    ("type_", "length"), [(c.NBD_CMD_WRITE, 4), (c.NBD_CMD_TRIM, 4), (c.NBD_CMD_WRITE_ZEROES, 4)]
)
def test_read_only_export_refuses_writes(type_: int, length: int) -> None:
    backend = RecordingBackend(read_only=True)
    with serving(backend) as (client, _):
        data = b"abcd" if type_ == c.NBD_CMD_WRITE else b""
        assert client.call(type_, 0, length, data=data) == (c.NBD_EPERM, b"")
        assert client.read(0, 4) == bytes(4)
        client.disconnect()
    assert backend.calls == []  # not even a flush at disconnect: nothing was written


@pytest.mark.parametrize("type_", [c.NBD_CMD_READ, c.NBD_CMD_WRITE, c.NBD_CMD_TRIM, c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_CACHE])
def test_zero_length_succeeds_without_backend(type_: int) -> None:
    backend = RecordingBackend()
    with serving(backend) as (client, _):
        assert client.call(type_, SIZE, 0) == (0, b"")
        client.disconnect()
    assert [call for call in backend.calls if call[0] != "flush"] == []


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (OSError(errno.ENOSPC, "full"), c.NBD_ENOSPC),
        (OSError(errno.EDQUOT, "quota"), c.NBD_ENOSPC),
        (DiskFull("image.vhd: file system full"), c.NBD_ENOSPC),
        (OSError(errno.EIO, "bad sector"), c.NBD_EIO),
        (CorruptImage("image.vhd: BAT entry 3 points past the end"), c.NBD_EIO),
        (RuntimeError("a bug"), c.NBD_EIO),
    ],
)
def test_backend_failures_become_errors(exc: BaseException, error: int, caplog: pytest.LogCaptureFixture) -> None:
    backend = RecordingBackend()
    with serving(backend) as (client, _):
        client.call(c.NBD_CMD_WRITE, 0, data=b"keep")
        backend.fail = exc
        for type_, data in ((c.NBD_CMD_READ, b""), (c.NBD_CMD_WRITE, b"lost"), (c.NBD_CMD_FLUSH, b""), (c.NBD_CMD_TRIM, b"")):
            assert client.call(type_, 0, 4, data=data) == (error, b""), type_
        backend.fail = None
        assert client.read(0, 4) == b"keep"  # the connection stayed up and nothing was half-applied
        client.disconnect()
    if isinstance(exc, RuntimeError):
        assert any(r.exc_info for r in caplog.records), "a bug is logged with its traceback"


def test_read_header_only_after_data(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = RecordingBackend()

    def short_read(offset: int, length: int) -> bytes:
        return bytes(length - 1)

    monkeypatch.setattr(backend, "read", short_read)
    with serving(backend) as (client, _):
        assert client.call(c.NBD_CMD_READ, 0, 16) == (c.NBD_EIO, b"")
        client.disconnect()


def test_pipelining_64_requests() -> None:
    backend = RecordingBackend()
    with serving(backend) as (client, _):
        expected: dict[int, tuple[int, bytes]] = {}
        for i in range(32):
            data = bytes([i]) * 512
            expected[client.send(c.NBD_CMD_WRITE, i * 512, data=data)] = (0, b"")
            expected[client.send(c.NBD_CMD_READ, i * 512, 512)] = (0, data)
        expected[client.send(c.NBD_CMD_FLUSH)] = (0, b"")
        expected[client.send(c.NBD_CMD_READ, SIZE, 1)] = (c.NBD_EINVAL, b"")
        got = {}
        for _ in range(len(expected)):
            cookie, error, data = client.reply()
            assert cookie not in got
            got[cookie] = (error, data)
        assert got == expected
        client.disconnect()


def test_bad_magic_closes_only_that_connection() -> None:
    backend = RecordingBackend()
    with serving(backend) as (good, _), serving(backend) as (bad, bad_thread):
        good.call(c.NBD_CMD_WRITE, 0, data=b"ok")
        bad.sock.sendall(b"\x00" * 28)
        bad_thread.join(timeout=30)
        assert not bad_thread.is_alive()
        assert bad.sock.recv(1) == b""
        assert good.read(0, 2) == b"ok"
        good.disconnect()


def test_oversized_write_is_refused_then_closed() -> None:
    backend = RecordingBackend()
    with serving(backend) as (client, thread):
        header = struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_WRITE, 5, 0, c.NBD_MAX_PAYLOAD + 1)
        client.sock.sendall(header)
        assert struct.unpack(">IIQ", recv_exact(client.sock, 16)) == (c.NBD_SIMPLE_REPLY_MAGIC, c.NBD_EINVAL, 5)
        thread.join(timeout=30)
        assert not thread.is_alive()


def test_truncated_header_ends_the_connection() -> None:
    backend = RecordingBackend()
    with serving(backend) as (client, thread):
        client.call(c.NBD_CMD_WRITE, 0, data=b"a")
        client.sock.sendall(b"\x25\x60")
        client.sock.shutdown(socket.SHUT_WR)
        thread.join(timeout=30)
    assert backend.calls[-1] == ("flush",)


def test_stop_event_ends_the_loop_and_flushes() -> None:
    backend = RecordingBackend()
    stop = threading.Event()
    with serving(backend, stop=stop) as (client, thread):
        client.call(c.NBD_CMD_WRITE, 0, data=b"a")
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert backend.calls[-1] == ("flush",)


def test_handshake_then_transmission() -> None:
    backend = RecordingBackend()
    with serving(backend, handshake=True) as (client, _):
        size, flags = client.handshake_go("disk")
        assert (size, flags) == (SIZE, transmission_flags(backend))
        client.call(c.NBD_CMD_WRITE, 0, data=b"hi")
        assert client.read(0, 2) == b"hi"
        client.disconnect()


def test_handshake_unknown_export_name_hangs_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with serving(RecordingBackend(), handshake=True) as (client, thread):
        recv_exact(client.sock, 18)
        client.sock.sendall(struct.pack(">I", 1) + struct.pack(">QII", c.IHAVEOPT, c.NBD_OPT_EXPORT_NAME, 3) + b"bad")
        thread.join(timeout=30)
        assert client.sock.recv(1) == b""
    assert "unknown export 'bad'" in caplog.text


class _Caps(MemoryBackend):
    def __init__(self, read_only: bool, flush: bool, fua: FuaMode, discard: bool, multi: bool) -> None:
        super().__init__(4096, read_only)
        self._caps = (flush, fua, discard, multi)

    @property
    def can_flush(self) -> bool:
        return self._caps[0]

    @property
    def can_fua(self) -> FuaMode:
        return self._caps[1]

    @property
    def can_discard(self) -> bool:
        return self._caps[2]

    @property
    def can_multi_conn(self) -> bool:
        return self._caps[3]


BASE = c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_SEND_CACHE


@pytest.mark.parametrize(
    ("caps", "flags"),
    [
        ((False, True, FuaMode.EMULATE, True, True), BASE | c.NBD_FLAG_SEND_FLUSH | c.NBD_FLAG_SEND_FUA
         | c.NBD_FLAG_SEND_TRIM | c.NBD_FLAG_SEND_WRITE_ZEROES | c.NBD_FLAG_CAN_MULTI_CONN),
        ((False, False, FuaMode.EMULATE, False, False), BASE | c.NBD_FLAG_SEND_WRITE_ZEROES),
        ((False, False, FuaMode.NATIVE, False, False), BASE | c.NBD_FLAG_SEND_WRITE_ZEROES | c.NBD_FLAG_SEND_FUA),
        ((False, True, FuaMode.NONE, False, False), BASE | c.NBD_FLAG_SEND_WRITE_ZEROES | c.NBD_FLAG_SEND_FLUSH),
        ((True, True, FuaMode.EMULATE, True, True), BASE | c.NBD_FLAG_READ_ONLY | c.NBD_FLAG_SEND_FLUSH
         | c.NBD_FLAG_CAN_MULTI_CONN),
    ],
)
def test_transmission_flags_from_capabilities(caps: tuple[bool, bool, FuaMode, bool, bool], flags: int) -> None:
    backend = _Caps(*caps)
    assert transmission_flags(backend) == flags
    assert Export(backend).flags == flags


def test_trim_refused_when_backend_cannot_discard() -> None:
    backend = _Caps(False, True, FuaMode.EMULATE, False, True)
    with serving(backend) as (client, _):
        assert client.call(c.NBD_CMD_TRIM, 0, 512) == (c.NBD_EINVAL, b"")
        client.disconnect()


def test_stats_count_requests() -> None:
    backend = RecordingBackend()
    export = Export(backend)
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=serve_connection, args=(theirs, export), kwargs={"handshake": False})
    thread.start()
    client = Client(ours)
    client.call(c.NBD_CMD_WRITE, 0, data=b"abc")
    client.read(0, 2)
    client.call(c.NBD_CMD_FLUSH)
    client.call(c.NBD_CMD_TRIM, 0, 1)
    client.call(c.NBD_CMD_READ, SIZE, 1)
    live = export.stats
    assert (live.reads, live.writes, live.bytes_read, live.bytes_written, live.trims, live.errors) == (1, 1, 2, 3, 1, 1)
    assert live.flushes == 1
    client.disconnect()
    thread.join(timeout=30)
    ours.close()
    theirs.close()
    assert export.stats == live


def test_pipelined_write_replies_all_arrive_then_a_lone_write_is_answered() -> None:
    # Many writes sent in one go, then one write that must be answered with nothing behind it.
    backend = RecordingBackend()
    with serving(backend) as (client, _):
        raw = b"".join(
            struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_WRITE, 1000 + i, i * 512, 512) + bytes([i]) * 512
            for i in range(100)
        )
        client.sock.sendall(raw)
        cookies = sorted(client.reply()[:2] for _ in range(100))
        assert cookies == [(1000 + i, 0) for i in range(100)]
        assert client.call(c.NBD_CMD_WRITE, 0, data=b"z") == (0, b"")
        assert client.read(512, 512) == bytes([1]) * 512
        client.disconnect()


def test_write_replies_are_sent_before_disconnect_ends_the_connection() -> None:
    backend = RecordingBackend()
    with serving(backend) as (client, thread):
        raw = b"".join(
            struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_WRITE, i, 0, 1) + b"w" for i in range(5)
        ) + struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_DISC, 99, 0, 0)
        client.sock.sendall(raw)
        thread.join(timeout=30)
        assert sorted(client.reply()[:2] for _ in range(5)) == [(i, 0) for i in range(5)]
        assert ("flush",) in backend.calls

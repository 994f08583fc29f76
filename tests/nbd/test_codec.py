"""Tables for the sans-IO transmission codec: every command and flag, any chunking, every failure."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhdblkd.errors import LocalProtocolError, RemoteProtocolError
from vhdblkd.nbd import constants as c
from vhdblkd.nbd.codec import (
    MAX_INCOMPLETE_SIZE,
    TRANSITIONS,
    Event,
    Request,
    RequestDecoder,
    State,
    decode_reply,
    encode_reply,
)

CASES = [
    Request(c.NBD_CMD_READ, 0, 1, 0, 4096),
    Request(c.NBD_CMD_READ, c.NBD_CMD_FLAG_FUA, 2**64 - 1, 2**64 - 1, 2**32 - 1),
    Request(c.NBD_CMD_WRITE, 0, 3, 512, 5, b"hello"),
    Request(c.NBD_CMD_WRITE, c.NBD_CMD_FLAG_FUA, 4, 0, 3, b"abc"),
    Request(c.NBD_CMD_WRITE, 0, 5, 0, 0, b""),
    Request(c.NBD_CMD_FLUSH, 0, 6, 0, 0),
    Request(c.NBD_CMD_TRIM, 0, 7, 4096, 1 << 31),
    Request(c.NBD_CMD_TRIM, c.NBD_CMD_FLAG_FUA, 8, 0, 4096),
    Request(c.NBD_CMD_CACHE, 0, 9, 0, 65536),
    Request(c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_FLAG_NO_HOLE, 10, 0, 1 << 20),
    Request(c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_FLAG_FUA | c.NBD_CMD_FLAG_FAST_ZERO, 11, 0, 512),
    Request(c.NBD_CMD_BLOCK_STATUS, c.NBD_CMD_FLAG_REQ_ONE, 12, 0, 512),
    Request(c.NBD_CMD_READ, c.NBD_CMD_FLAG_DF, 13, 0, 512),
    Request(0xBEEF, 0xFFFF, 14, 1, 2),  # unknown type and flags still parse; the server refuses them
]


def test_request_header_layout() -> None:
    raw = Request(c.NBD_CMD_WRITE, c.NBD_CMD_FLAG_FUA, 0x0102030405060708, 0x1112, 2, b"xy").pack()
    assert raw == bytes.fromhex("25609513" "0001" "0001" "0102030405060708" "0000000000001112" "00000002") + b"xy"


@pytest.mark.parametrize("request_", CASES, ids=lambda r: f"type{r.type}-flags{r.flags:#x}")
def test_round_trip_whole(request_: Request) -> None:
    dec = RequestDecoder()
    assert dec.feed(request_.pack()) == [request_]
    assert dec.state is State.HEADER
    assert dec.feed(b"") == []
    assert dec.state.name == "CLOSED"  # by name: mypy narrowed `state` before the feed


@pytest.mark.parametrize("request_", CASES, ids=lambda r: f"type{r.type}-flags{r.flags:#x}")
def test_round_trip_byte_at_a_time(request_: Request) -> None:
    dec = RequestDecoder()
    raw = request_.pack()
    out: list[Request] = []
    for i in range(len(raw)):
        got = dec.feed(raw[i : i + 1])
        if i < len(raw) - 1:
            assert got == []
        out += got
    assert out == [request_]


def test_coalesced_stream_of_every_case() -> None:
    dec = RequestDecoder()
    assert dec.feed(b"".join(r.pack() for r in CASES)) == CASES


@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=40))
def test_any_chunking_gives_the_same_requests(chunks: list[int]) -> None:
    raw = b"".join(r.pack() for r in CASES)
    dec = RequestDecoder()
    out: list[Request] = []
    pos = 0
    i = 0
    while pos < len(raw):
        size = chunks[i % len(chunks)]
        out += dec.feed(raw[pos : pos + size])
        pos += size
        i += 1
    assert out == CASES


def test_write_data_survives_later_feeds() -> None:
    dec = RequestDecoder()
    first = Request(c.NBD_CMD_WRITE, 0, 1, 0, 4, b"AAAA")
    (got,) = dec.feed(first.pack())
    dec.feed(Request(c.NBD_CMD_WRITE, 0, 2, 0, 4, b"BBBB").pack())
    assert bytes(got.data) == b"AAAA"


def test_disc_then_eof() -> None:
    dec = RequestDecoder()
    assert dec.feed(Request(c.NBD_CMD_DISC, 0, 1, 0, 0).pack()) == [Request(c.NBD_CMD_DISC, 0, 1, 0, 0)]
    assert dec.state is State.DISCONNECTED
    dec.feed(b"")
    assert dec.state.name == "CLOSED"


def test_data_after_disc_is_an_error() -> None:
    dec = RequestDecoder()
    raw = Request(c.NBD_CMD_DISC, 0, 1, 0, 0).pack() + Request(c.NBD_CMD_READ, 0, 2, 0, 1).pack()
    # The DISC completed before the violation, so it is returned and the error comes next.
    assert dec.feed(raw) == [Request(c.NBD_CMD_DISC, 0, 1, 0, 0)]
    assert dec.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="DISCONNECTED"):
        dec.feed(b"")


def test_bad_magic() -> None:
    dec = RequestDecoder()
    raw = bytearray(Request(c.NBD_CMD_READ, 0, 1, 0, 1).pack())
    raw[0] ^= 0xFF
    with pytest.raises(RemoteProtocolError, match="bad request magic"):
        dec.feed(bytes(raw))
    assert dec.state is State.ERROR


def test_oversized_write() -> None:
    header = struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_WRITE, 1, 0, c.NBD_MAX_PAYLOAD + 1)
    dec = RequestDecoder()
    with pytest.raises(RemoteProtocolError, match="payload limit"):
        dec.feed(header)


def test_max_sized_write_is_accepted() -> None:
    req = Request(c.NBD_CMD_WRITE, 0, 1, 0, c.NBD_MAX_PAYLOAD, bytes(c.NBD_MAX_PAYLOAD))
    assert RequestDecoder().feed(req.pack()) == [req]
    assert MAX_INCOMPLETE_SIZE == 28 + c.NBD_MAX_PAYLOAD


def test_oversized_read_and_trim_parse() -> None:
    # Only a WRITE payload must be buffered; the server answers an oversized READ with EINVAL.
    reqs = [Request(c.NBD_CMD_READ, 0, 1, 0, 2**32 - 1), Request(c.NBD_CMD_TRIM, 0, 2, 0, 2**32 - 1)]
    assert RequestDecoder().feed(b"".join(r.pack() for r in reqs)) == reqs


@pytest.mark.parametrize(
    "raw",
    [
        Request(c.NBD_CMD_READ, 0, 1, 0, 1).pack()[:27],
        Request(c.NBD_CMD_WRITE, 0, 1, 0, 4, b"abcd").pack()[:28],
        Request(c.NBD_CMD_WRITE, 0, 1, 0, 4, b"abcd").pack()[:31],
        b"\x25",
    ],
    ids=["header", "payload-missing", "payload-short", "one-byte"],
)
def test_truncated_at_eof(raw: bytes) -> None:
    dec = RequestDecoder()
    assert dec.feed(raw) == []
    with pytest.raises(RemoteProtocolError, match="stream ended inside a request"):
        dec.feed(b"")
    assert dec.state is State.ERROR


def test_error_is_sticky() -> None:
    dec = RequestDecoder()
    with pytest.raises(RemoteProtocolError):
        dec.feed(b"\x00" * 28)
    with pytest.raises(RemoteProtocolError, match="already failed"):
        dec.feed(Request(c.NBD_CMD_READ, 0, 1, 0, 1).pack())
    with pytest.raises(RemoteProtocolError):
        dec.feed(b"")
    assert dec.state is State.ERROR


def test_data_after_eof_is_an_error() -> None:
    dec = RequestDecoder()
    dec.feed(b"")
    with pytest.raises(RemoteProtocolError, match="CLOSED"):
        dec.feed(b"x")


def test_transition_table_names_every_state() -> None:
    assert {s for s, _ in TRANSITIONS} == set(State) - {State.ERROR}
    assert set(TRANSITIONS.values()) <= set(State) - {State.ERROR}
    assert {e for _, e in TRANSITIONS} == set(Event)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"type": 1 << 16},
        {"flags": -1},
        {"cookie": 1 << 64},
        {"offset": 1 << 64},
        {"length": 1 << 32},
        {"type": c.NBD_CMD_WRITE, "length": 4, "data": b"abc"},
        {"type": c.NBD_CMD_READ, "length": 3, "data": b"abc"},
    ],
)
def test_request_validates_itself(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"type": c.NBD_CMD_READ, "flags": 0, "cookie": 0, "offset": 0, "length": 0}
    args.update(kwargs)
    with pytest.raises(LocalProtocolError):
        Request(**args)  # type: ignore[arg-type]  # deliberately wrong values


@pytest.mark.parametrize(
    ("cookie", "error", "raw"),
    [
        (0, 0, "67446698" "00000000" "0000000000000000"),
        (2**64 - 1, c.NBD_EIO, "67446698" "00000005" "ffffffffffffffff"),
        (0x0102030405060708, c.NBD_ENOSPC, "67446698" "0000001c" "0102030405060708"),
        (7, c.NBD_ESHUTDOWN, "67446698" "0000006c" "0000000000000007"),
    ],
)
def test_reply_round_trip(cookie: int, error: int, raw: str) -> None:
    assert encode_reply(cookie, error) == bytes.fromhex(raw)
    assert decode_reply(bytes.fromhex(raw)) == (cookie, error)


def test_reply_rejects_bad_values() -> None:
    with pytest.raises(LocalProtocolError):
        encode_reply(1 << 64)
    with pytest.raises(LocalProtocolError):
        encode_reply(0, 1 << 32)
    with pytest.raises(RemoteProtocolError, match="bad reply magic"):
        decode_reply(bytes(16))
    with pytest.raises(RemoteProtocolError, match="truncated"):
        decode_reply(bytes(15))


def test_requests_before_a_bad_header_are_returned_and_the_error_follows() -> None:
    good = [Request(c.NBD_CMD_READ, 0, 1, 0, 512), Request(c.NBD_CMD_WRITE, 0, 2, 0, 3, b"abc")]
    bad = struct.pack(">IHHQQI", 0xDEADBEEF, 0, c.NBD_CMD_READ, 3, 0, 512)
    dec = RequestDecoder()
    assert dec.feed(b"".join(r.pack() for r in good) + bad) == good
    assert dec.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="bad request magic"):
        dec.feed(b"")
    with pytest.raises(RemoteProtocolError, match="already failed"):
        dec.feed(b"x")


def test_a_bad_header_alone_raises_at_once() -> None:
    dec = RequestDecoder()
    with pytest.raises(RemoteProtocolError, match="bad request magic"):
        dec.feed(bytes(c.NBD_REQUEST_SIZE))
    assert dec.state is State.ERROR

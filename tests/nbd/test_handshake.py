"""Tables for the sans-IO fixed-newstyle handshake, one option at a time."""

from __future__ import annotations

import struct

import pytest

from vhdblkd.errors import LocalProtocolError, RemoteProtocolError
from vhdblkd.nbd import constants as c
from vhdblkd.nbd.handshake import MAX_OPTION_LENGTH, TRANSITIONS, ExportInfo, ServerHandshake, State

INFO = ExportInfo("disk.vhd", 1 << 30, c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_SEND_FLUSH, "a test disk")
FIXED = c.NBD_FLAG_C_FIXED_NEWSTYLE


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data


def info_data(name: str, *requests: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(requests)}H", len(requests), *requests)


def replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, reply type, data)."""
    out = []
    while raw:
        magic, opt, kind, length = struct.unpack_from(">QIII", raw)
        assert magic == c.NBD_OPT_REPLY_MAGIC
        out.append((opt, kind, raw[20 : 20 + length]))
        raw = raw[20 + length :]
    return out


def negotiated(flags: int = FIXED | c.NBD_FLAG_C_NO_ZEROES) -> ServerHandshake:
    hs = ServerHandshake({INFO.name: INFO}, default=INFO.name)
    assert hs.feed(struct.pack(">I", flags)) == b""
    assert hs.state is State.OPTIONS
    return hs


def test_greeting() -> None:
    assert ServerHandshake.greeting() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"


def test_client_flags_recorded() -> None:
    hs = negotiated(FIXED)
    assert hs.fixed_newstyle and not hs.no_zeroes
    hs = negotiated(c.NBD_FLAG_C_NO_ZEROES)
    assert hs.no_zeroes and not hs.fixed_newstyle


def test_unknown_client_flags_close() -> None:
    hs = ServerHandshake({INFO.name: INFO})
    with pytest.raises(RemoteProtocolError, match="unknown client flags"):
        hs.feed(struct.pack(">I", 4))
    assert hs.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="already failed"):
        hs.feed(b"x")


@pytest.mark.parametrize("name", ["disk.vhd", ""])
@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(name: str, no_zeroes: bool) -> None:
    hs = negotiated(FIXED | (c.NBD_FLAG_C_NO_ZEROES if no_zeroes else 0))
    out = hs.feed(option(c.NBD_OPT_EXPORT_NAME, name.encode()))
    assert out[:10] == struct.pack(">QH", INFO.size, INFO.flags)
    assert out[10:] == (b"" if no_zeroes else bytes(124))
    assert hs.state is State.TRANSMISSION and hs.export == INFO


def test_export_name_unknown_hangs_up() -> None:
    hs = negotiated()
    with pytest.raises(RemoteProtocolError, match="unknown export 'nope'"):
        hs.feed(option(c.NBD_OPT_EXPORT_NAME, b"nope"))


def test_abort() -> None:
    hs = negotiated()
    assert replies(hs.feed(option(c.NBD_OPT_ABORT))) == [(c.NBD_OPT_ABORT, c.NBD_REP_ACK, b"")]
    assert hs.state is State.ABORTED
    hs.feed(b"")
    assert hs.state is State.ABORTED


def test_list() -> None:
    hs = negotiated()
    name = INFO.name.encode()
    assert replies(hs.feed(option(c.NBD_OPT_LIST))) == [
        (c.NBD_OPT_LIST, c.NBD_REP_SERVER, struct.pack(">I", len(name)) + name),
        (c.NBD_OPT_LIST, c.NBD_REP_ACK, b""),
    ]
    assert replies(hs.feed(option(c.NBD_OPT_LIST, b"x")))[0][1] == c.NBD_REP_ERR_INVALID
    assert hs.state is State.OPTIONS


@pytest.mark.parametrize("opt", [c.NBD_OPT_INFO, c.NBD_OPT_GO])
@pytest.mark.parametrize("name", ["disk.vhd", ""])
def test_info_and_go(opt: int, name: str) -> None:
    hs = negotiated()
    got = replies(hs.feed(option(opt, info_data(name, c.NBD_INFO_NAME, c.NBD_INFO_DESCRIPTION, c.NBD_INFO_BLOCK_SIZE))))
    assert got == [
        (opt, c.NBD_REP_INFO, struct.pack(">HQH", c.NBD_INFO_EXPORT, INFO.size, INFO.flags)),
        (opt, c.NBD_REP_INFO, struct.pack(">H", c.NBD_INFO_NAME) + b"disk.vhd"),
        (opt, c.NBD_REP_INFO, struct.pack(">H", c.NBD_INFO_DESCRIPTION) + b"a test disk"),
        (opt, c.NBD_REP_INFO, struct.pack(">HIII", c.NBD_INFO_BLOCK_SIZE, 1, 4096, 32 << 20)),
        (opt, c.NBD_REP_ACK, b""),
    ]
    assert hs.state is (State.TRANSMISSION if opt == c.NBD_OPT_GO else State.OPTIONS)


def test_go_without_requests_still_sends_export_and_block_size() -> None:
    hs = negotiated()
    kinds = [(k, d[:2]) for _, k, d in replies(hs.feed(option(c.NBD_OPT_GO, info_data(INFO.name))))]
    assert kinds == [
        (c.NBD_REP_INFO, struct.pack(">H", c.NBD_INFO_EXPORT)),
        (c.NBD_REP_INFO, struct.pack(">H", c.NBD_INFO_BLOCK_SIZE)),
        (c.NBD_REP_ACK, b""),
    ]


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (info_data("other"), c.NBD_REP_ERR_UNKNOWN),
        (b"\x00\x00\x00", c.NBD_REP_ERR_INVALID),
        (struct.pack(">I", 100) + b"ab" + b"\x00\x00", c.NBD_REP_ERR_INVALID),
        (info_data(INFO.name) + b"\x00", c.NBD_REP_ERR_INVALID),
        (struct.pack(">I", 2) + b"\xff\xfe" + b"\x00\x00", c.NBD_REP_ERR_INVALID),
    ],
    ids=["unknown-name", "short", "name-too-long", "count-mismatch", "not-utf8"],
)
@pytest.mark.parametrize("opt", [c.NBD_OPT_INFO, c.NBD_OPT_GO])
def test_info_and_go_errors(opt: int, data: bytes, reply: int) -> None:
    hs = negotiated()
    ((got_opt, kind, _),) = replies(hs.feed(option(opt, data)))
    assert (got_opt, kind) == (opt, reply)
    assert hs.state is State.OPTIONS  # an error reply lets the client try again


@pytest.mark.parametrize(
    "opt",
    [
        c.NBD_OPT_EXTENDED_HEADERS,
        c.NBD_OPT_PEEK_EXPORT,
        0xDEAD,
    ],
)
def test_unsupported_options(opt: int) -> None:
    hs = negotiated()
    ((got_opt, kind, _),) = replies(hs.feed(option(opt, b"ignored")))
    assert (got_opt, kind) == (opt, c.NBD_REP_ERR_UNSUP)
    assert hs.state is State.OPTIONS


def test_option_too_long_hangs_up() -> None:
    hs = negotiated()
    with pytest.raises(RemoteProtocolError, match="more than"):
        hs.feed(struct.pack(">QII", c.IHAVEOPT, c.NBD_OPT_GO, MAX_OPTION_LENGTH + 1))


def test_bad_option_magic() -> None:
    hs = negotiated()
    with pytest.raises(RemoteProtocolError, match="bad option magic"):
        hs.feed(struct.pack(">QII", 0, c.NBD_OPT_GO, 0))


def test_byte_at_a_time_session_and_read_sizes() -> None:
    hs = ServerHandshake({INFO.name: INFO}, default=INFO.name)
    stream = struct.pack(">I", FIXED) + option(c.NBD_OPT_LIST) + option(c.NBD_OPT_GO, info_data(""))
    out = b""
    for i in range(len(stream)):
        assert hs.next_read_size > 0
        out += hs.feed(stream[i : i + 1])
    assert hs.state is State.TRANSMISSION and hs.next_read_size == 0
    assert [k for _, k, _ in replies(out)] == [c.NBD_REP_SERVER, c.NBD_REP_ACK, c.NBD_REP_INFO, c.NBD_REP_INFO, c.NBD_REP_ACK]


def test_next_read_size_never_overreads() -> None:
    hs = ServerHandshake({INFO.name: INFO})
    assert hs.next_read_size == 4
    hs.feed(struct.pack(">I", FIXED))
    assert hs.next_read_size == 16
    go = option(c.NBD_OPT_GO, info_data(INFO.name))
    hs.feed(go[:16])
    assert hs.next_read_size == len(go) - 16


def test_trailing_data_kept_for_transmission() -> None:
    hs = negotiated()
    hs.feed(option(c.NBD_OPT_GO, info_data(INFO.name)) + b"early")
    assert hs.trailing_data == b"early"
    hs.feed(b"more")
    assert hs.trailing_data == b"earlymore"


def test_eof_inside_option() -> None:
    hs = negotiated()
    hs.feed(option(c.NBD_OPT_LIST)[:5])
    with pytest.raises(RemoteProtocolError, match="stream ended"):
        hs.feed(b"")


def test_eof_between_options() -> None:
    hs = negotiated()
    hs.feed(b"")
    assert hs.state is State.CLOSED


def test_export_info_validates() -> None:
    with pytest.raises(LocalProtocolError):
        ExportInfo("x" * 4097, 0, 0)
    with pytest.raises(LocalProtocolError):
        ExportInfo("x", 1 << 64, 0)
    with pytest.raises(LocalProtocolError):
        ExportInfo("x", 0, 1 << 16)


def test_transition_table_has_no_exit_from_terminal_states() -> None:
    assert not any(s in (State.TRANSMISSION, State.CLOSED, State.ERROR) for s, _ in TRANSITIONS)


def test_replies_before_an_error_are_returned_and_the_error_follows() -> None:
    hs = negotiated()
    bad = struct.pack(">QII", 0x1234, c.NBD_OPT_LIST, 0)
    assert replies(hs.feed(option(c.NBD_OPT_LIST) + bad))[-1] == (c.NBD_OPT_LIST, c.NBD_REP_ACK, b"")
    assert hs.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="bad option magic"):
        hs.feed(b"")
    with pytest.raises(RemoteProtocolError, match="already failed"):
        hs.feed(b"")


@pytest.mark.parametrize("split", [False, True])
def test_bytes_after_abort_are_moot_however_chunked(split: bool) -> None:
    hs = negotiated()
    chunks = [option(c.NBD_OPT_ABORT), option(c.NBD_OPT_LIST)]
    if not split:
        chunks = [b"".join(chunks)]
    out = b"".join(hs.feed(chunk) for chunk in chunks)
    assert replies(out) == [(c.NBD_OPT_ABORT, c.NBD_REP_ACK, b"")]
    assert hs.state is State.ABORTED

"""The handshake's newer options: structured replies, metadata contexts, STARTTLS, block sizes."""

from __future__ import annotations

import struct

import pytest

from vhdblkd.errors import LocalProtocolError, RemoteProtocolError
from vhdblkd.nbd import constants as c
from vhdblkd.nbd.handshake import ExportInfo, ServerHandshake, State, TlsMode

from .test_handshake import FIXED, info_data, option, replies

CONTEXTS = (c.META_BASE_ALLOCATION, c.META_QEMU_ALLOCATION_DEPTH)
DISK = ExportInfo("disk", 1 << 30, c.NBD_FLAG_HAS_FLAGS, "a disk", CONTEXTS, (512, 4096, 1 << 25))
OTHER = ExportInfo("other", 1 << 20, c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_READ_ONLY)


def start(*, structured: bool = True, tls: TlsMode = TlsMode.OFF) -> ServerHandshake:
    hs = ServerHandshake({"disk": DISK, "other": OTHER}, default="disk", structured=structured, tls=tls)
    assert hs.feed(struct.pack(">I", FIXED | c.NBD_FLAG_C_NO_ZEROES)) == b""
    return hs


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def kinds(raw: bytes) -> list[int]:
    return [k for _, k, _ in replies(raw)]


def contexts_of(raw: bytes) -> list[tuple[int, str]]:
    return [(struct.unpack_from(">I", d)[0], d[4:].decode()) for _, k, d in replies(raw) if k == c.NBD_REP_META_CONTEXT]


def test_structured_reply_acknowledged_when_offered() -> None:
    hs = start()
    assert kinds(hs.feed(option(c.NBD_OPT_STRUCTURED_REPLY))) == [c.NBD_REP_ACK]
    assert hs.structured


def test_structured_reply_refused_when_not_offered_or_with_data() -> None:
    hs = start(structured=False)
    assert kinds(hs.feed(option(c.NBD_OPT_STRUCTURED_REPLY))) == [c.NBD_REP_ERR_UNSUP]
    assert kinds(hs.feed(option(c.NBD_OPT_STRUCTURED_REPLY, b"x"))) == [c.NBD_REP_ERR_INVALID]
    assert not hs.structured and hs.state is State.OPTIONS


@pytest.mark.parametrize("opt", [c.NBD_OPT_LIST_META_CONTEXT, c.NBD_OPT_SET_META_CONTEXT])
def test_meta_context_needs_structured_replies(opt: int) -> None:
    hs = start()
    assert kinds(hs.feed(option(opt, meta_data("disk", c.META_BASE_ALLOCATION)))) == [c.NBD_REP_ERR_INVALID]


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ((), list(CONTEXTS)),
        (("base:",), [c.META_BASE_ALLOCATION]),
        (("qemu:",), [c.META_QEMU_ALLOCATION_DEPTH]),
        (("qemu:allocation-depth", "x-unknown:thing"), [c.META_QEMU_ALLOCATION_DEPTH]),
        (("base:nothing",), []),
    ],
)
def test_list_meta_context(queries: tuple[str, ...], expected: list[str]) -> None:
    hs = start()
    hs.feed(option(c.NBD_OPT_STRUCTURED_REPLY))
    out = hs.feed(option(c.NBD_OPT_LIST_META_CONTEXT, meta_data("disk", *queries)))
    assert contexts_of(out) == [(0, n) for n in expected]
    assert kinds(out)[-1] == c.NBD_REP_ACK


def test_set_meta_context_then_go_keeps_the_selection() -> None:
    hs = start()
    hs.feed(option(c.NBD_OPT_STRUCTURED_REPLY))
    out = hs.feed(option(c.NBD_OPT_SET_META_CONTEXT, meta_data("disk", "base:", *CONTEXTS, "base:allocation")))
    chosen = contexts_of(out)
    assert [n for _, n in chosen] == list(CONTEXTS)
    assert len({i for i, _ in chosen}) == 2 and all(i for i, _ in chosen)
    hs.feed(option(c.NBD_OPT_GO, info_data("disk")))
    assert hs.state is State.TRANSMISSION
    assert hs.meta_contexts == dict(chosen) and hs.structured


def test_go_to_another_export_drops_the_selection() -> None:
    hs = start()
    hs.feed(option(c.NBD_OPT_STRUCTURED_REPLY))
    hs.feed(option(c.NBD_OPT_SET_META_CONTEXT, meta_data("disk", c.META_BASE_ALLOCATION)))
    hs.feed(option(c.NBD_OPT_GO, info_data("other")))
    assert hs.export == OTHER and hs.meta_contexts == {}


def test_failed_set_clears_the_selection() -> None:
    hs = start()
    hs.feed(option(c.NBD_OPT_STRUCTURED_REPLY))
    hs.feed(option(c.NBD_OPT_SET_META_CONTEXT, meta_data("disk", c.META_BASE_ALLOCATION)))
    assert kinds(hs.feed(option(c.NBD_OPT_SET_META_CONTEXT, meta_data("nope", c.META_BASE_ALLOCATION)))) == [
        c.NBD_REP_ERR_UNKNOWN
    ]
    hs.feed(option(c.NBD_OPT_GO, info_data("disk")))
    assert hs.meta_contexts == {}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        struct.pack(">I", 100) + b"disk",
        meta_data("disk")[:-1],
        meta_data("disk") + b"x",
        meta_data("disk", "nocolon"),
        struct.pack(">I4sI", 4, b"disk", 1) + struct.pack(">I", 9) + b"base:",
        struct.pack(">I4sI", 4, b"disk", 1) + struct.pack(">I", 2) + b"\xff:",
        struct.pack(">I4sI", 4, b"disk", 100000),
    ],
)
def test_malformed_meta_context_data_is_invalid(data: bytes) -> None:
    hs = start()
    hs.feed(option(c.NBD_OPT_STRUCTURED_REPLY))
    for opt in (c.NBD_OPT_LIST_META_CONTEXT, c.NBD_OPT_SET_META_CONTEXT):
        assert kinds(hs.feed(option(opt, data))) == [c.NBD_REP_ERR_INVALID]
    assert hs.state is State.OPTIONS


def test_info_block_size_and_description() -> None:
    hs = start()
    out = replies(hs.feed(option(c.NBD_OPT_INFO, info_data("disk", c.NBD_INFO_DESCRIPTION, c.NBD_INFO_BLOCK_SIZE))))
    infos = {struct.unpack_from(">H", d)[0]: d[2:] for _, k, d in out if k == c.NBD_REP_INFO}
    assert infos[c.NBD_INFO_DESCRIPTION] == b"a disk"
    assert struct.unpack(">III", infos[c.NBD_INFO_BLOCK_SIZE]) == (512, 4096, 1 << 25)


@pytest.mark.parametrize("sizes", [(3, 4096, 1 << 25), (4096, 512, 1 << 25), (512, 4096, 1000), (1 << 17, 1 << 17, 1 << 20)])
def test_bad_block_sizes_are_refused(sizes: tuple[int, int, int]) -> None:
    with pytest.raises(LocalProtocolError, match="block sizes"):
        ExportInfo("x", 0, 0, block_sizes=sizes)


def test_list_names_every_export() -> None:
    hs = start()
    out = replies(hs.feed(option(c.NBD_OPT_LIST)))
    names = [d[4:].decode() for _, k, d in out if k == c.NBD_REP_SERVER]
    assert names == ["disk", "other"]


# --- STARTTLS -------------------------------------------------------------------------


def test_starttls_refused_by_policy_without_tls() -> None:
    hs = start()
    assert kinds(hs.feed(option(c.NBD_OPT_STARTTLS))) == [c.NBD_REP_ERR_POLICY]
    assert hs.state is State.OPTIONS


@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE])
def test_starttls_upgrade_forgets_earlier_options(mode: TlsMode) -> None:
    hs = start(tls=mode)
    if mode is TlsMode.ON:
        hs.feed(option(c.NBD_OPT_STRUCTURED_REPLY))
        assert hs.structured
    assert kinds(hs.feed(option(c.NBD_OPT_STARTTLS, b"x"))) == [c.NBD_REP_ERR_INVALID]
    assert kinds(hs.feed(option(c.NBD_OPT_STARTTLS))) == [c.NBD_REP_ACK]
    assert hs.state is State.TLS_UPGRADE and hs.next_read_size == 0
    with pytest.raises(RemoteProtocolError):
        hs.feed(b"\x16\x03\x01")  # a TLS hello is the I/O loop's business, not the handshake's
    hs = start(tls=mode)
    hs.feed(option(c.NBD_OPT_STARTTLS))
    hs.tls_ready()
    assert hs.state is State.OPTIONS and hs.tls_active and not hs.structured
    assert kinds(hs.feed(option(c.NBD_OPT_STARTTLS))) == [c.NBD_REP_ERR_INVALID]
    hs.feed(option(c.NBD_OPT_GO, info_data("disk")))
    assert hs.export == DISK


@pytest.mark.parametrize(
    "opt",
    [c.NBD_OPT_LIST, c.NBD_OPT_INFO, c.NBD_OPT_GO, c.NBD_OPT_STRUCTURED_REPLY, c.NBD_OPT_SET_META_CONTEXT, 0xDEAD],
)
def test_tls_required_refuses_plain_options(opt: int) -> None:
    hs = start(tls=TlsMode.REQUIRE)
    data = info_data("disk") if opt in (c.NBD_OPT_INFO, c.NBD_OPT_GO) else b""
    assert kinds(hs.feed(option(opt, data))) == [c.NBD_REP_ERR_TLS_REQD]
    assert hs.state is State.OPTIONS and hs.export is None


def test_tls_required_export_name_hangs_up_and_abort_works() -> None:
    hs = start(tls=TlsMode.REQUIRE)
    with pytest.raises(RemoteProtocolError, match="TLS is required"):
        hs.feed(option(c.NBD_OPT_EXPORT_NAME, b"disk"))
    hs = start(tls=TlsMode.REQUIRE)
    assert kinds(hs.feed(option(c.NBD_OPT_ABORT))) == [c.NBD_REP_ACK]
    assert hs.state is State.ABORTED


def test_tls_ready_only_after_starttls() -> None:
    hs = start(tls=TlsMode.ON)
    with pytest.raises(RemoteProtocolError):
        hs.tls_ready()


def test_eof_during_upgrade_closes() -> None:
    hs = start(tls=TlsMode.ON)
    hs.feed(option(c.NBD_OPT_STARTTLS))
    hs.feed(b"")
    assert hs.state is State.CLOSED

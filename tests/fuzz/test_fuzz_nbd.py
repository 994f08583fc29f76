"""Hypothesis fuzzing of the NBD codec, handshake and a live connection through nbdfuzz.run.

Streams are valid request/option sequences with mutations (flipped,
inserted and deleted bytes, truncation), or plain random bytes; each is fed
whole and split (including one byte at a time).  Every seed in corpus/nbd/
and every file in regressions/nbd/ is replayed.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import nbdfuzz
from vhdblkd.nbd import constants as c

HERE = Path(__file__).parent
SEED_DIR = HERE / "corpus" / "nbd"
SEEDS = sorted(SEED_DIR.glob("*.bin"))
REGRESSIONS = sorted((HERE / "regressions" / "nbd").glob("*.bin"))
# FUZZ_SCALE=N multiplies the example counts for a longer exploratory run.
SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
CODEC_EXAMPLES = 3000 * SCALE
HANDSHAKE_EXAMPLES = 3000 * SCALE
LIVE_EXAMPLES = 300 * SCALE

u64 = st.one_of(st.sampled_from([0, 1, 511, 512, 4096, (1 << 20) - 1, 1 << 20, (1 << 63), (1 << 64) - 1]),
                st.integers(0, (1 << 64) - 1))
u32 = st.one_of(st.sampled_from([0, 1, 512, 4096, c.NBD_MAX_PAYLOAD, c.NBD_MAX_PAYLOAD + 1, (1 << 32) - 1]),
                st.integers(0, (1 << 32) - 1))
commands = st.sampled_from([c.NBD_CMD_READ, c.NBD_CMD_WRITE, c.NBD_CMD_DISC, c.NBD_CMD_FLUSH, c.NBD_CMD_TRIM,
                            c.NBD_CMD_CACHE, c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_BLOCK_STATUS, 8, 0xFFFF])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    type_ = draw(commands)
    flags = draw(st.sampled_from([0, 0, c.NBD_CMD_FLAG_FUA, c.NBD_CMD_FLAG_NO_HOLE, c.NBD_CMD_FLAG_REQ_ONE, 0xFFFF]))
    offset = draw(u64)
    if type_ in (c.NBD_CMD_READ, c.NBD_CMD_BLOCK_STATUS) and draw(st.booleans()):
        # Inside the live export's 256 KiB, long enough for hole chunks.
        return nbdfuzz.request(type_, draw(st.integers(0, 1 << 18)), draw(st.integers(0, 1 << 18)), flags, draw(u64))
    if type_ == c.NBD_CMD_WRITE and draw(st.booleans()):
        payload = draw(st.binary(max_size=600))
        return nbdfuzz.request(type_, offset % (1 << 19), len(payload), flags, draw(u64), payload)
    return nbdfuzz.request(type_, offset, draw(u32), flags, draw(u64))


@st.composite
def options(draw: st.DrawFn) -> bytes:
    opt = draw(st.sampled_from([c.NBD_OPT_EXPORT_NAME, c.NBD_OPT_ABORT, c.NBD_OPT_LIST, c.NBD_OPT_STARTTLS,
                                c.NBD_OPT_INFO, c.NBD_OPT_GO, c.NBD_OPT_STRUCTURED_REPLY,
                                c.NBD_OPT_LIST_META_CONTEXT, c.NBD_OPT_SET_META_CONTEXT, c.NBD_OPT_STRUCTURED_REPLY,
                                c.NBD_OPT_EXTENDED_HEADERS, 0xDEAD]))
    name = draw(st.sampled_from([b"", b"disk", b"ro", b"missing", b"\xff\xfe", b"d" * 5000]))
    if opt in (c.NBD_OPT_INFO, c.NBD_OPT_GO):
        items = draw(st.lists(st.integers(0, 0xFFFF), max_size=4))
        data = nbdfuzz.info_request(name, *items)
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
    elif opt == c.NBD_OPT_EXPORT_NAME:
        data = name
    elif opt in (c.NBD_OPT_LIST_META_CONTEXT, c.NBD_OPT_SET_META_CONTEXT):
        queries = draw(st.lists(st.sampled_from([b"base:", b"base:allocation", b"qemu:", b"qemu:allocation-depth",
                                                 b"x-other:", b"nocolon", b"\xff:"]), max_size=4))
        data = nbdfuzz.meta_request(name[:100], *queries)
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
    elif opt == c.NBD_OPT_STRUCTURED_REPLY:
        data = draw(st.sampled_from([b"", b"", b"x"]))
    else:
        data = draw(st.binary(max_size=20))
    if draw(st.integers(0, 9)) == 0:
        return struct.pack(">QII", c.IHAVEOPT, opt, draw(u32)) + data  # a lying length
    return nbdfuzz.option(opt, data)


@st.composite
def mutated(draw: st.DrawFn, stream: bytes) -> bytes:
    buf = bytearray(stream)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(buf)))
        if kind == 0 and pos < len(buf):
            buf[pos] = draw(st.integers(0, 255))
        elif kind == 1:
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == 2:
            del buf[pos : pos + draw(st.integers(1, 8))]
        else:
            del buf[pos:]
    return bytes(buf)


transmission = st.lists(requests(), max_size=8).map(b"".join).flatmap(mutated)
client_flags = st.sampled_from([struct.pack(">I", f) for f in (0, 1, 2, 3, 4, 0xFFFFFFFF)])
negotiation = st.tuples(client_flags, st.lists(options(), max_size=5), st.lists(requests(), max_size=3)).map(
    lambda t: t[0] + b"".join(t[1]) + b"".join(t[2])).flatmap(mutated)


def program(mode: int, stream: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.tuples(st.integers(0, 255), st.one_of(stream, st.binary(max_size=200))).map(
        lambda t: bytes([mode, t[0]]) + t[1])


@settings(max_examples=CODEC_EXAMPLES)
@given(data=program(0, transmission))
def test_codec(data: bytes) -> None:
    nbdfuzz.run(data)


@settings(max_examples=HANDSHAKE_EXAMPLES)
@given(data=program(1, negotiation))
def test_handshake(data: bytes) -> None:
    nbdfuzz.run(data)


@settings(max_examples=LIVE_EXAMPLES)
@given(data=program(2, negotiation))
def test_live_connection(data: bytes) -> None:
    nbdfuzz.run(data)


@settings(max_examples=LIVE_EXAMPLES)
@given(data=program(3, transmission))
def test_connection_serves_what_the_codec_parses(data: bytes) -> None:
    nbdfuzz.run(data)


@pytest.mark.parametrize("path", SEEDS + REGRESSIONS, ids=lambda p: p.name)
def test_corpus_and_regressions(path: Path) -> None:
    nbdfuzz.run(path.read_bytes())


@pytest.mark.parametrize("path", SEEDS + REGRESSIONS, ids=lambda p: p.name)
def test_corpus_gets_the_same_verdicts_from_codec_and_connection(path: Path) -> None:
    """Every corpus input's transmission bytes: a live connection answers what the codec parses."""
    for stream in nbdfuzz.transmission_streams(path.read_bytes()):
        nbdfuzz.compare_live(stream)


def test_the_verdicts_are_not_vacuous() -> None:
    """The comparison sees answers, their order and the protocol error, each of which can differ."""
    (cookies, failed), _ = nbdfuzz.codec_verdict((SEED_DIR / "same-oversized-write.bin").read_bytes()[2:])
    assert cookies == list(range(10, 21)) and failed  # the oversized WRITE's cookie 20 is answered too
    stream = nbdfuzz.REQUESTS
    expected, reads = nbdfuzz.codec_verdict(stream)
    assert expected == ([1, 2, 3, 4, 5, 6], False)
    assert nbdfuzz.live_verdict(stream, reads) == expected
    assert nbdfuzz.live_verdict(stream[:-10], reads) == ([1, 2, 3, 4, 5, 6], True)  # cut inside DISC


def test_split_feeding_finds_disagreement() -> None:
    """The whole-versus-split comparison is not vacuous: a decoder that drops split input is caught."""
    from vhdblkd.nbd.codec import RequestDecoder

    stream = nbdfuzz.REQUESTS
    whole = nbdfuzz._decode([stream])
    dec = RequestDecoder()
    first = dec.feed(stream[:40])  # a decoder fed only a prefix sees fewer requests
    assert len(first) < len(whole[0])


def test_requests_before_an_error_are_not_lost() -> None:
    from vhdblkd.errors import RemoteProtocolError
    from vhdblkd.nbd.codec import Request, RequestDecoder

    good = nbdfuzz.request(c.NBD_CMD_READ, 0, 512, 0, 7)
    bad = struct.pack(">IHHQQI", 0xDEADBEEF, 0, c.NBD_CMD_READ, 8, 0, 512)
    dec = RequestDecoder()
    expected = [Request(c.NBD_CMD_READ, 0, 7, 0, 512)]
    try:
        got = dec.feed(good + bad)
    except RemoteProtocolError as exc:
        assert getattr(exc, "requests", None) == expected
        return
    assert got == expected
    with pytest.raises(RemoteProtocolError):
        dec.feed(b"")


def test_bytes_after_abort_are_treated_alike() -> None:
    from vhdblkd.nbd.handshake import ServerHandshake

    flags = struct.pack(">I", c.NBD_FLAG_C_FIXED_NEWSTYLE)
    abort = nbdfuzz.option(c.NBD_OPT_ABORT)
    extra = nbdfuzz.option(c.NBD_OPT_LIST)
    outcomes = []
    for chunks in ([flags + abort + extra], [flags + abort, extra]):
        hs = ServerHandshake(nbdfuzz.EXPORTS, default="disk")
        try:
            for chunk in chunks:
                hs.feed(chunk)
            outcomes.append(hs.state.name)
        except Exception as exc:  # noqa: BLE001 - the outcome itself is compared
            outcomes.append(type(exc).__name__)
    assert outcomes[0] == outcomes[1], outcomes

"""Hostile NBD requests against a VHD image served over a socketpair.

Every request that can be framed gets an error reply and the connection
stays up; the ones that cannot be framed (bad magic, an oversized WRITE, a
stream cut inside a request) end the connection cleanly after the earlier
requests were answered.  serve_connection never raises, and afterwards the
image checks clean and holds exactly the model's content.
"""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reliability.faultfile import FaultFactory
from tests.reliability.nbdpeer import Peer
from vhdblkd.nbd import constants as c
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_dynamic
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.memfile import MemoryDisk, MemoryFileFactory

BS = 4096
SIZE = 64 * BS
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
PATH = "/mem/hostile.vhd"


class Served:
    """An image on an in-memory file under the bounds-checking fault layer, plus its model."""

    def __init__(self) -> None:
        self.disks: dict[str, MemoryDisk] = {}
        mem = MemoryFileFactory(self.disks)
        create_dynamic(PATH, SIZE, block_size=BS, exact_size=True, file_factory=mem)
        self.faults = FaultFactory(mem)
        self.image = open_image(PATH, lock=False, file_factory=self.faults)
        self.model = bytearray(SIZE)
        self.peer = Peer(self.image)
        # Some allocated content so errors have something to corrupt.
        for i in range(0, 64, 5):
            data = bytes([i + 1]) * 1500
            assert self.peer.write(i * BS + 300, data) == 0
            self.model[i * BS + 300 : i * BS + 1800] = data

    def finish(self, *, disconnected: bool = False) -> None:
        if disconnected:
            self.peer.join()
        else:
            self.peer.close()
        self.image.close()
        mem = MemoryFileFactory(self.disks)
        report = check_image(PATH, lock=False, file_factory=mem)
        assert report.clean, report.problems
        with open_image(PATH, read_only=True, lock=False, file_factory=mem) as image:
            assert bytes(image.read(0, SIZE)) == bytes(self.model)
        assert not self.faults.log_for(PATH).violations


@pytest.fixture
def served() -> Served:
    return Served()


# proto.md lets an out-of-range write fail with EINVAL (or, as older servers did, ENOSPC) and an
# unknown command with EINVAL or ENOTSUP; the test pins that it is an error, not which of these.
OUT_OF_RANGE_WRITE = frozenset({c.NBD_EINVAL, c.NBD_ENOSPC})
UNKNOWN = frozenset({c.NBD_EINVAL, c.NBD_ENOTSUP})
EINVAL = frozenset({c.NBD_EINVAL})
OK = frozenset({0})

# (type, offset, length, flags, payload length, allowed replies)
FRAMED = [
    ("read past the end", c.NBD_CMD_READ, SIZE - 512, 1024, 0, 0, EINVAL),
    ("read starting past the end", c.NBD_CMD_READ, SIZE + BS, 512, 0, 0, EINVAL),
    ("read offset+length overflows u64", c.NBD_CMD_READ, U64 - 511, 1024, 0, 0, EINVAL),
    ("read at offset 2^63", c.NBD_CMD_READ, 1 << 63, 512, 0, 0, EINVAL),
    ("read of more than 32 MiB", c.NBD_CMD_READ, 0, c.NBD_MAX_PAYLOAD + 1, 0, 0, EINVAL),
    ("read of 4 GiB - 1", c.NBD_CMD_READ, 0, U32, 0, 0, EINVAL),
    ("read with unknown flag", c.NBD_CMD_READ, 0, 512, 1 << 9, 0, EINVAL),
    ("write past the end", c.NBD_CMD_WRITE, SIZE - 512, 1024, 0, 1024, OUT_OF_RANGE_WRITE),
    ("write offset+length overflows u64", c.NBD_CMD_WRITE, U64 - 511, 1024, 0, 1024, OUT_OF_RANGE_WRITE),
    ("write with unknown flag", c.NBD_CMD_WRITE, 0, 512, 1 << 12, 512, EINVAL),
    ("trim past the end", c.NBD_CMD_TRIM, SIZE - BS, 2 * BS, 0, 0, EINVAL),
    ("trim of 4 GiB - 1", c.NBD_CMD_TRIM, 0, U32, 0, 0, EINVAL),
    ("trim overflow", c.NBD_CMD_TRIM, U64, U32, 0, 0, EINVAL),
    ("write-zeroes past the end", c.NBD_CMD_WRITE_ZEROES, SIZE - 1, 2, 0, 0, OUT_OF_RANGE_WRITE),
    ("write-zeroes overflow", c.NBD_CMD_WRITE_ZEROES, U64, 1, 0, 0, OUT_OF_RANGE_WRITE),
    ("write-zeroes with unknown flag", c.NBD_CMD_WRITE_ZEROES, 0, 512, 1 << 7, 0, EINVAL),
    ("cache past the end", c.NBD_CMD_CACHE, SIZE, 1, 0, 0, EINVAL),
    ("flush with unknown flag", c.NBD_CMD_FLUSH, 0, 0, 1 << 5, 0, EINVAL),
    ("block status without structured replies", c.NBD_CMD_BLOCK_STATUS, 0, 512, 0, 0, UNKNOWN),
    ("unknown command 99", 99, 0, 512, 0, 0, UNKNOWN),
    ("unknown command 0xffff", 0xFFFF, U64, U32, 0xFFFF, 0, UNKNOWN),
    ("zero-length read at the end", c.NBD_CMD_READ, SIZE, 0, 0, 0, OK),
    ("zero-length read past the end", c.NBD_CMD_READ, SIZE + 1, 0, 0, 0, EINVAL),
    ("zero-length write", c.NBD_CMD_WRITE, 512, 0, 0, 0, OK),
    ("zero-length write past the end", c.NBD_CMD_WRITE, SIZE + 512, 0, 0, 0, OUT_OF_RANGE_WRITE),
    ("zero-length trim", c.NBD_CMD_TRIM, 512, 0, 0, 0, OK),
    ("zero-length write-zeroes", c.NBD_CMD_WRITE_ZEROES, 700, 0, 0, 0, OK),
]


@pytest.mark.parametrize("case", FRAMED, ids=[f[0] for f in FRAMED])
def test_framed_hostile_request_gets_an_error_and_the_connection_stays_up(
        served: Served, case: tuple[str, int, int, int, int, int, frozenset[int]]) -> None:
    _, type_, offset, length, flags, payload, allowed = case
    peer = served.peer
    cookie, head = peer.header(type_, offset, length, flags)
    peer.send_raw(head + b"\xee" * payload)
    assert peer.reply(cookie) in allowed
    # A READ that succeeded (zero-length) carries no data; the stream is still in step.
    assert peer.read(300, 1500) == (0, bytes(served.model[300:1800]))
    assert peer.write(5 * BS + 1, b"q" * 10) == 0
    served.model[5 * BS + 1 : 5 * BS + 11] = b"q" * 10
    assert peer.flush() == 0
    served.finish()


def test_unaligned_requests_work(served: Served) -> None:
    peer = served.peer
    assert peer.write(7 * BS + 3, b"unaligned!") == 0
    served.model[7 * BS + 3 : 7 * BS + 13] = b"unaligned!"
    assert peer.read(7 * BS + 1, 17) == (0, bytes(served.model[7 * BS + 1 : 7 * BS + 18]))
    assert peer.zeroes(300 + 7, 5) == 0
    served.model[307:312] = bytes(5)
    assert peer.trim(BS * 10 + 300 + 1, 9) == 0
    served.model[BS * 10 + 301 : BS * 10 + 310] = bytes(9)
    assert peer.read(0, SIZE) == (0, bytes(served.model))
    served.finish()


def test_oversized_write_is_refused_and_the_connection_closed(served: Served) -> None:
    peer = served.peer
    cookie, head = peer.header(c.NBD_CMD_WRITE, 0, c.NBD_MAX_PAYLOAD + 512)
    peer.send_raw(head + b"\x55" * 4096)  # the start of a payload the server must not apply
    assert peer.reply(cookie) == c.NBD_EINVAL
    assert peer.at_eof()
    served.finish(disconnected=True)


def test_bad_magic_mid_stream_answers_earlier_requests_then_closes(served: Served) -> None:
    peer = served.peer
    c1, h1 = peer.header(c.NBD_CMD_WRITE, 2 * BS, 512)
    c2, h2 = peer.header(c.NBD_CMD_WRITE, 3 * BS, 512, magic=0x12345678)
    peer.send_raw(h1 + b"w" * 512 + h2 + b"x" * 512)
    served.model[2 * BS : 2 * BS + 512] = b"w" * 512
    assert peer.reply(c1) == 0
    assert peer.at_eof()
    served.finish(disconnected=True)


@pytest.mark.parametrize("cut", [1, 511, 4095])
def test_client_disconnects_mid_write_payload(served: Served, cut: int) -> None:
    peer = served.peer
    cookie, head = peer.header(c.NBD_CMD_WRITE, 20 * BS + 100, 4096)
    peer.send_raw(head + b"p" * cut)
    peer.sock.shutdown(socket.SHUT_WR)
    assert peer.at_eof()  # no reply for a request that never arrived whole
    served.finish(disconnected=True)


@pytest.mark.parametrize("cut", [1, 8, 27])
def test_client_disconnects_mid_header(served: Served, cut: int) -> None:
    peer = served.peer
    _, head = peer.header(c.NBD_CMD_WRITE, 0, 512)
    peer.send_raw(head[:cut])
    peer.sock.shutdown(socket.SHUT_WR)
    assert peer.at_eof()
    served.finish(disconnected=True)


def test_requests_after_disc_are_ignored(served: Served) -> None:
    peer = served.peer
    _, disc = peer.header(c.NBD_CMD_DISC)
    _, write = peer.header(c.NBD_CMD_WRITE, 0, 512)
    peer.send_raw(disc + write + b"z" * 512)
    assert peer.at_eof()
    served.finish(disconnected=True)


REQUEST = st.tuples(
    st.sampled_from([c.NBD_CMD_READ, c.NBD_CMD_WRITE, c.NBD_CMD_TRIM, c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_FLUSH,
                     c.NBD_CMD_CACHE, c.NBD_CMD_BLOCK_STATUS, 42]),
    st.one_of(st.integers(0, SIZE), st.integers(SIZE - 2 * BS, SIZE + BS), st.integers(0, U64)),
    st.one_of(st.integers(0, 3 * BS), st.integers(0, U32)),
    st.sampled_from([0, 0, 0, c.NBD_CMD_FLAG_FUA, c.NBD_CMD_FLAG_NO_HOLE, 1 << 15]),
)


@settings(max_examples=60)
@given(requests=st.lists(REQUEST, min_size=1, max_size=12))
def test_random_request_streams_keep_image_and_model_in_step(
        requests: list[tuple[int, int, int, int]]) -> None:
    served = Served()
    peer = served.peer
    for type_, offset, length, flags in requests:
        in_range = offset + length <= SIZE
        if type_ == c.NBD_CMD_WRITE:
            length = min(length, 3 * BS)  # a bigger payload is the oversized case above
            in_range = offset + length <= SIZE
            data = bytes([offset % 251 + 1]) * length
            cookie, head = peer.header(type_, offset, length, flags)
            peer.send_raw(head + data)
            error = peer.reply(cookie)
            ok = in_range and not flags & ~c.NBD_CMD_FLAG_FUA
            assert (error == 0) == ok, (offset, length, flags, error)
            if ok:
                served.model[offset : offset + length] = data
            continue
        cookie, head = peer.header(type_, offset, length, flags)
        peer.send_raw(head)
        error = peer.reply(cookie)
        if type_ == c.NBD_CMD_READ:
            ok = in_range and length <= c.NBD_MAX_PAYLOAD and not flags & ~c.NBD_CMD_FLAG_FUA
            assert (error == 0) == ok, (offset, length, flags, error)
            if ok:
                assert peer.recv_exact(length) == bytes(served.model[offset : offset + length])
        elif type_ in (c.NBD_CMD_TRIM, c.NBD_CMD_WRITE_ZEROES):
            allowed = c.NBD_CMD_FLAG_FUA | (c.NBD_CMD_FLAG_NO_HOLE if type_ == c.NBD_CMD_WRITE_ZEROES else 0)
            ok = in_range and not flags & ~allowed
            assert (error == 0) == ok, (type_, offset, length, flags, error)
            if ok:
                served.model[offset : offset + length] = bytes(length)
        elif type_ == c.NBD_CMD_FLUSH:
            assert (error == 0) == (not flags & ~c.NBD_CMD_FLAG_FUA)
        elif type_ == c.NBD_CMD_CACHE:
            assert (error == 0) == (in_range and not flags & ~c.NBD_CMD_FLAG_FUA)
        else:
            assert error in UNKNOWN
    assert peer.read(0, SIZE) == (0, bytes(served.model))
    served.finish()


def test_header_layout_matches_the_spec() -> None:
    # The peer builds headers by hand; pin that its layout is the 28-byte request of proto.md.
    assert struct.calcsize(">IHHQQI") == c.NBD_REQUEST_SIZE == 28

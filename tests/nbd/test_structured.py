"""Structured-reply encoding, the sparse READ plan and block status descriptors (no sockets)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhdblkd.backend import Extent
from vhdblkd.errors import LocalProtocolError
from vhdblkd.nbd import constants as c
from vhdblkd.nbd import structured as s

extents_st = st.lists(
    st.builds(Extent, st.integers(1, 1 << 20), st.integers(0, 3), st.booleans()), min_size=0, max_size=20
)


def test_chunk_layouts() -> None:
    assert s.none_chunk(7) == struct.pack(">IHHQI", c.NBD_STRUCTURED_REPLY_MAGIC, 1, 0, 7, 0)
    err = s.error_chunk(9, c.NBD_EIO, "bad sector")
    assert s.decode_chunk_header(err) == (1, c.NBD_REPLY_TYPE_ERROR, 9, 6 + 10)
    assert err[20:] == struct.pack(">IH", 5, 10) + b"bad sector"
    data = s.data_chunk_header(3, 4096, 100, done=False)
    assert s.decode_chunk_header(data) == (0, c.NBD_REPLY_TYPE_OFFSET_DATA, 3, 108) and data[20:] == struct.pack(">Q", 4096)
    assert s.DATA_CHUNK.pack(s.DATA_MAGIC_DONE, 3, 108, 4096) == s.data_chunk_header(3, 4096, 100, done=True)
    hole = s.hole_chunk(3, 0, 65536, done=True)
    assert s.decode_chunk_header(hole) == (1, c.NBD_REPLY_TYPE_OFFSET_HOLE, 3, 12) and hole[20:] == struct.pack(">QI", 0, 65536)
    bs = s.block_status_chunk(4, 2, [(512, 3), (1024, 0)], done=True)
    assert s.decode_chunk_header(bs) == (1, c.NBD_REPLY_TYPE_BLOCK_STATUS, 4, 4 + 16)
    assert bs[20:] == struct.pack(">IIIII", 2, 512, 3, 1024, 0)
    with pytest.raises(LocalProtocolError):
        s.error_chunk(1, 0)
    with pytest.raises(LocalProtocolError):
        s.block_status_chunk(1, 1, [], done=True)


@given(extents=extents_st, offset=st.integers(0, 1 << 30), length=st.integers(1, 1 << 22))
def test_read_plan_covers_the_read_exactly(extents: list[Extent], offset: int, length: int) -> None:
    plan = s.read_plan(offset, length, extents)
    pos = offset
    for i, (start, n, hole) in enumerate(plan):
        assert start == pos and n > 0
        assert not hole or n >= s.MIN_HOLE
        if i:
            assert plan[i - 1][2] != hole  # neighbours differ
        pos += n
    assert pos == offset + length
    # A hole in the plan is zero in the extents.
    zero_at = []
    p = offset
    for e in extents:
        zero_at.append((p, p + e.length, e.zero))
        p += e.length
    for start, n, hole in plan:
        if hole:
            assert all(z for a, b, z in zero_at if a < start + n and b > start)


@given(extents=extents_st, length=st.integers(1, 1 << 22), req_one=st.booleans())
def test_block_status_descriptors(extents: list[Extent], length: int, req_one: bool) -> None:
    for context in (c.META_BASE_ALLOCATION, c.META_QEMU_ALLOCATION_DEPTH):
        out = s.block_status(context, extents, length, req_one=req_one)
        assert bool(out) == bool(extents)
        assert sum(n for n, _ in out) <= length and all(n > 0 for n, _ in out)
        assert all(a[1] != b[1] for a, b in zip(out, out[1:], strict=False))
        if req_one:
            assert len(out) <= 1
        if out:
            first = s.context_flags(context, extents[0])
            assert out[0][1] == first


def test_block_status_flags() -> None:
    ext = [Extent(4096, 0, True), Extent(4096, 2, False), Extent(4096, 1, False)]
    assert s.block_status(c.META_BASE_ALLOCATION, ext, 1 << 20, req_one=False) == [(4096, 3), (8192, 0)]
    assert s.block_status(c.META_QEMU_ALLOCATION_DEPTH, ext, 1 << 20, req_one=False) == [(4096, 0), (4096, 2), (4096, 1)]
    assert s.block_status(c.META_BASE_ALLOCATION, ext, 6000, req_one=True) == [(4096, 3)]
    assert s.block_status(c.META_BASE_ALLOCATION, ext, 100, req_one=True) == [(100, 3)]
    with pytest.raises(LocalProtocolError):
        s.context_flags("x-other:thing", ext[0])

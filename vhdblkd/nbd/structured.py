"""Sans-IO structured replies: chunk encoding, sparse READ layout, and BLOCK_STATUS descriptors.

Nothing here does I/O.  `read_plan()` splits a READ into data and hole
pieces from the backend's allocation; `block_status()` turns allocation
extents into one context's descriptors; the `*_chunk` functions build the
20-byte chunk headers and payloads of proto.md's structured replies.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from ..backend import Extent
from ..errors import LocalProtocolError, RemoteProtocolError
from .constants import (
    META_BASE_ALLOCATION,
    META_QEMU_ALLOCATION_DEPTH,
    NBD_MAX_STRING,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    NBD_STRUCTURED_REPLY_MAGIC,
)

CHUNK_HEADER: Final = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
OFFSET: Final = struct.Struct(">Q")
HOLE: Final = struct.Struct(">QI")  # offset, hole size
ERROR: Final = struct.Struct(">IH")  # error, message length
DESCRIPTOR: Final = struct.Struct(">II")  # extent length, status flags
CONTEXT_ID: Final = struct.Struct(">I")

# A whole OFFSET_DATA chunk header: magic, DONE flag and type folded into one u64
# (magic << 32 | flags << 16 | type), cookie, payload length, offset.  The inline READ
# path writes the constant head once and packs only DATA_TAIL per READ: every big-endian
# u64 costs struct a generic conversion, the head's one included.
DATA_CHUNK: Final = struct.Struct(">QQIQ")
DATA_MAGIC_DONE: Final = (NBD_STRUCTURED_REPLY_MAGIC << 32) | (NBD_REPLY_FLAG_DONE << 16) | NBD_REPLY_TYPE_OFFSET_DATA
DATA_TAIL: Final = struct.Struct(">QIQ")  # cookie, payload length, offset: DATA_CHUNK from byte 8
# A READ shorter than this is answered with one data chunk: looking up its
# allocation would cost more than the zeros it could save on the wire.
SPARSE_READ_MIN: Final = 64 * 1024
# Holes shorter than this travel as data: a chunk header per tiny hole is no saving.
MIN_HOLE: Final = 4096
MAX_DESCRIPTORS: Final = 1 << 20  # proto.md: servers SHOULD NOT send more in one chunk

_U32 = 0xFFFF_FFFF


def chunk_header(cookie: int, type_: int, length: int, *, done: bool) -> bytes:
    return CHUNK_HEADER.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE if done else 0, type_, cookie, length)


def none_chunk(cookie: int) -> bytes:
    return chunk_header(cookie, NBD_REPLY_TYPE_NONE, 0, done=True)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    """The final chunk of a failed request: NBD_REPLY_TYPE_ERROR with a message for humans."""
    if not 0 < error <= _U32:
        raise LocalProtocolError(f"an error chunk needs a nonzero 32-bit error, not {error}")
    text = message.encode()[:NBD_MAX_STRING]
    return chunk_header(cookie, NBD_REPLY_TYPE_ERROR, ERROR.size + len(text), done=True) + ERROR.pack(error, len(text)) + text


def data_chunk_header(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    """Header and offset of an OFFSET_DATA chunk; `length` data bytes follow."""
    return chunk_header(cookie, NBD_REPLY_TYPE_OFFSET_DATA, OFFSET.size + length, done=done) + OFFSET.pack(offset)


def hole_chunk(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    return chunk_header(cookie, NBD_REPLY_TYPE_OFFSET_HOLE, HOLE.size, done=done) + HOLE.pack(offset, length)


def read_plan(offset: int, length: int, extents: Sequence[Extent]) -> list[tuple[int, int, bool]]:
    """(offset, length, is_hole) pieces covering the READ exactly, in order.

    Extents may stop short of the range (the rest is data) or run past it
    (clipped).  Holes shorter than MIN_HOLE merge into the data around them.
    """
    pieces: list[tuple[int, int, bool]] = []
    pos, end = offset, offset + length

    def add(n: int, hole: bool) -> None:
        nonlocal pos
        if pieces and pieces[-1][2] == hole:
            start, size, _ = pieces[-1]
            pieces[-1] = (start, size + n, hole)
        else:
            pieces.append((pos, n, hole))
        pos += n

    for extent in extents:
        if pos >= end:
            break
        n = min(extent.length, end - pos)
        if n <= 0:
            break
        add(n, extent.zero and n >= MIN_HOLE)
    if pos < end:
        add(end - pos, False)
    return pieces


def context_flags(context: str, extent: Extent) -> int:
    if context == META_BASE_ALLOCATION:
        return NBD_STATE_HOLE | NBD_STATE_ZERO if extent.zero else 0
    if context == META_QEMU_ALLOCATION_DEPTH:
        return extent.depth
    raise LocalProtocolError(f"no status flags for metadata context {context!r}")


def block_status(context: str, extents: Sequence[Extent], length: int, *, req_one: bool) -> list[tuple[int, int]]:
    """(length, flags) descriptors of one context for a request of `length` bytes.

    Equal neighbours merge; the list covers at most `length` bytes (never
    more: clients need no look-ahead) and at least one byte when `extents`
    is not empty.  With `req_one` exactly one descriptor.
    """
    out: list[tuple[int, int]] = []
    covered = 0
    for extent in extents:
        if covered >= length:
            break
        n = min(extent.length, length - covered)
        flags = context_flags(context, extent)
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + n, flags)
        else:
            if req_one and out:
                break
            if len(out) >= MAX_DESCRIPTORS:
                break
            out.append((n, flags))
        covered += n
    return out


def block_status_chunk(cookie: int, context_id: int, descriptors: Sequence[tuple[int, int]], *, done: bool) -> bytes:
    if not descriptors:
        raise LocalProtocolError("a block status chunk needs at least one descriptor")
    body = CONTEXT_ID.pack(context_id) + b"".join(DESCRIPTOR.pack(n, f) for n, f in descriptors)
    return chunk_header(cookie, NBD_REPLY_TYPE_BLOCK_STATUS, len(body), done=done) + body


def decode_chunk_header(buf: bytes) -> tuple[int, int, int, int]:
    """(flags, type, cookie, payload length) of a chunk header; for clients and tests."""
    magic, flags, type_, cookie, length = CHUNK_HEADER.unpack_from(buf)
    if magic != NBD_STRUCTURED_REPLY_MAGIC:
        raise RemoteProtocolError(f"bad structured reply magic {magic:#010x}")
    return flags, type_, cookie, length

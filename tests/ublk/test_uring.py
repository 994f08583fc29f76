"""The io_uring layer: head/tail arithmetic over plain memory, then the host kernel's own io_uring.

The first half plays the kernel's side of the rings by hand over a bytearray
laid out as the kernel lays out its mapping (it only checks our index
arithmetic, wrap-around and full/empty; no kernel behaviour is imitated).
The second half runs real rings on the host kernel: NOPs and file reads,
plain and 128-byte SQEs, through many wraps of the ring indexes.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from vhdblkd.ublk import constants as c
from vhdblkd.ublk.structs import CQE, SQE_HEAD, CqringOffsets, SqringOffsets
from vhdblkd.ublk.uring import CompletionQueue, Ring, RingFull, SubmissionQueue, prep

ENTRIES = 8
# A ring mapping as the kernel builds one: heads/tails first, then the SQ index array, then CQEs.
SQ_OFF = SqringOffsets(head=0, tail=4, ring_mask=8, ring_entries=12, flags=16, dropped=20, array=64)
CQ_OFF = CqringOffsets(head=32, tail=36, ring_mask=40, ring_entries=44, overflow=48, cqes=128)


def _u32(mem: bytearray, off: int, value: int | None = None) -> int:
    if value is not None:
        mem[off : off + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
    return int.from_bytes(mem[off : off + 4], "little")


def _memory(start: int = 0) -> tuple[bytearray, bytearray]:
    mem = bytearray(CQ_OFF.cqes + 2 * ENTRIES * c.CQE_SIZE)
    for off, value in ((SQ_OFF.ring_mask, ENTRIES - 1), (SQ_OFF.ring_entries, ENTRIES),
                       (CQ_OFF.ring_mask, 2 * ENTRIES - 1), (CQ_OFF.ring_entries, 2 * ENTRIES),
                       (SQ_OFF.head, start), (SQ_OFF.tail, start), (CQ_OFF.head, start), (CQ_OFF.tail, start)):
        _u32(mem, off, value)
    return mem, bytearray(ENTRIES * c.SQE_SIZE)


def _kernel_consume(mem: bytearray, sqes: bytearray) -> list[int]:
    """Play the kernel: take every published SQE (through the index array), return their user_data."""
    head, tail = _u32(mem, SQ_OFF.head), _u32(mem, SQ_OFF.tail)
    out = []
    while head != tail:
        index = _u32(mem, SQ_OFF.array + 4 * (head & (ENTRIES - 1)))
        out.append(SQE_HEAD.unpack_from(sqes, index * c.SQE_SIZE)[9])
        head = (head + 1) & 0xFFFFFFFF
    _u32(mem, SQ_OFF.head, head)
    return out


def _kernel_post(mem: bytearray, *cqes: tuple[int, int, int]) -> None:
    tail = _u32(mem, CQ_OFF.tail)
    for cqe in cqes:
        CQE.pack_into(mem, CQ_OFF.cqes + (tail & (2 * ENTRIES - 1)) * c.CQE_SIZE, *cqe)
        tail = (tail + 1) & 0xFFFFFFFF
    _u32(mem, CQ_OFF.tail, tail)


@pytest.mark.parametrize("start", [0, 5, 0xFFFFFFFF - 3], ids=["zero", "odd", "u32-wrap"])
def test_submission_queue_arithmetic(start: int) -> None:
    mem, sqes = _memory(start)
    sq = SubmissionQueue(mem, SQ_OFF, sqes, c.SQE_SIZE)
    assert sq.space() == ENTRIES
    seen: list[int] = []
    next_id = 0
    for batch in (3, 8, 1, 5, 8, 7):
        for _ in range(batch):
            prep(sq, c.IORING_OP_NOP, -1, user_data=next_id)
            next_id += 1
        assert sq.space() == ENTRIES - batch
        assert _kernel_consume(mem, sqes) == []  # nothing visible before publish
        assert sq.publish() == batch
        seen += _kernel_consume(mem, sqes)
        assert sq.publish() == 0 and sq.space() == ENTRIES
    assert seen == list(range(next_id))
    sq.release()


def test_submission_queue_full_and_partial_consumption() -> None:
    mem, sqes = _memory()
    sq = SubmissionQueue(mem, SQ_OFF, sqes, c.SQE_SIZE)
    for i in range(ENTRIES):
        prep(sq, c.IORING_OP_NOP, -1, user_data=i)
    with pytest.raises(RingFull):
        sq.next_sqe()
    assert sq.publish() == ENTRIES
    _u32(mem, SQ_OFF.head, 3)  # the kernel took only three
    assert sq.space() == 3 and sq.publish() == ENTRIES - 3
    sq.release()


@pytest.mark.parametrize("start", [0, 0xFFFFFFFF - 2], ids=["zero", "u32-wrap"])
def test_completion_queue_drains_in_order(start: int) -> None:
    mem, _ = _memory(start)
    cq = CompletionQueue(mem, CQ_OFF)
    assert cq.drain() == []
    expected = []
    for round_ in range(5):
        batch = [(round_ * 100 + i, -i, i) for i in range(round_ * 3 % (2 * ENTRIES) + 1)]
        _kernel_post(mem, *batch)
        assert cq.ready() == len(batch)
        got = cq.drain()
        assert got == batch
        expected += got
        assert _u32(mem, CQ_OFF.head) == _u32(mem, CQ_OFF.tail)  # every slot handed back
    assert len(expected) == sum(r * 3 % 16 + 1 for r in range(5))
    cq.release()


# --- the host kernel's io_uring -------------------------------------------------------------


def test_nop_batches_through_many_wraps() -> None:
    ring = Ring(4)
    try:
        assert ring.sq.entries == 4 and ring.cq.entries == 8
        for round_ in range(300):  # about 150 passes over the 4 SQ slots
            n = round_ % 4 + 1
            for i in range(n):
                prep(ring.sq, c.IORING_OP_NOP, -1, user_data=round_ * 10 + i)
            assert ring.submit(wait=n) == n
            got = ring.completions()
            assert sorted(u for u, _res, _f in got) == [round_ * 10 + i for i in range(n)]
            assert all(res == 0 for _u, res, _f in got)
        assert ring.cq.overflow == 0
    finally:
        ring.close()


def test_read_and_write_through_the_ring(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * 64)
    fd = os.open(path, os.O_RDWR)
    ring = Ring(8)
    try:
        buf = ctypes.create_string_buffer(4096)
        prep(ring.sq, c.IORING_OP_READ, fd, off=4096, addr=ctypes.addressof(buf), length=4096, user_data=1)
        ring.submit(wait=1)
        assert ring.completions() == [(1, 4096, 0)]
        assert buf.raw == (bytes(range(256)) * 64)[4096:8192]
        out = ctypes.create_string_buffer(b"ring" * 256, 1024)
        prep(ring.sq, c.IORING_OP_WRITE, fd, off=100, addr=ctypes.addressof(out), length=1024, user_data=2)
        prep(ring.sq, c.IORING_OP_READ, -1, addr=ctypes.addressof(buf), length=1, user_data=3)  # bad fd
        ring.submit(wait=2)
        assert sorted(ring.completions()) == [(2, 1024, 0), (3, -9, 0)]  # -EBADF comes back as a CQE
        assert path.read_bytes()[100:1124] == b"ring" * 256
    finally:
        ring.close()
        os.close(fd)


def test_sqe128_ring_takes_wide_entries() -> None:
    ring = Ring(2, sqe128=True)
    try:
        assert ring.sq.sqe_size == 128
        for i in range(10):
            prep(ring.sq, c.IORING_OP_NOP, -1, user_data=i, cmd=bytes([i]) * 80)
            ring.submit(wait=1)
            assert ring.completions() == [(i, 0, 0)]
    finally:
        ring.close()


def test_the_queue_loops_one_pack_commit_is_the_sqe_prep_writes() -> None:
    from vhdblkd.ublk.queue import _IO_SQE
    from vhdblkd.ublk.structs import IO_CMD

    mem, sqes = _memory()
    sq = SubmissionQueue(mem, SQ_OFF, sqes, c.SQE_SIZE)
    sqes[:] = b"\xaa" * len(sqes)  # stale bytes of an earlier use of the slots
    prep(sq, c.IORING_OP_URING_CMD, 5, off=c.UBLK_U_IO_COMMIT_AND_FETCH_REQ, user_data=9,
         cmd=IO_CMD.pack(1, 9, -28, 0x7F0000001000))
    _IO_SQE.pack_into(sq.sqes, sq.next_sqe(False), c.IORING_OP_URING_CMD, 0, 0, 5, c.UBLK_U_IO_COMMIT_AND_FETCH_REQ,
                      0, 0, 0, 0, 9, 0, 0, 0, 1, 9, -28, 0x7F0000001000)
    assert sqes[: c.SQE_SIZE] == sqes[c.SQE_SIZE : 2 * c.SQE_SIZE]

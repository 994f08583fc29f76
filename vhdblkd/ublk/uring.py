"""A small io_uring in pure Python: ctypes system calls, mmap'd rings, struct-packed entries.

`io_uring_setup` returns the ring descriptor and the offsets of the SQ ring
(head, tail, mask, index array), the CQ ring (head, tail, mask, CQEs) and,
in a third mapping, the SQE array.  `SubmissionQueue` and `CompletionQueue`
hold only the head/tail arithmetic over a writable buffer, so tests can run
them over a plain bytearray; `Ring` adds the mappings and system calls.

Memory ordering.  The kernel reads the SQ tail with acquire semantics and
publishes the CQ tail with release semantics; userspace must write an SQE
before the tail that covers it, and read a CQE after the tail that covers
it.  On x86-64 (TSO) stores become visible in program order and loads are
not reordered with other loads, so plain stores and loads suffice provided
the compiler keeps their order.  CPython performs each SQE write, tail
store and CQE read as a separate call into C, which no compiler reorders,
and the head/tail words are accessed through aligned 32-bit ctypes views
(single, untorn loads and stores).  Weaker architectures would need real
barriers, which the standard library cannot issue: `Ring` refuses to run
anywhere but x86-64.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
from collections.abc import Callable
from typing import Final

from ..errors import UblkError, UblkUnavailable
from .constants import (
    CQE_SIZE,
    IORING_ENTER_GETEVENTS,
    IORING_FEAT_SINGLE_MMAP,
    IORING_OFF_CQ_RING,
    IORING_OFF_SQ_RING,
    IORING_OFF_SQES,
    IORING_SETUP_SQE128,
    NR_IO_URING_ENTER,
    NR_IO_URING_SETUP,
    SQE128_SIZE,
    SQE_OFF_CMD,
    SQE_SIZE,
)
from .structs import CQE, SQE_HEAD, CqringOffsets, SqringOffsets, UringParams

_U32: Final = 0xFFFFFFFF
_IO_URING_DISABLED: Final = "/proc/sys/kernel/io_uring_disabled"

Completion = tuple[int, int, int]  # user_data, res, flags
RingMemory = bytearray | mmap.mmap  # writable: the kernel's mapping, or a test's bytearray


class RingFull(UblkError):
    """No free SQE: the caller queued more than the ring holds (a bug)."""


def prep(
    sq: SubmissionQueue,
    opcode: int,
    fd: int,
    *,
    off: int = 0,
    addr: int = 0,
    length: int = 0,
    user_data: int = 0,
    cmd: bytes = b"",
) -> None:
    """Queue one SQE; for IORING_OP_URING_CMD `off` is the u32 cmd_op and `cmd` the command area."""
    offset = sq.next_sqe(zero=len(cmd) + SQE_OFF_CMD < sq.sqe_size)
    SQE_HEAD.pack_into(
        sq.sqes, offset, opcode, 0, 0, fd, off & _U32, off >> 32, addr, length, 0, user_data, 0, 0, 0
    )
    if cmd:
        sq.sqes[offset + SQE_OFF_CMD : offset + SQE_OFF_CMD + len(cmd)] = cmd


def _u32_at(buf: RingMemory, offset: int) -> ctypes.c_uint32:
    # An aligned 32-bit view: one untorn load or store per access.
    assert offset % 4 == 0, offset
    return ctypes.c_uint32.from_buffer(buf, offset)


class SubmissionQueue:
    """The SQ ring: we own the tail, the kernel the head; the index array maps slot i to SQE i."""

    def __init__(self, ring: RingMemory, off: SqringOffsets, sqes: RingMemory, sqe_size: int) -> None:
        self._khead = _u32_at(ring, off.head)
        self._ktail = _u32_at(ring, off.tail)
        self.mask = _u32_at(ring, off.ring_mask).value
        self.entries = _u32_at(ring, off.ring_entries).value
        self.sqes = memoryview(sqes).cast("B")
        self.sqe_size = sqe_size
        self._zero = bytes(sqe_size)
        self._tail = self._ktail.value
        array = memoryview(ring).cast("B")[off.array : off.array + 4 * self.entries].cast("I")
        for i in range(self.entries):
            array[i] = i
        array.release()

    def space(self) -> int:
        """SQEs that can still be queued."""
        return self.entries - ((self._tail - self._khead.value) & _U32)

    def next_sqe(self, zero: bool = True) -> int:
        """Reserve the next SQE and return its byte offset in `sqes`.

        `zero=False` is for callers that write all of its bytes themselves.
        """
        if self.space() <= 0:
            raise RingFull(f"io_uring submission queue full ({self.entries} entries)")
        offset = (self._tail & self.mask) * self.sqe_size
        if zero:
            self.sqes[offset : offset + self.sqe_size] = self._zero
        self._tail = (self._tail + 1) & _U32
        return offset

    def publish(self) -> int:
        """Make every reserved SQE visible to the kernel; return how many it has not consumed yet."""
        self._ktail.value = self._tail  # after the SQE writes: see the module docstring
        return (self._tail - self._khead.value) & _U32

    def release(self) -> None:
        self.sqes.release()
        del self._khead, self._ktail


class CompletionQueue:
    """The CQ ring: the kernel owns the tail, we own the head."""

    def __init__(self, ring: RingMemory, off: CqringOffsets, cqe_size: int = CQE_SIZE) -> None:
        self._khead = _u32_at(ring, off.head)
        self._ktail = _u32_at(ring, off.tail)
        self.mask = _u32_at(ring, off.ring_mask).value
        self.entries = _u32_at(ring, off.ring_entries).value
        self._overflow = _u32_at(ring, off.overflow)
        self.mem = memoryview(ring).cast("B")
        self.base = off.cqes
        self.cqe_size = cqe_size

    def ready(self) -> int:
        return (self._ktail.value - self._khead.value) & _U32

    def drain(self) -> list[Completion]:
        """Every completion posted so far, oldest first; their slots are handed back to the kernel."""
        head = self._khead.value
        tail = self._ktail.value  # before reading the CQEs it covers
        out: list[Completion] = []
        unpack, mem, base, size, mask = CQE.unpack_from, self.mem, self.base, self.cqe_size, self.mask
        while head != tail:
            out.append(unpack(mem, base + (head & mask) * size))
            head = (head + 1) & _U32
        self._khead.value = head  # after the reads
        return out

    @property
    def overflow(self) -> int:
        return self._overflow.value

    def release(self) -> None:
        self.mem.release()
        del self._khead, self._ktail, self._overflow


def _libc_syscall() -> Callable[..., int]:
    # CDLL (not PyDLL) calls release the GIL: other queue threads run while one waits.
    fn = ctypes.CDLL(None, use_errno=True).syscall
    fn.restype = ctypes.c_long
    syscall: Callable[..., int] = fn
    return syscall


def check_platform() -> None:
    if platform.machine() not in ("x86_64", "AMD64"):
        raise UblkUnavailable(
            f"the ublk transport runs on x86-64 only (this is {platform.machine()}): "
            "its io_uring code relies on x86 memory ordering; use --transport nbd"
        )


def _setup_error(err: int, flags: int) -> UblkError:
    if err == errno.ENOSYS:
        return UblkUnavailable(
            "this kernel has no io_uring (CONFIG_IO_URING is off): ublk needs it; use --transport nbd", err
        )
    if err == errno.EPERM:
        try:
            with open(_IO_URING_DISABLED) as f:
                setting = f.read().strip()
        except OSError:
            setting = "?"
        return UblkUnavailable(
            f"io_uring is disabled (kernel.io_uring_disabled = {setting}): run "
            "`sysctl kernel.io_uring_disabled=0` (or 1 for root only) and retry, or use --transport nbd",
            err,
        )
    if err == errno.EINVAL and flags & IORING_SETUP_SQE128:
        return UblkUnavailable(
            f"this kernel ({platform.release()}) has no 128-byte io_uring entries (IORING_SETUP_SQE128, "
            "Linux 5.19): ublk needs Linux 6.1 or later; use --transport nbd",
            err,
        )
    if err == errno.ENOMEM:
        return UblkError("io_uring_setup: out of memory (or RLIMIT_MEMLOCK too low on kernels before 5.12)", err)
    return UblkError(f"io_uring_setup failed: {os.strerror(err)}", err)


class Ring:
    """One io_uring instance: SQEs in, CQEs out.  Not thread-safe: one owner thread."""

    def __init__(self, entries: int, *, sqe128: bool = False, flags: int = 0) -> None:
        check_platform()
        self._syscall = _libc_syscall()
        if sqe128:
            flags |= IORING_SETUP_SQE128
        params = ctypes.create_string_buffer(UringParams(0, 0, flags).pack(), UringParams.SIZE)
        fd = self._syscall(ctypes.c_long(NR_IO_URING_SETUP), ctypes.c_long(entries), params)
        if fd < 0:
            raise _setup_error(ctypes.get_errno(), flags)
        self.fd = int(fd)
        self._maps: list[mmap.mmap] = []
        try:
            p = UringParams.unpack(params.raw)
            assert p.sq_off is not None and p.cq_off is not None
            self.params = p
            sqe_size = SQE128_SIZE if flags & IORING_SETUP_SQE128 else SQE_SIZE
            sq_len = p.sq_off.array + p.sq_entries * 4
            cq_len = p.cq_off.cqes + p.cq_entries * CQE_SIZE
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            if p.features & IORING_FEAT_SINGLE_MMAP:
                sq_ring = cq_ring = self._map(max(sq_len, cq_len), IORING_OFF_SQ_RING, prot)
            else:
                sq_ring = self._map(sq_len, IORING_OFF_SQ_RING, prot)
                cq_ring = self._map(cq_len, IORING_OFF_CQ_RING, prot)
            sqes = self._map(p.sq_entries * sqe_size, IORING_OFF_SQES, prot)
            self.sq = SubmissionQueue(sq_ring, p.sq_off, sqes, sqe_size)
            self.cq = CompletionQueue(cq_ring, p.cq_off)
        except BaseException:
            self._unmap()
            os.close(self.fd)
            raise

    def _map(self, length: int, offset: int, prot: int) -> mmap.mmap:
        m = mmap.mmap(self.fd, length, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot, offset=offset)
        self._maps.append(m)
        return m

    def _unmap(self) -> None:
        for m in self._maps:
            m.close()
        self._maps.clear()

    def enter(self, to_submit: int, min_complete: int, flags: int) -> int:
        """io_uring_enter, retried on EINTR; returns how many SQEs the kernel consumed."""
        while True:
            ret = self._syscall(
                ctypes.c_long(NR_IO_URING_ENTER),
                ctypes.c_long(self.fd),
                ctypes.c_long(to_submit),
                ctypes.c_long(min_complete),
                ctypes.c_long(flags),
                None,
                ctypes.c_long(0),
            )
            if ret >= 0:
                return int(ret)
            err = ctypes.get_errno()
            if err == errno.EINTR:
                # Whatever was consumed shows in the SQ head; the caller recomputes.
                to_submit = self.sq.publish()
                continue
            raise UblkError(f"io_uring_enter failed: {os.strerror(err)}", err)

    def submit(self, wait: int = 0) -> int:
        """Hand every queued SQE to the kernel in one call; with `wait`, block until that many CQEs."""
        pending = self.sq.publish()
        if pending == 0 and wait == 0:
            return 0
        return self.enter(pending, wait, IORING_ENTER_GETEVENTS if wait else 0)

    def completions(self) -> list[Completion]:
        return self.cq.drain()

    def close(self) -> None:
        if self.fd < 0:
            return
        self.sq.release()
        self.cq.release()
        self._unmap()
        os.close(self.fd)
        self.fd = -1

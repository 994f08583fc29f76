"""One ublk queue: a thread, its io_uring and its tags, turning descriptors into handler calls.

The thread that FETCHes a queue's tags becomes that queue's daemon in the
kernel: every later command for the queue must come from it, and the kernel
copies request data to and from the buffers in that thread's context.  So
the ring is created, armed and driven by this one thread.

The loop: FETCH every tag (each with its own buffer of the device's maximum
request size), then repeatedly enter the kernel once to submit every
COMMIT_AND_FETCH queued so far and wait for at least one completion, and
drain every completion posted.  A completion with result 0 means the
descriptor of its tag (user_data = tag) holds a request; the handler's
result (bytes done or -errno) is committed with that tag's re-arm.  FLUSH
goes to the queue's flush thread instead (flusher.py), whose results come
back through an eventfd read in the same ring and are committed then.  A
completion with UBLK_IO_RES_ABORT (-ENODEV) means the device is stopping
and the tag is not re-armed; the thread ends when no tag is left.

`release` ends the thread without stopping the device: an eventfd read
queued in the same ring completes, the batch in hand is committed, and the
ring is closed.  The kernel then requeues what is still in flight and holds
new requests until a server recovers the device (UBLK_F_USER_RECOVERY).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct
import threading
from typing import Protocol

from ..errors import UblkError
from . import constants as c
from .flusher import Flusher
from .structs import IO_CMD, IO_DESC, SQE_HEAD, IoDesc
from .uring import Completion, Ring, SubmissionQueue, prep

log = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE
# A whole I/O SQE in one pack: the SQE head as prep() writes it, then the ublksrv_io_cmd.
_IO_SQE = struct.Struct(SQE_HEAD.format + IO_CMD.format.lstrip("<"))
assert _IO_SQE.size == c.SQE_SIZE
_WAKE = 1 << 32  # user_data of the release eventfd's read; tags are 16-bit
_FLUSHED = 1 << 33  # user_data of the flusher eventfd's read


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def desc_array_offset(q_id: int) -> int:
    """Where queue q_id's descriptors sit in /dev/ublkcN: the kernel spaces queues by the largest depth."""
    return c.UBLKSRV_CMD_BUF_OFFSET + q_id * _round_up(c.UBLK_MAX_QUEUE_DEPTH * IoDesc.SIZE, _PAGE)


def desc_array_length(depth: int) -> int:
    return _round_up(depth * IoDesc.SIZE, _PAGE)


def io_opcodes(encoded: bool) -> tuple[int, int]:
    """FETCH_REQ and COMMIT_AND_FETCH_REQ, encoded (6.4+) or legacy (6.1-6.3), as the control device chose."""
    if encoded:
        return c.UBLK_U_IO_FETCH_REQ, c.UBLK_U_IO_COMMIT_AND_FETCH_REQ
    return c.UBLK_IO_FETCH_REQ, c.UBLK_IO_COMMIT_AND_FETCH_REQ


def _count(stats: QueueStats, op: int, result: int) -> None:
    stats.requests += 1
    if result < 0:
        stats.errors += 1
    elif op == c.UBLK_IO_OP_READ:
        stats.reads += 1
        stats.bytes_read += result
    elif op == c.UBLK_IO_OP_WRITE:
        stats.writes += 1
        stats.bytes_written += result
    elif op == c.UBLK_IO_OP_FLUSH:
        stats.flushes += 1
    elif op == c.UBLK_IO_OP_DISCARD:
        stats.trims += 1
    elif op == c.UBLK_IO_OP_WRITE_ZEROES:
        stats.writes += 1


class Handler(Protocol):
    """Serves one request: `buf` is the tag's buffer (data in for writes, out for reads)."""

    def __call__(self, op: int, flags: int, offset: int, length: int, buf: memoryview) -> int:
        """Return the bytes done (READ/WRITE), 0 (others), or -errno."""

    def flush(self) -> int:
        """Serve a FLUSH (on the queue's flush thread): 0 or -errno."""


class QueueStats:
    """One queue's counters, bumped only by its thread (the names are the NBD transport's)."""

    __slots__ = ("reads", "writes", "bytes_read", "bytes_written", "flushes", "trims", "errors", "requests", "enters")

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0  # WRITE and WRITE_ZEROES
        self.bytes_read = 0
        self.bytes_written = 0  # WRITE payload bytes
        self.flushes = 0  # FLUSH requests served
        self.trims = 0  # DISCARD requests
        self.errors = 0  # requests completed with -errno
        self.requests = 0
        self.enters = 0  # io_uring_enter calls that waited for requests: requests / enters is the batch size

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Queue:
    """The thread serving one hardware queue of one device."""

    def __init__(
        self, char_fd: int, q_id: int, depth: int, io_buf_bytes: int, handler: Handler, *, encoded: bool
    ) -> None:
        self.char_fd = char_fd
        self.q_id = q_id
        self.depth = depth
        self.io_buf_bytes = io_buf_bytes
        self.handler = handler
        self.fetch_op, self.commit_op = io_opcodes(encoded)
        self.armed = threading.Event()
        self.error: BaseException | None = None
        self.stats = QueueStats()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC)
        self._wake_buf = ctypes.create_string_buffer(8)
        self._flusher = Flusher(handler.flush, f"ublk-q{q_id}-flush")
        self._flushed_buf = ctypes.create_string_buffer(8)
        self._thread = threading.Thread(target=self._main, name=f"ublk-q{q_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait_armed(self, timeout: float | None = None) -> None:
        """Block until every tag is FETCHed (or the thread failed, which is raised)."""
        if not self.armed.wait(timeout):
            raise UblkError(f"ublk queue {self.q_id}: tags not armed within {timeout} s")
        if self.error is not None:
            raise self.error

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if not self._thread.is_alive() and self._wake >= 0:
            os.close(self._wake)
            self._wake = -1

    def release(self) -> None:
        """Ask the thread to stop serving between two batches, leaving the device to a later server."""
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)

    @property
    def requests(self) -> int:
        return self.stats.requests

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- the thread ----------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the queue
            self.error = exc
            if self.armed.is_set():
                log.exception("ublk queue %d failed", self.q_id)
        finally:
            self.armed.set()

    def _serve(self) -> None:
        depth, size = self.depth, self.io_buf_bytes
        descs = mmap.mmap(
            self.char_fd, desc_array_length(depth), mmap.MAP_SHARED, mmap.PROT_READ, offset=desc_array_offset(self.q_id)
        )
        bufs = mmap.mmap(-1, depth * size)
        anchor = ctypes.c_char.from_buffer(bufs)
        base = ctypes.addressof(anchor)
        view = memoryview(bufs)
        ring = Ring(depth + 2)  # every tag's command and the two eventfd reads
        try:
            self._loop(ring, descs, view, base)
        finally:
            ring.close()
            self._flusher.close()
            view.release()
            del anchor
            bufs.close()
            descs.close()

    def _read_event(self, sq: SubmissionQueue, fd: int, buf: ctypes.Array[ctypes.c_char], user_data: int) -> None:
        prep(sq, c.IORING_OP_READ, fd, addr=ctypes.addressof(buf), length=8, user_data=user_data)

    def _arm(self, ring: Ring, base: int) -> list[Completion]:
        """FETCH every tag and queue both eventfd reads; returns the completions already posted."""
        q_id, size, sq = self.q_id, self.io_buf_bytes, ring.sq
        for tag in range(self.depth):
            prep(sq, c.IORING_OP_URING_CMD, self.char_fd, off=self.fetch_op, user_data=tag,
                 cmd=IO_CMD.pack(q_id, tag, 0, base + tag * size))
        self._read_event(sq, self._wake, self._wake_buf, _WAKE)
        self._read_event(sq, self._flusher.event, self._flushed_buf, _FLUSHED)
        ring.submit()
        early = ring.completions()  # FETCH is handled inline: a refusal is already posted
        refused = [(tag, res) for tag, res, _ in early if res < 0 and tag < _WAKE]
        if refused:
            tag, res = refused[0]
            raise UblkError(f"ublk queue {q_id}: FETCH of tag {tag} refused: {os.strerror(-res)}", -res)
        return early

    def _commit_flushes(self, sq: SubmissionQueue, base: int) -> None:
        """The flush thread's results: commit (and re-arm) their tags, queue the eventfd read again."""
        q_id, size, fd, commit_op = self.q_id, self.io_buf_bytes, self.char_fd, self.commit_op
        for tags, result in self._flusher.finished():
            for tag in tags:
                _count(self.stats, c.UBLK_IO_OP_FLUSH, result)
                prep(sq, c.IORING_OP_URING_CMD, fd, off=commit_op, user_data=tag,
                     cmd=IO_CMD.pack(q_id, tag, result, base + tag * size))
        self._read_event(sq, self._flusher.event, self._flushed_buf, _FLUSHED)

    def _loop(self, ring: Ring, descs: mmap.mmap, view: memoryview, base: int) -> None:
        depth, size, q_id, sq = self.depth, self.io_buf_bytes, self.q_id, ring.sq
        fd, uring_cmd, commit_op, flusher = self.char_fd, c.IORING_OP_URING_CMD, self.commit_op, self._flusher
        early = self._arm(ring, base)
        self.armed.set()
        live = depth
        pending = early
        unpack, handler, stats = IO_DESC.unpack_from, self.handler, self.stats
        pack_sqe, next_sqe, sqes = _IO_SQE.pack_into, sq.next_sqe, sq.sqes
        released = False
        while live and not released:
            if not pending:
                ring.submit(wait=1)  # every commit of the last batch goes in this one call
                stats.enters += 1
                pending = ring.completions()
            for tag, res, _flags in pending:
                if tag >= _WAKE:  # an eventfd: release, or flushes done
                    if tag == _WAKE:
                        released = True
                    else:
                        self._commit_flushes(sq, base)
                    continue
                if res != c.UBLK_IO_RES_OK:
                    live -= 1
                    if res != -errno.ENODEV:  # UBLK_IO_RES_ABORT: the device is going away
                        log.error("ublk queue %d tag %d: command failed: %s", q_id, tag, os.strerror(-res))
                    continue
                op_flags, nr_sectors, start_sector, _addr = unpack(descs, tag * IoDesc.SIZE)
                if op_flags & 0xFF == c.UBLK_IO_OP_FLUSH:
                    flusher.submit(tag)  # committed when the flush thread is done
                    continue
                length = nr_sectors << c.SECTOR_SHIFT
                start = tag * size
                try:
                    result = handler(
                        op_flags & 0xFF, op_flags & ~0xFF, start_sector << c.SECTOR_SHIFT, length,
                        view[start : start + min(length, size)],
                    )
                except Exception:  # noqa: BLE001 - a bug in the handler must not wedge the device
                    log.exception("ublk queue %d tag %d: request failed", q_id, tag)
                    result = -errno.EIO
                _count(stats, op_flags & 0xFF, result)
                # COMMIT_AND_FETCH, the whole SQE in one pack (what prep() writes, in fewer calls).
                pack_sqe(sqes, next_sqe(False), uring_cmd, 0, 0, fd, commit_op, 0, 0, 0, 0, tag, 0, 0, 0,
                         q_id, tag, result, base + start)
            pending = []
        if released:
            ring.submit()  # the last batch's results; closing the ring then hands the tags back
            log.info("ublk queue %d released", q_id)

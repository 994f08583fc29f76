"""Structured replies of the transmission loop: sparse READs, error chunks, BLOCK_STATUS.

A mixin of the connection (connection.py), which owns the socket, the
request layer and the counters; the encoding is in structured.py.  READ
pieces come from the backend's allocation (`AllocationMap`) when the read is
long enough for holes to matter; block status answers every negotiated
context from one allocation lookup.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence

from ..backend import Buffer, Extent
from ..request import Command, Request, RequestLayer, describe, errno_for
from . import structured as sr
from .codec import nbd_error
from .constants import NBD_CMD_FLAG_REQ_ONE, NBD_EINVAL
from .export import Stats


class StructuredReplies:
    sock: socket.socket
    send_lock: threading.Lock
    stats: Stats
    layer: RequestLayer
    contexts: dict[int, str]
    allocation: Callable[[int, int], Sequence[Extent]] | None

    def _send(self, header: bytes, data: Buffer | None = None, error: int = 0) -> None:
        raise NotImplementedError

    def _reject(
        self, name: str, flags: int, offset: int, length: int, cookie: int, error: int, read: bool = False
    ) -> None:
        raise NotImplementedError

    def _read_failed(self, cookie: int, offset: int, length: int, error: int) -> None:
        """Answer a READ the backend failed (connection.py builds the error chunk for both READ paths)."""
        raise NotImplementedError

    def _send_all(self, buffers: list[Buffer], error: int = 0) -> None:
        """Several buffers as one message (one syscall when the socket takes them all)."""
        with self.send_lock:
            if error:
                self.stats.errors += 1
            sent = self.sock.sendmsg(buffers)
            for buf in buffers:
                n = len(buf)
                if sent >= n:
                    sent -= n
                    continue
                self.sock.sendall(memoryview(buf)[sent:])
                sent = 0

    def _structured_read(self, req: Request, cookie: int) -> None:
        """A READ as data and hole chunks; all data is read before anything is sent, so an
        error is one error chunk and the DONE flag marks a chunk that cannot fail any more."""
        offset, length = req.offset, req.length
        # Short READs never come here: the connection loop answers them inline with one data chunk.
        if length == 0:
            self._send(sr.none_chunk(cookie))
            return
        plan = [(offset, length, False)]
        try:
            if self.allocation is not None and length >= sr.SPARSE_READ_MIN:
                plan = sr.read_plan(offset, length, self.allocation(offset, length))
            buffers: list[Buffer] = []
            last = len(plan) - 1
            data_bytes = 0
            for i, (start, n, hole) in enumerate(plan):
                if hole:
                    buffers.append(sr.hole_chunk(cookie, start, n, done=i == last))
                    continue
                data = self.layer.execute(req if n == length else Request(Command.READ, start, n))
                assert data is not None
                buffers += (sr.data_chunk_header(cookie, start, n, done=i == last), data)
                data_bytes += n
        except Exception as exc:  # noqa: BLE001 - mapped to an NBD error and logged
            self._read_failed(cookie, offset, length, nbd_error(errno_for(exc, describe(req))))
            return
        self._send_all(buffers)
        self.stats.reads += 1
        self.stats.bytes_read += data_bytes
        self.stats.hole_bytes += length - data_bytes

    def _block_status(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if flags & ~NBD_CMD_FLAG_REQ_ONE or length == 0 or offset + length > self.layer.caps.size:
            self._reject("BLOCK_STATUS", flags, offset, length, cookie, NBD_EINVAL)
            return
        try:
            if self.allocation is not None:
                extents = list(self.allocation(offset, length))
            else:
                extents = [Extent(length, 1, False)]
        except Exception as exc:  # noqa: BLE001 - mapped to an NBD error and logged
            error = nbd_error(errno_for(exc, f"BLOCK_STATUS {length}@{offset}"))
            self._send(sr.error_chunk(cookie, error, "block status failed"), None, error)
            return
        req_one = bool(flags & NBD_CMD_FLAG_REQ_ONE)
        items = sorted(self.contexts.items())
        chunks: list[Buffer] = []
        for i, (context_id, name) in enumerate(items):
            descriptors = sr.block_status(name, extents, length, req_one=req_one) or [(length, 0)]
            chunks.append(sr.block_status_chunk(cookie, context_id, descriptors, done=i == len(items) - 1))
        self._send_all(chunks)
        self.stats.block_status += 1

"""An exported backend: its NBD transmission flags, computed once, and its counters."""

from __future__ import annotations

import dataclasses
import threading

from ..backend import AllocationMap, Backend, FuaMode
from .constants import (
    META_BASE_ALLOCATION,
    META_QEMU_ALLOCATION_DEPTH,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
)
from .handshake import ExportInfo


def transmission_flags(backend: Backend) -> int:
    """The one place where backend capabilities become NBD transmission flags (as nbdkit does)."""
    flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_CACHE  # CACHE is answered as an advisory no-op
    if backend.read_only:
        flags |= NBD_FLAG_READ_ONLY
    else:
        flags |= NBD_FLAG_SEND_WRITE_ZEROES
        if backend.can_discard:
            flags |= NBD_FLAG_SEND_TRIM
        fua = backend.can_fua
        if fua is FuaMode.NATIVE or (fua is FuaMode.EMULATE and backend.can_flush):
            flags |= NBD_FLAG_SEND_FUA
    if backend.can_flush:
        flags |= NBD_FLAG_SEND_FLUSH
    if backend.can_multi_conn:
        flags |= NBD_FLAG_CAN_MULTI_CONN
    return flags


@dataclasses.dataclass(slots=True)
class Stats:
    """Request counters; each connection owns one and bumps it without locking."""

    reads: int = 0
    writes: int = 0  # WRITE and WRITE_ZEROES
    bytes_read: int = 0  # READ data sent (holes not included)
    hole_bytes: int = 0  # READ bytes answered as hole chunks
    block_status: int = 0  # BLOCK_STATUS requests answered
    bytes_written: int = 0  # WRITE payload bytes
    flushes: int = 0  # backend flushes done for FLUSH and emulated FUA
    trims: int = 0
    errors: int = 0  # error replies sent

    def add(self, other: Stats) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class Export:
    """A backend as NBD clients see it; shared by all of its connections."""

    def __init__(self, backend: Backend, name: str = "", *, description: str = "") -> None:
        self.backend = backend
        self.name = name
        self.description = description
        # Capabilities are asked once, so every connection sees the same answers.
        self.size = backend.size
        self.read_only = backend.read_only
        self.can_flush = backend.can_flush
        self.can_fua = backend.can_fua
        self.can_discard = backend.can_discard
        self.can_multi_conn = backend.can_multi_conn
        self.flags = transmission_flags(backend)
        # Block status needs a backend that knows its allocation.
        self.contexts: tuple[str, ...] = (
            (META_BASE_ALLOCATION, META_QEMU_ALLOCATION_DEPTH) if isinstance(backend, AllocationMap) else ()
        )
        self._lock = threading.Lock()
        self._live: list[Stats] = []
        self._retired = Stats()

    def info(self) -> ExportInfo:
        return ExportInfo(self.name, self.size, self.flags, self.description, self.contexts)

    @property
    def stats(self) -> Stats:
        """A snapshot summed over finished and live connections."""
        total = Stats()
        with self._lock:
            total.add(self._retired)
            for live in self._live:
                total.add(live)
        return total

    def attach(self, stats: Stats) -> None:
        with self._lock:
            self._live.append(stats)

    def detach(self, stats: Stats) -> None:
        with self._lock:
            # By identity: two connections' counters may well be equal.
            self._live = [live for live in self._live if live is not stats]
            self._retired.add(stats)

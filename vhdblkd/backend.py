"""The contract every image kind implements, as nbdkit plugins and go-nbd backends do.

The transports only ever see this protocol, through the request layer
(vhdblkd/request.py); they never import the format layer.  Offsets and
lengths are in bytes.  The request layer has already checked range,
read-only and flags before it calls a backend, so backends may assert
instead of re-validating.  A backend that cannot do a request raises
`BackendError` (or a subclass such as `DiskFull`) carrying the errno to
answer, or lets an `OSError` through.  Backends must be safe to call from
several threads at once (one thread per connection or queue).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

Buffer = bytes | bytearray | memoryview


class FuaMode(enum.Enum):
    """How a backend honours FUA (as nbdkit's can_fua)."""

    NONE = 0  # no FUA at all
    EMULATE = 1  # the server strips FUA and calls flush() after the write
    NATIVE = 2  # write(..., fua=True) is durable when it returns


@runtime_checkable
class Backend(Protocol):
    """A virtual disk of fixed size."""

    @property
    def size(self) -> int:
        """Virtual size in bytes."""

    @property
    def read_only(self) -> bool: ...

    @property
    def can_flush(self) -> bool: ...

    @property
    def can_fua(self) -> FuaMode: ...

    @property
    def can_discard(self) -> bool: ...

    @property
    def can_multi_conn(self) -> bool:
        """True when a flush on one connection covers writes completed on all."""

    def read(self, offset: int, length: int) -> Buffer:
        """Return exactly `length` bytes; may be a memoryview valid until the next write."""

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None: ...

    def flush(self) -> None:
        """Make every completed write durable."""

    def discard(self, offset: int, length: int) -> None:
        """Drop the data; the range reads as zeros afterwards."""

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        """Make the range read as zeros; `may_trim` allows deallocating it."""

    def close(self) -> None:
        """Flush and release the backend; further calls are errors."""


class Extent(NamedTuple):
    """A run of a backend's address space, as block status reports it."""

    length: int
    depth: int  # the layer holding it: 1 = the image itself, 2 = its parent...; 0 = none
    zero: bool  # reads as zeros and is not stored (a hole)


@runtime_checkable
class AllocationMap(Protocol):
    """Optional: a backend that knows where its data is (NBD block status, sparse reads)."""

    def allocation(self, offset: int, length: int) -> Sequence[Extent]:
        """Consecutive extents from `offset`, covering at most `length` bytes, at least one
        when the range is inside the disk; they may stop short of `length`."""


class MemoryBackend:
    """A plain bytearray disk: the reference model and the server's test double."""

    def __init__(self, size: int, read_only: bool = False) -> None:
        self._data = bytearray(size)
        self._read_only = read_only
        self._lock = threading.Lock()
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def can_flush(self) -> bool:
        return True

    @property
    def can_fua(self) -> FuaMode:
        return FuaMode.EMULATE

    @property
    def can_discard(self) -> bool:
        return True

    @property
    def can_multi_conn(self) -> bool:
        return True

    def read(self, offset: int, length: int) -> Buffer:
        with self._lock:
            return bytes(self._data[offset : offset + length])

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        with self._lock:
            self._data[offset : offset + len(data)] = data

    def flush(self) -> None:
        self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        with self._lock:
            self._data[offset : offset + length] = bytes(length)

    def close(self) -> None:
        pass

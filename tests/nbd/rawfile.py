"""A raw-file backend for tests and benchmarks: mmap reads (zero-copy), pwrite writes."""

from __future__ import annotations

import mmap
import os
import threading

from vhdblkd.backend import Buffer, FuaMode


class RawFileBackend:
    """A plain file as a disk; reads are views into an mmap like a fixed VHD's."""

    def __init__(self, path: str, read_only: bool = False) -> None:
        self._fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self._size = os.fstat(self._fd).st_size
        self._map = mmap.mmap(self._fd, self._size, prot=mmap.PROT_READ if read_only else mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._map)
        self._read_only = read_only
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

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
        return self._view[offset : offset + length]

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self._view[offset : offset + len(data)] = data

    def flush(self) -> None:
        self._map.flush()

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        self._view[offset : offset + length] = bytes(length)

    def close(self) -> None:
        self._map.flush()
        self._view.release()
        self._map.close()
        os.close(self._fd)

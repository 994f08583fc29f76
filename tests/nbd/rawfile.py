"""A raw-file backend for tests and benchmarks: mmap reads (zero-copy), writes into the map."""

from __future__ import annotations

import mmap
import os

from vhdblkd.backend import Buffer, MemoryBackend


class RawFileBackend(MemoryBackend):
    """A plain file as a disk; reads are views into an mmap like a fixed VHD's.

    The model's capabilities, locking, writes and zeroing, over the file's map instead of a bytearray.
    """

    def __init__(self, path: str, read_only: bool = False) -> None:
        super().__init__(0, read_only)
        self._fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        size = os.fstat(self._fd).st_size
        self._map = mmap.mmap(self._fd, size, prot=mmap.PROT_READ if read_only else mmap.PROT_READ | mmap.PROT_WRITE)
        self._data = self._map  # type: ignore[assignment]  # an mmap takes len(), slicing and slice assignment alike
        self._view = memoryview(self._map)

    def read(self, offset: int, length: int) -> Buffer:
        return self._view[offset : offset + length]

    def flush(self) -> None:
        super().flush()
        self._map.flush()

    def close(self) -> None:
        self._map.flush()
        self._view.release()
        self._map.close()
        os.close(self._fd)

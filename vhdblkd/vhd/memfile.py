"""An in-memory ImageFile that records every operation, for tests and crash replay.

MemoryDisk holds the bytes and the log of operations (write, truncate, sync);
`replay(ops)` rebuilds the bytes a crash could leave behind from any chosen
subset of logged operations applied in order.
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Iterable

from vhdblkd.vhd.fileio import Buffer, ImageFile


@dataclasses.dataclass(frozen=True, slots=True)
class Op:
    kind: str  # "write" | "truncate" | "sync"
    offset: int = 0  # write offset, or new length for truncate
    data: bytes = b""


def apply(data: bytearray, op: Op) -> None:
    if op.kind == "write":
        end = op.offset + len(op.data)
        if end > len(data):
            data.extend(bytes(end - len(data)))
        data[op.offset : end] = op.data
    elif op.kind == "truncate":
        if op.offset < len(data):
            del data[op.offset :]
        else:
            data.extend(bytes(op.offset - len(data)))


class MemoryDisk:
    """The bytes of one file, plus the log of operations done through MemoryFile."""

    def __init__(self, initial: bytes = b"", mtime: int = 1_000_000_000) -> None:
        self.initial = bytes(initial)
        self.data = bytearray(initial)
        self.ops: list[Op] = []
        self.mtime = mtime
        self.recording = True

    def record(self, op: Op) -> None:
        apply(self.data, op)
        if self.recording:
            self.ops.append(op)

    def replay(self, ops: Iterable[Op]) -> bytes:
        data = bytearray(self.initial)
        for op in ops:
            apply(data, op)
        return bytes(data)


class MemoryFile(ImageFile):
    """ImageFile over a MemoryDisk; use `factory(disks)` to make a file_factory."""

    def __init__(self, disk: MemoryDisk, path: str, writable: bool) -> None:  # noqa: D107
        self.path = path
        self.writable = writable
        self._disk = disk
        self._closed = False

    @staticmethod
    def factory(disks: dict[str, MemoryDisk]) -> "MemoryFileFactory":
        return MemoryFileFactory(disks)

    def fileno(self) -> int:
        raise OSError("in-memory file has no descriptor")

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self._disk.data[offset : offset + length])

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        chunk = self._disk.data[offset : offset + len(buf)]
        memoryview(buf)[: len(chunk)] = chunk  # a short chunk must not resize a bytearray
        return len(chunk)

    def pwrite(self, offset: int, data: Buffer) -> None:
        assert self.writable, "write on a read-only file"
        self._disk.record(Op("write", offset, bytes(data)))

    def truncate(self, length: int) -> None:
        assert self.writable, "truncate on a read-only file"
        self._disk.record(Op("truncate", length))

    def allocate(self, offset: int, length: int) -> None:
        if offset + length > len(self._disk.data):
            self.truncate(offset + length)

    def punch_hole(self, offset: int, length: int) -> None:
        self.pwrite(offset, bytes(length))

    def data_runs(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        return [(start, end - start, True)] if end > start else []  # no holes in memory

    def has_hole(self, start: int, end: int) -> bool:
        return False

    def fdatasync(self) -> None:
        self._disk.record(Op("sync"))

    def size(self) -> int:
        return len(self._disk.data)

    def mtime(self) -> int:
        return self._disk.mtime

    def identity(self) -> tuple[int, int]:
        return 0, id(self._disk)

    def map_readonly(self, length: int) -> mmap.mmap | None:
        return None

    def close(self) -> None:
        self._closed = True


class MemoryFileFactory:
    """file_factory for open_image/create_*: paths name MemoryDisks in a dict."""

    def __init__(self, disks: dict[str, MemoryDisk]) -> None:
        self.disks = disks

    def __call__(self, path: str, writable: bool, *, create: bool = False) -> MemoryFile:
        if create:
            if path in self.disks:
                raise FileExistsError(path)
            self.disks[path] = MemoryDisk()
        try:
            disk = self.disks[path]
        except KeyError:
            raise FileNotFoundError(path) from None
        return MemoryFile(disk, path, writable)

    def exists(self, path: str) -> bool:
        return path in self.disks

"""A fault-injection layer under the image file.

`FaultFile` wraps any ImageFile (a real file or an in-memory one) and
- records every pwrite, truncate and fdatasync with its data (`FaultLog.ops`),
  so a crash can be replayed at any point of the log;
- raises a chosen OSError (ENOSPC, EIO, ...) on the Nth pwrite or fdatasync,
  or while a `failing` predicate says so ("the disk is full until space is back");
- checks that no read or write goes outside the file: a negative offset, a
  read or write starting past the end, or a read big enough to be a memory
  bomb is recorded as a violation (and raised as AssertionError, which no
  layer of vhdblkd may swallow).

`FaultFactory` is a file_factory for open_image/check_image/create_* that
wraps whatever the inner factory returns.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
from collections.abc import Callable

from vhdblkd.vhd.fileio import Buffer, ImageFile
from vhdblkd.vhd.memfile import Op

# No legitimate metadata read of the small images used in tests comes near this.
MAX_READ = 64 * 1024 * 1024
# An allocation writes the footer one block past the current end; blocks in tests are small,
# but a write starting further than this past the end of file is a stray write.
MAX_WRITE_GAP = 32 * 1024 * 1024


class BoundsViolation(AssertionError):
    """A read or write outside the file (an AssertionError: no layer of vhdblkd may swallow it)."""


@dataclasses.dataclass
class Fault:
    """Raise OSError(errno) on the `nth` (1-based) call of `kind` ("pwrite" | "fdatasync" | "truncate")."""

    kind: str
    nth: int
    errno: int = errno.EIO
    fired: bool = False


@dataclasses.dataclass
class FaultLog:
    """What one file saw: the operation log and counters shared by all its handles."""

    ops: list[Op] = dataclasses.field(default_factory=list)
    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    faults: list[Fault] = dataclasses.field(default_factory=list)
    # While this returns an errno for (kind, offset, length), that call fails (e.g. disk full).
    failing: Callable[[str, int, int], int | None] | None = None
    violations: list[str] = dataclasses.field(default_factory=list)
    injected: int = 0
    strict_bounds: bool = True

    def count(self, kind: str) -> int:
        n = self.calls.get(kind, 0) + 1
        self.calls[kind] = n
        return n

    def maybe_fail(self, kind: str, offset: int, length: int, path: str) -> None:
        n = self.count(kind)
        for fault in self.faults:
            if fault.kind == kind and fault.nth == n and not fault.fired:
                fault.fired = True
                self._raise(fault.errno, kind, offset, path)
        if self.failing is not None:
            code = self.failing(kind, offset, length)
            if code is not None:
                self._raise(code, kind, offset, path)

    def _raise(self, code: int, kind: str, offset: int, path: str) -> None:
        self.injected += 1
        raise OSError(code, f"injected {os.strerror(code)} in {kind} at {offset}", path)

    def violation(self, message: str) -> None:
        self.violations.append(message)
        if self.strict_bounds:
            raise BoundsViolation(message)


class FaultFile(ImageFile):
    """An ImageFile that delegates to `inner` and records, injects and checks (module docstring)."""

    def __init__(self, inner: ImageFile, log: FaultLog) -> None:  # noqa: D107 - no super(): no fd of our own
        self.path = inner.path
        self.writable = inner.writable
        self.inner = inner
        self.log = log

    # --- bounds checks -------------------------------------------------------

    def _check_read(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            self.log.violation(f"{self.path}: read {length}@{offset}: negative offset or length")
        elif length > MAX_READ:
            self.log.violation(f"{self.path}: read of {length} bytes at {offset}: unbounded read")
        elif offset > self.inner.size():
            self.log.violation(f"{self.path}: read {length}@{offset} starts past the end ({self.inner.size()})")

    def _check_write(self, offset: int, length: int) -> None:
        if not self.writable:
            self.log.violation(f"{self.path}: write {length}@{offset} on a read-only open")
        if offset < 0:
            self.log.violation(f"{self.path}: write {length}@{offset}: negative offset")
        elif offset > self.inner.size() + MAX_WRITE_GAP:
            self.log.violation(f"{self.path}: write {length}@{offset} far past the end ({self.inner.size()})")

    # --- the ImageFile interface -------------------------------------------------

    def fileno(self) -> int:
        return self.inner.fileno()

    def pread(self, offset: int, length: int) -> bytes:
        self._check_read(offset, length)
        return self.inner.pread(offset, length)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        self._check_read(offset, len(buf))
        return self.inner.readinto(offset, buf)

    def pwrite(self, offset: int, data: Buffer) -> None:
        self._check_write(offset, len(data))
        self.log.maybe_fail("pwrite", offset, len(data), self.path)
        payload = bytes(data)
        self.inner.pwrite(offset, payload)
        self.log.ops.append(Op("write", offset, payload))

    def truncate(self, length: int) -> None:
        if not self.writable or length < 0:
            self.log.violation(f"{self.path}: truncate to {length}")
        self.log.maybe_fail("truncate", length, 0, self.path)
        self.inner.truncate(length)
        self.log.ops.append(Op("truncate", length))

    def allocate(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        self.log.maybe_fail("allocate", offset, length, self.path)
        before = self.inner.size()
        self.inner.allocate(offset, length)
        if self.inner.size() != before:
            self.log.ops.append(Op("truncate", self.inner.size()))

    def punch_hole(self, offset: int, length: int) -> None:
        # Recorded as the zeros a reader sees afterwards, so replay needs no hole support.
        self._check_write(offset, length)
        self.log.maybe_fail("pwrite", offset, length, self.path)
        end = min(offset + length, self.inner.size())
        self.inner.punch_hole(offset, length)
        if end > offset:
            self.log.ops.append(Op("write", offset, bytes(end - offset)))

    def data_runs(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        return self.inner.data_runs(start, end)

    def has_hole(self, start: int, end: int) -> bool:
        return self.inner.has_hole(start, end)

    def fdatasync(self) -> None:
        self.log.maybe_fail("fdatasync", 0, 0, self.path)
        self.inner.fdatasync()
        self.log.ops.append(Op("sync"))

    def size(self) -> int:
        return self.inner.size()

    def mtime(self) -> int:
        return self.inner.mtime()

    def identity(self) -> tuple[int, int]:
        return self.inner.identity()

    def map_readonly(self, length: int) -> mmap.mmap | None:
        # Reads through a mapping would bypass the bounds checks and the fault layer.
        return None

    def close(self) -> None:
        self.inner.close()


InnerFactory = Callable[..., ImageFile]


class FaultFactory:
    """file_factory wrapping each opened file in a FaultFile; one FaultLog per path."""

    def __init__(self, inner: InnerFactory = ImageFile, *, strict_bounds: bool = True) -> None:
        self.inner = inner
        self.logs: dict[str, FaultLog] = {}
        self.strict_bounds = strict_bounds

    def log_for(self, path: str) -> FaultLog:
        if path not in self.logs:
            self.logs[path] = FaultLog(strict_bounds=self.strict_bounds)
        return self.logs[path]

    def __call__(self, path: str, writable: bool, *, create: bool = False) -> FaultFile:
        return FaultFile(self.inner(path, writable, create=create), self.log_for(path))

    def exists(self, path: str) -> bool:
        probe = getattr(self.inner, "exists", os.path.isfile)
        return bool(probe(path))

"""The one gateway for I/O on an image file.

Every read, write, truncate and sync of an image goes through ImageFile so a
test (or a fault-injection layer recording operations for crash replay) can
substitute a subclass.  Short reads past the end of file return fewer bytes;
callers decide whether that is corruption.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
from collections.abc import Callable

from vhdblkd.errors import DiskFull
from vhdblkd.vhd import constants as c

Buffer = bytes | bytearray | memoryview

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


@functools.cache
def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    """fallocate(2) from libc (os has only posix_fallocate, which cannot punch holes)."""
    import ctypes  # here: only punching holes needs it, and it is a tenth of `vhdblkctl info`'s imports

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


class ImageFile:
    """An image file opened O_RDONLY or O_RDWR."""

    def __init__(self, path: str, writable: bool, *, create: bool = False) -> None:
        self.path = path
        self.writable = writable
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        self._fd = os.open(path, flags | os.O_CLOEXEC, 0o644)

    def fileno(self) -> int:
        return self._fd

    def pread(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer only at end of file)."""
        data = os.pread(self._fd, length, offset)
        if len(data) == length or not data:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(self._fd, length - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        """Fill `buf` from `offset`; returns the bytes read (fewer only at end of file)."""
        total = len(buf)
        got = os.preadv(self._fd, (buf,), offset)  # the usual case: all of it at once
        while 0 < got < total:
            n = os.preadv(self._fd, (memoryview(buf)[got:],), offset + got)
            if n <= 0:
                break
            got += n
        return got

    def pwrite(self, offset: int, data: Buffer) -> None:
        done = self._pwrite_once(data, offset)
        if done == len(data):
            return  # the usual case: one syscall, no allocation
        # A short write is legal; finish the rest (a persistent failure raises on retry).
        view = memoryview(data)[done:]
        offset += done
        while view:
            done = self._pwrite_once(view, offset)
            view = view[done:]
            offset += done

    def _pwrite_once(self, data: Buffer, offset: int) -> int:
        try:
            return os.pwrite(self._fd, data, offset)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"{self.path}: no space left writing {len(data)} bytes at offset {offset}") from exc
            raise

    def truncate(self, length: int) -> None:
        os.ftruncate(self._fd, length)

    def allocate(self, offset: int, length: int) -> None:
        """Reserve disk space for a range (posix_fallocate); keeps it sparse if unsupported."""
        try:
            os.posix_fallocate(self._fd, offset, length)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"{self.path}: no space left to reserve {length} bytes at offset {offset}") from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise

    def punch_hole(self, offset: int, length: int) -> None:
        """Make a range read as zeros, freeing its space where the file system can."""
        func = _libc_fallocate()
        if func is not None and length > 0:
            if func(self._fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, length) == 0:
                return
            import ctypes

            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(err, f"{self.path}: fallocate(PUNCH_HOLE) at {offset}+{length}: {os.strerror(err)}")
        zeros = bytes(min(length, c.CHUNK_SIZE))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.pwrite(offset, zeros if n == len(zeros) else zeros[:n])
            offset += n

    def data_runs(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) runs covering [start, end), from SEEK_DATA/SEEK_HOLE.

        A file system without them reports the whole range as data (always correct).
        """
        runs: list[tuple[int, int, bool]] = []
        pos = start
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    data = end
                elif exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    runs.append((pos, end - pos, True))
                    break
                else:
                    raise
            data = min(data, end)
            if data > pos:
                runs.append((pos, data - pos, False))
            if data >= end:
                break
            hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
            runs.append((data, hole - data, True))
            pos = hole
        return runs

    def has_hole(self, start: int, end: int) -> bool:
        """Whether [start, end) may hold a hole (one SEEK_HOLE); False where unsupported,
        as data_runs then reports data."""
        try:
            return os.lseek(self._fd, start, os.SEEK_HOLE) < end
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # start at or past the end of file: all hole
                return start < end
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return False
            raise

    def fdatasync(self) -> None:
        os.fdatasync(self._fd)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def mtime(self) -> int:
        """Modification time in whole seconds since the Unix epoch."""
        return int(os.fstat(self._fd).st_mtime)

    def identity(self) -> tuple[int, int]:
        """(device, inode): lets the lock layer find holders in /proc/locks."""
        st = os.fstat(self._fd)
        return st.st_dev, st.st_ino

    def map_readonly(self, length: int) -> mmap.mmap | None:
        """A shared read-only mapping of the first `length` bytes, or None if not mappable."""
        if length <= 0:
            return None
        try:
            return mmap.mmap(self._fd, length, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

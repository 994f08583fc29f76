"""Fixed images: raw data followed by the footer.

The hot path of the NBD server.  Reads are zero-copy memoryview slices of a
read-only shared mapping; writes use pwrite, never the mapping, because a
store into a mapping on a full file system is SIGBUS (it would kill the
daemon) while pwrite reports ENOSPC.  Range checks are the caller's job.

Allocation (block status, and every large structured READ) comes from the
file's holes, two lseeks a lookup.  A fully written image has none, and
writes only ever fill holes, so whether the data area has any is learnt at
open (one SEEK_HOLE) and again at each flush while it might; until a
discard punches one, lookups answer "all data" without a syscall.  Erring
that way is safe in any case: data is a valid answer for a range of zeros.
"""

from __future__ import annotations

import mmap

from vhdblkd.backend import Buffer, Extent
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.base import VhdImage
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.layout import Layout
from vhdblkd.vhd.lock import ImageLock


class FixedImage(VhdImage):
    disk_type = "fixed"

    def __init__(self, path: str, file: ImageFile, layout: Layout, *, read_only: bool,
                 lock: ImageLock | None) -> None:
        super().__init__(path, file, layout, read_only=read_only, lock=lock)
        self._map: mmap.mmap | None = file.map_readonly(self._size)
        self._view: memoryview | None = memoryview(self._map) if self._map is not None else None
        self._pwrite = file.pwrite
        self._zeros = bytes(min(c.CHUNK_SIZE, max(self._size, 1)))
        self._may_have_holes = file.has_hole(0, self._size)

    def stored_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, stored) runs of [offset, offset+length): not stored = a hole in the file."""
        end = min(offset + length, self._size)
        if not self._may_have_holes:
            return [(offset, end - offset, True)] if offset < end else []
        return self._file.data_runs(offset, end)

    def allocation(self, offset: int, length: int) -> list[Extent]:
        if self._may_have_holes:
            return super().allocation(offset, length)
        end = min(offset + length, self._size)
        return [Extent(end - offset, 1, False)] if offset < end else []

    def read(self, offset: int, length: int) -> Buffer:
        assert 0 <= offset and offset + length <= self._size
        view = self._view
        if view is not None:
            return view[offset : offset + length]
        data = self._file.pread(offset, length)
        return data if len(data) == length else data + bytes(length - len(data))

    def read_into_zeroed(self, offset: int, dest: bytearray | memoryview) -> None:
        view = self._view
        if view is not None:
            dest[:] = view[offset : offset + len(dest)]
        else:
            self._file.readinto(offset, dest)  # short only at end of file, where dest stays zeros

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        assert 0 <= offset and offset + len(data) <= self._size
        if self._read_only:
            self._check_writable()
        self._pwrite(offset, data)
        if fua:
            self._file.fdatasync()

    def flush(self) -> None:
        if not self._read_only:
            self._file.fdatasync()
            if self._may_have_holes:
                # Writes may have filled the last hole (racing a discard can only leave a
                # hole reported as data, which is still a right answer).
                self._may_have_holes = self._file.has_hole(0, self._size)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, may_trim=True)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        assert 0 <= offset and offset + length <= self._size
        self._check_writable()
        if may_trim:
            # Like a raw file under QEMU: punching gives the space back and reads as zeros.
            self._may_have_holes = True  # before the hole exists, so no lookup misses it
            self._file.punch_hole(offset, length)
            if fua:
                self._file.fdatasync()
            return
        # NBD's NO_HOLE: the range must stay allocated, so write real zeros.
        zeros = self._zeros
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self._pwrite(offset, zeros[:n] if n < len(zeros) else zeros)
            offset += n
        if fua:
            self._file.fdatasync()

    def _release(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                # A reply still holds a slice; the mapping goes when the last slice does.
                pass
            self._map = None

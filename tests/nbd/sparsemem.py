"""An in-memory backend that knows its allocation: pages never written (or trimmed) are holes."""

from __future__ import annotations

from vhdblkd.backend import Buffer, Extent, MemoryBackend

PAGE = 4096


class SparseMemoryBackend(MemoryBackend):
    """MemoryBackend plus `allocation()` (backend.AllocationMap) at 4 KiB page granularity."""

    def __init__(self, size: int, read_only: bool = False) -> None:
        super().__init__(size, read_only)
        self.pages: set[int] = set()

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        super().write(offset, data, fua)
        if len(data):
            self.pages.update(range(offset // PAGE, (offset + len(data) - 1) // PAGE + 1))

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        super().write_zeroes(offset, length, may_trim, fua)
        if not length:
            return
        whole = range((offset + PAGE - 1) // PAGE, (offset + length) // PAGE)
        if may_trim:
            self.pages.difference_update(whole)  # whole pages of zeros need no storage
        else:
            self.pages.update(range(offset // PAGE, (offset + length - 1) // PAGE + 1))

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, may_trim=True)

    def allocation(self, offset: int, length: int) -> list[Extent]:
        end = min(self.size, offset + length)
        out: list[Extent] = []
        pos = offset
        while pos < end:
            stop = min(end, (pos // PAGE + 1) * PAGE)
            held = pos // PAGE in self.pages
            n = stop - pos
            if out and (out[-1].depth == 1) == held:
                out[-1] = Extent(out[-1].length + n, out[-1].depth, out[-1].zero)
            else:
                out.append(Extent(n, 1 if held else 0, not held))
            pos = stop
        return out

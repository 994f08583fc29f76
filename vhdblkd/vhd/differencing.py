"""Differencing images: a dynamic image whose absent sectors read from a parent.

Only what the parent changes is overridden, as a filter over the dynamic
image: absent sectors read the parent's data (zeros past its end), a new
block starts with every bit clear (the parent shows through until written),
and zeroing sets bits over real zeros instead of freeing, because a freed
block would show the parent again.  Allocation, flush ordering and close are
the dynamic image's.
"""

from __future__ import annotations

from vhdblkd.vhd.base import VhdImage
from vhdblkd.vhd.blockmap import UNUSED
from vhdblkd.vhd.dynamic import Dest, DynamicImage
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.layout import Layout
from vhdblkd.vhd.lock import ImageLock


class DifferencingImage(DynamicImage):
    disk_type = "differencing"

    def __init__(self, path: str, file: ImageFile, layout: Layout, *, read_only: bool,
                 lock: ImageLock | None, parent: VhdImage) -> None:
        super().__init__(path, file, layout, read_only=read_only, lock=lock)
        self.parent = parent
        if isinstance(parent, DynamicImage) and parent.block_size == self.block_size and parent.size >= self.size:
            self._below = parent

    def _fill_absent(self, voff: int, dest: Dest) -> None:
        """The parent's data; zeros (already in `dest`) past the parent's end (a child may be the larger)."""
        parent = self.parent
        assert parent is not None
        avail = min(len(dest), parent.size - voff)
        if avail > 0:
            parent.read_into_zeroed(voff, dest if avail == len(dest) else memoryview(dest)[:avail])

    def _fresh_bitmap(self) -> bytearray | None:
        return bytearray(self._bitmap_size)

    def _zero_in_block(self, block: int, in_block: int, voff: int, n: int, may_trim: bool) -> None:
        if n != self.block_size:
            self._zero_bytes(block, in_block, voff, n)
            return
        with self._meta:
            entry = self._entries[block]
            if entry == UNUSED:
                # A fresh block's data area reads as zeros: setting every bit is enough.
                self._allocate(block)
            else:
                self._file.punch_hole(self._blocks.data_offset(entry), self.block_size)
            self._blocks.set_bitmap(block, None)
            self._blocks.dirty_bitmaps.add(block)

"""compact: give back blocks that read as zeros and rewrite the file without holes.

Crash safety.  Freeing a block only changes its BAT entry to unused (one
4-byte write inside a sector): the block read as zeros (or, for a
differencing disk, as its parent) before and reads the same after, so any
subset of those writes reaching the disk leaves the same data.  The freed
slots are then leaks, which the engine's recovery (recovery.repair) closes
with the protocol a crash can interrupt at any point: copy the last block into
the first hole, fdatasync, repoint its BAT entry, fdatasync; finally the
footer is written after the last block and the file truncated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from vhdblkd.errors import CorruptImage, UnsupportedImage
from vhdblkd.vhd import bitmap as bits
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.base import VhdImage
from vhdblkd.vhd.blockmap import UNUSED
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.image import FileFactory, open_image
from vhdblkd.vhd.layout import Layout, scan
from vhdblkd.vhd.lock import ImageLock
from vhdblkd.vhd.recovery import needs_repair, repair

Progress = Callable[[int, int], None]


def _no_progress(done: int, total: int) -> None:
    """The default progress callback: report nothing."""


@dataclasses.dataclass(frozen=True, slots=True)
class CompactResult:
    path: str
    disk_type: str
    blocks_before: int
    blocks_freed: int
    blocks_after: int
    file_size_before: int
    file_size_after: int


@dataclasses.dataclass(slots=True)
class Maintenance:
    """An image held for maintenance: exclusive lock, writable file, recovered layout."""

    path: str
    file: ImageFile
    layout: Layout
    file_factory: FileFactory

    def rescan(self) -> Layout:
        self.layout = scan(self.file, self.path)
        if self.layout.fatal is not None:
            raise self.layout.fatal
        return self.layout

    @contextmanager
    def reader(self, *, allow_unsafe_parent: bool = False,
               strict_parent_timestamp: bool = False) -> Iterator[VhdImage]:
        """A read-only view of the image (and its parents); the lock is already ours."""
        with open_image(self.path, read_only=True, lock=False, allow_unsafe_parent=allow_unsafe_parent,
                        strict_parent_timestamp=strict_parent_timestamp, file_factory=self.file_factory) as image:
            yield image


@contextmanager
def maintain(path: str, *, lock: bool = True, file_factory: FileFactory = ImageFile) -> Iterator[Maintenance]:
    """Hold `path` exclusively (ImageLocked names the holder) with the read-write open's repairs done."""
    image_lock = ImageLock(path, exclusive=True) if lock else None
    try:
        f = file_factory(path, True)
        try:
            lay = scan(f, path)
            if lay.fatal is not None:
                raise lay.fatal
            if needs_repair(lay):
                lay = repair(f, lay)
                if lay.fatal is not None:
                    raise lay.fatal
            yield Maintenance(path, f, lay, file_factory)
        finally:
            f.close()
    finally:
        if image_lock is not None:
            image_lock.release()


def write_bat_entry(m: Maintenance, block: int, entry: int) -> None:
    assert m.layout.blocks is not None
    m.layout.blocks.write_entry(m.file, block, entry)


def _block_is_free(m: Maintenance, image: VhdImage, block: int, entry: int) -> bool:
    """True if dropping the block's BAT entry leaves what the block reads as unchanged."""
    lay = m.layout
    blocks = lay.blocks
    assert blocks is not None
    bs = blocks.block_size
    start = block * bs
    length = min(bs, lay.virtual_size - start) if start < lay.virtual_size else 0
    parent = image.parent
    if parent is not None:
        bitmap = blocks.read_bitmap(m.file, entry)
        if bits.none_set(bitmap, blocks.sectors_per_block):
            return True  # nothing of this block lives in the child
    if length == 0:
        return True  # past the disk's end: nothing can read it
    if any(image.read(start, length)):
        return False
    if parent is None:
        return True
    # A differencing block of zeros may go only if the parent shows zeros there too.
    pavail = max(0, min(length, parent.size - start))
    return pavail == 0 or not any(parent.read(start, pavail))


def compact(path: str, *, progress: Progress = _no_progress, lock: bool = True,
            allow_unsafe_parent: bool = False, strict_parent_timestamp: bool = False,
            file_factory: FileFactory = ImageFile) -> CompactResult:
    """Free zero blocks of a dynamic or differencing image and close the holes.

    strict_parent_timestamp: refuse (before a block is freed) a parent whose mtime differs from
    the child's record, as open_image does: which blocks may go depends on what it reads.
    """
    with maintain(path, lock=lock, file_factory=file_factory) as m:
        lay = m.layout
        assert lay.footer is not None
        if lay.footer.disk_type == c.DISK_TYPE_FIXED:
            raise UnsupportedImage(f"{path}: a fixed image has no blocks to give back; "
                                   "convert it to dynamic to make it sparse")
        assert lay.blocks is not None
        size_before = m.file.size()
        allocated = lay.blocks.allocated_blocks()
        freed = 0
        with m.reader(allow_unsafe_parent=allow_unsafe_parent, strict_parent_timestamp=strict_parent_timestamp) as image:
            disk_type = image.disk_type
            for n, (block, entry) in enumerate(allocated):
                progress(n, len(allocated))
                if _block_is_free(m, image, block, entry):
                    write_bat_entry(m, block, UNUSED)
                    freed += 1
        progress(len(allocated), len(allocated))
        if freed:
            m.file.fdatasync()  # the BAT forgets the blocks before any slot is reused
        lay = m.rescan()
        if needs_repair(lay):
            lay = repair(m.file, lay)
            if lay.fatal is not None:
                raise lay.fatal
            m.layout = lay
        if lay.leaks:
            raise CorruptImage(f"{path}: holes remain after compaction at {lay.leaks}")
        return CompactResult(path, disk_type, len(allocated), freed, len(allocated) - freed,
                             size_before, m.file.size())

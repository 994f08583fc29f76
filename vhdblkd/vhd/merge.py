"""merge and snapshot: fold a differencing child into its parent; start a new child.

merge copies every sector the child's bitmaps mark present into the parent
through the parent's own write path (crash-safe allocation, flushed at the
end), so an interruption leaves the parent a valid image and the child
untouched: running merge again writes the same sectors again and finishes.
The child's expected parent timestamp is not checked: an interrupted merge
has already changed the parent's mtime, and the child's sectors override
whatever the parent holds there.  The unique id is checked.  Afterwards the
child's header gets the parent's new timestamp, so the child (which now adds
nothing to the parent) still opens; delete it or keep using it as a child.
"""

from __future__ import annotations

import dataclasses

from vhdblkd.errors import UnsupportedImage
from vhdblkd.vhd import bitmap as bits
from vhdblkd.vhd import constants as c
from vhdblkd.vhd import parent as parent_mod
from vhdblkd.vhd.blockmap import sectors_to_bytes
from vhdblkd.vhd.compact import Progress, _no_progress, maintain
from vhdblkd.vhd.create import create_differencing
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.image import FileFactory, open_image
from vhdblkd.vhd.timestamp import vhd_mtime


@dataclasses.dataclass(frozen=True, slots=True)
class MergeResult:
    child: str
    parent: str
    blocks_merged: int
    bytes_merged: int


def merge(child: str, *, progress: Progress = _no_progress, lock: bool = True,
          allow_unsafe_parent: bool = False, strict_parent_timestamp: bool = False,
          file_factory: FileFactory = ImageFile) -> MergeResult:
    """Write the child's own sectors into its parent; the parent is then the live image.

    strict_parent_timestamp: refuse, before writing anything, a parent whose mtime differs
    from what the child records (by default the unique id alone decides, as for open_image).
    """
    with maintain(child, lock=lock, file_factory=file_factory) as m:
        lay = m.layout
        assert lay.footer is not None
        blocks = lay.blocks
        if lay.footer.disk_type != c.DISK_TYPE_DIFFERENCING or lay.header is None or blocks is None:
            raise UnsupportedImage(f"{child}: only a differencing image can be merged into its parent")
        header = lay.header
        found_by, parent_path = parent_mod.find(m.file, header, child, allow_unsafe=allow_unsafe_parent,
                                                strict_timestamp=strict_parent_timestamp, file_factory=file_factory)
        allocated = [(i, e) for i, e in blocks.allocated_blocks() if i < lay.total_blocks]
        copied = 0
        with open_image(parent_path, read_only=False, lock=lock, allow_unsafe_parent=allow_unsafe_parent,
                        strict_parent_timestamp=strict_parent_timestamp, file_factory=file_factory) as parent:
            # The unique id must match (the message says how to repoint); the timestamp only when strict.
            parent_mod.vet(parent_mod.link_to(child, header, found_by, parent),
                           strict_timestamp=strict_parent_timestamp)
            if lay.virtual_size > parent.size:
                # Silently dropping the child's sectors past the parent's end would lose data.
                raise UnsupportedImage(
                    f"{child}: the child is {lay.virtual_size} bytes, its parent {parent.size}; resize the "
                    f"parent to at least {lay.virtual_size} bytes first; nothing was merged")
            limit = min(lay.virtual_size, parent.size)
            for n, (block, entry) in enumerate(allocated):
                progress(n, len(allocated))
                data_at = blocks.data_offset(entry)
                bitmap = blocks.read_bitmap(m.file, entry)
                for start, stop, present in bits.runs(bitmap, 0, blocks.sectors_per_block):
                    if not present:
                        continue
                    voff = block * blocks.block_size + sectors_to_bytes(start)
                    length = min(sectors_to_bytes(stop - start), limit - voff)
                    if length <= 0:
                        continue
                    data = m.file.pread(data_at + sectors_to_bytes(start), length)
                    parent.write(voff, data.ljust(length, b"\0"))
                    copied += length
            parent.flush()
            progress(len(allocated), len(allocated))
        pf = file_factory(parent_path, False)
        try:
            stamp = vhd_mtime(pf.mtime())
        finally:
            pf.close()
        if stamp != header.parent_timestamp:
            m.file.pwrite(lay.footer.data_offset, header.replace(parent_timestamp=stamp).pack())
            m.file.fdatasync()
        return MergeResult(child, parent_path, len(allocated), copied)


def snapshot(image: str, new: str, *, lock: bool = True, file_factory: FileFactory = ImageFile) -> None:
    """Create `new` as an empty differencing child of `image` (which must then stay unchanged)."""
    create_differencing(new, image, lock=lock, file_factory=file_factory)

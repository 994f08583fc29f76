"""resize: change the virtual size of a fixed or dynamic image, or grow a differencing one.

Every step leaves a valid image holding the old data if it is interrupted:
- fixed grow: the new footer goes at the new end first (the file is then a
  valid larger image whose grown range still holds the old footer's bytes),
  fdatasync, then those 512 bytes are zeroed;
- fixed shrink: the new footer at the new end, fdatasync, truncate (a crash
  in between leaves the old image with footer bytes in the cut-off range,
  which was all zeros or given up with --yes);
- dynamic grow: blocks lying where the larger BAT must go are copied to the
  end (footer at the new end first, copy, fdatasync, repoint, fdatasync; the
  old slot is a leak recovery would close), the BAT's new entries written,
  fdatasync, and only then the header's max_table_entries;
- dynamic shrink: blocks past the new end are dropped from the BAT (a leak
  until the holes are closed as compact does), a block cut in the middle has
  its cut-off part zeroed, and the footers say the new size last.
- differencing grow: as dynamic grow; parent locators' data in the way of the
  larger BAT is first copied just past the new BAT and the old locators (the
  blocks in that range having been moved to the end as above), fdatasync,
  then the header is repointed at the copies through a shadow
  (header_shadow.rewrite) in the 1024 bytes before the footer.  The metadata stays
  ahead of every block, so the layout scan and recovery need no new cases.
  A grown child reads zeros past its parent's size; shrinking a child is
  refused (its parent would show through again if it were grown back).
"""

from __future__ import annotations

import dataclasses

from vhdblkd.errors import UnsupportedImage
from vhdblkd.vhd import constants as c
from vhdblkd.vhd import header_shadow
from vhdblkd.vhd.blockmap import UNUSED, round_up_sector, unused_table
from vhdblkd.vhd.compact import Maintenance, Progress, _no_progress, maintain, write_bat_entry
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.geometry import size_for_create
from vhdblkd.vhd.image import FileFactory, open_image
from vhdblkd.vhd.recovery import needs_repair, repair
from vhdblkd.vhd.structs import DynamicHeader, Footer


class DataLoss(UnsupportedImage):
    """Shrinking would cut off data; confirm with --yes."""


@dataclasses.dataclass(frozen=True, slots=True)
class ResizeResult:
    path: str
    disk_type: str
    old_size: int
    new_size: int
    blocks_moved: int
    data_discarded: bool


def new_footer(footer: Footer, size: int) -> Footer:
    """The footer for `size`, rounded as the image's creator expects readers to read it."""
    exact = footer.creator_application not in c.CREATORS_USING_CHS | {c.CREATOR_VHDBLKD}
    size, geometry = size_for_create(size, exact=exact)
    return footer.replace(current_size=size, original_size=size, cylinders=geometry.cylinders,
                          heads=geometry.heads, sectors_per_track=geometry.sectors_per_track)


def _range_has_data(m: Maintenance, start: int, end: int, progress: Progress) -> bool:
    with m.reader() as image:
        pos = start
        while pos < end:
            progress(pos - start, end - start)
            n = min(c.CHUNK_SIZE, end - pos)
            if any(image.read(pos, n)):
                return True
            pos += n
    return False


def resize(path: str, size: int, *, shrink: bool = False, discard_data: bool = False,
           progress: Progress = _no_progress, lock: bool = True,
           file_factory: FileFactory = ImageFile) -> ResizeResult:
    """Grow (or with shrink=True shrink) the image to at least `size` bytes (rounded like create)."""
    with maintain(path, lock=lock, file_factory=file_factory) as m:
        lay = m.layout
        assert lay.footer is not None
        old_size = lay.virtual_size
        footer = new_footer(lay.footer, size)
        new_size = footer.current_size
        kind = c.DISK_TYPE_NAMES.get(lay.footer.disk_type, "?")
        if lay.footer.disk_type == c.DISK_TYPE_DIFFERENCING and new_size < old_size:
            raise UnsupportedImage(f"{path}: a differencing image can grow but not shrink; merge it into "
                                   "the parent and shrink that, then take a new snapshot")
        if new_size < old_size and not shrink:
            raise UnsupportedImage(f"{path}: {new_size} bytes is smaller than the current {old_size}; "
                                   "pass --shrink to cut the disk")
        lost = False
        if new_size < old_size:
            lost = _range_has_data(m, new_size, old_size, progress)
            if lost and not discard_data:
                raise DataLoss(f"{path}: bytes {new_size}..{old_size} hold data that shrinking would destroy; "
                               "pass --yes to confirm the loss")
        moved = 0
        if new_size == old_size and footer.cylinders == lay.footer.cylinders:
            pass
        elif lay.footer.disk_type == c.DISK_TYPE_FIXED:
            _resize_fixed(m, old_size, footer)
        elif new_size > old_size:
            moved = _grow_dynamic(m, footer, progress)
        else:
            _shrink_dynamic(m, footer, lost)
        progress(1, 1)
        return ResizeResult(path, kind, old_size, new_size, moved, lost)


def _resize_fixed(m: Maintenance, old_size: int, footer: Footer) -> None:
    f = m.file
    new_size = footer.current_size
    f.pwrite(new_size, footer.pack())
    f.fdatasync()
    if new_size > old_size:
        f.pwrite(old_size, bytes(c.FOOTER_SIZE))  # the old footer now lies inside the disk
        f.truncate(new_size + c.FOOTER_SIZE)  # a stale tail past the old end (511-byte footers)
    else:
        f.truncate(new_size + c.FOOTER_SIZE)
    f.fdatasync()


def _write_footers(m: Maintenance, footer: Footer) -> None:
    """Trailing footer first (the one readers trust), then the copy at offset 0."""
    lay = m.rescan()
    raw = footer.pack()
    m.file.pwrite(lay.data_end, raw)
    m.file.truncate(lay.data_end + c.FOOTER_SIZE)
    m.file.fdatasync()
    m.file.pwrite(0, raw)
    m.file.fdatasync()


def _grow_dynamic(m: Maintenance, footer: Footer, progress: Progress) -> int:
    lay = m.layout
    blocks = lay.blocks
    assert lay.header is not None and blocks is not None and lay.footer is not None
    f = m.file
    header = lay.header
    entries = max(header.max_table_entries, -(-footer.current_size // blocks.block_size))
    bat_end = header.table_offset + round_up_sector(entries * c.BAT_ENTRY_SIZE)
    later = [(off, ln, what) for off, ln, what in lay.metadata if what != "BAT" and off >= header.table_offset]
    locators = [(off, ln, int(what.rsplit(" ", 1)[1])) for off, ln, what in later
                if what.startswith("parent locator ")]
    if any(off < bat_end for off, _, what in later if not what.startswith("parent locator ")):
        raise UnsupportedImage(f"{m.path}: other metadata follows the BAT at {header.table_offset}; "
                               "the table cannot grow in place")
    moving = [loc for loc in locators if loc[0] < bat_end]
    # Moved locators go past both the new BAT and the old locators, so no copy overwrites an original.
    locator_at = max([bat_end] + [off + ln for off, ln, _ in locators])
    meta_end = locator_at + sum(ln for _, ln, _ in moving) if moving else bat_end
    in_the_way = sorted((e, i) for i, e in blocks.allocated_blocks() if blocks.bitmap_offset(e) < meta_end)
    end = max(lay.data_end, meta_end)
    old_footer = lay.footer.pack()
    for n, (entry, block) in enumerate(in_the_way):
        progress(n, len(in_the_way))
        data = f.pread(blocks.bitmap_offset(entry), blocks.stride)
        f.pwrite(end + blocks.stride, old_footer)  # the file stays valid; the new slot is orphan space
        f.pwrite(end, data)
        f.fdatasync()  # the copy is durable before the BAT points at it
        write_bat_entry(m, block, blocks.entry_for(end))
        f.fdatasync()
        end += blocks.stride
    if end > lay.data_end and not in_the_way:
        f.pwrite(end, old_footer)  # no block to move, but the table needs the room
    if moving:
        header = _move_locators(m, header, moving, locator_at)
    old_table = header.table_offset + header.max_table_entries * c.BAT_ENTRY_SIZE
    f.pwrite(old_table, unused_table(bat_end - old_table))
    f.fdatasync()  # the new entries read as unused before the header counts them
    f.pwrite(footer.data_offset, header.replace(max_table_entries=entries).pack())
    f.fdatasync()
    _write_footers(m, footer)
    return len(in_the_way)


def _move_locators(m: Maintenance, header: DynamicHeader, moving: list[tuple[int, int, int]],
                   at: int) -> DynamicHeader:
    """Copy the locators' data to `at` (free space now), then point the header at the copies."""
    f = m.file
    locs = list(header.parent_locators)
    for off, ln, i in moving:
        f.pwrite(at, f.pread(off, ln).ljust(ln, b"\0"))
        locs[i] = locs[i].replace(platform_data_offset=at)
        at += ln
    f.fdatasync()  # the copies are durable before the header points at them
    header = header.replace(parent_locators=tuple(locs))
    assert m.layout.footer is not None
    # Both header sectors change (the offsets in the second, the checksum in the first): the
    # header goes through a shadow in the 1024 bytes before the footer, moved past it first.
    shadow_at = round_up_sector(f.size() - c.FOOTER_SIZE)
    f.pwrite(shadow_at + DynamicHeader.SIZE, m.layout.footer.pack())
    f.fdatasync()  # the file ends in a footer again; the space before it is orphan
    header_shadow.rewrite(f, m.layout.footer.data_offset, header.pack(), shadow_at=shadow_at)
    return header


def _shrink_dynamic(m: Maintenance, footer: Footer, lost: bool) -> None:
    lay = m.layout
    assert lay.blocks is not None
    new_size = footer.current_size
    bs = lay.blocks.block_size
    if lost and new_size % bs:
        # The block cut in the middle keeps its bytes past the new end; zero them so a later
        # grow shows zeros there, as a grown disk must.
        with open_image(m.path, read_only=False, lock=False, file_factory=m.file_factory) as image:
            last = -(-new_size // bs) * bs
            image.write_zeroes(new_size, min(last, image.size) - new_size, may_trim=False)
        lay = m.rescan()
    assert lay.blocks is not None
    keep = -(-new_size // bs)
    dropped = False
    for block, _ in lay.blocks.allocated_blocks():
        if block >= keep:
            write_bat_entry(m, block, UNUSED)
            dropped = True
    if dropped:
        m.file.fdatasync()
    lay = m.rescan()
    if needs_repair(lay):
        m.layout = repair(m.file, lay)
    _write_footers(m, footer)

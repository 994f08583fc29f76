"""Repairs done by a read-write open (and by check --repair).

Every step keeps the file openable if it is interrupted:
- leaked blocks in the middle (a crash inside flush can make a later block's
  BAT sector durable but not an earlier one's): the last block is copied into
  the first hole, fdatasync, its BAT entry repointed, fdatasync; the old copy
  is then orphan space at the tail;
- orphan space after the last referenced block (a torn allocation), a
  damaged or 511-byte trailing footer: the footer is written right after the
  data and the file truncated there;
- a missing or stale footer copy at offset 0 is rewritten from the footer;
- a dynamic header torn while set_parent rewrote it is written back from its
  shadow (header_shadow.py), one write, fdatasync; a tear of that write
  leaves the shadow in place to do it again;
- a parent locator whose data lies outside the file is cleared from the
  header: its range is not reserved, so once the file grew over it a block
  would overlap it and the image would no longer open.  The header's two
  sectors change (locators in the second, checksum in the first), so it is
  rewritten through a shadow (header_shadow.rewrite) in the last 1024 bytes
  before the footer: the footer is first moved 1024 bytes past the data,
  fdatasync, unless there is that much orphan space already.
"""

from __future__ import annotations

from vhdblkd.vhd import constants as c
from vhdblkd.vhd import header_shadow
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.layout import Layout, scan
from vhdblkd.vhd.lazylog import LazyLogger
from vhdblkd.vhd.structs import DynamicHeader, ParentLocator

log = LazyLogger(__name__)  # logging loads at the first warning: `vhdblkctl info` needs none


def needs_repair(lay: Layout) -> bool:
    if lay.fatal is not None or lay.footer is None:
        return False
    if lay.short_footer or not lay.trailing_footer_ok:
        return True
    if lay.footer.disk_type == c.DISK_TYPE_FIXED:
        return False
    return bool(lay.leaks) or bool(lay.bad_locators) or lay.header_shadow is not None or lay.footer_offset != lay.data_end or lay.backup_footer is None \
        or lay.backup_footer.pack() != lay.footer.pack()


def repair(f: ImageFile, lay: Layout) -> Layout:
    """Fix what a read-write open may fix; returns the rescanned layout."""
    assert lay.fatal is None and lay.footer is not None
    footer_bytes = lay.footer.pack()
    header_at = lay.footer.data_offset
    if lay.footer.disk_type == c.DISK_TYPE_FIXED:
        if lay.short_footer or not lay.trailing_footer_ok:
            log.warning("%s: rewriting the footer at offset %d", lay.path, lay.footer_offset)
            f.pwrite(lay.footer_offset, footer_bytes)
            f.truncate(lay.footer_offset + c.FOOTER_SIZE)
            f.fdatasync()
        return scan(f, lay.path)
    if lay.header_shadow is not None and lay.header is not None:
        log.warning("%s: writing the dynamic header back from its copy at %d", lay.path, lay.header_shadow)
        f.pwrite(header_at, lay.header.pack())
        f.fdatasync()  # the header is whole before anything else trusts it
        lay = scan(f, lay.path)
        if lay.fatal is not None:
            return lay
    if lay.bad_locators and lay.header is not None:
        log.warning("%s: clearing parent locators %s, whose data lies outside the file", lay.path,
                    ", ".join(map(str, lay.bad_locators)))
        locators = tuple(ParentLocator() if i in lay.bad_locators else loc
                         for i, loc in enumerate(lay.header.parent_locators))
        shadow_at = _room_before_footer(f, lay, footer_bytes)
        header_shadow.rewrite(f, header_at, lay.header.replace(parent_locators=locators).pack(),
                              shadow_at=shadow_at)
        lay = scan(f, lay.path)
        if lay.fatal is not None:
            return lay
    while lay.leaks:
        lay = _relocate_last_block(f, lay)
    if lay.short_footer or not lay.trailing_footer_ok or lay.footer_offset != lay.data_end:
        log.warning("%s: truncating %d bytes of unreferenced space and rewriting the footer at %d",
                    lay.path, max(0, lay.footer_offset - lay.data_end), lay.data_end)
        f.pwrite(lay.data_end, footer_bytes)
        f.truncate(lay.data_end + c.FOOTER_SIZE)
        f.fdatasync()
    if lay.backup_footer is None or lay.backup_footer.pack() != footer_bytes:
        log.warning("%s: rewriting the footer copy at offset 0", lay.path)
        f.pwrite(0, footer_bytes)
        f.fdatasync()
    return scan(f, lay.path)


def _room_before_footer(f: ImageFile, lay: Layout, footer_bytes: bytes) -> int:
    """Offset of 1024 orphan bytes right before the footer, where header_shadow.find looks."""
    if lay.footer_offset - lay.data_end >= DynamicHeader.SIZE:
        return lay.footer_offset - DynamicHeader.SIZE
    at = lay.data_end
    end = at + DynamicHeader.SIZE + c.FOOTER_SIZE
    f.pwrite(end - c.FOOTER_SIZE, footer_bytes)
    if f.size() > end:
        f.truncate(end)
    # The footer is past the shadow's place before the shadow overwrites the old footer;
    # until then the file is valid, with orphan space the last step of repair truncates.
    f.fdatasync()
    return at


def _relocate_last_block(f: ImageFile, lay: Layout) -> Layout:
    blocks = lay.blocks
    assert blocks is not None
    hole_offset, _ = lay.leaks[0]
    last = blocks.last_block()
    if last is None or blocks.bitmap_offset(last[1]) <= hole_offset:
        lay.leaks.clear()
        return lay
    block, top_entry = last
    top_offset = blocks.bitmap_offset(top_entry)
    log.warning("%s: moving block %d from offset %d into the leaked space at %d",
                lay.path, block, top_offset, hole_offset)
    data = f.pread(top_offset, blocks.stride)
    f.pwrite(hole_offset, data)
    f.fdatasync()  # the copy is durable before anything points at it
    blocks.write_entry(f, block, blocks.entry_for(hole_offset))
    f.fdatasync()  # the old copy is now orphan space at the tail
    return scan(f, lay.path)

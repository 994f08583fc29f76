"""set_parent: point a differencing image at its parent's new place (as `vhd-util modify -p` does).

What changes: the child's W2ru and W2ku locators (relative and absolute path,
UTF-16LE) and their data, the parent unicode name, the parent timestamp (the
new parent's mtime) and, only with ignore_id_mismatch, the parent unique id.
Other locators (deprecated ANSI and Mac ones) named the old place and are
dropped.  The blocks and the footer do not change.

Crash safety.  The old locators' data is never overwritten, so until the
header changes the child still opens through the old parent; the header
(two sectors under one checksum) is never left torn (header_shadow.py):
  1. room for the new locators' data and a shadow of the new header is found
     in a gap between the metadata that no live locator uses, else right
     after the metadata, where the blocks in the way are first moved to the
     end as resize does (footer at the new end, copy, fdatasync, repoint the
     BAT entry, fdatasync);
  2. the locators' data and the shadow are written, fdatasync;
  3. the header is rewritten in one sector-aligned write, fdatasync.  A crash
     that tears it between its sectors leaves the shadow, which scan reads
     the image through and a read-write open writes back;
  4. the shadow is zeroed, fdatasync.
After step 3 it opens through the new parent.  A gap a moved block left that
is big enough for a block is then closed as compact does (recovery.repair).
"""

from __future__ import annotations

import dataclasses
import os
import uuid

from vhdblkd.errors import ParentError, UnsupportedImage
from vhdblkd.vhd import constants as c
from vhdblkd.vhd import parent as parent_mod
from vhdblkd.vhd.base import VhdImage
from vhdblkd.vhd.blockmap import round_up_sector
from vhdblkd.vhd.compact import Maintenance, maintain, write_bat_entry
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.image import FileFactory, open_image
from vhdblkd.vhd.recovery import needs_repair, repair
from vhdblkd.vhd.structs import DynamicHeader, ParentLocator
from vhdblkd.vhd.timestamp import vhd_timestamp_to_iso


@dataclasses.dataclass(frozen=True, slots=True)
class SetParentResult:
    child: str
    parent: str
    previous_parent: str | None  # where the old locators led, if to an existing file
    parent_unique_id: str
    previous_parent_unique_id: str
    unique_id_updated: bool
    parent_timestamp: str  # ISO 8601 UTC
    relative_locator: str
    absolute_locator: str
    blocks_moved: int
    outside_child_directory: bool  # opening the child then needs allow_unsafe_parent


def set_parent(child: str, new_parent: str, *, ignore_id_mismatch: bool = False,
               allow_unsafe_parent: bool = False, lock: bool = True,
               file_factory: FileFactory = ImageFile) -> SetParentResult:
    """Rewrite `child`'s parent locators, name and timestamp to point at `new_parent`.

    Refused (ParentError) when new_parent's unique id is not the one the child records,
    unless ignore_id_mismatch: then the child records new_parent's id, which is only
    right when new_parent holds the very data the child was made on.
    allow_unsafe_parent concerns new_parent's own parents (as for open_image).
    """
    parent_abs = os.path.abspath(new_parent)
    exists = getattr(file_factory, "exists", os.path.isfile)
    if not exists(parent_abs):
        raise ParentError(f"{child}: the new parent {new_parent} does not exist; give the path of the parent image")
    with maintain(child, lock=lock, file_factory=file_factory) as m:
        lay = m.layout
        assert lay.footer is not None
        if lay.footer.disk_type != c.DISK_TYPE_DIFFERENCING or lay.header is None:
            raise UnsupportedImage(f"{child}: only a differencing image has a parent to set")
        header = lay.header
        try:
            previous: str | None = parent_mod.locate(m.file, header, child, allow_unsafe=True,
                                                                file_factory=file_factory)
        except ParentError:
            previous = None
        _refuse_loop(child, parent_abs, allow_unsafe_parent, file_factory)
        # Shared locks on the new chain while its identity and timestamp are recorded.
        with open_image(parent_abs, read_only=True, lock=lock, allow_unsafe_parent=allow_unsafe_parent,
                        file_factory=file_factory) as parent:
            link = parent_mod.link_to(child, header, "given path", parent)
            if not link.id_matches and not ignore_id_mismatch:
                raise ParentError(
                    f"{child}: {new_parent} has unique id {uuid.UUID(bytes=link.unique_id)}, but the child "
                    f"expects {uuid.UUID(bytes=link.expected_unique_id)}: it is not this child's parent; "
                    "the child still points where it did. Give the right parent, or pass --ignore-id-mismatch "
                    "(ignore_id_mismatch=True) only if it holds the very data the child was made on")
            texts = parent_mod.locator_texts(child, parent_abs)
            new_header = header.replace(
                parent_unique_id=link.unique_id,
                parent_timestamp=link.timestamp,
                parent_unicode_name=parent_mod.parent_name_field(parent_abs))
            moved = _rewrite(m, new_header, texts)
        child_dir = os.path.dirname(os.path.abspath(child))
        return SetParentResult(
            child=child, parent=parent_abs, previous_parent=previous,
            parent_unique_id=str(uuid.UUID(bytes=link.unique_id)),
            previous_parent_unique_id=str(uuid.UUID(bytes=link.expected_unique_id)),
            unique_id_updated=not link.id_matches,
            parent_timestamp=vhd_timestamp_to_iso(link.timestamp),
            relative_locator=texts[0][1], absolute_locator=texts[1][1], blocks_moved=moved,
            outside_child_directory=not parent_mod.is_within(parent_abs, child_dir))


def _refuse_loop(child: str, parent_abs: str, allow_unsafe_parent: bool, file_factory: FileFactory) -> None:
    """Refuse a new parent that is the child or has it in its own chain."""
    with open_image(parent_abs, read_only=True, lock=False, allow_unsafe_parent=allow_unsafe_parent,
                    file_factory=file_factory) as parent:
        node: VhdImage | None = parent
        while node is not None:
            if _same_file(node.path, child):
                raise ParentError(f"{child}: {parent_abs} is (or has in its chain) the child itself; "
                                  "a chain cannot loop; give the image the child was made on")
            node = node.parent


def _same_file(a: str, b: str) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _rewrite(m: Maintenance, header: DynamicHeader, texts: list[tuple[bytes, str]]) -> int:
    """Write the locators' data where nothing live lies, then the header that points at it."""
    lay = m.layout
    assert lay.footer is not None
    datas = [text.encode("utf-16-le") for _, text in texts]
    need = sum(round_up_sector(len(d)) for d in datas) + DynamicHeader.SIZE  # the data, then the shadow
    at, moved = _room(m, need)
    locators: list[ParentLocator] = []
    pos = at
    for (code, _), data in zip(texts, datas, strict=True):
        space = round_up_sector(len(data))
        m.file.pwrite(pos, data + bytes(space - len(data)))
        # The data space is in sectors, as the specification says.
        locators.append(ParentLocator(code, space // c.SECTOR_SIZE, len(data), pos))
        pos += space
    locators.extend(ParentLocator() for _ in range(c.PARENT_LOCATOR_COUNT - len(locators)))
    packed = header.replace(parent_locators=tuple(locators)).pack()
    m.file.pwrite(pos, packed)
    # The data and the shadow are durable before the header points at the data: a crash that
    # tears the header's two sectors apart from here on is repaired from the shadow.
    m.file.fdatasync()
    m.file.pwrite(lay.footer.data_offset, packed)
    m.file.fdatasync()  # the header is durable before its shadow goes
    m.file.pwrite(pos, bytes(DynamicHeader.SIZE))
    # A shadow left behind could be taken for the copy of a later header; lost, it is only free space.
    m.file.fdatasync()
    lay = m.rescan()
    if needs_repair(lay):
        m.layout = repair(m.file, lay)
        if m.layout.fatal is not None:
            raise m.layout.fatal
    return moved


def _room(m: Maintenance, need: int) -> tuple[int, int]:
    """(offset of `need` free bytes among the metadata, blocks moved to make it)."""
    lay = m.layout
    blocks = lay.blocks
    assert blocks is not None and lay.footer is not None
    stride = blocks.stride
    allocated = blocks.allocated_blocks()
    busy = sorted([(off, round_up_sector(ln)) for off, ln, _ in lay.metadata]
                  + [(blocks.bitmap_offset(e), stride) for _, e in allocated])
    pos = 0
    for off, ln in busy:
        if off >= lay.metadata_end:
            break
        if off - pos >= need:
            return pos, 0
        pos = max(pos, round_up_sector(off + ln))
    at = lay.metadata_end
    in_the_way = sorted((e, i) for i, e in allocated
                        if blocks.bitmap_offset(e) < at + need and blocks.bitmap_offset(e) + stride > at)
    end = max(lay.data_end, at + need)
    old_footer = lay.footer.pack()
    for entry, block in in_the_way:
        data = m.file.pread(blocks.bitmap_offset(entry), stride)
        m.file.pwrite(end + stride, old_footer)  # the file stays valid; the new slot is orphan space
        m.file.pwrite(end, data.ljust(stride, b"\0"))
        m.file.fdatasync()  # the copy is durable before the BAT points at it
        write_bat_entry(m, block, blocks.entry_for(end))
        m.file.fdatasync()
        end += stride
    if end > lay.data_end and not in_the_way:
        m.file.pwrite(end, old_footer)  # nothing moved, but the data needs room before the footer
    return at, len(in_the_way)

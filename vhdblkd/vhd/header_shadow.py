"""The shadow of a dynamic header: what makes rewriting the 1024-byte header crash-safe.

The header spans two sectors and its checksum (in the first) covers both, so
a header rewrite torn between them (a device writes sectors, not pages,
atomically) leaves a header whose checksum fails, and the image would not
open.  A writer that changes both sectors (set_parent) therefore first puts a
complete copy of the new header, the shadow, into free metadata space, beside
the new locator data, and makes it durable; only then does it write the
header.  A torn header is told from random damage by a shadow that is byte
for byte one of its two sectors and agrees on every field that says where the
BAT is: scan then reads the image through the shadow and a read-write open
writes it over the header.  Both halves a tear can leave are covered: the
sector holding the new half equals the shadow's, and either way the shadow is
the complete new header, whose locator data was durable before it.

The shadow is zeroed once the header is durable, so it is never taken for
the copy of a later, different header.

Where the shadow may lie: among the metadata (set_parent puts it beside the
new locator data, which the header it tears into may not name), or in the
last 1024 bytes before the footer (recovery, which clears locators and has no
metadata room of its own: a tear can hide which locators the header named,
so only a fixed place is found for sure).
"""

from __future__ import annotations

from vhdblkd.errors import CorruptImage
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.structs import DynamicHeader


def find(f: ImageFile, torn: bytes, *, at: int, limit: int, max_locator: int) -> tuple[int, DynamicHeader] | None:
    """(offset, header) of the shadow that `torn` (a header whose checksum fails, at `at`) was being replaced by.

    It lies after the header, outside the BAT, at most two locators' data (of at most
    `max_locator` bytes each) past the metadata the torn header names, and before `limit`.
    """
    try:
        header = DynamicHeader.unpack(torn, 0, verify=False)
    except CorruptImage:
        return None
    start = at + DynamicHeader.SIZE
    bat = (header.table_offset, header.table_offset + header.max_table_entries * c.BAT_ENTRY_SIZE)
    ends = [bat[1]] + [loc.platform_data_offset + max(loc.data_space_bytes(), loc.platform_data_length)
                       for loc in header.parent_locators if loc.used]
    stop = min(limit, max(ends) + 2 * max_locator + DynamicHeader.SIZE)
    # The BAT is not read: the shadow never lies inside it, and it can be megabytes.
    tail = limit - DynamicHeader.SIZE
    windows = [(start, min(stop, bat[0])), (max(start, bat[1]), stop)]
    if tail >= start and (tail >= bat[1] or tail + DynamicHeader.SIZE <= bat[0]):
        windows.append((tail, limit))
    for lo, hi in windows:
        found = _find_in(f, torn, header, lo, hi)
        if found is not None:
            return found
    return None


def rewrite(f: ImageFile, at: int, packed: bytes, *, shadow_at: int) -> None:
    """Replace the header at `at` with `packed` so that no crash leaves it torn for good.

    `shadow_at` is free space find() looks in (after the header, outside the BAT).
    """
    assert len(packed) == DynamicHeader.SIZE
    f.pwrite(shadow_at, packed)
    f.fdatasync()  # the shadow is whole before the header can tear: find() repairs from it
    f.pwrite(at, packed)
    f.fdatasync()  # the header is durable before its shadow goes
    f.pwrite(shadow_at, bytes(DynamicHeader.SIZE))
    # A shadow left behind could be taken for the copy of a later header; lost, it is only free space.
    f.fdatasync()


def _find_in(f: ImageFile, torn: bytes, header: DynamicHeader, lo: int, hi: int) -> tuple[int, DynamicHeader] | None:
    lo = -(-lo // c.SECTOR_SIZE) * c.SECTOR_SIZE
    if hi - lo < DynamicHeader.SIZE:
        return None
    window = f.pread(lo, hi - lo)
    pos = window.find(c.HEADER_COOKIE)
    while pos != -1:
        if pos % c.SECTOR_SIZE == 0 and pos + DynamicHeader.SIZE <= len(window):
            raw = window[pos : pos + DynamicHeader.SIZE]
            if _is_shadow_of(raw, torn, header):
                return lo + pos, DynamicHeader.unpack(raw, 0)
        pos = window.find(c.HEADER_COOKIE, pos + 1)
    return None


def _is_shadow_of(raw: bytes, torn: bytes, header: DynamicHeader) -> bool:
    try:
        shadow = DynamicHeader.unpack(raw, 0)
    except CorruptImage:
        return False
    half = c.SECTOR_SIZE
    if raw[:half] != torn[:half] and raw[half:] != torn[half:]:
        return False
    return (shadow.data_offset, shadow.table_offset, shadow.max_table_entries, shadow.block_size,
            shadow.header_version) == (header.data_offset, header.table_offset, header.max_table_entries,
                                       header.block_size, header.header_version)

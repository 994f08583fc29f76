"""BlockMap: the BAT, the blocks' sector bitmaps, and how both sit on disk.

Block i of the virtual disk lives where BAT entry i points: a sector number,
a big-endian 32-bit integer on disk, 0xFFFFFFFF for a block not allocated.
At that sector starts the block's sector bitmap (one bit per sector, most
significant bit first, padded to whole sectors), and the block's data
follows it.  This module is the only one that knows that encoding.

For an open image the map also holds the bitmaps read so far, one state byte
per block (absent, full, mixed, or not looked at yet: what a read needs to
know in one lookup, instead of the BAT entry and the bitmap cache) and what
the next flush must write.  It does no locking and decides no ordering: when
each piece reaches the disk is the business of dynamic.py (flush) and
recovery.py (the crash protocol).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator

from vhdblkd.vhd import constants as c
from vhdblkd.vhd.fileio import ImageFile

UNUSED = c.BAT_UNUSED
ENTRIES_PER_SECTOR = c.SECTOR_SIZE // c.BAT_ENTRY_SIZE
_ENTRY = struct.Struct(">I")
_SECTOR_SHIFT = 9
assert 1 << _SECTOR_SHIFT == c.SECTOR_SIZE

# A block's state byte (BlockMap.state).
ABSENT = 0  # no BAT entry: this file holds none of the block
FULL = 1  # allocated, every bitmap bit set
MIXED = 2  # allocated, bitmap loaded (BlockMap.bitmaps) with some bits clear
UNKNOWN = 3  # not looked at since open: consult the BAT entry and the bitmap


# --- sector arithmetic ---------------------------------------------------------


def sectors_to_bytes(sector: int) -> int:
    return sector << _SECTOR_SHIFT


def sector_of(offset: int) -> int:
    """The sector holding byte `offset`."""
    return offset >> _SECTOR_SHIFT


def sectors_spanning(start: int, end: int) -> tuple[int, int]:
    """[first, stop) sectors that bytes [start, end) touch."""
    return start >> _SECTOR_SHIFT, (end + c.SECTOR_SIZE - 1) >> _SECTOR_SHIFT


def is_sector_aligned(offset: int) -> bool:
    return not offset & (c.SECTOR_SIZE - 1)


def round_up_sector(offset: int) -> int:
    return -(-offset // c.SECTOR_SIZE) * c.SECTOR_SIZE


def bitmap_size_for(block_size: int) -> int:
    """Bytes of a block's sector bitmap: one bit per sector, padded to a sector."""
    bits_bytes = block_size // c.SECTOR_SIZE // 8
    return max(c.SECTOR_SIZE, round_up_sector(bits_bytes))


def spans(offset: int, length: int, block_size: int) -> Iterator[tuple[int, int, int, int]]:
    """Split a request into (block, offset in block, offset in request, length) pieces."""
    pos = 0
    while pos < length:
        block, in_block = divmod(offset + pos, block_size)
        n = min(block_size - in_block, length - pos)
        yield block, in_block, pos, n
        pos += n


# --- the table's encoding -------------------------------------------------------


def decode_table(raw: bytes) -> array[int]:
    """BAT entries from their on-disk bytes, in host order."""
    entries = array("I")
    entries.frombytes(raw)
    if sys.byteorder == "little":
        entries.byteswap()
    return entries


def encode_entries(entries: array[int]) -> bytes:
    out = array("I", entries)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


def unused_table(length: int) -> bytes:
    """`length` bytes of BAT that hold only unused entries."""
    return b"\xff" * length


class BlockMap:
    """The BAT (`entries`, host order) and the geometry of the blocks it points at."""

    __slots__ = ("entries", "table_offset", "block_size", "bitmap_size", "stride", "sectors_per_block",
                 "full_bitmap", "empty_bitmap", "bitmaps", "state", "dirty_sectors", "dirty_bitmaps", "allocated")

    def __init__(self, entries: array[int], *, table_offset: int, block_size: int) -> None:
        self.entries = entries
        self.table_offset = table_offset
        self.block_size = block_size
        self.bitmap_size = bitmap_size_for(block_size)
        self.stride = self.bitmap_size + block_size  # bitmap and data: the file space of one block
        self.sectors_per_block = block_size // c.SECTOR_SIZE
        self.full_bitmap = b"\xff" * self.bitmap_size
        self.empty_bitmap = bytes(self.bitmap_size)
        # The open image's state: a block's bitmap as read (None once every bit is set), and what
        # the next flush must write.
        self.bitmaps: dict[int, bytearray | None] = {}
        # Learnt lazily (at open a huge BAT costs nothing); changed only through the methods
        # below, and always after the entry on the way in, before it on the way out, so a
        # lock-free reader that sees FULL or MIXED finds the entry already set.
        self.state = bytearray([UNKNOWN]) * len(entries)
        self.dirty_sectors: set[int] = set()  # BAT sectors
        self.dirty_bitmaps: set[int] = set()  # blocks
        self.allocated = len(entries) - entries.count(UNUSED)

    @classmethod
    def read(cls, f: ImageFile, *, table_offset: int, entries: int, block_size: int) -> BlockMap:
        raw = f.pread(table_offset, entries * c.BAT_ENTRY_SIZE)
        return cls(decode_table(raw), table_offset=table_offset, block_size=block_size)

    # --- where things are ------------------------------------------------------

    @staticmethod
    def bitmap_offset(entry: int) -> int:
        return sectors_to_bytes(entry)

    def data_offset(self, entry: int) -> int:
        return sectors_to_bytes(entry) + self.bitmap_size

    @staticmethod
    def entry_for(file_offset: int) -> int:
        """The BAT entry of a block that starts at `file_offset`."""
        return sector_of(file_offset)

    def entry_offset(self, block: int) -> int:
        """Where block `block`'s BAT entry is in the file."""
        return self.table_offset + c.BAT_ENTRY_SIZE * block

    @property
    def table_bytes(self) -> int:
        return len(self.entries) * c.BAT_ENTRY_SIZE

    # --- the table -------------------------------------------------------------

    def allocated_blocks(self) -> list[tuple[int, int]]:
        """(block, entry) of every allocated block, by block."""
        entries = self.entries
        return [(i, entries[i]) for i in range(len(entries)) if entries[i] != UNUSED]

    def block_at(self, entry: int) -> int | None:
        """The block whose entry is `entry`, if any."""
        try:
            return self.entries.index(entry)
        except ValueError:
            return None

    def last_block(self) -> tuple[int, int] | None:
        """(block, entry) of the block nearest the end of the file, if any is allocated."""
        entry = max((e for e in self.entries if e != UNUSED), default=UNUSED)
        return None if entry == UNUSED else (self.entries.index(entry), entry)

    def read_bitmap(self, f: ImageFile, entry: int) -> bytearray:
        raw = bytearray(f.pread(sectors_to_bytes(entry), self.bitmap_size))
        raw.extend(bytes(self.bitmap_size - len(raw)))
        return raw

    # --- changes an open image makes (on disk at the next flush) ---------------

    def point(self, block: int, entry: int, bitmap: bytearray | None) -> None:
        """Allocate: block `block` now lives at `entry`, with `bitmap` (None: every bit set)."""
        self.entries[block] = entry
        self.set_bitmap(block, bitmap)
        self.dirty_sectors.add(block // ENTRIES_PER_SECTOR)
        self.allocated += 1

    def set_bitmap(self, block: int, bitmap: bytearray | None) -> None:
        """Cache an allocated block's bitmap (None once every bit is set)."""
        self.bitmaps[block] = bitmap
        self.state[block] = FULL if bitmap is None else MIXED

    def free(self, block: int) -> None:
        """Forget a block: its entry becomes unused and its bitmap is not written."""
        self.state[block] = ABSENT
        self.entries[block] = UNUSED
        self.dirty_sectors.add(block // ENTRIES_PER_SECTOR)
        self.dirty_bitmaps.discard(block)
        self.bitmaps.pop(block, None)
        self.allocated -= 1

    def take_writes(self) -> tuple[list[tuple[int, bytes]], set[int], set[int]]:
        """The (offset, bytes) writes that make the dirty bitmaps and BAT sectors durable.

        Bitmaps first, then BAT sectors, each in ascending order.  The dirty sets are
        handed back with them, for `put_back` if the writes fail.
        """
        writes: list[tuple[int, bytes]] = []
        entries = self.entries
        for block in sorted(self.dirty_bitmaps):
            entry = entries[block]
            if entry == UNUSED:
                continue
            bitmap = self.bitmaps.get(block)
            writes.append((sectors_to_bytes(entry), self.full_bitmap if bitmap is None else bytes(bitmap)))
        for sector in sorted(self.dirty_sectors):
            writes.append((self.table_offset + sectors_to_bytes(sector), self._table_sector(sector)))
        sectors, bitmaps = self.dirty_sectors, self.dirty_bitmaps
        self.dirty_sectors, self.dirty_bitmaps = set(), set()
        return writes, sectors, bitmaps

    def put_back(self, sectors: set[int], bitmaps: set[int]) -> None:
        self.dirty_sectors |= sectors
        self.dirty_bitmaps |= bitmaps

    def _table_sector(self, sector: int) -> bytes:
        start = sector * ENTRIES_PER_SECTOR
        return encode_entries(self.entries[start : start + ENTRIES_PER_SECTOR])

    # --- one entry rewritten in place (maintenance and recovery) ---------------

    def write_entry(self, f: ImageFile, block: int, entry: int) -> None:
        """Point block `block` at `entry` on disk now (one 4-byte write; no sync)."""
        if (self.entries[block] == UNUSED) != (entry == UNUSED):
            self.allocated += 1 if entry != UNUSED else -1
        self.state[block] = UNKNOWN
        self.entries[block] = entry
        f.pwrite(self.entry_offset(block), _ENTRY.pack(entry))

"""Dynamic and differencing images: BAT, sector bitmaps, crash-safe allocation.

Memory: the BAT is one array('I'); bitmaps are cached per allocated block
that was touched, as a bytearray, or None when every bit is set (then reads
and writes of that block are plain pread/pwrite without the lock).

Crash safety.  A new block always goes at the end of the data area:
  1. the footer is written at the new end of file (the file stays valid; the
     block is orphan space until referenced),
  2. the block's initial bitmap (all ones for a dynamic disk, whose fresh
     data area reads as zeros; all zeros for a differencing disk) and data,
  3. the BAT entry, in memory only.
flush() then does: fdatasync; write dirty BAT sectors and dirty bitmaps;
fdatasync.  So on disk a BAT entry or a set bitmap bit never becomes durable
before the data and footer it depends on, and bitmap changes (bits set by
writes, bits cleared by discards) are deferred the same way.

A crash inside flush's second phase can make a later block's BAT sector
durable but not an earlier one's, leaving an unreferenced block in the middle
of the file.  Rather than ordering BAT writes with extra syncs, recovery on
the next read-write open relocates tail blocks into such holes (copy,
fdatasync, repoint the BAT entry, fdatasync) and truncates; see recovery.py.

Discard of a whole block on a dynamic disk frees it: the data is punched out
(QEMU ignores bitmaps, so the data itself must read as zeros) and the BAT
entry becomes unused, durable at the next flush.  The freed slot is never
reused while the image is open (allocation only appends), so nothing can point
at it again before the BAT change is durable; reusing slots in place would
need its own crash-safe protocol and would make check unable to tell free
space from a leak.  At close(), after a flush, the gaps are closed with the
same crash-safe relocation recovery uses, so the file stays compact and check
clean; after a crash the next read-write open does it.  Partial discards punch
the range out and keep the block.  On a differencing disk a discarded range is
zeroed and its bits set, so the parent never shows through; such blocks cannot
be freed.  Wholly empty blocks that end the file are freed and the file
truncated at close().
"""

from __future__ import annotations

import logging
import sys
import threading
from array import array

from vhdblkd.backend import Buffer
from vhdblkd.vhd import bitmap as bits
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.base import VhdImage
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.layout import Layout, scan, sectors_to_bytes
from vhdblkd.vhd.lock import ImageLock
from vhdblkd.vhd.recovery import needs_repair, repair

log = logging.getLogger(__name__)

_UNUSED = c.BAT_UNUSED
_ENTRIES_PER_SECTOR = c.SECTOR_SIZE // c.BAT_ENTRY_SIZE
_NOT_LOADED = b""  # sentinel for a bitmap not read yet (never a valid bitmap)
_ZERO_CHUNK = 1024 * 1024


class DynamicImage(VhdImage):
    disk_type = "dynamic"

    def __init__(self, path: str, file: ImageFile, layout: Layout, *, read_only: bool,
                 lock: ImageLock | None, parent: VhdImage | None = None) -> None:
        super().__init__(path, file, layout, read_only=read_only, lock=lock)
        assert layout.bat is not None and layout.header is not None
        self.parent = parent
        self._bat: array[int] = layout.bat
        self.block_size = layout.block_size
        self._bs = layout.block_size
        self._bms = layout.bitmap_size
        self._stride = layout.stride
        self._spb = layout.block_size // c.SECTOR_SIZE
        self._bat_offset = layout.header.table_offset
        self._metadata_end = layout.metadata_end
        self._bitmaps: dict[int, bytearray | None] = {}
        self._dirty_bat: set[int] = set()
        self._dirty_bitmaps: set[int] = set()
        self._freed_slots = 0  # blocks given back by discard since open: gaps to close at close()
        self._end = layout.data_end  # where the trailing footer sits (after recovery)
        self._meta = threading.RLock()
        self._flush_lock = threading.Lock()
        self._total_blocks = layout.total_blocks
        self._allocated = len(self._bat) - self._bat.count(_UNUSED)
        self._footer_bytes = self.footer.pack()
        self._full_bitmap = b"\xff" * self._bms
        self._zeros = bytes(min(self._bs, _ZERO_CHUNK))
        self._pwrite = file.pwrite

    @property
    def allocated_blocks(self) -> int:
        return self._allocated

    @property
    def total_blocks(self) -> int:
        return self._total_blocks

    def allocated_block_indexes(self) -> list[int]:
        with self._meta:
            bat = self._bat
            return [i for i in range(len(bat)) if bat[i] != _UNUSED]

    def sector_presence(self, block: int) -> bytes | bool:
        """Which sectors of `block` this file holds: False (none, the block is unallocated),
        True (all of them) or the block's sector bitmap (bit set = held here)."""
        entry = self._bat[block]
        if entry == _UNUSED:
            return False
        bm = self._bitmap(block, entry)
        return True if bm is None else bytes(bm)

    # --- reads ----------------------------------------------------------------

    def read(self, offset: int, length: int) -> Buffer:
        assert 0 <= offset and offset + length <= self._size
        out = bytearray(length)
        view = memoryview(out)
        bs = self._bs
        pos = 0
        while pos < length:
            voff = offset + pos
            block, in_block = divmod(voff, bs)
            n = min(bs - in_block, length - pos)
            self._read_in_block(block, in_block, voff, view[pos : pos + n])
            pos += n
        return out

    def _read_in_block(self, block: int, in_block: int, voff: int, dest: memoryview) -> None:
        entry = self._bat[block]
        if entry == _UNUSED:
            self._read_fallback(voff, dest)
            return
        base = sectors_to_bytes(entry) + self._bms
        bm = self._bitmap(block, entry)
        if bm is None:
            self._readinto(base + in_block, dest)
            return
        n = len(dest)
        for start, stop, is_set in bits.runs(bm, in_block >> 9, (in_block + n + 511) >> 9):
            lo = max(start << 9, in_block)
            hi = min(stop << 9, in_block + n)
            sub = dest[lo - in_block : hi - in_block]
            if is_set:
                self._readinto(base + lo, sub)
            else:
                self._read_fallback(voff - in_block + lo, sub)

    def _readinto(self, offset: int, dest: memoryview) -> None:
        got = self._file.readinto(offset, dest)
        if got < len(dest):
            dest[got:] = bytes(len(dest) - got)

    def _read_fallback(self, voff: int, dest: memoryview) -> None:
        """Sectors not in this file: zeros for a dynamic disk, the parent's data for a child.

        Every caller passes a freshly allocated (zeroed) buffer, so zeros need no copy.
        """
        parent = self.parent
        if parent is None:
            return
        n = len(dest)
        avail = max(0, min(n, parent.size - voff))
        if avail:
            dest[:avail] = parent.read(voff, avail)
        if avail < n:
            dest[avail:] = bytes(n - avail)

    def _bitmap(self, block: int, entry: int) -> bytearray | None:
        bm = self._bitmaps.get(block, _NOT_LOADED)
        if bm is not _NOT_LOADED:
            return bm  # type: ignore[return-value]  # the sentinel was ruled out
        with self._meta:
            if block in self._bitmaps:
                return self._bitmaps[block]
            raw = bytearray(self._file.pread(sectors_to_bytes(entry), self._bms))
            raw.extend(bytes(self._bms - len(raw)))
            loaded = None if bits.all_set(raw, self._spb) else raw
            self._bitmaps[block] = loaded
            return loaded

    # --- writes ---------------------------------------------------------------

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        assert 0 <= offset and offset + len(data) <= self._size
        self._check_writable()
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        length = len(view)
        bs = self._bs
        pos = 0
        while pos < length:
            voff = offset + pos
            block, in_block = divmod(voff, bs)
            n = min(bs - in_block, length - pos)
            self._write_in_block(block, in_block, voff, view[pos : pos + n])
            pos += n
        if fua:
            self.flush()

    def _write_in_block(self, block: int, in_block: int, voff: int, chunk: memoryview) -> None:
        entry = self._bat[block]
        if entry != _UNUSED and self._bitmaps.get(block, _NOT_LOADED) is None:
            # Allocated and fully populated: the lock-free hot path.
            self._pwrite(sectors_to_bytes(entry) + self._bms + in_block, chunk)
            return
        with self._meta:
            entry = self._bat[block]
            if entry == _UNUSED:
                entry = self._allocate(block)
            bm = self._bitmap(block, entry)
            base = sectors_to_bytes(entry) + self._bms
            if bm is None:
                self._pwrite(base + in_block, chunk)
                return
            self._write_partial(block, base, bm, in_block, voff, chunk)

    def _write_partial(self, block: int, base: int, bm: bytearray, in_block: int, voff: int,
                       chunk: memoryview) -> None:
        """Write into a block whose bitmap has clear bits, then set the bits (under the lock)."""
        n = len(chunk)
        first = in_block >> 9
        end = (in_block + n + 511) >> 9
        head_partial = bool(in_block & 511) and not bits.test(bm, first)
        tail_partial = bool((in_block + n) & 511) and not bits.test(bm, end - 1)
        if head_partial or tail_partial:
            # A sector whose bit is clear is not in this file: merge the new bytes into what the
            # sector reads as now (zeros or the parent's data) and write whole sectors.
            start = first << 9
            buf = bytearray((end - first) << 9)
            edge = memoryview(buf)
            for sector in {first, end - 1}:
                sub = edge[(sector - first) << 9 : (sector - first + 1) << 9]
                if bits.test(bm, sector):
                    self._readinto(base + (sector << 9), sub)
                else:
                    self._read_fallback(voff - in_block + (sector << 9), sub)
            buf[in_block - start : in_block - start + n] = chunk
            self._pwrite(base + start, buf)
        else:
            self._pwrite(base + in_block, chunk)
        bits.set_range(bm, first, end, True)
        self._dirty_bitmaps.add(block)
        if bits.all_set(bm, self._spb):
            self._bitmaps[block] = None

    def _allocate(self, block: int) -> int:
        """Append a block at the end of the data area (caller holds the lock)."""
        offset = self._end
        new_end = offset + self._stride
        try:
            self._pwrite(new_end, self._footer_bytes)
        except BaseException:
            self._file.truncate(offset + c.FOOTER_SIZE)
            raise
        bitmap = self._full_bitmap if self.parent is None else bytes(self._bms)
        try:
            self._pwrite(offset, bitmap)
        except BaseException:
            # The bitmap goes where the old footer was: put the footer back and drop the
            # half-made block, so even a clean close leaves no torn allocation behind.
            try:
                self._pwrite(offset, self._footer_bytes)
                self._file.truncate(offset + c.FOOTER_SIZE)
            except OSError:
                pass  # the original error is what the caller must see; the next rw open repairs the tail
            raise
        self._bitmaps[block] = None if self.parent is None else bytearray(self._bms)
        self._end = new_end
        entry = offset // c.SECTOR_SIZE
        self._bat[block] = entry
        self._dirty_bat.add(block // _ENTRIES_PER_SECTOR)
        self._allocated += 1
        return entry

    # --- zeroing --------------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, may_trim=True)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        assert 0 <= offset and offset + length <= self._size
        self._check_writable()
        bs = self._bs
        pos = 0
        while pos < length:
            voff = offset + pos
            block, in_block = divmod(voff, bs)
            n = min(bs - in_block, length - pos)
            self._zero_in_block(block, in_block, voff, n, may_trim)
            pos += n
        if fua:
            self.flush()

    def _zero_in_block(self, block: int, in_block: int, voff: int, n: int, may_trim: bool) -> None:
        entry = self._bat[block]
        whole = n == self._bs
        if self.parent is None:
            if entry == _UNUSED:
                return  # reads as zeros already
            if not may_trim:
                self._zero_bytes(block, in_block, voff, n)
                return
            # QEMU ignores the bitmaps of dynamic disks, so the data itself must become zeros;
            # a punched hole does that and gives the space back.  The bitmap is left alone.
            self._file.punch_hole(sectors_to_bytes(entry) + self._bms + in_block, n)
            if whole:
                with self._meta:
                    if self._bat[block] == entry:
                        self._free_block(block)
            return
        if whole:
            with self._meta:
                entry = self._bat[block]
                if entry == _UNUSED:
                    # A fresh block's data area reads as zeros: setting every bit is enough.
                    self._allocate(block)
                else:
                    self._file.punch_hole(sectors_to_bytes(entry) + self._bms, self._bs)
                self._bitmaps[block] = None
                self._dirty_bitmaps.add(block)
            return
        self._zero_bytes(block, in_block, voff, n)

    def _zero_bytes(self, block: int, in_block: int, voff: int, n: int) -> None:
        zeros = self._zeros
        while n > 0:
            k = min(n, len(zeros))
            self._write_in_block(block, in_block, voff, memoryview(zeros)[:k])
            in_block += k
            voff += k
            n -= k

    # --- flush and close ------------------------------------------------------

    def _bat_sector_bytes(self, sector: int) -> bytes:
        entries = self._bat[sector * _ENTRIES_PER_SECTOR : (sector + 1) * _ENTRIES_PER_SECTOR]
        if sys.byteorder == "little":
            entries.byteswap()
        return entries.tobytes()

    def flush(self) -> None:
        if self._read_only:
            return
        with self._flush_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        with self._meta:
            writes: list[tuple[int, bytes]] = []
            for block in sorted(self._dirty_bitmaps):
                entry = self._bat[block]
                if entry == _UNUSED:
                    continue
                bm = self._bitmaps.get(block)
                writes.append((sectors_to_bytes(entry), self._full_bitmap if bm is None else bytes(bm)))
            for sector in sorted(self._dirty_bat):
                writes.append((self._bat_offset + sector * c.SECTOR_SIZE, self._bat_sector_bytes(sector)))
            dirty_bat, dirty_bitmaps = self._dirty_bat, self._dirty_bitmaps
            self._dirty_bat, self._dirty_bitmaps = set(), set()
        try:
            self._file.fdatasync()  # data, bitmaps of new blocks and footers first ...
            if writes:
                for offset, data in writes:
                    self._pwrite(offset, data)
                self._file.fdatasync()  # ... then the metadata that references them
        except BaseException:
            with self._meta:
                self._dirty_bat |= dirty_bat
                self._dirty_bitmaps |= dirty_bitmaps
            raise

    def _free_block(self, block: int) -> None:
        """Give a wholly discarded block back (caller holds the lock).

        The BAT entry reaches the disk at the next flush.  The slot is never reused
        while this file is open (allocation only appends), so nothing can reference
        it again before the BAT forgets it durably; until close() closes the gap it
        is plain leaked space, which a read-write open after a crash relocates away
        just like the leak a torn flush leaves.
        """
        self._bat[block] = _UNUSED
        self._dirty_bat.add(block // _ENTRIES_PER_SECTOR)
        self._dirty_bitmaps.discard(block)
        self._bitmaps.pop(block, None)
        self._allocated -= 1
        self._freed_slots += 1

    def _on_close_writable(self) -> None:
        """Free trailing blocks that hold nothing (all bits clear) and shrink the file."""
        with self._flush_lock, self._meta:
            freed = False
            while self._end - self._stride >= self._metadata_end:
                entry = (self._end - self._stride) // c.SECTOR_SIZE
                try:
                    block = self._bat.index(entry)
                except ValueError:
                    break
                bm = self._bitmap(block, entry)
                if bm is None or not bits.none_set(bm, self._spb):
                    break
                self._bat[block] = _UNUSED
                self._dirty_bat.add(block // _ENTRIES_PER_SECTOR)
                self._dirty_bitmaps.discard(block)
                self._bitmaps.pop(block, None)
                self._allocated -= 1
                self._end -= self._stride
                freed = True
            if freed:
                # The BAT must forget the blocks durably before the file shrinks under them.
                self._flush_locked()
                self._pwrite(self._end, self._footer_bytes)
                self._file.truncate(self._end + c.FOOTER_SIZE)
                self._file.fdatasync()
            if self._freed_slots:
                # Discarded blocks left gaps: move the last blocks into them and truncate, with
                # the crash-safe steps a read-write open uses for leaked space.
                self._flush_locked()
                self._freed_slots = 0
                try:
                    lay = scan(self._file, self.path)
                    if needs_repair(lay):
                        repair(self._file, lay)
                except OSError as exc:
                    # Every write is durable already; the gaps are only wasted space, and each
                    # step above leaves a valid file, which the next read-write open tidies.
                    log.warning("%s: could not close the gaps discarded blocks left (%s); "
                                "the next read-write open will", self.path, exc)


class DifferencingImage(DynamicImage):
    disk_type = "differencing"

"""Dynamic images: requests over the BlockMap, crash-safe allocation, flush and close.

Memory: the BAT is one array('I'); bitmaps are cached per allocated block
that was touched, as a bytearray, or None when every bit is set; one state
byte per block (absent, full, mixed, unknown) says which in one lookup, so
reads and writes of a full block are plain pread/pwrite without the lock;
all three live in the BlockMap (blockmap.py).  DifferencingImage
(differencing.py) overrides what a parent changes: what absent sectors read
as, a new block's bitmap and zeroing.  A read walks down the chain in one
loop while the levels share a block size, into the caller's buffer.

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

import threading

from vhdblkd.backend import Buffer
from vhdblkd.vhd import bitmap as bits
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.base import VhdImage
from vhdblkd.vhd.blockmap import (
    ABSENT,
    FULL,
    MIXED,
    UNKNOWN,
    UNUSED,
    BlockMap,
    is_sector_aligned,
    sectors_spanning,
    sectors_to_bytes,
    spans,
)
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.layout import Layout, scan
from vhdblkd.vhd.lazylog import LazyLogger
from vhdblkd.vhd.lock import ImageLock
from vhdblkd.vhd.recovery import needs_repair, repair

log = LazyLogger(__name__)  # logging loads at the first warning: `vhdblkctl info` needs none

_NOT_LOADED = bytearray()  # sentinel for a bitmap not read yet (never a valid bitmap)
Dest = bytearray | memoryview  # where a read goes; sliced only as a memoryview, so writes go through


def _span_state(bitmap: bytearray, in_block: int, length: int) -> int:
    """FULL or ABSENT when the bits of bytes [in_block, in_block+length) are all alike
    and whole bitmap bytes (8 sectors: a 4k read), else MIXED."""
    first, stop = sectors_spanning(in_block, in_block + length)
    if first & 7 or stop & 7:
        return MIXED
    lo, hi = first >> 3, stop >> 3
    if hi - lo == 1:
        byte = bitmap[lo]
        return FULL if byte == 0xFF else ABSENT if byte == 0 else MIXED
    chunk = bitmap[lo:hi]
    if chunk.count(0xFF) == hi - lo:
        return FULL
    return ABSENT if chunk.count(0) == hi - lo else MIXED


class DynamicImage(VhdImage):
    disk_type = "dynamic"

    def __init__(self, path: str, file: ImageFile, layout: Layout, *, read_only: bool,
                 lock: ImageLock | None) -> None:
        super().__init__(path, file, layout, read_only=read_only, lock=lock)
        assert layout.blocks is not None and layout.header is not None
        blocks = layout.blocks
        self._blocks: BlockMap = blocks
        self.block_size: int = blocks.block_size
        # The hot paths use these directly instead of through the map.
        self._entries = blocks.entries
        self._bitmaps = blocks.bitmaps
        self._state = blocks.state
        # The next level down the chain that _fill_block may walk to directly (same block
        # size, at least as large); None: absent sectors go through _fill_absent.
        self._below: DynamicImage | None = None
        self._bitmap_size = blocks.bitmap_size
        self._sectors_per_block = blocks.sectors_per_block
        self._metadata_end = layout.metadata_end
        self._freed_slots = 0  # blocks given back by discard since open: gaps to close at close()
        self._end = layout.data_end  # where the trailing footer sits (after recovery)
        self._meta = threading.RLock()
        self._flush_lock = threading.Lock()
        self._total_blocks = layout.total_blocks
        self._footer_bytes = self.footer.pack()
        self._zeros = bytes(min(self.block_size, c.CHUNK_SIZE))
        self._pwrite = file.pwrite

    @property
    def allocated_blocks(self) -> int:
        return self._blocks.allocated

    @property
    def total_blocks(self) -> int:
        return self._total_blocks

    def allocated_block_indexes(self) -> list[int]:
        with self._meta:
            return [block for block, _ in self._blocks.allocated_blocks()]

    def sector_presence(self, block: int) -> bytes | bool:
        """Which sectors of `block` this file holds: False (none, the block is unallocated),
        True (all of them) or the block's sector bitmap (bit set = held here)."""
        entry = self._entries[block]
        if entry == UNUSED:
            return False
        bitmap = self._bitmap(block, entry)
        return True if bitmap is None else bytes(bitmap)

    # --- what a kind of image changes ------------------------------------------

    def _fill_absent(self, voff: int, dest: Dest) -> None:
        """Put what sectors not in this file read as, from virtual offset `voff`, into `dest`.

        `dest` holds zeros (see read_into_zeroed), which is what a dynamic disk's absent
        sectors read as: nothing to do.
        """

    def _fresh_bitmap(self) -> bytearray | None:
        """The bitmap of a newly allocated block (None: every bit set).

        A new block's data area reads as zeros, which is what a dynamic disk's absent
        sectors read as: every sector is present.
        """
        return None

    # --- reads ----------------------------------------------------------------

    def read(self, offset: int, length: int) -> Buffer:
        assert 0 <= offset and offset + length <= self._size
        out = bytearray(length)
        block, in_block = divmod(offset, self.block_size)
        if in_block + length <= self.block_size:
            if length:  # a zero-length read at the very end would name a block past the BAT
                # Profile (4k reads): no memoryview unless a level slices (most never do).
                self._fill_block(block, in_block, offset, out)
        else:
            self.read_into_zeroed(offset, memoryview(out))
        return out

    def read_into_zeroed(self, offset: int, dest: Dest) -> None:
        bs = self.block_size
        block, in_block = divmod(offset, bs)
        if in_block + len(dest) <= bs:
            self._fill_block(block, in_block, offset, dest)
            return
        dest = memoryview(dest)
        for block, in_block, pos, n in spans(offset, len(dest), bs):
            self._fill_block(block, in_block, offset + pos, dest[pos : pos + n])

    def _fill_block(self, block: int, in_block: int, voff: int, dest: Dest) -> None:
        """Fill `dest` (inside one block) from the first level down the chain that holds it.

        Profile (4k random reads, 3-level chain): a read per level, each with its own buffer,
        block split and copy, was most of the time.  Now the levels of the same block size
        are walked in this loop, one state byte per level, straight into the caller's buffer.
        """
        image = self
        while True:
            state = image._state[block]
            if state == MIXED:
                bitmap = image._bitmaps.get(block)
                if bitmap is not None:
                    state = _span_state(bitmap, in_block, len(dest))
                    if state == MIXED:
                        image._fill_runs(bitmap, block, in_block, voff, dest)
                        return
                else:
                    state = FULL  # the last clear bits were set meanwhile
            elif state == UNKNOWN:
                image._learn_state(block)
                continue
            if state == FULL:
                at = sectors_to_bytes(image._entries[block]) + image._bitmap_size + in_block
                if image._file.readinto(at, dest) < len(dest):
                    image._readinto(at, dest)  # short: past the end of a truncated file, zeros
                return
            below = image._below
            if below is None:
                if image.parent is not None:
                    image._fill_absent(voff, dest)
                return  # a dynamic image's absent sectors are the zeros already there
            image = below

    def _fill_runs(self, bitmap: bytearray, block: int, in_block: int, voff: int, dest: Dest) -> None:
        """The part of a block with set and clear bits: each run from here or from below."""
        dest = memoryview(dest)  # slices must write through
        data_at = sectors_to_bytes(self._entries[block]) + self._bitmap_size
        n = len(dest)
        first, stop = sectors_spanning(in_block, in_block + n)
        for start, end, present in bits.runs(bitmap, first, stop):
            lo = max(sectors_to_bytes(start), in_block)
            hi = min(sectors_to_bytes(end), in_block + n)
            sub = dest[lo - in_block : hi - in_block]
            if present:
                self._readinto(data_at + lo, sub)
            else:
                self._fill_absent(voff - in_block + lo, sub)

    def _readinto(self, offset: int, dest: Dest) -> None:
        got = self._file.readinto(offset, dest)
        if got < len(dest):
            dest[got:] = bytes(len(dest) - got)

    def _learn_state(self, block: int) -> None:
        """Settle an UNKNOWN state from the BAT entry and the bitmap (read on first use)."""
        with self._meta:
            if self._state[block] != UNKNOWN:
                return
            entry = self._entries[block]
            if entry == UNUSED:
                self._state[block] = ABSENT
                return
            bitmap = self._bitmaps.get(block, _NOT_LOADED)
            if bitmap is _NOT_LOADED:
                raw = self._blocks.read_bitmap(self._file, entry)
                bitmap = None if bits.all_set(raw, self._sectors_per_block) else raw
            self._blocks.set_bitmap(block, bitmap)

    def _bitmap(self, block: int, entry: int) -> bytearray | None:
        """An allocated block's bitmap; None when every bit is set."""
        if self._state[block] == UNKNOWN:
            self._learn_state(block)
        return self._bitmaps.get(block)

    # --- writes ---------------------------------------------------------------

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        assert 0 <= offset and offset + len(data) <= self._size
        self._check_writable()
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        for block, in_block, pos, n in spans(offset, len(view), self.block_size):
            self._write_in_block(block, in_block, offset + pos, view[pos : pos + n])
        if fua:
            self.flush()

    def _write_in_block(self, block: int, in_block: int, voff: int, chunk: memoryview) -> None:
        entry = self._entries[block]  # before the state: free() clears the state first
        if entry != UNUSED and self._state[block] == FULL:
            # Allocated and fully populated: the lock-free hot path.
            self._pwrite(sectors_to_bytes(entry) + self._bitmap_size + in_block, chunk)
            return
        with self._meta:
            entry = self._entries[block]
            if entry == UNUSED:
                entry = self._allocate(block)
            bitmap = self._bitmap(block, entry)
            data_at = self._blocks.data_offset(entry)
            if bitmap is None:
                self._pwrite(data_at + in_block, chunk)
                return
            self._write_partial(block, data_at, bitmap, in_block, voff, chunk)

    def _write_partial(self, block: int, data_at: int, bitmap: bytearray, in_block: int, voff: int,
                       chunk: memoryview) -> None:
        """Write into a block whose bitmap has clear bits, then set the bits (under the lock)."""
        n = len(chunk)
        first, stop = sectors_spanning(in_block, in_block + n)
        head_partial = not is_sector_aligned(in_block) and not bits.test(bitmap, first)
        tail_partial = not is_sector_aligned(in_block + n) and not bits.test(bitmap, stop - 1)
        if head_partial or tail_partial:
            # A sector whose bit is clear is not in this file: merge the new bytes into what the
            # sector reads as now (zeros or the parent's data) and write whole sectors.
            start = sectors_to_bytes(first)
            block_voff = voff - in_block
            buf = bytearray(sectors_to_bytes(stop) - start)
            edge = memoryview(buf)
            for sector in {first, stop - 1}:
                at = sectors_to_bytes(sector)
                sub = edge[at - start : at - start + c.SECTOR_SIZE]
                if bits.test(bitmap, sector):
                    self._readinto(data_at + at, sub)
                else:
                    self._fill_absent(block_voff + at, sub)
            buf[in_block - start : in_block - start + n] = chunk
            self._pwrite(data_at + start, buf)
        else:
            self._pwrite(data_at + in_block, chunk)
        bits.set_range(bitmap, first, stop, True)
        self._blocks.dirty_bitmaps.add(block)
        if bits.all_set(bitmap, self._sectors_per_block):
            self._blocks.set_bitmap(block, None)

    def _allocate(self, block: int) -> int:
        """Append a block at the end of the data area (caller holds the lock)."""
        blocks = self._blocks
        offset = self._end
        new_end = offset + blocks.stride
        try:
            self._pwrite(new_end, self._footer_bytes)
        except BaseException:
            self._file.truncate(offset + c.FOOTER_SIZE)
            raise
        fresh = self._fresh_bitmap()
        try:
            self._pwrite(offset, blocks.full_bitmap if fresh is None else blocks.empty_bitmap)
        except BaseException:
            # The bitmap goes where the old footer was: put the footer back and drop the
            # half-made block, so even a clean close leaves no torn allocation behind.
            try:
                self._pwrite(offset, self._footer_bytes)
                self._file.truncate(offset + c.FOOTER_SIZE)
            except OSError:
                pass  # the original error is what the caller must see; the next rw open repairs the tail
            raise
        self._end = new_end
        entry = blocks.entry_for(offset)
        blocks.point(block, entry, fresh)
        return entry

    # --- zeroing --------------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, may_trim=True)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        assert 0 <= offset and offset + length <= self._size
        self._check_writable()
        for block, in_block, pos, n in spans(offset, length, self.block_size):
            self._zero_in_block(block, in_block, offset + pos, n, may_trim)
        if fua:
            self.flush()

    def _zero_in_block(self, block: int, in_block: int, voff: int, n: int, may_trim: bool) -> None:
        entry = self._entries[block]
        if entry == UNUSED:
            return  # reads as zeros already
        if not may_trim:
            self._zero_bytes(block, in_block, voff, n)
            return
        # QEMU ignores the bitmaps of dynamic disks, so the data itself must become zeros;
        # a punched hole does that and gives the space back.  The bitmap is left alone.
        self._file.punch_hole(self._blocks.data_offset(entry) + in_block, n)
        if n == self.block_size:
            with self._meta:
                if self._entries[block] == entry:
                    self._free_block(block)

    def _zero_bytes(self, block: int, in_block: int, voff: int, n: int) -> None:
        zeros = self._zeros
        while n > 0:
            k = min(n, len(zeros))
            self._write_in_block(block, in_block, voff, memoryview(zeros)[:k])
            in_block += k
            voff += k
            n -= k

    # --- flush and close ------------------------------------------------------

    def flush(self) -> None:
        if self._read_only:
            return
        with self._flush_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        with self._meta:
            writes, sectors, bitmaps = self._blocks.take_writes()
        try:
            self._file.fdatasync()  # data, bitmaps of new blocks and footers first ...
            if writes:
                for offset, data in writes:
                    self._pwrite(offset, data)
                self._file.fdatasync()  # ... then the metadata that references them
        except BaseException:
            with self._meta:
                self._blocks.put_back(sectors, bitmaps)
            raise

    def _free_block(self, block: int) -> None:
        """Give a wholly discarded block back (caller holds the lock).

        The BAT entry reaches the disk at the next flush.  The slot is never reused
        while this file is open (allocation only appends), so nothing can reference
        it again before the BAT forgets it durably; until close() closes the gap it
        is plain leaked space, which a read-write open after a crash relocates away
        just like the leak a torn flush leaves.
        """
        self._blocks.free(block)
        self._freed_slots += 1

    def _on_close_writable(self) -> None:
        """Free trailing blocks that hold nothing (all bits clear) and shrink the file."""
        with self._flush_lock, self._meta:
            blocks = self._blocks
            freed = False
            while self._end - blocks.stride >= self._metadata_end:
                entry = blocks.entry_for(self._end - blocks.stride)
                block = blocks.block_at(entry)
                if block is None:
                    break
                bitmap = self._bitmap(block, entry)
                if bitmap is None or not bits.none_set(bitmap, self._sectors_per_block):
                    break
                blocks.free(block)
                self._end -= blocks.stride
                freed = True
            if freed:
                # The BAT must forget the blocks durably before the file shrinks under them.
                self._flush_locked()
                self._pwrite(self._end, self._footer_bytes)
                self._file.truncate(self._end + c.FOOTER_SIZE)
                self._file.fdatasync()
            if self._freed_slots:
                self._close_gaps()

    def _close_gaps(self) -> None:
        """Move the last blocks into the gaps discarded blocks left and truncate.

        The same crash-safe steps a read-write open uses for leaked space.
        """
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

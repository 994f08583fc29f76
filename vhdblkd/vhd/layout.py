"""Scan an image file's metadata into a Layout, collecting problems instead of raising.

Both open_image (which raises the first fatal problem) and check_image (which
reports them all) start here, so the two always agree on what is wrong.
Nothing here writes.  Hostile values are bounded before any size arithmetic
or allocation: block size, table size, offsets past end of file.
"""

from __future__ import annotations

import os

from vhdblkd.errors import CorruptImage, UnsupportedImage, VhdError
from vhdblkd.vhd import constants as c
from vhdblkd.vhd import header_shadow
from vhdblkd.vhd.blockmap import UNUSED, BlockMap, round_up_sector
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.geometry import virtual_size
from vhdblkd.vhd.record import Frozen, Record
from vhdblkd.vhd.structs import DynamicHeader, Footer

REPAIR_HINT = "run vhdblkctl check --repair"
DAMAGED_HINT = "the image is damaged beyond automatic repair; restore it from a backup"
# A locator's path is at most a few KiB; more is hostile.
MAX_LOCATOR_LENGTH = 64 * 1024


class Problem(Frozen):
    """One thing wrong with an image (a check finding)."""

    __slots__ = ("code", "message", "offset")
    code: str
    message: str
    offset: int | None

    def __init__(self, code: str, message: str, offset: int | None = None) -> None:
        self._init(code=code, message=message, offset=offset)


class Layout(Record):
    """Where everything of an image file is, as scan() found it, and what is wrong with it."""

    __slots__ = ("path", "file_size", "footer", "footer_offset", "trailing_footer_ok", "footer_checksum_ok",
                 "short_footer", "backup_footer", "header", "header_checksum_ok", "virtual_size", "blocks",
                 "total_blocks", "metadata", "metadata_end", "data_end", "leaks", "bad_locators", "problems",
                 "fatal", "header_shadow")
    path: str
    file_size: int
    footer: Footer | None
    footer_offset: int  # where the trailing footer is (or belongs)
    trailing_footer_ok: bool
    footer_checksum_ok: bool
    short_footer: bool
    backup_footer: Footer | None
    header: DynamicHeader | None
    header_checksum_ok: bool
    virtual_size: int
    blocks: BlockMap | None  # the whole BAT, all max_table_entries of it
    total_blocks: int  # the entries the virtual size needs
    metadata: list[tuple[int, int, str]]
    metadata_end: int
    data_end: int  # end of the last referenced block (or of metadata)
    leaks: list[tuple[int, int]]
    # Parent locators whose data lies outside the file: unreadable, and not reserved as metadata.
    bad_locators: list[int]
    problems: list[Problem]
    fatal: VhdError | None
    # Where the header's shadow is when the header itself was torn (header_shadow.py); None if it is whole.
    header_shadow: int | None

    def __init__(self, path: str, file_size: int, footer: Footer | None = None, footer_offset: int = 0,
                 trailing_footer_ok: bool = False, footer_checksum_ok: bool = False, short_footer: bool = False,
                 backup_footer: Footer | None = None, header: DynamicHeader | None = None,
                 header_checksum_ok: bool = False, virtual_size: int = 0, blocks: BlockMap | None = None,
                 total_blocks: int = 0, metadata: list[tuple[int, int, str]] | None = None, metadata_end: int = 0,
                 data_end: int = 0, leaks: list[tuple[int, int]] | None = None, bad_locators: list[int] | None = None,
                 problems: list[Problem] | None = None, fatal: VhdError | None = None,
                 header_shadow: int | None = None) -> None:
        # A list left out starts empty and unshared, as a dataclass's default_factory=list gives.
        self._init(path=path, file_size=file_size, footer=footer, footer_offset=footer_offset,
                   trailing_footer_ok=trailing_footer_ok, footer_checksum_ok=footer_checksum_ok,
                   short_footer=short_footer, backup_footer=backup_footer, header=header,
                   header_checksum_ok=header_checksum_ok, virtual_size=virtual_size, blocks=blocks,
                   total_blocks=total_blocks, metadata=[] if metadata is None else metadata,
                   metadata_end=metadata_end, data_end=data_end, leaks=[] if leaks is None else leaks,
                   bad_locators=[] if bad_locators is None else bad_locators,
                   problems=[] if problems is None else problems, fatal=fatal, header_shadow=header_shadow)

    def add(self, code: str, message: str, offset: int | None = None) -> None:
        self.problems.append(Problem(code, message, offset))

    def fail(self, code: str, error: VhdError, offset: int | None = None) -> Layout:
        self.add(code, str(error), offset)
        if self.fatal is None:
            self.fatal = error
        return self


def looks_like_vhd(path: str | os.PathLike[str]) -> bool:
    """True when the file has a footer cookie where scan() looks for one.

    That is at its end (the footer, or the old 511-byte form of it) or at offset 0
    (the copy a dynamic image keeps).  A file or block device, read with plain I/O.
    """
    cookie = c.FOOTER_COOKIE
    with open(path, "rb") as f:
        head = f.read(len(cookie))
        end = f.seek(0, os.SEEK_END)
        for footer_length in (c.FOOTER_SIZE, c.FOOTER_SIZE - 1):
            if end >= footer_length:
                f.seek(end - footer_length)
                if f.read(len(cookie)) == cookie:
                    return True
    return head == cookie


def _read_footer_at(f: ImageFile, offset: int, length: int) -> tuple[Footer | None, bool, str]:
    """(footer or None, checksum ok, error text) for a footer at `offset`."""
    raw = f.pread(offset, length)
    if len(raw) < length:
        return None, False, f"footer at offset {offset}: file too short"
    raw = raw + bytes(Footer.SIZE - len(raw))
    try:
        footer = Footer.unpack(raw, 0, verify=False)
    except CorruptImage as exc:
        return None, False, str(exc).replace("offset 0", f"offset {offset}", 1)
    try:
        Footer.unpack(raw, 0)
    except CorruptImage as exc:
        return footer, False, str(exc).replace("offset 0", f"offset {offset}", 1)
    return footer, True, ""


def scan(f: ImageFile, path: str) -> Layout:  # noqa: C901  one check per footer/header field, in file order
    size = f.size()
    lay = Layout(path, size)
    if size < c.SECTOR_SIZE - 1:
        return lay.fail("short-file", CorruptImage(
            f"{path}: file is {size} bytes, too short for a VHD footer (512 bytes); not a VHD image"))
    # Some old writers left a 511-byte footer; its missing byte is reserved (zero).
    lay.short_footer = size % c.SECTOR_SIZE == c.SECTOR_SIZE - 1
    flen = c.SECTOR_SIZE - 1 if lay.short_footer else c.SECTOR_SIZE
    lay.footer_offset = size - flen
    trailing, trailing_ok, trailing_err = _read_footer_at(f, lay.footer_offset, flen)
    if lay.short_footer and trailing is not None:
        lay.add("short-footer", f"{path}: the footer at offset {lay.footer_offset} is 511 bytes, "
                f"not 512; a read-write open rewrites it ({REPAIR_HINT})", lay.footer_offset)
    backup: Footer | None = None
    backup_ok = False
    if size >= c.SECTOR_SIZE * 2:
        backup, backup_ok, _ = _read_footer_at(f, 0, c.SECTOR_SIZE)
        if backup is not None and backup.disk_type not in (c.DISK_TYPE_DYNAMIC, c.DISK_TYPE_DIFFERENCING):
            backup = None
    lay.backup_footer = backup if backup_ok else None
    if trailing is not None and trailing_ok:
        lay.footer, lay.trailing_footer_ok, lay.footer_checksum_ok = trailing, True, True
    elif backup is not None and backup_ok:
        lay.footer, lay.footer_checksum_ok = backup, False
        lay.footer_offset = size - c.SECTOR_SIZE if not lay.short_footer else lay.footer_offset
        lay.add("footer-checksum", f"{path}: {trailing_err}; using the copy at offset 0 "
                f"({REPAIR_HINT} or open read-write to rewrite it)", lay.footer_offset)
    elif trailing is not None:
        lay.footer_checksum_ok = False
        return lay.fail("footer-checksum", CorruptImage(
            f"{path}: {trailing_err}, and there is no valid copy at offset 0; {DAMAGED_HINT}"),
            lay.footer_offset)
    else:
        return lay.fail("footer-checksum", CorruptImage(
            f"{path}: no VHD footer: {trailing_err}; not a VHD image or {DAMAGED_HINT}"), lay.footer_offset)
    footer = lay.footer
    assert footer is not None
    if footer.file_format_version >> 16 != 1:
        return lay.fail("footer-version", UnsupportedImage(
            f"{path}: footer field file_format_version expected 0x00010000, found "
            f"0x{footer.file_format_version:08x}"), lay.footer_offset + 12)
    lay.virtual_size = virtual_size(footer)
    if lay.virtual_size % c.SECTOR_SIZE:
        return lay.fail("footer-size", CorruptImage(
            f"{path}: footer field current_size expected a multiple of 512, found {lay.virtual_size}"),
            lay.footer_offset + 48)
    if lay.virtual_size > c.MAX_VIRTUAL_SIZE:
        return lay.fail("footer-size", UnsupportedImage(
            f"{path}: virtual size {lay.virtual_size} bytes is larger than the 2040 GiB vhdblkd "
            "(like QEMU and Hyper-V) supports"), lay.footer_offset + 48)
    if footer.disk_type == c.DISK_TYPE_FIXED:
        if lay.footer_offset < lay.virtual_size:
            return lay.fail("truncated", CorruptImage(
                f"{path}: fixed image holds {lay.footer_offset} data bytes but the footer says "
                f"{lay.virtual_size}; the file is truncated; {DAMAGED_HINT}"), lay.footer_offset)
        lay.data_end = lay.footer_offset
        return lay
    if footer.disk_type not in (c.DISK_TYPE_DYNAMIC, c.DISK_TYPE_DIFFERENCING):
        return lay.fail("disk-type", UnsupportedImage(
            f"{path}: footer field disk_type expected 2, 3 or 4, found {footer.disk_type}"),
            lay.footer_offset + 60)
    if lay.trailing_footer_ok and backup is None:
        lay.add("backup-footer", f"{path}: the footer copy at offset 0 is missing or damaged ({REPAIR_HINT})", 0)
    elif lay.trailing_footer_ok and backup is not None and backup.pack() != footer.pack():
        lay.add("footer-mismatch", f"{path}: the footer copy at offset 0 differs from the footer at "
                f"offset {lay.footer_offset} ({REPAIR_HINT})", 0)
    _scan_dynamic(f, lay)
    return lay


def _scan_dynamic(f: ImageFile, lay: Layout) -> None:  # noqa: C901  one check per header/BAT field, in file order
    footer = lay.footer
    assert footer is not None
    path = lay.path
    hoff = footer.data_offset
    if hoff < c.SECTOR_SIZE or hoff + DynamicHeader.SIZE > lay.footer_offset:
        lay.fail("header-offset", CorruptImage(
            f"{path}: footer field data_offset (dynamic header offset) expected 512..{lay.footer_offset - 1024}, "
            f"found {hoff}; {DAMAGED_HINT}"), lay.footer_offset + 16)
        return
    raw = f.pread(hoff, DynamicHeader.SIZE)
    try:
        header = DynamicHeader.unpack(raw, 0, verify=False)
    except CorruptImage as exc:
        lay.fail("header-cookie", CorruptImage(f"{path}: {str(exc).replace('offset 0', f'offset {hoff}', 1)}; "
                                               f"{DAMAGED_HINT}"), hoff)
        return
    lay.header = header
    try:
        DynamicHeader.unpack(raw, 0)
        lay.header_checksum_ok = True
    except CorruptImage as exc:
        shadow = header_shadow.find(f, raw, at=hoff, limit=lay.footer_offset, max_locator=MAX_LOCATOR_LENGTH)
        if shadow is not None:
            lay.header_shadow, lay.header = shadow
            lay.add("header-torn", f"{path}: the dynamic header at {hoff} was torn while it was rewritten; "
                    f"using its complete copy at {lay.header_shadow} (a read-write open writes it back)", hoff)
            _scan_header(f, lay, lay.header)
            return
        lay.fail("header-checksum", CorruptImage(
            f"{path}: {str(exc).replace('offset 0', f'offset {hoff}', 1)}; {REPAIR_HINT} "
            "to recompute it if the header is otherwise sound"), hoff + DynamicHeader.CHECKSUM_OFFSET)
        return
    _scan_header(f, lay, header)


def _scan_header(f: ImageFile, lay: Layout, header: DynamicHeader) -> None:  # noqa: C901  one check per field
    footer = lay.footer
    assert footer is not None
    path, hoff = lay.path, footer.data_offset
    bs = header.block_size
    if bs < c.MIN_BLOCK_SIZE or bs > c.MAX_BLOCK_SIZE or bs & (bs - 1):
        lay.fail("block-size", CorruptImage(
            f"{path}: dynamic header field block_size expected a power of two from 512 to "
            f"{c.MAX_BLOCK_SIZE}, found {bs}; {DAMAGED_HINT}"), hoff + 32)
        return
    needed = -(-lay.virtual_size // bs)
    if header.max_table_entries < needed:
        lay.fail("bat-size", CorruptImage(
            f"{path}: dynamic header field max_table_entries expected at least {needed} for a "
            f"{lay.virtual_size}-byte disk with {bs}-byte blocks, found {header.max_table_entries}; "
            f"{DAMAGED_HINT}"), hoff + 28)
        return
    toff = header.table_offset
    # The whole table is loaded and validated, even entries past the disk's end that the
    # size does not need: a block they reference is still not free space.
    table_bytes = header.max_table_entries * c.BAT_ENTRY_SIZE
    if toff % c.SECTOR_SIZE:
        lay.fail("bat-misaligned", CorruptImage(
            f"{path}: dynamic header field table_offset expected a multiple of 512, found {toff}; "
            f"{DAMAGED_HINT}"), hoff + 16)
        return
    if toff < c.SECTOR_SIZE or toff + needed * c.BAT_ENTRY_SIZE > lay.footer_offset:
        lay.fail("bat-offset", CorruptImage(
            f"{path}: dynamic header field table_offset {toff} with {needed} entries does not fit "
            f"in the file (footer at {lay.footer_offset}); {DAMAGED_HINT}"), hoff + 16)
        return
    if toff + table_bytes > lay.footer_offset:
        lay.fail("bat-size", CorruptImage(
            f"{path}: dynamic header field max_table_entries {header.max_table_entries} makes the BAT at "
            f"{toff} ({table_bytes} bytes) larger than the file allows (footer at {lay.footer_offset}); "
            f"{DAMAGED_HINT}"), hoff + 28)
        return
    if toff < hoff + DynamicHeader.SIZE and hoff < toff + table_bytes:
        lay.fail("bat-offset", CorruptImage(
            f"{path}: the BAT at {toff} overlaps the dynamic header at {hoff}; {DAMAGED_HINT}"), hoff + 16)
        return
    lay.blocks = BlockMap.read(f, table_offset=toff, entries=header.max_table_entries, block_size=bs)
    lay.total_blocks = needed
    meta = [(0, c.SECTOR_SIZE, "footer copy"), (hoff, DynamicHeader.SIZE, "dynamic header"),
            (toff, round_up_sector(table_bytes), "BAT")]
    if footer.disk_type == c.DISK_TYPE_DIFFERENCING:
        for i, loc in enumerate(header.parent_locators):
            if not loc.used:
                continue
            space = max(loc.data_space_bytes(), loc.platform_data_length)
            if loc.platform_data_offset + space > lay.footer_offset or space > MAX_LOCATOR_LENGTH:
                lay.add("locator", f"{path}: parent locator {i} ({loc.platform_code!r}) data at "
                        f"{loc.platform_data_offset} (+{space}) lies outside the file; ignored",
                        hoff + 576 + 24 * i)
                lay.bad_locators.append(i)
                continue
            meta.append((loc.platform_data_offset, round_up_sector(space), f"parent locator {i}"))
    lay.metadata = meta
    lay.metadata_end = round_up_sector(max(off + ln for off, ln, _ in meta))
    _scan_blocks(lay)


def _scan_blocks(lay: Layout) -> None:
    blocks = lay.blocks
    assert blocks is not None
    path, stride = lay.path, blocks.stride
    limit = lay.footer_offset
    extents: list[tuple[int, int]] = []
    for index, entry in enumerate(blocks.entries):
        if entry == UNUSED:
            continue
        start = blocks.bitmap_offset(entry)
        where = blocks.entry_offset(index)
        if start + stride > limit:
            lay.fail("bat-past-eof", CorruptImage(
                f"{path}: BAT entry {index} (at offset {where}) points at offset {start}, "
                f"but the block ({stride} bytes) ends past the data area ending at {limit}; {DAMAGED_HINT}"),
                where)
            return
        for moff, mlen, what in lay.metadata:
            if start < moff + mlen and moff < start + stride:
                lay.fail("bat-overlap", CorruptImage(
                    f"{path}: BAT entry {index} (at offset {where}) points at offset {start}, "
                    f"overlapping the {what} at {moff}; {DAMAGED_HINT}"), where)
                return
        extents.append((start, index))
    extents.sort()
    for (a, ia), (b, ib) in zip(extents, extents[1:], strict=False):
        if b < a + stride:
            lay.fail("bat-overlap", CorruptImage(
                f"{path}: BAT entries {ia} and {ib} point at overlapping blocks (offsets {a} and {b}, "
                f"block size {stride} with bitmap); {DAMAGED_HINT}"), blocks.entry_offset(ib))
            return
    pos = lay.metadata_end
    for start, _ in extents:
        if start - pos >= stride:
            lay.leaks.append((pos, start - pos))
        pos = start + stride
    lay.data_end = pos
    for off, ln in lay.leaks:
        lay.add("leaked-block", f"{path}: {ln} bytes at offset {off} hold no referenced block "
                f"(a leak from an interrupted write; a read-write open compacts it)", off)
    if lay.footer_offset > lay.data_end:
        lay.add("torn-allocation", f"{path}: {lay.footer_offset - lay.data_end} bytes of unreferenced "
                f"space before the footer at {lay.footer_offset} (an interrupted allocation; "
                "a read-write open truncates it)", lay.data_end)

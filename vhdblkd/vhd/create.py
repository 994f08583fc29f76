"""Creating fixed, dynamic and differencing images.

Creator and size conventions (see geometry.py):
- default: the size is rounded up to the next CHS-expressible size as
  qemu-img does, current size = original size = that size, creator 'vhdb'.
  Readers that trust CHS and readers that trust current size (QEMU for any
  creator but 'vpc '/'qemu', Hyper-V) and libvhdi (original size) all agree.
- exact_size: the requested size (in whole sectors) with the maximum geometry
  and creator 'qem2', exactly what QEMU's force_size writes; every reader
  takes the maximum geometry to mean "believe current size".
- azure: a fixed image whose size is rounded up to a whole MiB and stored
  exactly (as exact_size).  Azure checks only the type and the MiB alignment
  of the virtual size, not the creator; 'qem2' is what QEMU's documented
  Azure recipe (subformat=fixed,force_size) produces.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

from vhdblkd.errors import UnsupportedImage
from vhdblkd.fsutil import remove_quietly
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.blockmap import round_up_sector, unused_table
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.geometry import Geometry, size_for_create
from vhdblkd.vhd.parent import locator_texts, parent_name_field
from vhdblkd.vhd.structs import DynamicHeader, Footer, ParentLocator
from vhdblkd.vhd.timestamp import vhd_mtime, vhd_now

FileFactory = Callable[..., ImageFile]
# Reserve space in steps this big so progress can be reported.
_ALLOCATE_STEP = 256 * 1024 * 1024
MIB = 1024 * 1024


def make_footer(size: int, geometry: Geometry, disk_type: int, *, exact: bool,
                data_offset: int, unique_id: bytes | None = None) -> Footer:
    return Footer(
        features=c.FEATURES_RESERVED,
        file_format_version=c.FILE_FORMAT_VERSION,
        data_offset=data_offset,
        timestamp=vhd_now(),
        creator_application=c.CREATOR_QEMU_FORCE_SIZE if exact else c.CREATOR_VHDBLKD,
        creator_version=c.CREATOR_VERSION_VHDBLKD,
        creator_host_os=c.CREATOR_HOST_OS_WINDOWS,
        original_size=size,
        current_size=size,
        cylinders=geometry.cylinders,
        heads=geometry.heads,
        sectors_per_track=geometry.sectors_per_track,
        disk_type=disk_type,
        unique_id=unique_id if unique_id is not None else uuid.uuid4().bytes,
    )


def _new_file(path: str, factory: FileFactory) -> ImageFile:
    return factory(path, True, create=True)


def create_fixed(path: str, size: int, *, exact_size: bool = False, azure: bool = False,
                 progress: Callable[[int, int], None] | None = None,
                 file_factory: FileFactory = ImageFile) -> None:
    """Create a fixed VHD; the data area is reserved with fallocate (sparse if unsupported)."""
    if azure:
        size = -(-size // MIB) * MIB
        exact_size = True
    size, geometry = size_for_create(size, exact=exact_size)
    footer = make_footer(size, geometry, c.DISK_TYPE_FIXED, exact=exact_size, data_offset=c.FIXED_DATA_OFFSET)
    f = _new_file(path, file_factory)
    try:
        f.truncate(size)
        done = 0
        if progress is not None:
            progress(0, size)
        while done < size:
            step = min(_ALLOCATE_STEP, size - done)
            f.allocate(done, step)
            done += step
            if progress is not None:
                progress(done, size)
        f.pwrite(size, footer.pack())
        f.fdatasync()
    except BaseException:
        f.close()
        remove_quietly(path)
        raise
    f.close()


def _check_block_size(block_size: int) -> None:
    if block_size < c.MIN_BLOCK_SIZE or block_size > c.MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise UnsupportedImage(
            f"block size {block_size} is not a power of two from {c.MIN_BLOCK_SIZE} to {c.MAX_BLOCK_SIZE}")


def _write_sparse_image(f: ImageFile, footer: Footer, header: DynamicHeader,
                        extra: list[tuple[int, bytes]], data_end: int) -> None:
    entries = header.max_table_entries
    f.pwrite(0, footer.pack())
    f.pwrite(footer.data_offset, header.pack())
    f.pwrite(header.table_offset, unused_table(round_up_sector(entries * c.BAT_ENTRY_SIZE)))
    for offset, data in extra:
        f.pwrite(offset, data)
    f.pwrite(data_end, footer.pack())
    f.truncate(data_end + c.FOOTER_SIZE)
    f.fdatasync()


def create_dynamic(path: str, size: int, *, block_size: int = c.DEFAULT_BLOCK_SIZE,
                   exact_size: bool = False, file_factory: FileFactory = ImageFile) -> None:
    """Create an empty dynamic VHD: footer copy, header at 512, BAT at 1536, footer."""
    _check_block_size(block_size)
    size, geometry = size_for_create(size, exact=exact_size)
    entries = -(-size // block_size)
    header_offset = c.FOOTER_SIZE
    table_offset = header_offset + c.HEADER_SIZE
    data_end = table_offset + round_up_sector(entries * c.BAT_ENTRY_SIZE)
    footer = make_footer(size, geometry, c.DISK_TYPE_DYNAMIC, exact=exact_size, data_offset=header_offset)
    header = DynamicHeader(table_offset=table_offset, max_table_entries=entries, block_size=block_size)
    f = _new_file(path, file_factory)
    try:
        _write_sparse_image(f, footer, header, [], data_end)
    except BaseException:
        f.close()
        remove_quietly(path)
        raise
    f.close()


def _utf16le_locator(text: str) -> bytes:
    return text.encode("utf-16-le")


def create_differencing(path: str, parent_path: str, *, block_size: int | None = None,
                        relative: bool = True, lock: bool = True, file_factory: FileFactory = ImageFile) -> None:
    """Create an empty child of `parent_path` (opened read-only to read its identity)."""
    from vhdblkd.vhd.image import open_image  # here: image imports create's users, not create

    parent_abs = os.path.abspath(parent_path)
    with open_image(parent_abs, read_only=True, allow_unsafe_parent=True, lock=lock,
                    file_factory=file_factory) as parent:
        pfooter = parent.footer
        psize = parent.size
        pblock = parent.block_size
        pmtime = parent.file_mtime()
    if block_size is None:
        block_size = pblock or c.DEFAULT_BLOCK_SIZE
    _check_block_size(block_size)
    entries = -(-psize // block_size)
    header_offset = c.FOOTER_SIZE
    table_offset = header_offset + c.HEADER_SIZE
    pos = table_offset + round_up_sector(entries * c.BAT_ENTRY_SIZE)
    locators: list[ParentLocator] = []
    extra: list[tuple[int, bytes]] = []
    for code, text in locator_texts(path, parent_abs, relative=relative):
        data = _utf16le_locator(text)
        space = round_up_sector(max(len(data), 1))
        locators.append(ParentLocator(code, space // c.SECTOR_SIZE, len(data), pos))
        extra.append((pos, data + bytes(space - len(data))))
        pos += space
    locators.extend(ParentLocator() for _ in range(c.PARENT_LOCATOR_COUNT - len(locators)))
    header = DynamicHeader(
        table_offset=table_offset, max_table_entries=entries, block_size=block_size,
        parent_unique_id=pfooter.unique_id, parent_timestamp=vhd_mtime(pmtime),
        parent_unicode_name=parent_name_field(parent_abs),
        parent_locators=tuple(locators))
    # Same size and geometry as the parent; 'vhdb' means "current size is the size".
    geometry = Geometry(pfooter.cylinders, pfooter.heads, pfooter.sectors_per_track)
    footer = make_footer(psize, geometry, c.DISK_TYPE_DIFFERENCING, exact=False, data_offset=header_offset)
    f = _new_file(path, file_factory)
    try:
        _write_sparse_image(f, footer, header, extra, pos)
    except BaseException:
        f.close()
        remove_quietly(path)
        raise
    f.close()

"""Disk geometry (CHS) and the virtual size a reader should believe.

The CHS algorithm is the one in the VHD specification's appendix, as QEMU's
block/vpc.c implements it (calculate_geometry).  Creation follows qemu-img:
by default the size is rounded up to the next size the geometry can express,
so readers that trust CHS (Virtual PC, QEMU for 'vpc '/'qemu' images) and
readers that trust current size agree; `exact` keeps the requested size and
stores the maximum geometry, as QEMU's force_size does, which every reader
takes to mean "believe current size".
"""

from __future__ import annotations

from typing import NamedTuple

from vhdblkd.errors import UnsupportedImage
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.structs import Footer


class Geometry(NamedTuple):
    cylinders: int
    heads: int
    sectors_per_track: int

    @property
    def total_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track


MAX_GEOMETRY = Geometry(c.MAX_CYLINDERS, c.MAX_HEADS, c.MAX_SECTORS_PER_TRACK)


def chs_from_sectors(total_sectors: int) -> Geometry:
    """The spec's CHS for a sector count (rounding down), capped at the maximum geometry."""
    total_sectors = min(total_sectors, c.MAX_GEOMETRY_SECTORS)
    if total_sectors >= 65535 * 16 * 63:
        spt = 255
        heads = 16
        cyl_times_heads = total_sectors // spt
    else:
        spt = 17
        cyl_times_heads = total_sectors // spt
        heads = max(4, (cyl_times_heads + 1023) // 1024)
        if cyl_times_heads >= heads * 1024 or heads > 16:
            spt = 31
            heads = 16
            cyl_times_heads = total_sectors // spt
        if cyl_times_heads >= heads * 1024:
            spt = 63
            heads = 16
            cyl_times_heads = total_sectors // spt
    return Geometry(cyl_times_heads // heads, heads, spt)


def virtual_size(footer: Footer) -> int:
    """The size a reader should believe: CHS for 'vpc '/'qemu' images, current size otherwise.

    The maximum geometry always means current size (it cannot express the size).
    """
    geometry = Geometry(footer.cylinders, footer.heads, footer.sectors_per_track)
    if footer.creator_application in c.CREATORS_USING_CHS and geometry != MAX_GEOMETRY:
        return geometry.total_sectors * c.SECTOR_SIZE
    return footer.current_size


def too_large_message(size: int) -> str:
    return (
        f"a virtual size of {size} bytes is larger than {c.MAX_VIRTUAL_SIZE} bytes: the VHD format "
        "as QEMU and Hyper-V read it tops out at 2040 GiB; use VHDX for larger disks"
    )


def size_for_create(size: int, *, exact: bool = False) -> tuple[int, Geometry]:
    """The virtual size and geometry to store for a requested size.

    The size is first rounded up to whole sectors.  Without `exact` it is then
    rounded up to the next CHS-expressible size, as qemu-img does; above the
    CHS range (about 127 GiB) the maximum geometry is stored with the size.
    """
    if size < 0:
        raise UnsupportedImage(f"a virtual size cannot be negative (got {size})")
    size = -(-size // c.SECTOR_SIZE) * c.SECTOR_SIZE
    if size > c.MAX_VIRTUAL_SIZE:
        raise UnsupportedImage(too_large_message(size))
    total_sectors = size // c.SECTOR_SIZE
    if exact:
        return size, MAX_GEOMETRY
    if total_sectors == 0:
        return 0, Geometry(0, 0, 0)
    geometry = chs_from_sectors(total_sectors)
    extra = 0
    while geometry.total_sectors < total_sectors and geometry != MAX_GEOMETRY:
        extra += 1
        geometry = chs_from_sectors(total_sectors + extra)
    if geometry == MAX_GEOMETRY:
        return size, geometry
    return geometry.total_sectors * c.SECTOR_SIZE, geometry

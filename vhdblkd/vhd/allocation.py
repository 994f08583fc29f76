"""Where an image's data lives: allocation runs through the parent chain.

`allocation(image, offset, length)` answers NBD block status: consecutive
`Run`s covering the range, each with the *depth* of the layer that holds it
(1 = the image itself, 2 = its parent, ...; 0 = no layer, so it reads as
zeros, as qemu's ``qemu:allocation-depth`` counts) and whether it is known
to read as zeros without being stored (unallocated in the whole chain, or a
hole in a fixed image's file: ``base:allocation`` HOLE|ZERO).

Dynamic and differencing layers answer from the BAT and the sector
bitmaps: a clear bit of a differencing block falls through to the parent, of
a dynamic block it reads zeros.  A fixed layer holds everything; the file's
own holes come from SEEK_DATA/SEEK_HOLE.  Nothing here reads data.
"""

from __future__ import annotations

from vhdblkd.backend import Extent as Run
from vhdblkd.vhd import bitmap as bits
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.base import VhdImage
from vhdblkd.vhd.dynamic import DynamicImage
from vhdblkd.vhd.fixed import FixedImage

MAX_RUNS = 1 << 16  # a reply this long is plenty; the client asks again from where it ends


def allocation(image: VhdImage, offset: int, length: int, *, max_runs: int = MAX_RUNS) -> list[Run]:
    """Runs covering [offset, offset+length) (clipped to the image), merged, at most `max_runs`."""
    end = min(image.size, offset + length)
    out: list[Run] = []
    if offset < end:
        _layer(image, 1, offset, end, out, max_runs)
    return out


def _add(out: list[Run], length: int, depth: int, zero: bool) -> None:
    if out and out[-1].depth == depth and out[-1].zero == zero:
        out[-1] = Run(out[-1].length + length, depth, zero)
    elif length:
        out.append(Run(length, depth, zero))


def _full(out: list[Run], max_runs: int) -> bool:
    return len(out) > max_runs


def _below(image: VhdImage, depth: int, start: int, end: int, out: list[Run], max_runs: int) -> None:
    """[start, end) is not in `image` itself: the parent's answer, zeros past the parent's end."""
    parent = image.parent  # None for a dynamic image: its clear bits read zeros
    if parent is None:
        _add(out, end - start, 0, True)
        return
    inside = min(end, parent.size)
    if start < inside:
        _layer(parent, depth + 1, start, inside, out, max_runs)
    if inside < end:
        _add(out, end - max(start, inside), 0, True)


def _layer(image: VhdImage, depth: int, start: int, end: int, out: list[Run], max_runs: int) -> None:
    if isinstance(image, FixedImage):
        for _, n, stored in image.stored_runs(start, end - start):
            _add(out, n, depth, not stored)
        return
    assert isinstance(image, DynamicImage) and image.block_size is not None
    bs = image.block_size
    presence = image.sector_presence
    pos = start
    while pos < end and not _full(out, max_runs):
        block, in_block = divmod(pos, bs)
        stop = min(end, (block + 1) * bs)
        held = presence(block)
        if held is True:
            _add(out, stop - pos, depth, False)
        elif held is False:
            _below(image, depth, pos, stop, out, max_runs)
        else:
            base = block * bs
            first = in_block // c.SECTOR_SIZE
            last = (stop - base + c.SECTOR_SIZE - 1) // c.SECTOR_SIZE
            for s0, s1, is_set in bits.runs(held, first, last):
                lo = max(base + s0 * c.SECTOR_SIZE, pos)
                hi = min(base + s1 * c.SECTOR_SIZE, stop)
                if is_set:
                    _add(out, hi - lo, depth, False)
                else:
                    _below(image, depth, lo, hi, out, max_runs)
        pos = stop

"""Sector bitmaps: one bit per sector, most significant bit first (bit set = data here)."""

from __future__ import annotations

from collections.abc import Iterator


def test(bitmap: bytes | bytearray, sector: int) -> bool:
    return bool(bitmap[sector >> 3] & (0x80 >> (sector & 7)))


def runs(bitmap: bytes | bytearray, first: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """(start, stop, is_set) runs of equal bits covering sectors [first, end)."""
    sector = first
    while sector < end:
        value = test(bitmap, sector)
        stop = sector + 1
        fill = 0xFF if value else 0x00
        while stop < end:
            if stop & 7 == 0 and stop + 8 <= end and bitmap[stop >> 3] == fill:
                stop += 8
                continue
            if test(bitmap, stop) != value:
                break
            stop += 1
        yield sector, stop, value
        sector = stop


def set_range(bitmap: bytearray, first: int, end: int, value: bool) -> None:
    """Set or clear the bits of sectors [first, end)."""
    sector = first
    while sector < end and sector & 7:
        _set(bitmap, sector, value)
        sector += 1
    whole_end = sector + ((end - sector) & ~7)
    if whole_end > sector:
        bitmap[sector >> 3 : whole_end >> 3] = (b"\xff" if value else b"\x00") * ((whole_end - sector) >> 3)
        sector = whole_end
    while sector < end:
        _set(bitmap, sector, value)
        sector += 1


def _set(bitmap: bytearray, sector: int, value: bool) -> None:
    if value:
        bitmap[sector >> 3] |= 0x80 >> (sector & 7)
    else:
        bitmap[sector >> 3] &= ~(0x80 >> (sector & 7)) & 0xFF


def all_set(bitmap: bytes | bytearray, sectors: int) -> bool:
    whole = sectors >> 3
    if bitmap[:whole].count(0xFF) != whole:
        return False
    return all(test(bitmap, s) for s in range(whole << 3, sectors))


def none_set(bitmap: bytes | bytearray, sectors: int) -> bool:
    whole = sectors >> 3
    if bitmap[:whole].count(0) != whole:
        return False
    return not any(test(bitmap, s) for s in range(whole << 3, sectors))

"""The crash models themselves: a lone write between two syncs tears as well as several do."""

from __future__ import annotations

import random

from tests.reliability.crashsim import PAGE, SECTOR, crash_states
from vhdblkd.vhd.memfile import Op


def test_a_lone_write_tears_by_sector_and_by_page() -> None:
    base = bytes(3 * PAGE)
    new = b"\x01" * (2 * PAGE)
    ops = [Op("sync"), Op("write", PAGE // 2, new), Op("sync")]
    states = list(crash_states(base, ops, random.Random(1), pagecache=40, torn=40))
    at_write: dict[str, set[bytes]] = {}
    for s in states:
        if s.k == 2:
            at_write.setdefault(s.model, set()).add(s.data)
    assert "drop-subset" not in at_write  # one write: a subset is the prefix or nothing
    whole = {base, base[: PAGE // 2] + new + base[PAGE // 2 + len(new) :]}
    torn = at_write["torn"] - whole
    assert torn, "the lone write never tore"
    for data in torn:  # sector by sector old or new, never a sector half of each
        for i in range(0, len(data), SECTOR):
            assert data[i : i + SECTOR] in (bytes(SECTOR), b"\x01" * SECTOR)
    # A page cache writes pages back each on its own: the write's three pages split at page bounds.
    assert at_write["pagecache"] - whole
    for data in at_write["pagecache"]:
        for i in range(PAGE // 2, PAGE // 2 + len(new), PAGE // 2):
            assert len(set(data[i : i + PAGE // 2])) == 1


def test_a_lone_one_sector_write_is_all_or_nothing() -> None:
    ops = [Op("write", SECTOR, b"\x02" * SECTOR)]
    states = list(crash_states(bytes(4 * SECTOR), ops, random.Random(2), pagecache=5, torn=5))
    assert {s.model for s in states if s.k == 1} == {"prefix", "drop-all"}

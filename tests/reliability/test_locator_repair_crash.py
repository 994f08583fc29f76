"""Crash replay of the repair that clears a parent locator whose data lies outside the file.

Clearing it changes both sectors of the dynamic header (the locator in the
second, the checksum in the first), so the repair rewrites the header through
a shadow (header_shadow.rewrite).  Every crash state of that repair, including
the header write torn between its sectors either way, must open read-only
with the child's content, recover on a read-write open, and check clean.
"""

from __future__ import annotations

import random

from tests.reliability.crashsim import SECTOR, crash_states
from tests.vhd.test_compact import fill
from vhdblkd.errors import CorruptImage
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_differencing, create_dynamic
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.layout import scan
from vhdblkd.vhd.memfile import MemoryDisk, MemoryFileFactory, apply
from vhdblkd.vhd.structs import DynamicHeader, Footer

BS = 4096
SIZE = 64 * BS
PARENT, CHILD = "/mem/base.vhd", "/mem/child.vhd"
WRITES = [(0, b"\x01" * BS), (5 * BS + 512, b"\x05" * 3000), (40 * BS, b"\x28" * 2 * BS)]


def with_bad_locator() -> tuple[dict[str, MemoryDisk], bytes, int]:
    """(disks, model, index of the bad locator): a child whose W2ku locator points past its end."""
    disks: dict[str, MemoryDisk] = {}
    factory = MemoryFileFactory(disks)
    create_dynamic(PARENT, SIZE, block_size=BS, exact_size=True, file_factory=factory)
    model = bytearray(SIZE)
    fill(PARENT, model, WRITES[:1], lock=False, file_factory=factory)
    create_differencing(CHILD, PARENT, lock=False, file_factory=factory)
    fill(CHILD, model, WRITES[1:], lock=False, file_factory=factory)
    raw = bytearray(disks[CHILD].data)
    at = Footer.unpack(raw, len(raw) - c.FOOTER_SIZE).data_offset
    header = DynamicHeader.unpack(raw, at)
    bad = next(i for i, loc in enumerate(header.parent_locators) if loc.platform_code == c.PLATFORM_W2KU)
    locs = list(header.parent_locators)
    locs[bad] = locs[bad].replace(platform_data_offset=len(raw) + 64 * SECTOR)
    raw[at : at + DynamicHeader.SIZE] = header.replace(parent_locators=tuple(locs)).pack()
    disks[CHILD] = MemoryDisk(bytes(raw))
    return disks, bytes(model), bad


def header_whole(state: bytes, at: int) -> bool:
    try:
        DynamicHeader.unpack(state, at)
    except CorruptImage:
        return False
    return True


def test_every_crash_of_the_locator_repair_opens_and_recovers() -> None:
    disks, model, bad = with_bad_locator()
    factory = MemoryFileFactory(disks)
    cdisk = disks[CHILD]
    lay = scan(factory(CHILD, False), CHILD)
    assert lay.bad_locators == [bad] and lay.header is not None
    at = lay.footer.data_offset if lay.footer is not None else 0
    with open_image(CHILD, lock=False, file_factory=factory) as image:  # the repair, recorded
        assert bytes(image.read(0, SIZE)) == model
    ops = list(cdisk.ops)
    after = scan(factory(CHILD, False), CHILD)
    assert after.bad_locators == [] and after.header is not None
    assert not after.header.parent_locators[bad].used
    header_writes = [k for k, op in enumerate(ops) if op.kind == "write" and op.offset == at]
    assert len(header_writes) == 1
    k = header_writes[0]
    assert ops[k - 1].kind == "sync" and ops[k + 1].kind == "sync", "the header write is alone in its epoch"
    states = [s.data for s in crash_states(cdisk.initial, ops, random.Random(3), subsets=2, pagecache=2, torn=2)]
    # The header write torn between its sectors, both ways: a disk writes a sector at a time.
    durable = bytearray(cdisk.initial)
    for op in ops[:k]:
        apply(durable, op)
    new = ops[k].data
    for half in (slice(0, SECTOR), slice(SECTOR, 2 * SECTOR)):
        torn = bytearray(durable)
        torn[at + half.start : at + half.stop] = new[half]
        states.append(bytes(torn))
    assert sum(not header_whole(s, at) for s in states) >= 2
    for i, state in enumerate(states):
        trial = dict(disks)
        trial[CHILD] = MemoryDisk(state)
        tf = MemoryFileFactory(trial)
        with open_image(CHILD, read_only=True, lock=False, file_factory=tf) as image:
            assert bytes(image.read(0, SIZE)) == model, i
        with open_image(CHILD, lock=False, file_factory=tf) as image:  # recovery
            assert bytes(image.read(0, SIZE)) == model, i
        report = check_image(CHILD, lock=False, file_factory=tf)
        assert report.clean, (i, report.problems)
        repaired = scan(tf(CHILD, False), CHILD)
        assert repaired.header is not None and not repaired.header.parent_locators[bad].used, i
        assert header_whole(bytes(trial[CHILD].data), at), i

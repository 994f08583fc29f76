"""Maintenance commands under crashsim's torn model, where a lone write between syncs tears too.

compact, and resize growing a differencing image, replayed at every crash
point: each state must open read-only and recover on a read-write open to
the model's content (tests/vhd replays them with whole writes only).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from tests.reliability.crashsim import crash_states
from tests.vhd import test_compact as tc
from tests.vhd import test_resize as tr
from vhdblkd.errors import CorruptImage
from vhdblkd.vhd.compact import compact
from vhdblkd.vhd.create import create_differencing, create_dynamic
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.memfile import MemoryDisk, MemoryFileFactory
from vhdblkd.vhd.resize import resize
from vhdblkd.vhd.structs import DynamicHeader

PATH, PARENT = "/mem/c.vhd", "/mem/p.vhd"


def replay_all(disks: dict[str, MemoryDisk], disk: MemoryDisk, model_for: Callable[[int], bytes]) -> int:
    states = 0
    for state in crash_states(disk.initial, disk.ops, random.Random(5), subsets=3, pagecache=6, torn=6):
        where = f"crash after op {state.k} ({state.model})"
        probe = MemoryFileFactory({**disks, PATH: MemoryDisk(state.data)})
        with open_image(PATH, read_only=True, lock=False, file_factory=probe) as image:
            size = image.size
        try:
            tc.assert_recovers(disks, PATH, state.data, model_for(size))
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from exc
        states += 1
    return states


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_compact_survives_torn_writes(kind: str) -> None:
    disks: dict[str, MemoryDisk] = {}
    factory = MemoryFileFactory(disks)
    model = bytearray(tc.SIZE)
    if kind == "dynamic":
        create_dynamic(PATH, tc.SIZE, block_size=tc.BS, exact_size=True, file_factory=factory)
    else:
        create_dynamic(PARENT, tc.SIZE, block_size=tc.BS, exact_size=True, file_factory=factory)
        tc.fill(PARENT, model, [(tc.BS, b"\x55" * tc.BS)], lock=False, file_factory=factory)
        create_differencing(PATH, PARENT, lock=False, file_factory=factory)
    tc.fill(PATH, model, tc.WRITES, lock=False, file_factory=factory)
    disk = MemoryDisk(bytes(disks[PATH].data))
    disks[PATH] = disk
    compact(PATH, lock=False, file_factory=factory)
    assert replay_all(disks, disk, lambda size: bytes(model)) > 50


def test_a_differencing_grow_survives_a_torn_header_rewrite() -> None:
    """Moving the locators rewrites both header sectors; torn, the shadow before the footer repairs it."""
    disks: dict[str, MemoryDisk] = {}
    factory = MemoryFileFactory(disks)
    model = bytearray(tr.M)
    tr.make_chain(PARENT, PATH, model, lock=False, file_factory=factory)
    disk = MemoryDisk(bytes(disks[PATH].data))
    disks[PATH] = disk
    resize(PATH, 40 * tr.M, lock=False, file_factory=factory)
    torn = 0
    for state in crash_states(disk.initial, disk.ops, random.Random(5), subsets=3, pagecache=6, torn=6):
        try:
            DynamicHeader.unpack(state.data, 512)
        except CorruptImage:
            torn += 1
    assert torn >= 2, "no crash state tore the header: the test would prove nothing"
    assert replay_all(disks, disk, lambda size: bytes(model) + bytes(size - tr.M)) > 50

"""Crash-order test: replay every prefix of the recorded file operations.

An allocation-heavy workload runs over an in-memory file that logs every
write, truncate and fdatasync.  For every prefix of that log (a crash at that
moment), and for variants where writes issued since the last fdatasync are
dropped (the page cache lost them in any order), the resulting file must open
read-write (recovery), check clean afterwards, and hold every byte that a
completed flush (or FUA write) acknowledged; bytes written after the last
completed flush may hold either their old value or a value written later.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_differencing, create_dynamic
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.memfile import MemoryDisk, MemoryFileFactory, Op

BS = 4096
BLOCKS = 256  # 256 BAT entries: two BAT sectors, so a flush can tear between them
SIZE = BLOCKS * BS
CHILD = "/mem/disk.vhd"
PARENT = "/mem/parent.vhd"


@dataclasses.dataclass
class Recording:
    disk: MemoryDisk
    parent: MemoryDisk | None
    # (number of ops when the flush completed, model snapshot at that time)
    flushes: list[tuple[int, bytes]]
    # (number of ops when the write was issued, offset, data) in issue order
    writes: list[tuple[int, int, bytes]]
    initial_model: bytes


def record(kind: str, seed: int) -> Recording:
    rng = random.Random(seed)
    disks: dict[str, MemoryDisk] = {}
    factory = MemoryFileFactory(disks)
    model = bytearray(SIZE)
    parent_disk = None
    if kind == "differencing":
        create_dynamic(PARENT, SIZE, block_size=BS * 4, exact_size=True, file_factory=factory)
        with open_image(PARENT, lock=False, file_factory=factory) as parent:
            for _ in range(20):
                off = rng.randrange(SIZE - 3 * BS)
                data = rng.randbytes(rng.randrange(1, 3 * BS))
                parent.write(off, data)
                model[off : off + len(data)] = data
        create_differencing(CHILD, PARENT, block_size=BS, lock=False, file_factory=factory)
        parent_disk = disks[PARENT]
    else:
        create_dynamic(CHILD, SIZE, block_size=BS, exact_size=True, file_factory=factory)
    disk = disks[CHILD]
    disk.initial = bytes(disk.data)
    disk.ops.clear()
    initial_model = bytes(model)
    flushes: list[tuple[int, bytes]] = [(0, initial_model)]
    writes: list[tuple[int, int, bytes]] = []
    image = open_image(CHILD, lock=False, file_factory=factory)
    assert not disk.ops, "opening a clean image must not write"
    for _step in range(70):
        choice = rng.random()
        if choice < 0.6:
            off = rng.randrange(SIZE - 1)
            length = min(SIZE - off, rng.choice([1, 100, 512, 3000, BS, 2 * BS + 77]))
            data = rng.randbytes(length)
            fua = rng.random() < 0.1
            writes.append((len(disk.ops), off, data))
            image.write(off, data, fua=fua)
            model[off : off + length] = data
            if fua:
                flushes.append((len(disk.ops), bytes(model)))
        elif choice < 0.75:
            whole = rng.random() < 0.5
            off = rng.randrange(BLOCKS) * BS if whole else rng.randrange(SIZE - 1)
            length = BS * rng.randrange(1, 3) if whole else rng.randrange(1, 2 * BS)
            length = min(length, SIZE - off)
            writes.append((len(disk.ops), off, bytes(length)))
            image.discard(off, length)
            model[off : off + length] = bytes(length)
        else:
            image.flush()
            flushes.append((len(disk.ops), bytes(model)))
    # End on a wholly discarded tail block, which close() frees by shrinking the file.
    allocated = set(image.allocated_block_indexes())
    free_block = next(i for i in range(BLOCKS) if i not in allocated)
    writes.append((len(disk.ops), free_block * BS, b"\x77" * BS))
    image.write(free_block * BS, b"\x77" * BS)
    writes.append((len(disk.ops), free_block * BS, bytes(BS)))
    image.discard(free_block * BS, BS)
    model[free_block * BS : (free_block + 1) * BS] = bytes(BS)
    before_close = len(disk.data)
    image.close()
    if kind == "dynamic":
        assert len(disk.data) < before_close  # the tail block was freed
    flushes.append((len(disk.ops), bytes(model)))
    return Recording(disk, parent_disk, flushes, writes, initial_model)


def crash_states(rec: Recording, rng: random.Random) -> list[tuple[int, list[Op]]]:
    return crash_states_of(rec.disk.ops, rng)


def crash_states_of(ops: list[Op], rng: random.Random) -> list[tuple[int, list[Op]]]:
    """(crash point, surviving ops) for every prefix, plus states with unsynced ops dropped."""
    states: list[tuple[int, list[Op]]] = []
    last_sync = 0
    for k in range(len(ops) + 1):
        if k and ops[k - 1].kind == "sync":
            last_sync = k
        states.append((k, ops[:k]))
        unsynced = list(range(last_sync, k))
        if len(unsynced) >= 2:
            for _ in range(2):
                keep = [i for i in unsynced if rng.random() < 0.5]
                states.append((k, ops[:last_sync] + [ops[i] for i in keep]))
            states.append((k, ops[:last_sync] + [ops[unsynced[-1]]]))
    return states


def verify_content(rec: Recording, k: int, got: bytes) -> None:
    durable_at, snapshot = max((f for f in rec.flushes if f[0] <= k), key=lambda f: f[0])
    later = [(off, data) for issued, off, data in rec.writes if issued >= durable_at]
    if got == snapshot:
        return
    for chunk in range(0, SIZE, 512):
        if got[chunk : chunk + 512] == snapshot[chunk : chunk + 512]:
            continue
        for i in range(chunk, chunk + 512):
            if got[i] == snapshot[i]:
                continue
            allowed = {data[i - off] for off, data in later if off <= i < off + len(data)}
            assert got[i] in allowed, (
                f"crash after op {k}: byte {i} is {got[i]}, flushed value {snapshot[i]}, "
                f"later writes allow {sorted(allowed)}")


@pytest.mark.parametrize("kind,seed", [("dynamic", 1), ("dynamic", 2), ("differencing", 3)])
def test_every_crash_point_recovers(kind: str, seed: int) -> None:
    rec = record(kind, seed)
    ops = rec.disk.ops
    assert sum(op.kind == "sync" for op in ops) > 10
    states = crash_states(rec, random.Random(seed))
    assert len(states) > 300
    leaks_seen = 0
    for k, surviving in states:
        disks = {CHILD: MemoryDisk(rec.disk.replay(surviving))}
        if rec.parent is not None:
            disks[PARENT] = rec.parent
        factory = MemoryFileFactory(disks)
        before = check_image(CHILD, lock=False, file_factory=factory)
        leaks_seen += any(p.code == "leaked-block" for p in before.problems)
        with open_image(CHILD, lock=False, file_factory=factory) as image:
            got = bytes(image.read(0, SIZE))
        verify_content(rec, k, got)
        after = check_image(CHILD, lock=False, file_factory=factory)
        assert after.clean, f"crash after op {k}: {after.problems}"
        with open_image(CHILD, read_only=True, lock=False, file_factory=factory) as image:
            assert bytes(image.read(0, SIZE)) == got
    if kind == "dynamic":
        # The workload must really produce the mid-file leak that recovery relocates.
        assert leaks_seen > 0


def test_read_only_open_of_a_crashed_file_changes_nothing() -> None:
    rec = record("dynamic", 4)
    ops = rec.disk.ops
    for k in range(0, len(ops), 7):
        state = rec.disk.replay(ops[:k])
        disks = {CHILD: MemoryDisk(state)}
        factory = MemoryFileFactory(disks)
        with open_image(CHILD, read_only=True, lock=False, file_factory=factory) as image:
            image.read(0, SIZE)
        report = check_image(CHILD, lock=False, file_factory=factory)
        assert bytes(disks[CHILD].data) == state
        assert not disks[CHILD].ops
        assert report.problems == report.remaining


def test_crash_during_recovery_is_recoverable() -> None:
    """Recovery itself (relocating leaked blocks, truncating) survives a crash at any point."""
    rec = record("dynamic", 1)
    rng = random.Random(5)
    checked = 0
    for _k, surviving in crash_states(rec, rng):
        state = rec.disk.replay(surviving)
        probe = MemoryFileFactory({CHILD: MemoryDisk(state)})
        if not any(p.code == "leaked-block" for p in check_image(CHILD, lock=False, file_factory=probe).problems):
            continue
        with open_image(CHILD, read_only=True, lock=False, file_factory=probe) as image:
            expected = bytes(image.read(0, SIZE))
        recovering = MemoryDisk(state)
        with open_image(CHILD, lock=False, file_factory=MemoryFileFactory({CHILD: recovering})):
            pass
        assert recovering.ops, "recovery must have written something"
        for j, ops in crash_states_of(recovering.ops, rng):
            disks = {CHILD: MemoryDisk(recovering.replay(ops))}
            factory = MemoryFileFactory(disks)
            with open_image(CHILD, lock=False, file_factory=factory) as image:
                assert bytes(image.read(0, SIZE)) == expected, f"recovery crash at op {j}"
            assert check_image(CHILD, lock=False, file_factory=factory).clean
        checked += 1
        if checked >= 5:
            break
    assert checked > 0

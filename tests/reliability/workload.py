"""Recorded allocation-heavy workloads and the model that says what a crash may leave.

A workload runs random writes (unaligned, multi-block), discards,
write-zeroes, flushes and FUA writes on a dynamic or differencing image
whose file sits under the fault layer (over an in-memory file), and keeps
the reference model of the virtual disk next to the operation log.

What a crash after k operations must leave, with D the last flush (or FUA
write) that completed within those k operations:
- a sector that no write issued after D touches reads as at D;
- a sector touched by exactly one such write reads either as at D or as
  that write left it (never a mix within the sector: the image writes a
  sector in one pwrite);
- a sector touched by several reads as at D with some of those writes
  applied in issue order (checked exhaustively up to 6 writes, byte by byte
  against the set of written values beyond that).
"""

from __future__ import annotations

import dataclasses
import itertools
import random

from tests.reliability.faultfile import FaultFactory, FaultLog
from vhdblkd.vhd.create import create_differencing, create_dynamic
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.memfile import MemoryDisk, MemoryFileFactory

SECTOR = 512
CHILD = "/mem/child.vhd"
PARENT = "/mem/parent.vhd"


@dataclasses.dataclass
class Recording:
    kind: str
    block_size: int
    size: int
    initial: bytes  # the child file before the workload
    log: FaultLog
    parent: bytes | None
    flushes: list[tuple[int, bytes]]  # (ops done when a flush completed, model then)
    writes: list[tuple[int, int, bytes]]  # (ops done when issued, offset, data) in issue order

    def disks(self, child: bytes) -> dict[str, MemoryDisk]:
        disks = {CHILD: MemoryDisk(child)}
        if self.parent is not None:
            disks[PARENT] = MemoryDisk(self.parent)
        return disks


def record(kind: str, block_size: int, blocks: int, seed: int, steps: int = 60) -> Recording:
    rng = random.Random(seed)
    size = blocks * block_size
    disks: dict[str, MemoryDisk] = {}
    mem = MemoryFileFactory(disks)
    model = bytearray(size)
    parent_bytes = None
    if kind == "differencing":
        create_dynamic(PARENT, size, block_size=block_size * 2, exact_size=True, file_factory=mem)
        with open_image(PARENT, lock=False, file_factory=mem) as parent:
            for _ in range(blocks // 4):
                off = rng.randrange(size - 2 * block_size)
                data = rng.randbytes(rng.randrange(1, 2 * block_size))
                parent.write(off, data)
                model[off : off + len(data)] = data
        create_differencing(CHILD, PARENT, block_size=block_size, lock=False, file_factory=mem)
        parent_bytes = bytes(disks[PARENT].data)
    else:
        create_dynamic(CHILD, size, block_size=block_size, exact_size=True, file_factory=mem)
    initial = bytes(disks[CHILD].data)
    faults = FaultFactory(mem)
    log = faults.log_for(CHILD)
    flushes: list[tuple[int, bytes]] = [(0, bytes(model))]
    writes: list[tuple[int, int, bytes]] = []
    image = open_image(CHILD, lock=False, file_factory=faults)
    assert not log.ops, "opening a clean image must not write"
    for _ in range(steps):
        choice = rng.random()
        if choice < 0.6:
            off = rng.randrange(size - 1)
            if rng.random() < 0.3:
                off -= off % SECTOR
            length = min(size - off, rng.choice([1, 100, 512, 1500, block_size, 2 * block_size + 77]))
            data = rng.randbytes(length)
            fua = rng.random() < 0.12
            writes.append((len(log.ops), off, data))
            image.write(off, data, fua=fua)
            model[off : off + length] = data
            if fua:
                flushes.append((len(log.ops), bytes(model)))
        elif choice < 0.78:
            whole = rng.random() < 0.5
            off = rng.randrange(blocks) * block_size if whole else rng.randrange(size - 1)
            length = block_size * rng.randrange(1, 3) if whole else rng.randrange(1, 2 * block_size)
            length = min(length, size - off)
            writes.append((len(log.ops), off, bytes(length)))
            if rng.random() < 0.7:
                image.discard(off, length)
            else:
                image.write_zeroes(off, length, may_trim=False, fua=False)
            model[off : off + length] = bytes(length)
        else:
            image.flush()
            flushes.append((len(log.ops), bytes(model)))
    image.close()
    flushes.append((len(log.ops), bytes(model)))
    return Recording(kind, block_size, size, initial, log, parent_bytes, flushes, writes)


def _overlay(base: bytes, start: int, writes: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(base)
    for off, data in writes:
        lo, hi = max(off, start), min(off + len(data), start + len(out))
        out[lo - start : hi - start] = data[lo - off : hi - off]
    return bytes(out)


def verify(rec: Recording, k: int, got: bytes) -> None:
    """Assert the recovered content `got` is one a crash after k operations may leave (module doc)."""
    durable_at, snapshot = max((f for f in rec.flushes if f[0] <= k), key=lambda f: f[0])
    if got == snapshot:
        return
    later = [(off, data) for issued, off, data in rec.writes if durable_at <= issued < k]
    for start in range(0, rec.size, SECTOR):
        old = snapshot[start : start + SECTOR]
        sector = got[start : start + SECTOR]
        if sector == old:
            continue
        touching = [(off, data) for off, data in later if off < start + SECTOR and start < off + len(data)]
        where = f"{rec.kind} bs={rec.block_size}: crash after op {k} (durable at {durable_at}), sector {start // SECTOR}"
        assert touching, f"{where} changed though no write after the last flush touched it"
        if len(touching) <= 6:
            allowed = {_overlay(old, start, [w for w, keep in zip(touching, mask, strict=False) if keep])
                       for mask in itertools.product((False, True), repeat=len(touching))}
            assert sector in allowed, f"{where} holds none of the {len(allowed)} allowed contents"
            continue
        for i in range(SECTOR):
            pos = start + i
            values = {old[i]} | {data[pos - off] for off, data in touching if off <= pos < off + len(data)}
            assert sector[i] in values, f"{where} byte {i} is {sector[i]}, allowed {sorted(values)}"

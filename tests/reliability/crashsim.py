"""Crash states of a recorded operation log, as a host could leave them after power loss.

For a crash after the first k operations, everything up to the last fdatasync
in that prefix is durable; what was issued since (the open "sync epoch") may
have reached the disk in part.  Three models of that epoch:

- ``prefix``: every operation of the prefix reached the disk;
- ``drop``: none of the epoch's operations did, or a random subset did
  (applied in order: a disk that loses whole writes);
- ``pagecache``: each 4 KiB page touched in the epoch independently holds
  its content as of some moment in the epoch, and the file size is that of
  yet another moment: a page cache writing back dirty pages in any order and
  at any time, which never makes one write land before an earlier write to
  the same page;
- ``torn``: as ``pagecache``, but each 512-byte sector on its own: a device
  that writes a dirty page back in sector-sized pieces and loses power
  half-way (sectors are the unit a disk writes atomically).

``pagecache`` and ``torn`` apply to an epoch of a single write as well (one
that spans several pages or sectors): a lone header or BAT-sector rewrite
between two syncs tears like any other.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

from vhdblkd.vhd.memfile import Op, apply

PAGE = 4096
SECTOR = 512


@dataclasses.dataclass(frozen=True, slots=True)
class CrashState:
    k: int  # operations issued before the crash
    model: str  # "prefix" | "drop-all" | "drop-subset" | "pagecache"
    data: bytes


def _page_versions(base: bytes, epoch: list[Op], unit: int) -> tuple[list[int], dict[int, list[tuple[int, bytes]]]]:
    """File sizes after each epoch op (index 0 = before any) and, per touched unit, its versions."""
    PAGE = unit  # noqa: N806 - the unit of write-back, a page or a sector
    cur = bytearray(base)
    sizes = [len(cur)]
    versions: dict[int, list[tuple[int, bytes]]] = {}
    for j, op in enumerate(epoch, start=1):
        old_len = len(cur)
        apply(cur, op)
        if op.kind == "write":
            first, last = op.offset // PAGE, (op.offset + len(op.data) - 1) // PAGE
        elif op.kind == "truncate":
            lo = min(old_len, len(cur))
            first, last = lo // PAGE, max(old_len, len(cur)) // PAGE
        else:
            first, last = 0, -1
        for page in range(first, last + 1):
            if page not in versions:
                versions[page] = [(0, bytes(base[page * PAGE : (page + 1) * PAGE]))]
            versions[page].append((j, bytes(cur[page * PAGE : (page + 1) * PAGE])))
        sizes.append(len(cur))
    return sizes, versions


def pagecache_state(base: bytes, epoch: list[Op], rng: random.Random, unit: int = PAGE) -> bytes:
    PAGE = unit  # noqa: N806 - the unit of write-back, a page or a sector
    sizes, versions = _page_versions(base, epoch, unit)
    size = sizes[rng.randrange(len(sizes))]
    out = bytearray(base[:size])
    if len(out) < size:
        out.extend(bytes(size - len(out)))
    for page, history in versions.items():
        _, content = history[rng.randrange(len(history))]
        start = page * PAGE
        if start >= size:
            continue
        chunk = content[: size - start]
        out[start : start + len(chunk)] = chunk
        # A page version shorter than the chosen size reads as zeros past its own end.
        gap_end = min(size, start + PAGE)
        if start + len(chunk) < gap_end:
            out[start + len(chunk) : gap_end] = bytes(gap_end - start - len(chunk))
    return bytes(out)


def crash_states(initial: bytes, ops: list[Op], rng: random.Random, *, subsets: int = 1,
                 pagecache: int = 1, torn: int = 0, stride: int = 1) -> Iterator[CrashState]:
    """Crash states for every `stride`-th prefix of `ops` (and always the last one)."""
    cur = bytearray(initial)
    durable = bytes(initial)
    last_sync = 0
    points = set(range(0, len(ops) + 1, stride)) | {len(ops)}
    for k in range(len(ops) + 1):
        if k:
            op = ops[k - 1]
            apply(cur, op)
            if op.kind == "sync":
                last_sync = k
                durable = bytes(cur)
        if k not in points:
            continue
        yield CrashState(k, "prefix", bytes(cur))
        epoch = [op for op in ops[last_sync:k] if op.kind != "sync"]
        if not epoch:
            continue
        yield CrashState(k, "drop-all", durable)
        yield from _epoch_states(k, durable, epoch, rng, subsets, pagecache, torn)


def _epoch_states(k: int, durable: bytes, epoch: list[Op], rng: random.Random, subsets: int,
                  pagecache: int, torn: int) -> Iterator[CrashState]:
    if len(epoch) >= 2:  # with one write, a subset is all or nothing: prefix and drop-all
        for _ in range(subsets):
            data = bytearray(durable)
            for op in epoch:
                if rng.random() < 0.5:
                    apply(data, op)
            yield CrashState(k, "drop-subset", bytes(data))
    # A lone write tears too: its pages (or sectors) reach the disk each on its own.
    if _spans_units(epoch, PAGE):
        for _ in range(pagecache):
            yield CrashState(k, "pagecache", pagecache_state(durable, epoch, rng))
    if _spans_units(epoch, SECTOR):
        for _ in range(torn):
            yield CrashState(k, "torn", pagecache_state(durable, epoch, rng, SECTOR))


def _spans_units(epoch: list[Op], unit: int) -> bool:
    """Whether the epoch can leave anything but all or none of it: several ops, or one over several units."""
    if len(epoch) != 1:
        return bool(epoch)
    op = epoch[0]
    if op.kind != "write":
        return True  # a truncate: the size and the zeroed tail are separate
    return op.offset // unit != (op.offset + len(op.data) - 1) // unit

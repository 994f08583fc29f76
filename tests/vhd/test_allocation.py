"""Allocation runs (NBD block status) against a sector-level model of a three-level chain."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhdblkd.backend import AllocationMap, Extent
from vhdblkd.vhd.create import create_differencing, create_dynamic, create_fixed
from vhdblkd.vhd.image import open_image

SECTOR = 512
BS = 16 * 1024  # small blocks: many of them in a small image
SIZE = 64 * BS
SECTORS = SIZE // SECTOR

writes = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, SIZE - 1), st.integers(1, 3 * BS)), min_size=0, max_size=12
)


def expand(extents: list[Extent]) -> list[tuple[int, bool]]:
    """Per-sector (depth, zero) from extents (every length a multiple of the sector here)."""
    out: list[tuple[int, bool]] = []
    for e in extents:
        assert e.length > 0 and e.length % SECTOR == 0
        out += [(e.depth, e.zero)] * (e.length // SECTOR)
    return out


def build(tmp: Path, ops: list[tuple[int, int, int]]) -> tuple[Path, list[int]]:
    """base (dynamic) <- mid <- top; apply writes at level 0 (base), 1, 2 (top); model depths."""
    base, mid, top = tmp / "base.vhd", tmp / "mid.vhd", tmp / "top.vhd"
    for p in (base, mid, top):
        p.unlink(missing_ok=True)
    create_dynamic(str(base), SIZE, block_size=BS, exact_size=True)
    create_differencing(str(mid), str(base))
    create_differencing(str(top), str(mid))
    held: list[set[int]] = [set(), set(), set()]  # sectors each level holds
    paths = [base, mid, top]
    for level in range(3):
        image = open_image(str(paths[level]), allow_unsafe_parent=True)
        try:
            for lvl, off, n in ops:
                if lvl != level:
                    continue
                n = min(n, SIZE - off)
                image.write(off, os.urandom(n))
                first, last = off // SECTOR, (off + n - 1) // SECTOR
                if level == 0:  # a dynamic block holds every sector once allocated
                    first, last = first - first % (BS // SECTOR), (last // (BS // SECTOR) + 1) * (BS // SECTOR) - 1
                held[level].update(range(first, last + 1))
        finally:
            image.close()
    depths = []
    for s in range(SECTORS):
        depth = 0
        for d, level in ((1, 2), (2, 1), (3, 0)):
            if s in held[level]:
                depth = d
                break
        depths.append(depth)
    return top, depths


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=writes, window=st.tuples(st.integers(0, SECTORS - 1), st.integers(1, SECTORS)))
def test_chain_depths_match_the_model(tmp_path: Path, ops: list[tuple[int, int, int]], window: tuple[int, int]) -> None:
    top, depths = build(tmp_path, ops)
    image = open_image(str(top), read_only=True, allow_unsafe_parent=True)
    try:
        assert isinstance(image, AllocationMap)
        whole = expand(list(image.allocation(0, SIZE)))
        assert whole == [(d, d == 0) for d in depths]
        first, count = window
        count = min(count, SECTORS - first)
        part = expand(list(image.allocation(first * SECTOR, count * SECTOR)))
        assert part == whole[first : first + count]
        # Adjacent extents differ (merged), and unallocated ranges read as zeros.
        runs = list(image.allocation(0, SIZE))
        assert all((a.depth, a.zero) != (b.depth, b.zero) for a, b in zip(runs, runs[1:], strict=False))
        pos = 0
        for e in runs:
            if e.zero:
                assert not any(image.read(pos, e.length))
            pos += e.length
    finally:
        image.close()


def test_dynamic_reports_its_bat(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_dynamic(str(path), SIZE, block_size=BS, exact_size=True)
    with open_image(str(path)) as image:
        image.write(3 * BS + 100, b"x")
        image.write(10 * BS, b"y" * (2 * BS))
    with open_image(str(path), read_only=True) as image:
        runs = image.allocation(0, SIZE)
        assert runs == [
            Extent(3 * BS, 0, True), Extent(BS, 1, False), Extent(6 * BS, 0, True), Extent(2 * BS, 1, False),
            Extent(SIZE - 12 * BS, 0, True),
        ]
        assert image.allocation(3 * BS + 512, 1024) == [Extent(1024, 1, False)]
        assert image.allocation(SIZE, 10) == []


def test_fixed_reports_file_holes(tmp_path: Path) -> None:
    path = tmp_path / "f.vhd"
    create_fixed(str(path), 4 * 1024 * 1024, exact_size=True)
    with open_image(str(path)) as image:
        image.write_zeroes(0, 4 * 1024 * 1024, may_trim=True)  # punch everything
        image.write(1024 * 1024, b"z" * 65536)
    with open_image(str(path), read_only=True) as image:
        runs = image.allocation(0, image.size)
        assert sum(e.length for e in runs) == image.size and all(e.depth == 1 for e in runs)
        if not any(e.zero for e in runs):
            pytest.skip("this file system reports no holes (SEEK_HOLE)")
        pos = 0
        for e in runs:
            if not e.zero:
                assert pos <= 1024 * 1024 < pos + e.length or pos < 1024 * 1024 + 65536 <= pos + e.length
            pos += e.length


MiB = 1024 * 1024


def _count_lseeks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the lseek calls the format layer makes (the real call still happens)."""
    calls: list[int] = []
    real = os.lseek

    def counting(fd: int, pos: int, how: int) -> int:
        calls.append(how)
        return real(fd, pos, how)

    monkeypatch.setattr(os, "lseek", counting)
    return calls


def _holes_supported(path: Path) -> bool:
    probe = path.with_suffix(".probe")
    with open(probe, "wb") as f:
        f.truncate(MiB)
        f.seek(MiB - 1)
        f.write(b"x")
    try:
        fd = os.open(probe, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_HOLE) == 0
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        probe.unlink()


def test_fully_written_fixed_answers_all_data_without_syscalls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Learnt at open, kept while nothing punches a hole; a discard makes it look again."""
    path = tmp_path / "full.vhd"
    size = 4 * MiB
    create_fixed(str(path), size, exact_size=True)
    with open_image(str(path)) as image:
        for off in range(0, size, MiB):
            image.write(off, bytes([off // MiB + 1]) * MiB)
    calls = _count_lseeks(monkeypatch)
    with open_image(str(path)) as image:
        calls.clear()
        assert image.allocation(0, size) == [Extent(size, 1, False)]
        assert image.allocation(MiB + 512, 65536) == [Extent(65536, 1, False)]
        assert image.allocation(size - 512, MiB) == [Extent(512, 1, False)]
        assert image.allocation(size, 10) == []
        image.write(0, b"w" * 4096)  # writes never make holes: still no lookups
        assert image.allocation(0, size) == [Extent(size, 1, False)]
        assert calls == []
        image.discard(2 * MiB, MiB)
        runs = image.allocation(0, size)
        assert calls, "after a discard the file's holes are looked up again"
        assert sum(e.length for e in runs) == size and all(e.depth == 1 for e in runs)
        if _holes_supported(tmp_path):
            assert runs == [Extent(2 * MiB, 1, False), Extent(MiB, 1, True), Extent(MiB, 1, False)]
        assert image.read(2 * MiB, 4096) == bytes(4096)
        image.write(2 * MiB, b"v" * MiB)  # fills the hole again ...
        assert image.allocation(0, size) == [Extent(size, 1, False)]
        image.flush()  # ... which a flush notices
        calls.clear()
        assert image.allocation(0, size) == [Extent(size, 1, False)]
        assert calls == []


def test_sparse_fixed_reports_holes_before_and_after_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not _holes_supported(tmp_path):
        pytest.skip("this file system reports no holes (SEEK_HOLE)")
    path = tmp_path / "sparse.vhd"
    size = 4 * MiB
    create_fixed(str(path), size, exact_size=True)
    with open_image(str(path)) as image:
        image.discard(0, size)  # a sparse file, as a raw copy with holes would be
    with open_image(str(path)) as image:
        assert image.allocation(0, size) == [Extent(size, 1, True)]
        image.write(MiB, b"a" * MiB)
        assert image.allocation(0, size) == [Extent(MiB, 1, True), Extent(MiB, 1, False), Extent(2 * MiB, 1, True)]
        image.flush()
        assert image.allocation(0, size) == [Extent(MiB, 1, True), Extent(MiB, 1, False), Extent(2 * MiB, 1, True)]
        for off in (0, 2 * MiB, 3 * MiB):
            image.write(off, b"b" * MiB)
        image.flush()
        calls = _count_lseeks(monkeypatch)
        assert image.allocation(0, size) == [Extent(size, 1, False)]
        assert calls == []
    # A child of a fixed parent: the parent's answer at depth 2, from the same knowledge.
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(path), block_size=BS)
    with open_image(str(child)) as image:
        image.write(0, b"c" * BS)
        calls.clear()
        assert image.allocation(0, size) == [Extent(BS, 1, False), Extent(size - BS, 2, False)]
        assert calls == []

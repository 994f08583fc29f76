"""Model-based tests: every image kind against a bytearray, through random operations.

Small block sizes and small disks make requests cross many block boundaries;
offsets are unaligned; the image is closed and reopened along the way and
check_image must find it clean at the end.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vhdblkd.vhd.base import VhdImage
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_differencing, create_dynamic, create_fixed
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.memfile import MemoryFileFactory

BLOCK_SIZES = [512, 4096, 16384, 65536]


class _ImageMachine(RuleBasedStateMachine):
    kind = "dynamic"
    in_memory = True

    def __init__(self) -> None:
        super().__init__()
        self.image: VhdImage | None = None
        self.model = bytearray()
        self.block_size = 4096
        self.tmpdir = tempfile.mkdtemp(prefix="vhdmodel-") if not self.in_memory else "/mem"
        self.factory = MemoryFileFactory({})
        self.path = os.path.join(self.tmpdir, "disk.vhd")

    def _kw(self) -> dict[str, object]:
        return {"file_factory": self.factory, "lock": False} if self.in_memory else {}

    def _open(self) -> VhdImage:
        return open_image(self.path, **self._kw())  # type: ignore[arg-type]  # kwargs built above

    @initialize(block_size=st.sampled_from(BLOCK_SIZES), blocks=st.integers(2, 10),
                tail_sectors=st.integers(0, 7), seed=st.integers(0, 2**32 - 1))
    def setup(self, block_size: int, blocks: int, tail_sectors: int, seed: int) -> None:
        self.block_size = block_size
        size = blocks * block_size + tail_sectors * 512
        ff = {"file_factory": self.factory} if self.in_memory else {}
        if self.kind == "fixed":
            create_fixed(self.path, size, exact_size=True, **ff)  # type: ignore[arg-type]
            self.model = bytearray(size)
        elif self.kind == "dynamic":
            create_dynamic(self.path, size, block_size=block_size, exact_size=True, **ff)  # type: ignore[arg-type]
            self.model = bytearray(size)
        else:
            parent = os.path.join(self.tmpdir, "parent.vhd")
            create_dynamic(parent, size, block_size=block_size, exact_size=True, **ff)  # type: ignore[arg-type]
            rng = random.Random(seed)
            self.model = bytearray(size)
            with open_image(parent, **self._kw()) as p:  # type: ignore[arg-type]
                for _ in range(6):
                    off = rng.randrange(size)
                    data = rng.randbytes(min(size - off, rng.randrange(1, 3 * block_size)))
                    p.write(off, data)
                    self.model[off : off + len(data)] = data
            create_differencing(self.path, parent, lock=not self.in_memory, **ff)  # type: ignore[arg-type]
        self.image = self._open()
        assert self.image.size == size

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        size = len(self.model)
        offset = data.draw(st.integers(0, size - 1), label="offset")
        length = data.draw(st.integers(1, min(size - offset, 3 * self.block_size + 1000)), label="length")
        return offset, length

    @precondition(lambda self: self.image is not None)
    @rule(data=st.data(), seed=st.integers(0, 2**16), fua=st.booleans())
    def write(self, data: st.DataObject, seed: int, fua: bool) -> None:
        assert self.image is not None
        offset, length = self._range(data)
        payload = random.Random(seed).randbytes(length)
        self.image.write(offset, payload, fua=fua)
        self.model[offset : offset + length] = payload

    @precondition(lambda self: self.image is not None)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        assert self.image is not None
        offset, length = self._range(data)
        got = self.image.read(offset, length)
        assert len(got) == length
        assert bytes(got) == bytes(self.model[offset : offset + length])

    @precondition(lambda self: self.image is not None)
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        assert self.image is not None
        offset, length = self._range(data)
        self.image.discard(offset, length)
        self.model[offset : offset + length] = bytes(length)

    @precondition(lambda self: self.image is not None)
    @rule(data=st.data(), may_trim=st.booleans(), fua=st.booleans())
    def write_zeroes(self, data: st.DataObject, may_trim: bool, fua: bool) -> None:
        assert self.image is not None
        offset, length = self._range(data)
        self.image.write_zeroes(offset, length, may_trim=may_trim, fua=fua)
        self.model[offset : offset + length] = bytes(length)

    @precondition(lambda self: self.image is not None)
    @rule(whole=st.booleans())
    def discard_aligned_blocks(self, whole: bool) -> None:
        """Whole-block discards, including the last blocks (freed at close)."""
        assert self.image is not None
        bs = self.block_size
        size = len(self.model)
        start = (size // bs - 1) * bs if whole else 0
        self.image.discard(start, size - start if whole else bs)
        end = size if whole else bs
        self.model[start:end] = bytes(end - start)

    @precondition(lambda self: self.image is not None)
    @rule(data=st.data())
    def discard_one_whole_block(self, data: st.DataObject) -> None:
        """Any whole block, often in the middle: a dynamic image frees it, a child keeps it."""
        assert self.image is not None
        bs = self.block_size
        size = len(self.model)
        if size < bs:
            return
        block = data.draw(st.integers(0, size // bs - 1), label="block")
        had = block in self.image.allocated_block_indexes()
        before = self.image.allocated_blocks
        self.image.discard(block * bs, bs)
        self.model[block * bs : (block + 1) * bs] = bytes(bs)
        if self.image.parent is None:
            assert block not in self.image.allocated_block_indexes()
            assert self.image.allocated_blocks == before - had
        else:
            assert block in self.image.allocated_block_indexes()

    @precondition(lambda self: self.image is not None)
    @rule()
    def flush(self) -> None:
        assert self.image is not None
        self.image.flush()

    @precondition(lambda self: self.image is not None)
    @rule(check=st.booleans())
    def reopen(self, check: bool) -> None:
        assert self.image is not None
        self.image.close()
        if check:
            report = check_image(self.path, **self._kw())  # type: ignore[arg-type]
            assert report.clean, report.problems
        self.image = self._open()

    @invariant()
    def size_is_stable(self) -> None:
        if self.image is not None:
            assert self.image.size == len(self.model)

    def teardown(self) -> None:
        try:
            if self.image is not None:
                self.image.close()
                report = check_image(self.path, **self._kw())  # type: ignore[arg-type]
                assert report.clean, report.problems
                with open_image(self.path, read_only=True, **self._kw()) as image:  # type: ignore[arg-type]
                    assert bytes(image.read(0, len(self.model))) == bytes(self.model)
        finally:
            if not self.in_memory:
                shutil.rmtree(self.tmpdir, ignore_errors=True)  # failing examples too


class FixedMachine(_ImageMachine):
    kind = "fixed"
    in_memory = False  # exercises the mmap read path


class DynamicMachine(_ImageMachine):
    kind = "dynamic"


class DynamicFileMachine(_ImageMachine):
    kind = "dynamic"
    in_memory = False  # real pread/pwrite/punch_hole


class DifferencingMachine(_ImageMachine):
    kind = "differencing"


_SETTINGS = settings(max_examples=40, stateful_step_count=40)
TestFixed = FixedMachine.TestCase
TestFixed.settings = _SETTINGS
TestDynamic = DynamicMachine.TestCase
TestDynamic.settings = settings(max_examples=80, stateful_step_count=50)
TestDynamicFile = DynamicFileMachine.TestCase
TestDynamicFile.settings = _SETTINGS
TestDifferencing = DifferencingMachine.TestCase
TestDifferencing.settings = settings(max_examples=80, stateful_step_count=50)


def test_concurrent_writers_on_distinct_ranges(tmp_path: object) -> None:
    """Threads allocating blocks at once (one per NBD connection) never lose a write."""
    path = os.path.join(str(tmp_path), "mt.vhd")
    bs = 4096
    create_dynamic(path, 64 * bs, block_size=bs, exact_size=True)
    image = open_image(path)
    model = bytearray(64 * bs)

    def worker(n: int) -> None:
        rng = random.Random(n)
        for i in range(200):
            offset = (rng.randrange(64 * bs // 512 // 8) * 8 + n) * 512  # thread n owns sector n of each 8
            data = bytes([n + 1]) * 512
            image.write(offset, data)
            if i % 50 == 0:
                image.flush()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in range(8):
        rng = random.Random(n)
        for _ in range(200):
            offset = (rng.randrange(64 * bs // 512 // 8) * 8 + n) * 512
            model[offset : offset + 512] = bytes([n + 1]) * 512
    image.close()
    assert check_image(path).clean
    with open_image(path, read_only=True) as image2:
        assert bytes(image2.read(0, len(model))) == bytes(model)


def test_concurrent_readers_writers_flushers_on_a_child(tmp_path: object) -> None:
    """Several connections on a differencing image: reads never see torn allocations."""
    base = os.path.join(str(tmp_path), "base.vhd")
    child = os.path.join(str(tmp_path), "child.vhd")
    bs = 4096
    size = 64 * bs
    create_dynamic(base, size, block_size=bs, exact_size=True)
    with open_image(base) as parent:
        parent.write(0, bytes([0xBB]) * size)
    create_differencing(child, base)
    image = open_image(child)
    errors: list[str] = []

    def writer(n: int) -> None:
        rng = random.Random(n)
        for i in range(150):
            sector = rng.randrange(size // 512 // 4) * 4 + n  # writer n owns sector n of each 4
            image.write(sector * 512 + 100, bytes([n + 1]) * 300)
            if i % 40 == 0:
                image.flush()

    def reader() -> None:
        rng = random.Random(99)
        for _ in range(300):
            offset = rng.randrange(size // 512) * 512
            data = bytes(image.read(offset, 512))
            head, mid, tail = data[:100], data[100:400], data[400:]
            if head != b"\xbb" * 100 or tail != b"\xbb" * 112 or len(set(mid)) != 1 or mid[0] not in (0xBB, 1, 2, 3, 4):
                errors.append(f"sector at {offset} reads {data[:8]!r}...{data[100:108]!r}")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    image.close()
    assert not errors, errors[:5]
    assert check_image(child).clean

"""The VHD parser fuzz target, shared by the hypothesis tests and the atheris entry point.

An input is a small mutation program over one of the seed images in
corpus/vhd/ (so both fuzzers mostly produce images that get past the
checksums and reach the deeper parsing):

    seed:u8  flags:u8  op*
    flags bit 0: recompute the footer (both copies) and header checksums afterwards
    flags bit 1: also open read-write, write, flush and close
    op:u8 % 6 selects
      0 footer field  : copy:u8 (0 = trailing, 1 = at offset 0, 2 = both)  field:u8  value
      1 header field  : field:u8  value
      2 raw bytes     : offset:u32 (mod file size)  n:u8 (1..16)  n bytes
      3 truncate      : n:u16 bytes off the end
      4 BAT entry     : index:u16  value
      5 locator field : locator:u8 (mod 8)  field:u8  value
    value: idx:u8 into INTERESTING, or 0xff followed by a raw big-endian u64

`run(data)` must raise nothing but VhdblkError subclasses (it catches those),
must finish within the time limit, and must never read or write outside the
file (FaultFile's bounds checks raise AssertionError).  A read-only open and
a check change no byte; an image that opened read-write and closed opens again.
"""

from __future__ import annotations

import os
import struct
import traceback
from pathlib import Path

from tests.fuzz.guard import time_limit
from tests.reliability.faultfile import BoundsViolation, FaultFactory
from vhdblkd.errors import VhdblkError
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.memfile import MemoryDisk, MemoryFileFactory
from vhdblkd.vhd.structs import checksum

CORPUS = Path(__file__).parent / "corpus" / "vhd"
ROOT = "/fz"
TIME_LIMIT = 20.0

# (offset, width) of the footer's and header's fields, in their 512/1024-byte structures.
FOOTER_FIELDS = [(0, 8), (8, 4), (12, 4), (16, 8), (24, 4), (28, 4), (32, 4), (36, 4), (40, 8), (48, 8),
                 (56, 2), (58, 1), (59, 1), (60, 4), (64, 4), (68, 16), (84, 1)]
HEADER_FIELDS = [(0, 8), (8, 8), (16, 8), (24, 4), (28, 4), (32, 4), (36, 4), (40, 16), (56, 4), (60, 4),
                 (64, 512)]
LOCATOR_FIELDS = [(0, 4), (4, 4), (8, 4), (12, 4), (16, 8)]
INTERESTING = [0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0x100, 511, 512, 513, 1024, 1536, 4096, 0x8000, 0xFFFF, 0x10000,
               0x200000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 1 << 32, (1 << 32) + 512, 1 << 40,
               2040 << 30, (2040 << 30) + 512, 1 << 62, 1 << 63, (1 << 64) - 1, (1 << 64) - 512, 0x00010000,
               0x00020000, 0x636F6E6563746978, 0x6378737061727365, 0x57327275, 0x57326B75]


def load_seeds() -> list[tuple[str, dict[str, bytes]]]:
    """(target name, every corpus file) per seed: a differencing child needs its parent beside it."""
    files = {p.name: p.read_bytes() for p in sorted(CORPUS.glob("*.vhd"))}
    targets = [name for name in files if not name.startswith("parent-")]
    return [(name, files) for name in targets]


class Reader:
    """Draws fields from the program bytes; past the end every draw is zero."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out + bytes(n - len(out))

    def u8(self) -> int:
        return self.take(1)[0]

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def value(self) -> int:
        idx = self.u8()
        if idx == 0xFF:
            return self.uint(8)
        return INTERESTING[idx % len(INTERESTING)]


def _put(buf: bytearray, offset: int, width: int, value: int) -> None:
    if offset < 0 or offset + width > len(buf):
        return
    buf[offset : offset + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big")


def _footer_offsets(buf: bytearray, copy: int) -> list[int]:
    trailing = len(buf) - 512
    return {0: [trailing], 1: [0], 2: [trailing, 0]}[copy % 3] if len(buf) >= 512 else []


def _header_offset(buf: bytearray) -> int:
    if len(buf) < 512:
        return -1
    return int.from_bytes(buf[len(buf) - 512 + 16 : len(buf) - 512 + 24], "big")


def fix_checksums(buf: bytearray) -> None:
    for off in {0, len(buf) - 512}:
        if 0 <= off and off + 512 <= len(buf):
            _put(buf, off + 64, 4, checksum(buf[off : off + 512], 64))
    hoff = _header_offset(buf)
    if 0 <= hoff and hoff + 1024 <= len(buf):
        _put(buf, hoff + 36, 4, checksum(buf[hoff : hoff + 1024], 36))


def mutate(seed: bytes, program: Reader) -> tuple[bytes, bool, bool]:
    """Apply the program to a seed image; returns (image, fix checksums, read-write phase)."""
    flags = program.u8()
    buf = bytearray(seed)
    ops = 0
    while not program.done and ops < 64:
        ops += 1
        op = program.u8() % 6
        if op == 0:
            copy = program.u8()
            off, width = FOOTER_FIELDS[program.u8() % len(FOOTER_FIELDS)]
            value = program.value()
            for base in _footer_offsets(buf, copy):
                _put(buf, base + off, width, value)
        elif op == 1:
            off, width = HEADER_FIELDS[program.u8() % len(HEADER_FIELDS)]
            _put(buf, _header_offset(buf) + off, width, program.value())
        elif op == 2:
            where = program.uint(4)
            n = program.u8() % 16 + 1
            data = program.take(n)
            if buf:
                where %= len(buf)
                buf[where : where + n] = data[: len(buf) - where]
        elif op == 3:
            cut = program.uint(2)
            del buf[max(0, len(buf) - cut) :]
        elif op == 4:
            index = program.uint(2)
            value = program.value()
            hoff = _header_offset(buf)
            if 0 <= hoff and hoff + 1024 <= len(buf):
                table = int.from_bytes(buf[hoff + 16 : hoff + 24], "big")
                _put(buf, table + 4 * index, 4, value)
        else:
            loc = program.u8() % 8
            off, width = LOCATOR_FIELDS[program.u8() % len(LOCATOR_FIELDS)]
            _put(buf, _header_offset(buf) + 576 + 24 * loc + off, width, program.value())
    fix = bool(flags & 1)
    if fix:
        fix_checksums(buf)
    return bytes(buf), fix, bool(flags & 2)


SEEDS = load_seeds()
# Bugs already pinned by xfail tests, as (exception type, function on the stack).  Exploratory
# runs set VHDFUZZ_SKIP_KNOWN=1 to look past them; CI never does.
KNOWN_BUGS: list[tuple[type[BaseException], str]] = []


def is_known(exc: BaseException) -> bool:
    names = {frame.name for frame in traceback.extract_tb(exc.__traceback__)}
    return any(isinstance(exc, kind) and where in names for kind, where in KNOWN_BUGS)


def run(data: bytes) -> None:
    """The fuzz target (module docstring)."""
    program = Reader(data)
    name, files = SEEDS[program.u8() % len(SEEDS)]
    image_bytes, _, read_write = mutate(files[name], program)
    try:
        with time_limit(TIME_LIMIT):
            exercise(name, image_bytes, files, read_write)
    except (BoundsViolation, OverflowError) as exc:
        if os.environ.get("VHDFUZZ_SKIP_KNOWN") == "1" and is_known(exc):
            return
        raise


def _factory(target: str, image_bytes: bytes, files: dict[str, bytes]) -> tuple[FaultFactory, dict[str, MemoryDisk]]:
    disks = {f"{ROOT}/{n}": MemoryDisk(content) for n, content in files.items()}
    disks[target] = MemoryDisk(image_bytes)
    return FaultFactory(MemoryFileFactory(disks)), disks


def exercise(name: str, image_bytes: bytes, files: dict[str, bytes], read_write: bool) -> None:
    target = f"{ROOT}/{name}"
    faults, disks = _factory(target, image_bytes, files)
    try:
        with open_image(target, read_only=True, lock=False, file_factory=faults) as image:
            size = image.size
            image.info()
            for offset in {0, size // 2, max(0, size - 4096)}:
                length = min(65536, size - offset)
                got = image.read(offset, length)
                assert len(got) == length, f"read {length}@{offset} returned {len(got)} bytes"
    except VhdblkError:
        pass
    try:
        report = check_image(target, lock=False, file_factory=faults)
        assert report.problems == report.remaining
    except VhdblkError:
        pass
    assert bytes(disks[target].data) == image_bytes, "a read-only open or check changed the file"
    assert not disks[target].ops, "a read-only open or check wrote"
    if not read_write:
        return
    try:
        with open_image(target, lock=False, file_factory=faults) as image:
            size = image.size
            if size >= 1024:
                image.discard(0, min(size, 8192))
                image.write(size - 700, b"\xa5" * 600)
                if size >= 2048:  # a second write that does not overlap the first
                    image.write(100, b"\x5a" * 600)
                image.flush()
    except VhdblkError:
        return
    if size < 1024:
        return
    # What opened and closed read-write must open again and hold what was written.
    try:
        with open_image(target, read_only=True, lock=False, file_factory=faults) as image:
            assert bytes(image.read(size - 700, 600)) == b"\xa5" * 600
    except VhdblkError as exc:
        # Only a missing/mismatched parent may still refuse (the child was fine before).
        assert type(exc).__name__ == "ParentError", f"image unreadable after a read-write session: {exc}"


def encode_value(value: int) -> bytes:
    if value in INTERESTING:
        return bytes([INTERESTING.index(value)])
    return b"\xff" + struct.pack(">Q", value & ((1 << 64) - 1))

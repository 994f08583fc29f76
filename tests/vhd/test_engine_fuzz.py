"""Random damage to valid images: only typed errors, never a crash, a stray read or a write."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from vhdblkd.errors import VhdError
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_differencing, create_dynamic
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.memfile import MemoryDisk, MemoryFileFactory

BS = 4096
SIZE = 40 * BS


def _template(kind: str) -> dict[str, bytes]:
    disks: dict[str, MemoryDisk] = {}
    factory = MemoryFileFactory(disks)
    create_dynamic("/m/base.vhd", SIZE, block_size=BS, exact_size=True, file_factory=factory)
    with open_image("/m/base.vhd", lock=False, file_factory=factory) as image:
        for i in range(0, 40, 3):
            image.write(i * BS + 700, bytes([i]) * 3000)
    if kind == "differencing":
        create_differencing("/m/child.vhd", "/m/base.vhd", lock=False, file_factory=factory)
        with open_image("/m/child.vhd", lock=False, file_factory=factory) as image:
            for i in range(1, 40, 4):
                image.write(i * BS + 100, b"c" * 700)
    return {path: bytes(disk.data) for path, disk in disks.items()}


TEMPLATES = {kind: _template(kind) for kind in ("dynamic", "differencing")}


@settings(max_examples=300)
@given(kind=st.sampled_from(sorted(TEMPLATES)),
       damage=st.lists(st.tuples(st.integers(0, 4095), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4),
       tail_damage=st.booleans(), cut=st.integers(0, 3 * BS))
def test_damaged_images_fail_cleanly(kind: str, damage: list[tuple[int, bytes]], tail_damage: bool, cut: int) -> None:
    files = TEMPLATES[kind]
    target = "/m/child.vhd" if kind == "differencing" else "/m/base.vhd"
    raw = bytearray(files[target])
    for offset, data in damage:
        if tail_damage:
            offset = len(raw) - 1 - offset % 512
        raw[offset : offset + len(data)] = data
        del raw[len(files[target]):]
    if cut:
        del raw[len(raw) - cut:]
    disks = {path: MemoryDisk(content) for path, content in files.items()}
    disks[target] = MemoryDisk(bytes(raw))
    factory = MemoryFileFactory(disks)
    before = hashlib.sha256(bytes(raw)).digest()
    try:
        with open_image(target, read_only=True, lock=False, file_factory=factory) as image:
            for offset in range(0, image.size, 7 * BS + 123):
                assert len(image.read(offset, min(3 * BS, image.size - offset))) == min(3 * BS, image.size - offset)
    except VhdError:
        pass
    report = check_image(target, lock=False, file_factory=factory)
    assert report.problems == report.remaining
    assert hashlib.sha256(bytes(disks[target].data)).digest() == before
    assert not disks[target].ops
    # A read-write open either refuses or leaves an image that checks clean.
    try:
        with open_image(target, lock=False, file_factory=factory) as image:
            image.write(0, b"w" * 600)
    except VhdError:
        return
    after = check_image(target, lock=False, file_factory=factory)
    assert after.clean or all(p.code in ("locator",) for p in after.problems), after.problems

"""merge and snapshot: the parent ends up showing what the child showed, even after a crash."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.vhd.test_compact import crash_states, fill, read_all
from vhdblkd.errors import ImageLocked, UnsupportedImage
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_dynamic, create_fixed
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.lock import ImageLock
from vhdblkd.vhd.memfile import MemoryDisk, MemoryFileFactory
from vhdblkd.vhd.merge import merge, snapshot

K = 1024
BS = 64 * K
SIZE = 16 * BS

PARENT_WRITES = [(0, b"\x01" * BS), (3 * BS, b"\x03" * BS), (9 * BS, b"\x09" * 4096)]
CHILD_WRITES = [(512, b"child" * 200), (3 * BS + 100, b"\x33" * 3000), (6 * BS, b"\x66" * BS),
                (9 * BS, bytes(1024)), (15 * BS + BS - 512, b"\xee" * 512)]


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_merge_folds_the_child_into_the_parent(kind: str, tmp_path: Path) -> None:
    parent = str(tmp_path / "p.vhd")
    child = str(tmp_path / "c.vhd")
    if kind == "fixed":
        create_fixed(parent, SIZE, exact_size=True)
    else:
        create_dynamic(parent, SIZE, block_size=BS, exact_size=True)
    model = bytearray(SIZE)
    fill(parent, model, PARENT_WRITES)
    snapshot(parent, child)
    fill(child, model, CHILD_WRITES)
    assert read_all(child) == model
    seen: list[tuple[int, int]] = []
    r = merge(child, progress=lambda d, t: seen.append((d, t)))
    blocks = 5 if kind == "dynamic" else 1  # a child of a fixed disk has 2 MiB blocks
    assert r.parent == parent and r.blocks_merged == blocks
    assert r.bytes_merged == 1024 + 3584 + BS + 1024 + 512  # whole sectors, as the bitmaps say
    assert seen[-1] == (blocks, blocks)
    assert check_image(parent).clean and check_image(child).clean
    assert read_all(parent) == model
    assert read_all(child) == model  # the child still opens and adds nothing now
    again = merge(child)
    assert again.bytes_merged == r.bytes_merged and read_all(parent) == model


@pytest.mark.peers
def test_qemu_reads_the_merged_parent(tmp_path: Path) -> None:
    parent = str(tmp_path / "p.vhd")
    child = str(tmp_path / "c.vhd")
    create_dynamic(parent, SIZE, block_size=BS, exact_size=True)
    model = bytearray(SIZE)
    fill(parent, model, PARENT_WRITES)
    snapshot(parent, child)
    fill(child, model, CHILD_WRITES)
    merge(child)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    info = subprocess.run(["qemu-img", "info", "-f", "vpc", parent], capture_output=True, text=True, check=True)
    assert f"({SIZE} bytes)" in info.stdout
    subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", parent, str(raw)], check=True,
                   capture_output=True)


def test_merge_refusals(tmp_path: Path) -> None:
    parent = str(tmp_path / "p.vhd")
    child = str(tmp_path / "c.vhd")
    create_dynamic(parent, SIZE, block_size=BS)
    with pytest.raises(UnsupportedImage, match="differencing"):
        merge(parent)
    snapshot(parent, child)
    holder = ImageLock(child, exclusive=False)
    try:
        with pytest.raises(ImageLocked):
            merge(child)
    finally:
        holder.release()
    # A parent attached read-write elsewhere refuses the merge too (and the snapshot).
    holder = ImageLock(parent, exclusive=True)
    try:
        with pytest.raises(ImageLocked):
            merge(child)
        with pytest.raises(ImageLocked):
            snapshot(parent, str(tmp_path / "c2.vhd"))
    finally:
        holder.release()


def test_every_crash_point_of_merge_leaves_both_valid_and_rerun_finishes() -> None:
    disks: dict[str, MemoryDisk] = {}
    factory = MemoryFileFactory(disks)
    parent, child = "/mem/p.vhd", "/mem/c.vhd"
    create_dynamic(parent, SIZE, block_size=BS, exact_size=True, file_factory=factory)
    before = bytearray(SIZE)
    fill(parent, before, PARENT_WRITES, lock=False, file_factory=factory)
    snapshot(parent, child, lock=False, file_factory=factory)
    model = bytearray(before)
    fill(child, model, CHILD_WRITES, lock=False, file_factory=factory)
    pdisk = MemoryDisk(bytes(disks[parent].data))
    cdisk = MemoryDisk(bytes(disks[child].data))
    disks[parent], disks[child] = pdisk, cdisk
    merge(child, lock=False, file_factory=factory)
    assert not cdisk.ops or all(op.kind != "truncate" for op in cdisk.ops)
    child_before = cdisk.initial
    states = crash_states(pdisk.ops)
    assert len(states) > 10
    for i, ops in enumerate(states):
        trial = {parent: MemoryDisk(pdisk.replay(ops)), child: MemoryDisk(child_before)}
        tf = MemoryFileFactory(trial)
        with open_image(parent, lock=False, file_factory=tf) as image:  # recovery
            got = bytes(image.read(0, image.size))
        # Every sector is either the parent's old content or the child's: never anything else.
        for off in range(0, SIZE, 512):
            assert got[off : off + 512] in (before[off : off + 512], model[off : off + 512]), (i, off)
        assert check_image(parent, lock=False, file_factory=tf).clean
        if i % 7 == 0:  # rerunning finishes the job
            merge(child, lock=False, file_factory=tf)
            with open_image(parent, read_only=True, lock=False, file_factory=tf) as image:
                assert bytes(image.read(0, image.size)) == model

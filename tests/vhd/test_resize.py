"""resize: grow and shrink fixed and dynamic images; the data and the checks agree."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.vhd.test_compact import assert_recovers, crash_states, fill, read_all
from vhdblkd.errors import ImageLocked, UnsupportedImage
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_differencing, create_dynamic, create_fixed
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.layout import scan
from vhdblkd.vhd.lock import ImageLock
from vhdblkd.vhd.memfile import MemoryDisk, MemoryFileFactory
from vhdblkd.vhd.merge import merge
from vhdblkd.vhd.resize import DataLoss, resize

K = 1024
M = 1024 * K
BS = 64 * K


def qemu_size(path: str) -> int:
    out = subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", path],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)["virtual-size"])


def qemu_compare(path: str, model: bytes, tmp_path: Path) -> None:
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", path, str(raw)], check=True,
                   capture_output=True)


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_grow_keeps_data_and_reads_zeros_beyond(kind: str, tmp_path: Path) -> None:
    path = str(tmp_path / "x.vhd")
    if kind == "fixed":
        create_fixed(path, 1 * M, exact_size=True)
    else:
        create_dynamic(path, 1 * M, block_size=BS, exact_size=True)
    model = bytearray(1 * M)
    fill(path, model, [(0, b"\x01" * BS), (5 * BS + 7 * 512, b"hello" * 100), (M - 512, b"\x09" * 512)])
    r = resize(path, 40 * M)  # the BAT outgrows its sector: block 0 must move
    assert (r.old_size, r.new_size) == (M, 40 * M)
    if kind == "dynamic":
        assert r.blocks_moved >= 1
    model.extend(bytes(39 * M))
    assert check_image(path).clean
    assert read_all(path) == model


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_shrink_needs_flags(kind: str, tmp_path: Path) -> None:
    path = str(tmp_path / "x.vhd")
    if kind == "fixed":
        create_fixed(path, 4 * M, exact_size=True)
    else:
        create_dynamic(path, 4 * M, block_size=BS, exact_size=True)
    model = bytearray(4 * M)
    fill(path, model, [(0, b"\x01" * BS), (3 * M, b"\x02" * 4096)])
    with pytest.raises(UnsupportedImage, match="--shrink"):
        resize(path, 2 * M)
    with pytest.raises(DataLoss, match="--yes"):
        resize(path, 2 * M, shrink=True)
    assert read_all(path) == model  # a refusal changes nothing
    r = resize(path, 2 * M + 512, shrink=True, discard_data=True)
    assert r.data_discarded and r.new_size == 2 * M + 512
    assert check_image(path).clean
    assert read_all(path) == model[: 2 * M + 512]
    # Growing again shows zeros where the cut-off data was.
    resize(path, 4 * M)
    assert read_all(path) == model[: 2 * M + 512] + bytes(2 * M - 512)


def test_shrink_of_an_empty_range_needs_no_yes(tmp_path: Path) -> None:
    path = str(tmp_path / "x.vhd")
    create_dynamic(path, 4 * M, block_size=BS, exact_size=True)
    model = bytearray(4 * M)
    fill(path, model, [(0, b"\x01" * BS), (3 * M, bytes(BS))])  # zeros past the cut: no loss
    r = resize(path, M, shrink=True)
    assert not r.data_discarded
    assert check_image(path).clean
    assert read_all(path) == model[:M]


def test_differencing_shrink_and_locked_images_are_refused(tmp_path: Path) -> None:
    parent = str(tmp_path / "p.vhd")
    child = str(tmp_path / "c.vhd")
    create_dynamic(parent, M, block_size=BS, exact_size=True)
    create_differencing(child, parent)
    with pytest.raises(UnsupportedImage, match="can grow but not shrink"):
        resize(child, M // 2, shrink=True, discard_data=True)
    holder = ImageLock(parent, exclusive=True)
    try:
        with pytest.raises(ImageLocked):
            resize(parent, 2 * M)
    finally:
        holder.release()


def make_chain(parent: str, child: str, model: bytearray, **kw: object) -> bytes:
    """A 1 MiB parent with data and a child holding data of its own, some over the parent's.

    Returns what the parent alone reads."""
    factory = {k: v for k, v in kw.items() if k == "file_factory"}  # create_dynamic takes no lock option
    create_dynamic(parent, M, block_size=BS, exact_size=True, **factory)  # type: ignore[arg-type]  # test options
    fill(parent, model, [(0, b"\x01" * BS), (BS, b"\x02" * BS), (M - 512, b"\x09" * 512)], **kw)
    parent_model = bytes(model)
    create_differencing(child, parent, **kw)  # type: ignore[arg-type]  # test options
    fill(child, model, [(BS + 1024, b"\x05" * 2048), (9 * BS, b"\x03" * 512)], **kw)
    return parent_model


def locator_offsets(path: str) -> list[int]:
    f = ImageFile(path, False)
    try:
        header = scan(f, path).header
    finally:
        f.close()
    assert header is not None
    return [loc.platform_data_offset for loc in header.parent_locators if loc.used]


def test_grow_a_differencing_child(tmp_path: Path) -> None:
    parent, child = str(tmp_path / "p.vhd"), str(tmp_path / "c.vhd")
    model = bytearray(M)
    parent_model = make_chain(parent, child, model)
    before = locator_offsets(child)
    r = resize(child, 40 * M)  # the BAT outgrows the room before the parent locators
    after = locator_offsets(child)
    assert before and all(a > b for a, b in zip(after, before, strict=False))  # the locators moved past the new BAT
    assert (r.disk_type, r.old_size) == ("differencing", M) and r.new_size >= 40 * M  # CHS-rounded
    assert r.blocks_moved >= 1
    model.extend(bytes(r.new_size - M))
    report = check_image(child)
    assert report.clean, report.problems
    assert read_all(child) == model
    assert read_all(parent) == parent_model  # the parent is untouched
    fill(child, model, [(M - 1024, b"\x07" * 4096), (39 * M, b"\x08" * 512)])  # across and past the old end
    assert read_all(child) == model
    assert check_image(child).clean


def test_merge_of_a_grown_child_is_refused_until_the_parent_grows(tmp_path: Path) -> None:
    parent, child = str(tmp_path / "p.vhd"), str(tmp_path / "c.vhd")
    model = bytearray(M)
    make_chain(parent, child, model)
    resize(child, 2 * M)
    with pytest.raises(UnsupportedImage, match="resize the parent"):
        merge(child)
    grown = resize(parent, resize(child, 2 * M).new_size).new_size
    merge(child, allow_unsafe_parent=True)
    assert read_all(parent) == model + bytes(grown - M)


def test_every_crash_point_of_a_differencing_grow_recovers() -> None:
    disks: dict[str, MemoryDisk] = {}
    factory = MemoryFileFactory(disks)
    parent, path = "/mem/p.vhd", "/mem/c.vhd"
    model = bytearray(M)
    make_chain(parent, path, model, lock=False, file_factory=factory)
    disk = MemoryDisk(bytes(disks[path].data))
    disks[path] = disk
    r = resize(path, 40 * M, lock=False, file_factory=factory)
    assert r.blocks_moved >= 1
    states = crash_states(disk.ops)
    assert len(states) > 20
    sizes: set[int] = set()
    for ops in states:
        state = disk.replay(ops)
        probe = MemoryFileFactory({**disks, path: MemoryDisk(state)})
        with open_image(path, read_only=True, lock=False, file_factory=probe) as image:
            size = image.size
        assert size in (M, r.new_size)
        sizes.add(size)
        assert_recovers(disks, path, state, bytes(model) + bytes(size - M))
    assert sizes == {M, r.new_size}


@pytest.mark.peers
@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_qemu_reads_the_resized_image(kind: str, tmp_path: Path) -> None:
    path = str(tmp_path / "x.vhd")
    if kind == "fixed":
        create_fixed(path, 3 * M)
    else:
        create_dynamic(path, 3 * M, block_size=BS)
    with_size = qemu_size(path)
    model = bytearray(with_size)
    fill(path, model, [(0, b"\x01" * BS), (2 * M, b"\x02" * 4096)])
    r = resize(path, 50 * M)
    assert qemu_size(path) == r.new_size >= 50 * M
    model.extend(bytes(r.new_size - len(model)))
    qemu_compare(path, bytes(model), tmp_path)
    r = resize(path, 2 * M, shrink=True, discard_data=True)
    assert qemu_size(path) == r.new_size
    qemu_compare(path, bytes(model[: r.new_size]), tmp_path)


def test_every_crash_point_of_a_dynamic_grow_recovers() -> None:
    disks: dict[str, MemoryDisk] = {}
    factory = MemoryFileFactory(disks)
    path = "/mem/d.vhd"
    create_dynamic(path, M, block_size=BS, exact_size=True, file_factory=factory)
    model = bytearray(M)
    fill(path, model, [(0, b"\x01" * BS), (BS, b"\x02" * BS), (9 * BS, b"\x03" * 512)], lock=False,
         file_factory=factory)
    disk = MemoryDisk(bytes(disks[path].data))
    disks[path] = disk
    r = resize(path, 40 * M, lock=False, file_factory=factory)
    assert r.blocks_moved >= 1
    for ops in crash_states(disk.ops):
        state = disk.replay(ops)
        # Old size or new: either way the first megabyte is the model and the rest zeros.
        probe = MemoryFileFactory({path: MemoryDisk(state)})
        with open_image(path, read_only=True, lock=False, file_factory=probe) as image:
            size = image.size
        assert size in (M, 40 * M)
        assert_recovers(disks, path, state, bytes(model) + bytes(size - M))


def test_every_crash_point_of_a_dynamic_shrink_recovers() -> None:
    disks: dict[str, MemoryDisk] = {}
    factory = MemoryFileFactory(disks)
    path = "/mem/d.vhd"
    create_dynamic(path, 2 * M, block_size=BS, exact_size=True, file_factory=factory)
    model = bytearray(2 * M)
    # Blocks past the cut are allocated but hold zeros: no --yes needed, nothing may be lost.
    fill(path, model, [(0, b"\x01" * BS), (20 * BS, bytes(BS)), (2 * BS, b"\x02" * 512), (25 * BS, bytes(BS)),
                       (3 * BS, b"\x03" * BS)], lock=False, file_factory=factory)
    disk = MemoryDisk(bytes(disks[path].data))
    disks[path] = disk
    resize(path, 5 * BS, shrink=True, lock=False, file_factory=factory)
    states = crash_states(disk.ops)
    assert len(states) > 5
    for ops in states:
        state = disk.replay(ops)
        probe = MemoryFileFactory({path: MemoryDisk(state)})
        with open_image(path, read_only=True, lock=False, file_factory=probe) as image:
            size = image.size
        assert size in (5 * BS, 2 * M)
        assert_recovers(disks, path, state, bytes(model[:size]))

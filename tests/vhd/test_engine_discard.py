"""Whole-block discard frees the block; gaps are closed crash-safely."""

from __future__ import annotations

import shutil
from pathlib import Path

from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_differencing, create_dynamic
from vhdblkd.vhd.image import open_image

MiB = 1024 * 1024
BS = 2 * MiB


def _fill(path: Path, blocks: int) -> None:
    with open_image(str(path)) as image:
        for b in range(blocks):
            image.write(b * BS, bytes([b + 1]) * BS)
        image.flush()


def test_whole_block_discard_frees_middle_block_and_compacts(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_dynamic(str(path), 16 * MiB)
    _fill(path, 4)
    size_before = path.stat().st_size
    with open_image(str(path)) as image:
        assert image.allocated_blocks == 4
        image.discard(1 * BS, BS)          # whole block in the middle
        image.discard(2 * BS + 512, 4096)  # partial: stays allocated, reads zeros
        assert image.allocated_blocks == 3
        assert bytes(image.read(1 * BS, BS)) == bytes(BS)
        image.flush()
    assert path.stat().st_size == size_before - BS - 512  # one block (data + bitmap sector) less
    report = check_image(str(path))
    assert report.clean, report.problems
    with open_image(str(path), read_only=True) as image:
        assert image.allocated_blocks == 3
        assert bytes(image.read(0, BS)) == b"\x01" * BS
        assert bytes(image.read(BS, BS)) == bytes(BS)
        part = bytes(image.read(2 * BS, BS))
        assert part[:512] == b"\x03" * 512 and part[512:4608] == bytes(4096)
        assert part[4608:] == b"\x03" * (BS - 4608)
        assert bytes(image.read(3 * BS, BS)) == b"\x04" * BS


def test_freed_block_can_be_written_again(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_dynamic(str(path), 16 * MiB)
    _fill(path, 3)
    with open_image(str(path)) as image:
        image.discard(0, BS)
        image.flush()
        image.write(0, b"\xaa" * 4096)
        assert image.allocated_blocks == 3
    assert check_image(str(path)).clean
    with open_image(str(path), read_only=True) as image:
        got = bytes(image.read(0, BS))
        assert got[:4096] == b"\xaa" * 4096 and got[4096:] == bytes(BS - 4096)
        assert bytes(image.read(2 * BS, BS)) == b"\x03" * BS


def test_crash_after_discard_flush_leaves_a_leak_the_next_open_repairs(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    crashed = tmp_path / "crashed.vhd"
    create_dynamic(str(path), 16 * MiB)
    _fill(path, 3)
    image = open_image(str(path))
    image.discard(0, BS)
    image.flush()
    shutil.copyfile(path, crashed)  # the file as a crash right after the flush leaves it
    image.close()
    assert not check_image(str(crashed)).clean  # the freed slot is leaked space until repaired
    with open_image(str(crashed)) as again:
        assert again.allocated_blocks == 2
        assert bytes(again.read(0, BS)) == bytes(BS)
        assert bytes(again.read(BS, BS)) == b"\x02" * BS
        assert bytes(again.read(2 * BS, BS)) == b"\x03" * BS
    assert check_image(str(crashed)).clean
    assert crashed.stat().st_size == path.stat().st_size


def test_crash_before_flush_keeps_the_block(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    crashed = tmp_path / "crashed.vhd"
    create_dynamic(str(path), 16 * MiB)
    _fill(path, 2)
    image = open_image(str(path))
    image.discard(0, BS)
    shutil.copyfile(path, crashed)  # BAT change not durable: the block is still referenced
    image.close()
    assert check_image(str(crashed)).clean
    with open_image(str(crashed), read_only=True) as again:
        assert bytes(again.read(0, BS)) == bytes(BS)  # the data was punched out already
        assert bytes(again.read(BS, BS)) == b"\x02" * BS


def test_differencing_whole_discard_reads_zeros_not_parent(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    child = tmp_path / "child.vhd"
    create_dynamic(str(base), 16 * MiB)
    _fill(base, 2)
    create_differencing(str(child), str(base))
    with open_image(str(child)) as image:
        image.discard(0, BS)
        assert image.allocated_blocks == 1
        assert bytes(image.read(0, BS)) == bytes(BS)
    assert check_image(str(child)).clean
    with open_image(str(child), read_only=True) as image:
        assert bytes(image.read(0, BS)) == bytes(BS)
        assert bytes(image.read(BS, BS)) == b"\x02" * BS

"""A wholly discarded block of a dynamic image is given back: BAT entry freed, file compacted."""

from __future__ import annotations

import os
from pathlib import Path

from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_dynamic, create_differencing
from vhdblkd.vhd.image import open_image

KiB = 1024
BS = 64 * KiB


def _fill(path: Path, blocks: int) -> bytearray:
    model = bytearray(blocks * BS)
    with open_image(str(path)) as img:
        for b in range(blocks):
            data = bytes([b + 1]) * BS
            img.write(b * BS, data)
            model[b * BS : (b + 1) * BS] = data
        img.flush()
    return model


def test_middle_block_discard_frees_and_compacts(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_dynamic(str(path), 8 * BS, block_size=BS, exact_size=True)
    model = _fill(path, 4)
    size_before = os.path.getsize(path)
    with open_image(str(path)) as img:
        img.discard(1 * BS, BS)  # a whole block in the middle of the file
        img.discard(2 * BS + 512, 1024)  # a partial discard only zeroes
        model[1 * BS : 2 * BS] = bytes(BS)
        model[2 * BS + 512 : 2 * BS + 1536] = bytes(1024)
        assert img.allocated_blocks == 3
        assert bytes(img.read(0, 4 * BS)) == bytes(model[: 4 * BS])
    assert check_image(str(path)).clean
    assert os.path.getsize(path) < size_before  # the gap was closed and the file truncated
    with open_image(str(path), read_only=True) as img:
        assert img.allocated_blocks == 3
        assert bytes(img.read(0, 8 * BS)) == bytes(model) + bytes(4 * BS)


def test_discard_then_rewrite_in_one_session(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_dynamic(str(path), 8 * BS, block_size=BS, exact_size=True)
    model = _fill(path, 3)
    with open_image(str(path)) as img:
        img.discard(0, 2 * BS)
        img.write(BS + 100, b"x" * 300)  # reallocates block 1 at the end of the file
        model[0 : 2 * BS] = bytes(2 * BS)
        model[BS + 100 : BS + 400] = b"x" * 300
        img.flush()
        assert img.allocated_blocks == 2
    assert check_image(str(path)).clean
    with open_image(str(path), read_only=True) as img:
        assert bytes(img.read(0, 3 * BS)) == bytes(model)


def test_differencing_discard_keeps_the_block_reading_zeros(tmp_path: Path) -> None:
    parent = tmp_path / "p.vhd"
    create_dynamic(str(parent), 4 * BS, block_size=BS, exact_size=True)
    _fill(parent, 2)
    child = tmp_path / "c.vhd"
    create_differencing(str(child), str(parent))
    with open_image(str(child)) as img:
        img.discard(0, BS)
        assert bytes(img.read(0, BS)) == bytes(BS)  # zeros, not the parent's data
        assert bytes(img.read(BS, BS)) == bytes([2]) * BS
    assert check_image(str(child)).clean

"""VhdImage.allocated_block_indexes() and data_extents(): what may hold data, through the chain."""

from __future__ import annotations

from pathlib import Path

from vhdblkd.vhd.create import create_differencing, create_dynamic, create_fixed
from vhdblkd.vhd.image import open_image

MiB = 1024 * 1024
BS = 2 * MiB


def test_data_extents_merge_runs_and_follow_the_parent_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    child = tmp_path / "child.vhd"
    create_dynamic(str(base), 16 * MiB)
    with open_image(str(base)) as image:
        assert image.allocated_block_indexes() == [] and list(image.data_extents()) == []
        for b in (0, 1, 5):
            image.write(b * BS, b"x" * 512)
    create_differencing(str(child), str(base))
    with open_image(str(child)) as image:
        image.write(3 * BS + 4096, b"y" * 512)
        image.discard(7 * BS, BS)  # a child keeps discarded blocks: they must hide the parent
        assert image.allocated_block_indexes() == [3, 7]
        assert list(image.data_extents()) == [(0, 2 * BS), (3 * BS, BS), (5 * BS, BS), (7 * BS, BS)]
        assert image.parent is not None and image.parent.allocated_block_indexes() == [0, 1, 5]
    with open_image(str(base)) as image:
        image.discard(0, BS)
        assert list(image.data_extents()) == [(BS, BS), (5 * BS, BS)]


def test_fixed_image_is_all_data(tmp_path: Path) -> None:
    path = tmp_path / "f.vhd"
    create_fixed(str(path), 4 * MiB, exact_size=True)
    with open_image(str(path), read_only=True) as image:
        assert image.allocated_block_indexes() == []
        assert list(image.data_extents()) == [(0, 4 * MiB)]

"""create_fixed / create_dynamic: sizes, creators, layout, progress, limits."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vhdblkd.errors import UnsupportedImage
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_dynamic, create_fixed
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.structs import DynamicHeader, Footer

MiB = 1024 * 1024


def test_fixed_default_rounds_like_qemu_with_our_creator(tmp_path: Path) -> None:
    path = tmp_path / "f.vhd"
    create_fixed(str(path), 100 * MiB)
    assert path.stat().st_size == 104865792 + 512
    footer = Footer.unpack(path.read_bytes()[-512:])
    assert footer.creator_application == b"vhdb"
    assert (footer.cylinders, footer.heads, footer.sectors_per_track) == (1004, 12, 17)
    assert footer.current_size == footer.original_size == 104865792
    assert footer.data_offset == c.FIXED_DATA_OFFSET and footer.disk_type == c.DISK_TYPE_FIXED
    with open_image(str(path), read_only=True) as image:
        assert image.size == 104865792
        assert isinstance(image.read(0, 4096), memoryview)  # zero-copy mmap slice


def test_fixed_exact_and_azure(tmp_path: Path) -> None:
    path = tmp_path / "e.vhd"
    create_fixed(str(path), 100 * MiB + 512, exact_size=True)
    footer = Footer.unpack(path.read_bytes()[-512:])
    assert footer.creator_application == b"qem2" and footer.current_size == 100 * MiB + 512
    assert (footer.cylinders, footer.heads, footer.sectors_per_track) == (65535, 16, 255)
    az = tmp_path / "a.vhd"
    create_fixed(str(az), 100 * MiB + 512, azure=True)
    with open_image(str(az), read_only=True) as image:
        assert image.size == 101 * MiB and image.disk_type == "fixed"


def test_fixed_progress_and_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "p.vhd"
    seen: list[tuple[int, int]] = []
    create_fixed(str(path), 600 * MiB, exact_size=True, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 600 * MiB) and seen[-1] == (600 * MiB, 600 * MiB)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    with pytest.raises(FileExistsError):
        create_fixed(str(path), MiB)
    assert path.stat().st_size == 600 * MiB + 512


def test_too_large_is_refused_with_advice(tmp_path: Path) -> None:
    for create in (create_fixed, create_dynamic):
        with pytest.raises(UnsupportedImage, match="tops out at 2040 GiB; use VHDX for larger disks"):
            create(str(tmp_path / "big.vhd"), 2041 * 1024 * MiB)
        assert not (tmp_path / "big.vhd").exists()


def test_dynamic_layout(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_dynamic(str(path), 100 * MiB)
    raw = path.read_bytes()
    footer = Footer.unpack(raw, len(raw) - 512)
    assert Footer.unpack(raw, 0) == footer
    header = DynamicHeader.unpack(raw, footer.data_offset)
    assert (footer.data_offset, header.table_offset, header.block_size) == (512, 1536, 2 * MiB)
    assert header.max_table_entries == 51  # ceil(104865792 / 2 MiB)
    assert raw[1536 : 1536 + 4 * 51] == b"\xff" * 4 * 51
    assert len(raw) == 1536 + 512 + 512
    assert check_image(str(path)).clean


def test_dynamic_max_size_with_small_file(tmp_path: Path) -> None:
    path = tmp_path / "max.vhd"
    create_dynamic(str(path), c.MAX_VIRTUAL_SIZE, exact_size=True)
    with open_image(str(path)) as image:
        assert image.size == c.MAX_VIRTUAL_SIZE
        assert image.total_blocks == c.MAX_VIRTUAL_SIZE // (2 * MiB)
        image.write(c.MAX_VIRTUAL_SIZE - 512, b"end".ljust(512, b"\0"))
        assert bytes(image.read(c.MAX_VIRTUAL_SIZE - 512, 3)) == b"end"
        assert image.allocated_blocks == 1
    assert path.stat().st_size < 8 * MiB
    assert check_image(str(path)).clean


@pytest.mark.parametrize("block_size", [0, 1000, 512 * MiB])
def test_dynamic_bad_block_size(tmp_path: Path, block_size: int) -> None:
    with pytest.raises(UnsupportedImage, match="power of two"):
        create_dynamic(str(tmp_path / "b.vhd"), MiB, block_size=block_size)


def test_allocation_order_on_disk(tmp_path: Path) -> None:
    """Blocks are appended in write order right after the BAT, footer last."""
    path = tmp_path / "o.vhd"
    create_dynamic(str(path), 8 * MiB, block_size=MiB, exact_size=True)
    with open_image(str(path)) as image:
        image.write(5 * MiB, b"five")
        image.write(1 * MiB, b"one")
    raw = path.read_bytes()
    bat = struct.unpack_from(">8I", raw, 1536)
    first = 2048 // 512
    stride = (512 + MiB) // 512
    assert bat[5] == first and bat[1] == first + stride
    assert [e for i, e in enumerate(bat) if i not in (1, 5)] == [c.BAT_UNUSED] * 6
    assert len(raw) == 2048 + 2 * (512 + MiB) + 512
    assert raw[2048 : 2048 + 512] == b"\xff" * 512  # full bitmap: qemu and we agree on every sector

"""CHS geometry and create-time rounding, against values qemu-img 7.2 produces."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vhdblkd.errors import UnsupportedImage
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.geometry import MAX_GEOMETRY, Geometry, chs_from_sectors, size_for_create, virtual_size
from vhdblkd.vhd.structs import Footer

MiB = 1024 * 1024
GiB = 1024 * MiB

# (requested, size qemu-img stores, geometry) as `qemu-img create -f vpc` wrote them.
QEMU_ROUNDED = [
    (10 * MiB, 10514432, (302, 4, 17)),
    (100 * MiB, 104865792, (1004, 12, 17)),
    (GiB, 1073995776, (2081, 16, 63)),
    (3_000_000_000, 3000066048, (5813, 16, 63)),
    (130 * GiB, 139586437120, (65535, 16, 255)),
]


@pytest.mark.parametrize("requested,stored,chs", QEMU_ROUNDED)
def test_rounding_matches_qemu(requested: int, stored: int, chs: tuple[int, int, int]) -> None:
    size, geometry = size_for_create(requested)
    assert (size, tuple(geometry)) == (stored, chs)


@pytest.mark.parametrize("requested", [10 * MiB, 100 * MiB, 3_000_000_000, 130 * GiB, c.MAX_VIRTUAL_SIZE])
def test_exact_size_uses_max_geometry_like_force_size(requested: int) -> None:
    size, geometry = size_for_create(requested, exact=True)
    assert size == requested and geometry == MAX_GEOMETRY


def chs_from_size(size: int) -> Geometry:
    return chs_from_sectors(size // 512)


def test_chs_from_size_spec_branches() -> None:
    assert chs_from_size(100 * MiB) == (1003, 12, 17)  # rounds down; create rounds up
    assert chs_from_size(20 * MiB) == (602, 4, 17)
    assert chs_from_size(GiB) == (2080, 16, 63)
    assert chs_from_size(c.MAX_VIRTUAL_SIZE) == (65535, 16, 255)
    assert Geometry(1004, 12, 17).total_sectors * 512 == 104865792


def test_rounded_size_is_expressible_and_not_smaller() -> None:
    for requested in range(512, 70 * MiB, 3_333_333):
        size, geometry = size_for_create(requested)
        assert size >= requested
        assert size == geometry.total_sectors * 512
        assert chs_from_size(size) == geometry


def test_sizes_round_up_to_sectors_and_limits() -> None:
    assert size_for_create(1000, exact=True)[0] == 1024
    assert size_for_create(0) == (0, Geometry(0, 0, 0))
    with pytest.raises(UnsupportedImage, match="tops out at 2040 GiB; use VHDX"):
        size_for_create(c.MAX_VIRTUAL_SIZE + 512)


def _f(app: bytes, cur: int, chs: tuple[int, int, int]) -> Footer:
    return Footer(2, 0x10000, 512, 0, app, 0, b"Wi2k", cur, cur, *chs, 3, bytes(16))


@pytest.mark.parametrize("app,expect_chs", [
    (b"vpc ", True), (b"qemu", True), (b"qem2", False), (b"win ", False), (b"d2v ", False),
    (b"tap\0", False), (b"wa\0\0", False), (b"vhdb", False), (b"vs  ", False)])
def test_virtual_size_by_creator(app: bytes, expect_chs: bool) -> None:
    footer = _f(app, 104857600, (1004, 12, 17))
    assert virtual_size(footer) == (104865792 if expect_chs else 104857600)


def test_virtual_size_max_geometry_means_current_size() -> None:
    assert virtual_size(_f(b"qemu", 3 * 10**12 // 512 * 512, (65535, 16, 255))) == 3 * 10**12 // 512 * 512


@pytest.mark.peers
@pytest.mark.parametrize("requested", [10 * MiB, 100 * MiB, 3_000_000_000])
def test_peer_qemu_img_agrees(tmp_path: Path, requested: int) -> None:
    img = tmp_path / "q.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", str(img), str(requested)], check=True)
    info = json.loads(subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", str(img)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["virtual-size"] == size_for_create(requested)[0]

"""Hostile and damaged images: typed errors with useful messages, never a crash or a stray write."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from vhdblkd.errors import CorruptImage, UnsupportedImage, VhdError
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_differencing, create_dynamic, create_fixed
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.structs import DynamicHeader, Footer

BS = 4096
SIZE = 64 * BS
HEADER_AT = 512
BAT_AT = 1536


def make_dynamic(tmp_path: Path, blocks_written: int = 3) -> Path:
    path = tmp_path / "d.vhd"
    create_dynamic(str(path), SIZE, block_size=BS, exact_size=True)
    with open_image(str(path)) as image:
        for i in range(blocks_written):
            image.write(i * 5 * BS + 100, b"data%d" % i * 100)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def patch_header(path: Path, **changes: object) -> None:
    raw = path.read_bytes()
    header = DynamicHeader.unpack(raw, HEADER_AT).replace(**changes)
    patch(path, HEADER_AT, header.pack())


def patch_footers(path: Path, **changes: object) -> None:
    raw = path.read_bytes()
    footer = Footer.unpack(raw, len(raw) - 512).replace(**changes)
    patch(path, len(raw) - 512, footer.pack())
    if footer.disk_type != c.DISK_TYPE_FIXED:
        patch(path, 0, footer.pack())


def bat_entry(path: Path, index: int) -> int:
    return int(struct.unpack_from(">I", path.read_bytes(), BAT_AT + 4 * index)[0])


def set_bat_entry(path: Path, index: int, value: int) -> None:
    patch(path, BAT_AT + 4 * index, struct.pack(">I", value))


def expect(path: Path, error: type[VhdError], *fragments: str, code: str | None = None) -> None:
    """Read-only open and check both fail/report as expected and change nothing."""
    before = digest(path)
    with pytest.raises(error) as info:
        open_image(str(path), read_only=True)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    report = check_image(str(path))
    assert not report.clean
    if code is not None:
        assert code in [p.code for p in report.problems]
    assert digest(path) == before


def test_bat_entry_past_eof(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    set_bat_entry(path, 0, 10**6)
    expect(path, CorruptImage, "BAT entry 0", "past the data area", "restore it from a backup", code="bat-past-eof")
    # The read-write open refuses too, and does not "repair" by truncating data away.
    before = digest(path)
    with pytest.raises(CorruptImage):
        open_image(str(path))
    assert digest(path) == before


def test_bat_entries_overlap(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    set_bat_entry(path, 1, bat_entry(path, 0) + 1)
    expect(path, CorruptImage, "overlapping blocks", code="bat-overlap")


def test_block_overlaps_metadata(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    set_bat_entry(path, 0, 1)  # sector 1: the dynamic header
    expect(path, CorruptImage, "overlapping the dynamic header", code="bat-overlap")


@pytest.mark.parametrize("block_size", [0, 3 * 512, 1000, 512 * 1024 * 1024, 0x80000000])
def test_bad_block_sizes(tmp_path: Path, block_size: int) -> None:
    path = make_dynamic(tmp_path)
    patch_header(path, block_size=block_size)
    expect(path, CorruptImage, "block_size expected a power of two", f"found {block_size}", code="block-size")


def test_max_table_entries_too_small_for_size(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    patch_header(path, max_table_entries=10)
    expect(path, CorruptImage, "max_table_entries expected at least 64", "found 10", code="bat-size")


def test_max_table_entries_overflowing(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    patch_header(path, max_table_entries=0xFFFFFFFF)
    expect(path, CorruptImage, "max_table_entries 4294967295", "larger than the file", code="bat-size")


def test_bat_larger_than_file(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path, blocks_written=0)
    size = path.stat().st_size
    patch_header(path, table_offset=size - 512)
    expect(path, CorruptImage, "table_offset", "does not fit", code="bat-offset")


def test_bat_misaligned(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    patch_header(path, table_offset=BAT_AT + 4)
    expect(path, CorruptImage, "table_offset expected a multiple of 512", code="bat-misaligned")


def test_header_checksum_mismatch(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    patch(path, HEADER_AT + 700, b"\x01")
    expect(path, CorruptImage, "dynamic header at offset 512: field checksum", "vhdblkctl check --repair",
           code="header-checksum")
    report = check_image(str(path), repair=True)
    assert report.repaired and report.clean
    with open_image(str(path), read_only=True) as image:
        assert bytes(image.read(100, 5)) == b"data0"


def test_header_offset_past_eof(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    patch_footers(path, data_offset=1 << 50)
    expect(path, CorruptImage, "data_offset (dynamic header offset)", code="header-offset")


def test_unknown_disk_type(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    patch_footers(path, disk_type=5)
    expect(path, UnsupportedImage, "disk_type expected 2, 3 or 4, found 5")


def test_virtual_size_beyond_2040_gib(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    patch_footers(path, current_size=c.MAX_VIRTUAL_SIZE + 1024 * 1024, original_size=c.MAX_VIRTUAL_SIZE + 1024 * 1024)
    expect(path, UnsupportedImage, "larger than the 2040 GiB")


def test_not_a_vhd(tmp_path: Path) -> None:
    path = tmp_path / "junk.vhd"
    path.write_bytes(bytes(range(256)) * 40)
    expect(path, CorruptImage, "no VHD footer", "not a VHD image")


def test_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.vhd"
    path.write_bytes(b"conectix")
    expect(path, CorruptImage, "too short for a VHD footer")


def test_fixed_footer_checksum_without_backup(tmp_path: Path) -> None:
    path = tmp_path / "f.vhd"
    create_fixed(str(path), SIZE, exact_size=True)
    patch(path, SIZE + 100, b"\x07")
    expect(path, CorruptImage, "field checksum", "no valid copy at offset 0", code="footer-checksum")


def test_fixed_truncated(tmp_path: Path) -> None:
    path = tmp_path / "f.vhd"
    create_fixed(str(path), SIZE, exact_size=True)
    raw = path.read_bytes()
    path.write_bytes(raw[: SIZE // 2] + raw[-512:])
    expect(path, CorruptImage, "the file is truncated", code="truncated")


def test_dynamic_truncated_in_the_blocks(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 512 - BS])
    expect(path, CorruptImage, "past the data area", code="bat-past-eof")


def test_dynamic_footer_damaged_uses_backup(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    size = path.stat().st_size
    patch(path, size - 512 + 200, b"\x55")
    before = digest(path)
    with open_image(str(path), read_only=True) as image:
        assert image.info().footer_checksum_ok is False
        assert bytes(image.read(100, 5)) == b"data0"
    report = check_image(str(path))
    assert [p.code for p in report.problems] == ["footer-checksum"]
    assert "vhdblkctl check --repair" in report.problems[0].message
    assert digest(path) == before
    # A read-write open repairs it from the copy at offset 0.
    with open_image(str(path)) as image:
        assert bytes(image.read(100, 5)) == b"data0"
    assert check_image(str(path)).clean


def test_511_byte_footer(tmp_path: Path) -> None:
    path = tmp_path / "f.vhd"
    create_fixed(str(path), SIZE, exact_size=True)
    with open_image(str(path)) as image:
        image.write(0, b"hello")
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    before = digest(path)
    with open_image(str(path), read_only=True) as image:
        assert bytes(image.read(0, 5)) == b"hello"
    assert [p.code for p in check_image(str(path)).problems] == ["short-footer"]
    assert digest(path) == before
    with open_image(str(path)) as image:
        assert bytes(image.read(0, 5)) == b"hello"
    assert path.stat().st_size == SIZE + 512
    assert check_image(str(path)).clean


def test_stale_footer_copy_is_reported_and_repaired(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    raw = path.read_bytes()
    patch(path, 0, Footer.unpack(raw, len(raw) - 512).replace(timestamp=1).pack())
    report = check_image(str(path))
    assert [p.code for p in report.problems] == ["footer-mismatch"]
    fixed = check_image(str(path), repair=True)
    assert fixed.repaired and fixed.clean
    assert check_image(str(path)).clean


def test_torn_allocation_is_truncated_on_rw_open(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    raw = path.read_bytes()
    # Orphan space: a block's worth of bytes and a second footer after the real end.
    path.write_bytes(raw[:-512] + b"\xaa" * (BS + 512) + raw[-512:])
    assert [p.code for p in check_image(str(path)).problems] == ["torn-allocation"]
    with open_image(str(path)) as image:
        assert bytes(image.read(100, 5)) == b"data0"
    assert path.stat().st_size == len(raw)
    assert check_image(str(path)).clean


def test_reads_never_leave_the_file(tmp_path: Path) -> None:
    """A dynamic image whose every BAT entry is valid but whose file is sparse still reads fully."""
    path = make_dynamic(tmp_path)
    with open_image(str(path), read_only=True) as image:
        data = bytes(image.read(0, SIZE))
    assert data[100:105] == b"data0" and len(data) == SIZE


def test_blocks_referenced_past_the_disk_end_are_not_free_space(tmp_path: Path) -> None:
    """A longer table than the size needs: its extra entries still own their blocks."""
    path = make_dynamic(tmp_path, blocks_written=0)
    raw = bytearray(path.read_bytes())
    header = DynamicHeader.unpack(raw, HEADER_AT)
    # Room for 128 entries exists (the table is padded to a sector); claim 128 and use entry 100.
    stride = 512 + BS
    end = len(raw) - 512
    path.write_bytes(bytes(raw[:end]) + b"\xff" * 512 + b"\x5a" * BS + bytes(raw[-512:]))
    patch_header(path, max_table_entries=128)
    set_bat_entry(path, 100, end // 512)
    assert header.max_table_entries == 64
    report = check_image(str(path))
    assert report.clean, report.problems
    size = path.stat().st_size
    with open_image(str(path)) as image:
        assert image.total_blocks == 64 and image.allocated_blocks == 1
        assert bytes(image.read(0, SIZE)) == bytes(SIZE)
    assert path.stat().st_size == size == end + stride + 512


def test_dynamic_511_byte_footer_is_fixed_on_rw_open(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    with open_image(str(path), read_only=True) as image:
        assert bytes(image.read(100, 5)) == b"data0"
    with open_image(str(path)) as image:
        assert bytes(image.read(100, 5)) == b"data0"
    assert path.read_bytes() == raw


def test_locators_pointing_past_the_file_are_skipped_for_the_next_candidate(tmp_path: Path) -> None:
    parent = make_dynamic(tmp_path, 1)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(parent))
    raw = child.read_bytes()
    header = DynamicHeader.unpack(raw, HEADER_AT)
    far = 2**64 - 4096  # os.pread cannot even be asked for this offset
    locators = tuple(loc.replace(platform_data_offset=far) if loc.used else loc
                     for loc in header.parent_locators)
    assert any(loc.used for loc in locators)
    patch_header(child, parent_locators=locators)
    before = digest(child)
    # Every locator is bad: the parent is still found by the name in the header, beside the child.
    with open_image(str(child), read_only=True) as image:
        assert image.parent is not None and image.parent.path == str(parent)
        assert bytes(image.read(100, 5)) == b"data0"
    report = check_image(str(child))
    assert "locator" in [p.code for p in report.problems]
    assert digest(child) == before

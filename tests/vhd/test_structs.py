"""Round-trip tables and checksum vectors for the VHD structures."""

from __future__ import annotations

import datetime
import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhdblkd.errors import CorruptImage
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.structs import DynamicHeader, Footer, ParentLocator, checksum, uuid_text
from vhdblkd.vhd.timestamp import vhd_timestamp_to_iso


def _footer(**kw: object) -> Footer:
    base: dict[str, object] = dict(
        features=2, file_format_version=0x10000, data_offset=512, timestamp=0x2B5A3C4D,
        creator_application=b"vhdb", creator_version=0x10000, creator_host_os=b"Wi2k",
        original_size=104865792, current_size=104865792, cylinders=1004, heads=12,
        sectors_per_track=17, disk_type=3, unique_id=bytes(range(16)))
    base.update(kw)
    return Footer(**base)  # type: ignore[arg-type]


FOOTERS = [
    _footer(),
    _footer(disk_type=2, data_offset=c.FIXED_DATA_OFFSET),
    _footer(disk_type=4, creator_application=b"win ", creator_host_os=b"Mac ", saved_state=1),
    _footer(cylinders=65535, heads=16, sectors_per_track=255, current_size=c.MAX_VIRTUAL_SIZE,
            original_size=1, creator_application=b"qem2"),
    _footer(unique_id=b"\xff" * 16, timestamp=0xFFFFFFFF, features=3),
]


@pytest.mark.parametrize("footer", FOOTERS)
def test_footer_round_trip(footer: Footer) -> None:
    raw = footer.pack()
    assert len(raw) == Footer.SIZE == 512
    back = Footer.unpack(raw)
    assert back.pack() == raw
    assert back.replace(checksum=0) == footer.replace(checksum=0)
    assert back.checksum == struct.unpack_from(">I", raw, 64)[0]
    # Unpacking at an offset inside a larger buffer.
    assert Footer.unpack(b"\0" * 7 + raw + b"x", 7).pack() == raw


def test_footer_field_offsets() -> None:
    raw = _footer().pack()
    assert raw[0:8] == b"conectix"
    assert struct.unpack_from(">I", raw, 8)[0] == 2
    assert struct.unpack_from(">Q", raw, 16)[0] == 512
    assert raw[28:32] == b"vhdb"
    assert struct.unpack_from(">QQ", raw, 40) == (104865792, 104865792)
    assert struct.unpack_from(">HBB", raw, 56) == (1004, 12, 17)
    assert struct.unpack_from(">I", raw, 60)[0] == 3
    assert raw[68:84] == bytes(range(16))
    assert raw[85:] == bytes(427)


def test_checksum_vectors() -> None:
    assert checksum(b"") == 0xFFFFFFFF
    assert checksum(b"\x01\x02\x03") == 0xFFFFFFF9
    assert checksum(b"\xff" * 512) == (~(255 * 512)) & 0xFFFFFFFF
    # The checksum field itself counts as zero.
    assert checksum(b"\x01\x00\x00\x00\x09", 1) == checksum(b"\x01\x00\x00\x00\x00", 1) == 0xFFFFFFFE
    raw = _footer().pack()
    stored = struct.unpack_from(">I", raw, 64)[0]
    zeroed = raw[:64] + b"\0\0\0\0" + raw[68:]
    assert stored == (~sum(zeroed)) & 0xFFFFFFFF


def test_qemu_footer_vector() -> None:
    """A footer as qemu-img 7.2 wrote it for `create -f vpc -o subformat=fixed x 10M` (unique id zeroed)."""
    f = _footer(disk_type=2, data_offset=c.FIXED_DATA_OFFSET, creator_application=b"qemu",
                creator_version=0x50003, original_size=10514432, current_size=10514432,
                cylinders=302, heads=4, sectors_per_track=17, unique_id=bytes(16), timestamp=0)
    raw = f.pack()
    assert Footer.unpack(raw).checksum == (~sum(raw[:64] + raw[68:])) & 0xFFFFFFFF


def test_footer_bad_cookie_names_field() -> None:
    raw = bytearray(_footer().pack())
    raw[0:8] = b"notvhd!!"
    with pytest.raises(CorruptImage, match=r"offset 0: field cookie expected b'conectix', found b'notvhd!!'"):
        Footer.unpack(raw)


def test_footer_bad_checksum_names_expected_and_found() -> None:
    raw = bytearray(_footer().pack())
    raw[100] ^= 1
    with pytest.raises(CorruptImage, match=r"field checksum \(offset 64\) expected 0x[0-9a-f]{8}, found 0x"):
        Footer.unpack(raw)
    assert Footer.unpack(raw, verify=False).disk_type == 3


def test_footer_short_buffer() -> None:
    with pytest.raises(CorruptImage, match="expected 512 bytes, found 100"):
        Footer.unpack(bytes(100))


LOCATORS = [
    ParentLocator(),
    ParentLocator(b"W2ru", 1, 24, 3072),
    ParentLocator(b"W2ku", 512, 200, 1 << 40, reserved=7),
]


@pytest.mark.parametrize("loc", LOCATORS)
def test_locator_round_trip(loc: ParentLocator) -> None:
    raw = loc.pack()
    assert len(raw) == ParentLocator.SIZE == 24
    assert ParentLocator.unpack(raw) == loc


@pytest.mark.parametrize("space,length,expected", [(1, 24, 512), (2, 600, 1024), (512, 24, 512), (1024, 600, 1024), (700, 10, 0)])
def test_locator_data_space_sectors_or_bytes(space: int, length: int, expected: int) -> None:
    assert ParentLocator(b"W2ru", space, length, 0).data_space_bytes() == expected


HEADERS = [
    DynamicHeader(table_offset=1536, max_table_entries=50, block_size=2 * 1024 * 1024),
    DynamicHeader(table_offset=1536, max_table_entries=1, block_size=512, parent_unique_id=b"\x11" * 16,
                  parent_timestamp=12345, parent_unicode_name="base.vhd".encode("utf-16-be").ljust(512, b"\0"),
                  parent_locators=(ParentLocator(b"W2ru", 1, 22, 2048), ParentLocator(b"W2ku", 1, 40, 2560))
                  + tuple(ParentLocator() for _ in range(6))),
]


@pytest.mark.parametrize("header", HEADERS)
def test_header_round_trip(header: DynamicHeader) -> None:
    raw = header.pack()
    assert len(raw) == DynamicHeader.SIZE == 1024
    assert raw[:8] == b"cxsparse"
    assert struct.unpack_from(">QQIII", raw, 8) == (c.HEADER_DATA_OFFSET, header.table_offset, 0x10000,
                                                    header.max_table_entries, header.block_size)
    back = DynamicHeader.unpack(raw)
    assert back.pack() == raw
    assert back.replace(checksum=0) == header.replace(checksum=0)
    assert raw[576:600] == header.parent_locators[0].pack()
    assert raw[768:] == bytes(256)


def test_header_parent_name_decodes_utf16be() -> None:
    assert HEADERS[1].parent_name == "base.vhd"
    assert HEADERS[0].parent_name == ""


def test_header_checksum_and_cookie_errors() -> None:
    raw = bytearray(HEADERS[0].pack())
    raw[40] ^= 0xFF
    with pytest.raises(CorruptImage, match=r"dynamic header at offset 0: field checksum \(offset 36\)"):
        DynamicHeader.unpack(raw)
    raw[0:8] = b"xxxxxxxx"
    with pytest.raises(CorruptImage, match="field cookie expected b'cxsparse'"):
        DynamicHeader.unpack(raw)


# --- the text forms `info` prints without importing uuid or datetime ------------------------------


@given(st.binary(min_size=16, max_size=16))
def test_uuid_text_is_what_uuid_prints(raw: bytes) -> None:
    assert uuid_text(raw) == str(uuid.UUID(bytes=raw))


@pytest.mark.parametrize("size", [0, 15, 17])
def test_uuid_text_refuses_a_wrong_length(size: int) -> None:
    with pytest.raises(ValueError):
        uuid_text(bytes(size))


@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_timestamp_text_is_what_datetime_prints(timestamp: int) -> None:
    moment = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(seconds=timestamp)
    assert vhd_timestamp_to_iso(timestamp) == moment.strftime("%Y-%m-%dT%H:%M:%SZ")

"""On-disk layouts of the VHD format: footer, dynamic header, parent locator.

Each is a Frozen record (record.py; a frozen dataclass made at import cost
`vhdblkctl info` a tenth) with a class-level big-endian `struct.Struct`.
`unpack` checks the cookie and the checksum and raises CorruptImage naming
the field, offset, expected and found values; `pack` computes the checksum.
"""

from __future__ import annotations

import struct
from typing import ClassVar

from vhdblkd.errors import CorruptImage
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.record import Frozen

_CHECKSUM_FIELD = struct.Struct(">I")


def checksum(buf: bytes | bytearray | memoryview, checksum_offset: int | None = None) -> int:
    """One's complement of the byte sum, with the checksum field counted as zero."""
    total = sum(bytes(buf))
    if checksum_offset is not None:
        total -= sum(bytes(buf[checksum_offset : checksum_offset + 4]))
    return ~total & 0xFFFFFFFF


def uuid_text(raw: bytes) -> str:
    """A 16-byte unique id as str(uuid.UUID(bytes=raw)) prints it; importing uuid costs `info` a twentieth."""
    if len(raw) != 16:
        raise ValueError(f"a unique id is 16 bytes, not {len(raw)}")
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _with_checksum(raw: bytearray, checksum_offset: int) -> bytes:
    _CHECKSUM_FIELD.pack_into(raw, checksum_offset, checksum(raw, checksum_offset))
    return bytes(raw)


def _need(buf: bytes | bytearray | memoryview, offset: int, size: int, what: str) -> None:
    if offset < 0 or len(buf) - offset < size:
        raise CorruptImage(
            f"{what} at offset {offset}: expected {size} bytes, found {max(0, len(buf) - offset)}"
        )


class Footer(Frozen):
    """The 512-byte hard disk footer (also copied at offset 0 of dynamic disks)."""

    __slots__ = ("features", "file_format_version", "data_offset", "timestamp", "creator_application",
                 "creator_version", "creator_host_os", "original_size", "current_size", "cylinders", "heads",
                 "sectors_per_track", "disk_type", "unique_id", "saved_state", "checksum", "cookie")
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")
    SIZE: ClassVar[int] = c.FOOTER_SIZE
    CHECKSUM_OFFSET: ClassVar[int] = 64

    features: int
    file_format_version: int
    data_offset: int
    timestamp: int
    creator_application: bytes
    creator_version: int
    creator_host_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    unique_id: bytes
    saved_state: int
    checksum: int  # as found by unpack; pack() always recomputes
    cookie: bytes

    def __init__(self, features: int, file_format_version: int, data_offset: int, timestamp: int,
                 creator_application: bytes, creator_version: int, creator_host_os: bytes, original_size: int,
                 current_size: int, cylinders: int, heads: int, sectors_per_track: int, disk_type: int,
                 unique_id: bytes, saved_state: int = 0, checksum: int = 0,
                 cookie: bytes = c.FOOTER_COOKIE) -> None:
        self._init(features=features, file_format_version=file_format_version, data_offset=data_offset,
                   timestamp=timestamp, creator_application=creator_application, creator_version=creator_version,
                   creator_host_os=creator_host_os, original_size=original_size, current_size=current_size,
                   cylinders=cylinders, heads=heads, sectors_per_track=sectors_per_track, disk_type=disk_type,
                   unique_id=unique_id, saved_state=saved_state, checksum=checksum, cookie=cookie)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0, *, verify: bool = True) -> Footer:
        _need(buf, offset, cls.SIZE, "footer")
        raw = bytes(buf[offset : offset + cls.SIZE])
        (cookie, features, version, data_offset, timestamp, app, app_ver, host_os, orig, cur,
         cyl, heads, spt, disk_type, found_sum, uid, saved) = cls.STRUCT.unpack(raw)
        if cookie != c.FOOTER_COOKIE:
            raise CorruptImage(
                f"footer at offset {offset}: field cookie expected {c.FOOTER_COOKIE!r}, found {cookie!r}"
            )
        if verify:
            want = checksum(raw, cls.CHECKSUM_OFFSET)
            if want != found_sum:
                raise CorruptImage(
                    f"footer at offset {offset}: field checksum (offset {offset + cls.CHECKSUM_OFFSET}) "
                    f"expected 0x{want:08x}, found 0x{found_sum:08x}"
                )
        return cls(features, version, data_offset, timestamp, app, app_ver, host_os, orig, cur,
                   cyl, heads, spt, disk_type, uid, saved, found_sum, cookie)

    def pack(self) -> bytes:
        raw = bytearray(self.STRUCT.pack(
            self.cookie, self.features, self.file_format_version, self.data_offset, self.timestamp,
            self.creator_application, self.creator_version, self.creator_host_os,
            self.original_size, self.current_size, self.cylinders, self.heads,
            self.sectors_per_track, self.disk_type, 0, self.unique_id, self.saved_state))
        return _with_checksum(raw, self.CHECKSUM_OFFSET)


class ParentLocator(Frozen):
    """One of the eight 24-byte parent locator entries of a dynamic header."""

    __slots__ = ("platform_code", "platform_data_space", "platform_data_length", "platform_data_offset", "reserved")
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">4sIIIQ")
    SIZE: ClassVar[int] = 24

    platform_code: bytes
    platform_data_space: int
    platform_data_length: int
    platform_data_offset: int
    reserved: int

    def __init__(self, platform_code: bytes = c.PLATFORM_NONE, platform_data_space: int = 0,
                 platform_data_length: int = 0, platform_data_offset: int = 0, reserved: int = 0) -> None:
        self._init(platform_code=platform_code, platform_data_space=platform_data_space,
                   platform_data_length=platform_data_length, platform_data_offset=platform_data_offset,
                   reserved=reserved)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> ParentLocator:
        _need(buf, offset, cls.SIZE, "parent locator")
        code, space, length, reserved, data_offset = cls.STRUCT.unpack_from(buf, offset)
        return cls(code, space, length, data_offset, reserved)

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.platform_code, self.platform_data_space,
                                self.platform_data_length, self.reserved, self.platform_data_offset)

    @property
    def used(self) -> bool:
        return self.platform_code != c.PLATFORM_NONE

    def data_space_bytes(self) -> int:
        """The reserved space in bytes: the spec says sectors, some writers store bytes."""
        space = self.platform_data_space
        if space < c.SECTOR_SIZE:
            return space * c.SECTOR_SIZE
        if space % c.SECTOR_SIZE == 0:
            return space
        return 0


_EMPTY_LOCATORS = tuple(ParentLocator() for _ in range(c.PARENT_LOCATOR_COUNT))


class DynamicHeader(Frozen):
    """The 1024-byte dynamic disk header (cookie cxsparse)."""

    __slots__ = ("table_offset", "max_table_entries", "block_size", "parent_unique_id", "parent_timestamp",
                 "parent_unicode_name", "parent_locators", "data_offset", "header_version", "reserved1", "checksum",
                 "cookie")
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">8sQQIIII16sII512s192s256x")
    SIZE: ClassVar[int] = c.HEADER_SIZE
    CHECKSUM_OFFSET: ClassVar[int] = 36

    table_offset: int
    max_table_entries: int
    block_size: int
    parent_unique_id: bytes
    parent_timestamp: int
    parent_unicode_name: bytes  # raw UTF-16BE, NUL padded
    parent_locators: tuple[ParentLocator, ...]
    data_offset: int
    header_version: int
    reserved1: int
    checksum: int  # as found by unpack; pack() always recomputes
    cookie: bytes

    def __init__(self, table_offset: int, max_table_entries: int, block_size: int,
                 parent_unique_id: bytes = bytes(16), parent_timestamp: int = 0,
                 parent_unicode_name: bytes = bytes(c.PARENT_NAME_SIZE),
                 parent_locators: tuple[ParentLocator, ...] = _EMPTY_LOCATORS, data_offset: int = c.HEADER_DATA_OFFSET,
                 header_version: int = c.HEADER_VERSION, reserved1: int = 0, checksum: int = 0,
                 cookie: bytes = c.HEADER_COOKIE) -> None:
        self._init(table_offset=table_offset, max_table_entries=max_table_entries, block_size=block_size,
                   parent_unique_id=parent_unique_id, parent_timestamp=parent_timestamp,
                   parent_unicode_name=parent_unicode_name, parent_locators=parent_locators,
                   data_offset=data_offset, header_version=header_version, reserved1=reserved1, checksum=checksum,
                   cookie=cookie)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0, *, verify: bool = True) -> DynamicHeader:
        _need(buf, offset, cls.SIZE, "dynamic header")
        raw = bytes(buf[offset : offset + cls.SIZE])
        (cookie, data_offset, table_offset, version, max_entries, block_size, found_sum,
         parent_uid, parent_ts, reserved1, name, locs) = cls.STRUCT.unpack(raw)
        if cookie != c.HEADER_COOKIE:
            raise CorruptImage(
                f"dynamic header at offset {offset}: field cookie expected {c.HEADER_COOKIE!r}, found {cookie!r}"
            )
        if verify:
            want = checksum(raw, cls.CHECKSUM_OFFSET)
            if want != found_sum:
                raise CorruptImage(
                    f"dynamic header at offset {offset}: field checksum (offset {offset + cls.CHECKSUM_OFFSET}) "
                    f"expected 0x{want:08x}, found 0x{found_sum:08x}"
                )
        locators = tuple(ParentLocator.unpack(locs, i * ParentLocator.SIZE)
                         for i in range(c.PARENT_LOCATOR_COUNT))
        return cls(table_offset, max_entries, block_size, parent_uid, parent_ts, name, locators,
                   data_offset, version, reserved1, found_sum, cookie)

    def pack(self) -> bytes:
        if len(self.parent_locators) != c.PARENT_LOCATOR_COUNT:
            raise ValueError(f"need exactly {c.PARENT_LOCATOR_COUNT} parent locators")
        locs = b"".join(loc.pack() for loc in self.parent_locators)
        raw = bytearray(self.STRUCT.pack(
            self.cookie, self.data_offset, self.table_offset, self.header_version,
            self.max_table_entries, self.block_size, 0, self.parent_unique_id,
            self.parent_timestamp, self.reserved1, self.parent_unicode_name, locs))
        return _with_checksum(raw, self.CHECKSUM_OFFSET)

    @property
    def parent_name(self) -> str:
        """The parent's unicode name, decoded from UTF-16BE up to the first NUL."""
        raw = self.parent_unicode_name
        end = len(raw)
        for i in range(0, len(raw) - 1, 2):
            if raw[i] == 0 and raw[i + 1] == 0:
                end = i
                break
        return raw[:end].decode("utf-16-be", errors="replace")


"""Constants of the VHD format.

Source: Microsoft "Virtual Hard Disk Image Format Specification" v1.0
(October 2006), plus the creator codes and the 2040 GiB ceiling that QEMU's
block/vpc.c uses.  All on-disk integers are big-endian.
"""

from __future__ import annotations

SECTOR_SIZE = 512

# Footer ("hard disk footer")
FOOTER_COOKIE = b"conectix"
FOOTER_SIZE = 512
FEATURES_RESERVED = 0x00000002  # "always set" per the spec
FEATURES_TEMPORARY = 0x00000001
FILE_FORMAT_VERSION = 0x00010000
FIXED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF

DISK_TYPE_NONE = 0
DISK_TYPE_FIXED = 2
DISK_TYPE_DYNAMIC = 3
DISK_TYPE_DIFFERENCING = 4
DISK_TYPE_NAMES = {
    DISK_TYPE_FIXED: "fixed",
    DISK_TYPE_DYNAMIC: "dynamic",
    DISK_TYPE_DIFFERENCING: "differencing",
}

# Dynamic disk header
HEADER_COOKIE = b"cxsparse"
HEADER_SIZE = 1024
HEADER_VERSION = 0x00010000
HEADER_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
PARENT_NAME_SIZE = 512
PARENT_LOCATOR_COUNT = 8

# Parent locator platform codes
PLATFORM_NONE = b"\0\0\0\0"
PLATFORM_WI2R = b"Wi2r"  # deprecated, relative, ANSI
PLATFORM_WI2K = b"Wi2k"  # deprecated, absolute, ANSI
PLATFORM_W2RU = b"W2ru"  # relative path, UTF-16LE
PLATFORM_W2KU = b"W2ku"  # absolute path, UTF-16LE
PLATFORM_MAC = b"Mac "
PLATFORM_MACX = b"MacX"  # file URL, UTF-8

# Creator applications
CREATOR_VPC = b"vpc "
CREATOR_VIRTUAL_SERVER = b"vs  "
CREATOR_QEMU = b"qemu"  # QEMU, CHS-rounded size
CREATOR_QEMU_FORCE_SIZE = b"qem2"  # QEMU force_size: exact current size
CREATOR_HYPERV = b"win "
CREATOR_DISK2VHD = b"d2v "
CREATOR_DISK2VHD_NUL = b"d2v\0"
CREATOR_XEN = b"tap\0"
CREATOR_CITRIX = b"CTXS"
CREATOR_AZURE = b"wa\0\0"
CREATOR_VHDBLKD = b"vhdb"
CREATOR_VERSION_VHDBLKD = 0x00010000
# Readers that trust the CHS geometry over current size (as QEMU does).
CREATORS_USING_CHS = frozenset({CREATOR_VPC, CREATOR_QEMU})

CREATOR_HOST_OS_WINDOWS = b"Wi2k"
CREATOR_HOST_OS_MAC = b"Mac "

# Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
VHD_EPOCH_OFFSET = 946684800

# Geometry limits
MAX_CYLINDERS = 65535
MAX_HEADS = 16
MAX_SECTORS_PER_TRACK = 255
MAX_GEOMETRY_SECTORS = MAX_CYLINDERS * MAX_HEADS * MAX_SECTORS_PER_TRACK

# QEMU and Hyper-V top out at 2040 GiB (0xFF000000 sectors).
MAX_VIRTUAL_SIZE = 2040 * 1024**3

DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024
MIN_BLOCK_SIZE = SECTOR_SIZE
# Real writers use 512 KiB or 2 MiB; anything larger than this is refused as
# hostile (the sector bitmap and the per-block arithmetic stay bounded).
MAX_BLOCK_SIZE = 256 * 1024 * 1024

BAT_UNUSED = 0xFFFFFFFF
BAT_ENTRY_SIZE = 4

# Zeros are written, and data scanned, at most this much at a time.
CHUNK_SIZE = 1024 * 1024

"""NBD wire constants, named as the protocol and its headers name them.

Sources: the NBD protocol specification `doc/proto.md` and `nbd.h` in the
NetworkBlockDevice/nbd repository, and the kernel's
`include/uapi/linux/nbd.h` (whose `NBD_CMD_FLAG_*` are shifted into the high
half of a 32-bit word; the wire values below are the unshifted 16-bit ones
from proto.md).  The kernel's netlink constants live in `nbd/netlink.py`.
All multi-byte integers travel big-endian.
"""

from __future__ import annotations

from typing import Final

# --- magics -----------------------------------------------------------------

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC", proto.md "INIT_PASSWD"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT", newstyle negotiation and option requests
NBD_OPT_REPLY_MAGIC: Final = 0x3E889045565A9
NBD_REQUEST_MAGIC: Final = 0x25609513
NBD_SIMPLE_REPLY_MAGIC: Final = 0x67446698
NBD_REPLY_MAGIC: Final = NBD_SIMPLE_REPLY_MAGIC  # the kernel header's older name
NBD_STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# --- handshake flags (server, 16 bits) and client flags (32 bits) ------------

NBD_FLAG_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_NO_ZEROES: Final = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE: Final = NBD_FLAG_FIXED_NEWSTYLE
NBD_FLAG_C_NO_ZEROES: Final = NBD_FLAG_NO_ZEROES

# --- option types -------------------------------------------------------------

NBD_OPT_EXPORT_NAME: Final = 1
NBD_OPT_ABORT: Final = 2
NBD_OPT_LIST: Final = 3
NBD_OPT_PEEK_EXPORT: Final = 4  # withdrawn; never used
NBD_OPT_STARTTLS: Final = 5
NBD_OPT_INFO: Final = 6
NBD_OPT_GO: Final = 7
NBD_OPT_STRUCTURED_REPLY: Final = 8
NBD_OPT_LIST_META_CONTEXT: Final = 9
NBD_OPT_SET_META_CONTEXT: Final = 10
NBD_OPT_EXTENDED_HEADERS: Final = 11

# --- option reply types ---------------------------------------------------------

NBD_REP_ACK: Final = 1
NBD_REP_SERVER: Final = 2
NBD_REP_INFO: Final = 3
NBD_REP_META_CONTEXT: Final = 4
NBD_REP_FLAG_ERROR: Final = 1 << 31
NBD_REP_ERR_UNSUP: Final = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY: Final = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID: Final = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM: Final = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD: Final = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN: Final = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN: Final = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD: Final = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG: Final = NBD_REP_FLAG_ERROR | 9

# --- NBD_REP_INFO information types -------------------------------------------

NBD_INFO_EXPORT: Final = 0
NBD_INFO_NAME: Final = 1
NBD_INFO_DESCRIPTION: Final = 2
NBD_INFO_BLOCK_SIZE: Final = 3

# --- transmission flags (16 bits) ------------------------------------------------

NBD_FLAG_HAS_FLAGS: Final = 1 << 0
NBD_FLAG_READ_ONLY: Final = 1 << 1
NBD_FLAG_SEND_FLUSH: Final = 1 << 2
NBD_FLAG_SEND_FUA: Final = 1 << 3
NBD_FLAG_ROTATIONAL: Final = 1 << 4
NBD_FLAG_SEND_TRIM: Final = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
NBD_FLAG_SEND_DF: Final = 1 << 7
NBD_FLAG_CAN_MULTI_CONN: Final = 1 << 8
NBD_FLAG_SEND_RESIZE: Final = 1 << 9
NBD_FLAG_SEND_CACHE: Final = 1 << 10
NBD_FLAG_SEND_FAST_ZERO: Final = 1 << 11

# --- request types ---------------------------------------------------------------

NBD_CMD_READ: Final = 0
NBD_CMD_WRITE: Final = 1
NBD_CMD_DISC: Final = 2
NBD_CMD_FLUSH: Final = 3
NBD_CMD_TRIM: Final = 4
NBD_CMD_CACHE: Final = 5
NBD_CMD_WRITE_ZEROES: Final = 6
NBD_CMD_BLOCK_STATUS: Final = 7

NBD_CMD_NAMES: Final = {
    NBD_CMD_READ: "READ",
    NBD_CMD_WRITE: "WRITE",
    NBD_CMD_DISC: "DISC",
    NBD_CMD_FLUSH: "FLUSH",
    NBD_CMD_TRIM: "TRIM",
    NBD_CMD_CACHE: "CACHE",
    NBD_CMD_WRITE_ZEROES: "WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

# --- command flags (16 bits on the wire) --------------------------------------------

NBD_CMD_FLAG_FUA: Final = 1 << 0
NBD_CMD_FLAG_NO_HOLE: Final = 1 << 1
NBD_CMD_FLAG_DF: Final = 1 << 2
NBD_CMD_FLAG_REQ_ONE: Final = 1 << 3
NBD_CMD_FLAG_FAST_ZERO: Final = 1 << 4

# --- error values of simple replies --------------------------------------------------

NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108

# --- sizes ---------------------------------------------------------------------------

NBD_REQUEST_SIZE: Final = 28  # magic u32, flags u16, type u16, cookie u64, offset u64, length u32
NBD_SIMPLE_REPLY_SIZE: Final = 16  # magic u32, error u32, cookie u64
NBD_MAX_PAYLOAD: Final = 32 * 1024 * 1024  # 2^25: proto.md's portable maximum, the kernel's max_hw_sectors
NBD_MIN_BLOCK_SIZE: Final = 1
NBD_PREFERRED_BLOCK_SIZE: Final = 4096
NBD_MAX_STRING: Final = 4096  # proto.md: names and messages MUST be no longer than this
NBD_ZERO_PAD_LEN: Final = 124  # zeroes after the NBD_OPT_EXPORT_NAME reply unless NO_ZEROES

# --- structured replies and block status ------------------------------------------------

NBD_REPLY_FLAG_DONE: Final = 1 << 0
NBD_REPLY_TYPE_NONE: Final = 0
NBD_REPLY_TYPE_OFFSET_DATA: Final = 1
NBD_REPLY_TYPE_OFFSET_HOLE: Final = 2
NBD_REPLY_TYPE_BLOCK_STATUS: Final = 5
NBD_REPLY_TYPE_ERROR: Final = (1 << 15) | 1
NBD_REPLY_TYPE_ERROR_OFFSET: Final = (1 << 15) | 2
NBD_STRUCTURED_REPLY_HEADER_SIZE: Final = 20  # magic u32, flags u16, type u16, cookie u64, length u32

NBD_STATE_HOLE: Final = 1 << 0  # base:allocation: not allocated
NBD_STATE_ZERO: Final = 1 << 1  # base:allocation: reads as zeros

# Metadata context names: the spec's one, and qemu's registered namespace
# (qemu docs/interop/nbd.rst: the value is the depth of the backing-chain
# layer holding the data, 0 = unallocated in the whole chain, 1 = the top).
META_BASE_ALLOCATION: Final = "base:allocation"
META_QEMU_ALLOCATION_DEPTH: Final = "qemu:allocation-depth"

"""ublk and io_uring constants, named as the kernel headers name them.

Sources: the kernel's `include/uapi/linux/ublk_cmd.h` (the 6.12 layout; later
kernels only append) and `include/uapi/linux/io_uring.h`; the encoded
command numbers follow `include/uapi/asm-generic/ioctl.h` (`_IOR`/`_IOWR`).
Kernel versions in comments say where a feature first appeared, as read from
the kernel's history (used in error messages, never to decide behaviour:
GET_FEATURES and ADD_DEV's returned flags decide).  All integers are
little-endian (x86-64 only: see uring.py on memory ordering).
"""

from __future__ import annotations

from typing import Final

# --- io_uring.h: system calls (x86-64; the same numbers on every arch since 5.1) --

NR_IO_URING_SETUP: Final = 425
NR_IO_URING_ENTER: Final = 426

# --- io_uring.h: setup flags, features, mmap offsets, enter flags ------------------

IORING_SETUP_CQSIZE: Final = 1 << 3
IORING_SETUP_CLAMP: Final = 1 << 4
IORING_SETUP_SQE128: Final = 1 << 10  # 5.19: 128-byte SQEs, needed for ublk control commands
IORING_SETUP_CQE32: Final = 1 << 11

IORING_FEAT_SINGLE_MMAP: Final = 1 << 0

IORING_OFF_SQ_RING: Final = 0
IORING_OFF_CQ_RING: Final = 0x8000000
IORING_OFF_SQES: Final = 0x10000000

IORING_ENTER_GETEVENTS: Final = 1 << 0

# --- io_uring.h: opcodes used here ------------------------------------------------

IORING_OP_NOP: Final = 0
IORING_OP_READ: Final = 22
IORING_OP_WRITE: Final = 23
IORING_OP_URING_CMD: Final = 46  # 5.19

# Offsets inside struct io_uring_sqe (64 bytes; SQE128 doubles it).
SQE_SIZE: Final = 64
SQE128_SIZE: Final = 128
SQE_OFF_OPCODE: Final = 0
SQE_OFF_FD: Final = 4
SQE_OFF_CMD_OP: Final = 8  # union with `off`: u32 cmd_op, u32 __pad1
SQE_OFF_ADDR: Final = 16
SQE_OFF_LEN: Final = 24
SQE_OFF_USER_DATA: Final = 32
SQE_OFF_CMD: Final = 48  # u8 cmd[]: 16 bytes in a 64-byte SQE, 80 with SQE128
CQE_SIZE: Final = 16

# --- ublk_cmd.h: legacy command numbers (6.0) ----------------------------------------

UBLK_CMD_GET_QUEUE_AFFINITY: Final = 0x01
UBLK_CMD_GET_DEV_INFO: Final = 0x02
UBLK_CMD_ADD_DEV: Final = 0x04
UBLK_CMD_DEL_DEV: Final = 0x05
UBLK_CMD_START_DEV: Final = 0x06
UBLK_CMD_STOP_DEV: Final = 0x07
UBLK_CMD_SET_PARAMS: Final = 0x08
UBLK_CMD_GET_PARAMS: Final = 0x09
UBLK_CMD_START_USER_RECOVERY: Final = 0x10  # 6.1
UBLK_CMD_END_USER_RECOVERY: Final = 0x11  # 6.1
UBLK_CMD_GET_DEV_INFO2: Final = 0x12  # 6.3
UBLK_CMD_GET_FEATURES: Final = 0x13  # 6.5, only ever ioctl-encoded

UBLK_IO_FETCH_REQ: Final = 0x20
UBLK_IO_COMMIT_AND_FETCH_REQ: Final = 0x21
UBLK_IO_NEED_GET_DATA: Final = 0x22

SIZEOF_UBLKSRV_CTRL_CMD: Final = 32
SIZEOF_UBLKSRV_IO_CMD: Final = 16

_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    """asm-generic/ioctl.h's _IOC with type 'u'."""
    return (direction << 30) | (size << 16) | (ord("u") << 8) | nr


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# 6.4: ioctl-encoded numbers (UBLK_F_CMD_IOCTL_ENCODE); kernels built without
# CONFIG_BLKDEV_UBLK_LEGACY_OPCODES take only these.
UBLK_U_CMD_GET_QUEUE_AFFINITY: Final = _ior(UBLK_CMD_GET_QUEUE_AFFINITY, SIZEOF_UBLKSRV_CTRL_CMD)
UBLK_U_CMD_GET_DEV_INFO: Final = _ior(UBLK_CMD_GET_DEV_INFO, SIZEOF_UBLKSRV_CTRL_CMD)
UBLK_U_CMD_ADD_DEV: Final = _iowr(UBLK_CMD_ADD_DEV, SIZEOF_UBLKSRV_CTRL_CMD)
UBLK_U_CMD_DEL_DEV: Final = _iowr(UBLK_CMD_DEL_DEV, SIZEOF_UBLKSRV_CTRL_CMD)
UBLK_U_CMD_START_DEV: Final = _iowr(UBLK_CMD_START_DEV, SIZEOF_UBLKSRV_CTRL_CMD)
UBLK_U_CMD_STOP_DEV: Final = _iowr(UBLK_CMD_STOP_DEV, SIZEOF_UBLKSRV_CTRL_CMD)
UBLK_U_CMD_SET_PARAMS: Final = _iowr(UBLK_CMD_SET_PARAMS, SIZEOF_UBLKSRV_CTRL_CMD)
UBLK_U_CMD_GET_PARAMS: Final = _ior(UBLK_CMD_GET_PARAMS, SIZEOF_UBLKSRV_CTRL_CMD)
UBLK_U_CMD_START_USER_RECOVERY: Final = _iowr(UBLK_CMD_START_USER_RECOVERY, SIZEOF_UBLKSRV_CTRL_CMD)
UBLK_U_CMD_END_USER_RECOVERY: Final = _iowr(UBLK_CMD_END_USER_RECOVERY, SIZEOF_UBLKSRV_CTRL_CMD)
UBLK_U_CMD_GET_DEV_INFO2: Final = _ior(UBLK_CMD_GET_DEV_INFO2, SIZEOF_UBLKSRV_CTRL_CMD)
UBLK_U_CMD_GET_FEATURES: Final = _ior(UBLK_CMD_GET_FEATURES, SIZEOF_UBLKSRV_CTRL_CMD)

UBLK_U_IO_FETCH_REQ: Final = _iowr(UBLK_IO_FETCH_REQ, SIZEOF_UBLKSRV_IO_CMD)
UBLK_U_IO_COMMIT_AND_FETCH_REQ: Final = _iowr(UBLK_IO_COMMIT_AND_FETCH_REQ, SIZEOF_UBLKSRV_IO_CMD)
UBLK_U_IO_NEED_GET_DATA: Final = _iowr(UBLK_IO_NEED_GET_DATA, SIZEOF_UBLKSRV_IO_CMD)

UBLK_FEATURES_LEN: Final = 8

# --- ublk_cmd.h: I/O results, buffers, limits ----------------------------------------

UBLK_IO_RES_OK: Final = 0
UBLK_IO_RES_NEED_GET_DATA: Final = 1
# UBLK_IO_RES_ABORT is (-ENODEV): the device is stopping, the tag is not re-armed.

UBLKSRV_CMD_BUF_OFFSET: Final = 0
UBLK_MAX_QUEUE_DEPTH: Final = 4096
UBLK_IO_BUF_BITS: Final = 25  # a single I/O buffer is at most 32 MiB
UBLK_MAX_NR_QUEUES: Final = 4096

# --- ublk_cmd.h: device flags (features) ---------------------------------------------

UBLK_F_SUPPORT_ZERO_COPY: Final = 1 << 0
UBLK_F_URING_CMD_COMP_IN_TASK: Final = 1 << 1
UBLK_F_NEED_GET_DATA: Final = 1 << 2  # 6.1
UBLK_F_USER_RECOVERY: Final = 1 << 3  # 6.1
UBLK_F_USER_RECOVERY_REISSUE: Final = 1 << 4  # 6.1
UBLK_F_UNPRIVILEGED_DEV: Final = 1 << 5  # 6.3
UBLK_F_CMD_IOCTL_ENCODE: Final = 1 << 6  # 6.4
UBLK_F_USER_COPY: Final = 1 << 7  # 6.5
UBLK_F_ZONED: Final = 1 << 8  # 6.6
UBLK_F_USER_RECOVERY_FAIL_IO: Final = 1 << 9  # 6.13

# Kernel version that first has each feature, for the "too old" error.
FEATURE_SINCE: Final = {
    UBLK_F_USER_RECOVERY: ("UBLK_F_USER_RECOVERY", "6.1"),
    UBLK_F_USER_RECOVERY_REISSUE: ("UBLK_F_USER_RECOVERY_REISSUE", "6.1"),
    UBLK_F_CMD_IOCTL_ENCODE: ("UBLK_F_CMD_IOCTL_ENCODE", "6.4"),
}

# --- ublk_cmd.h: device states -------------------------------------------------------

UBLK_S_DEV_DEAD: Final = 0
UBLK_S_DEV_LIVE: Final = 1
UBLK_S_DEV_QUIESCED: Final = 2
UBLK_S_DEV_FAIL_IO: Final = 3

# --- ublk_cmd.h: I/O operations and flags (ublksrv_io_desc.op_flags) -----------------

UBLK_IO_OP_READ: Final = 0
UBLK_IO_OP_WRITE: Final = 1
UBLK_IO_OP_FLUSH: Final = 2
UBLK_IO_OP_DISCARD: Final = 3
UBLK_IO_OP_WRITE_SAME: Final = 4
UBLK_IO_OP_WRITE_ZEROES: Final = 5

UBLK_IO_F_FAILFAST_DEV: Final = 1 << 8
UBLK_IO_F_FAILFAST_TRANSPORT: Final = 1 << 9
UBLK_IO_F_FAILFAST_DRIVER: Final = 1 << 10
UBLK_IO_F_META: Final = 1 << 11
UBLK_IO_F_FUA: Final = 1 << 13
UBLK_IO_F_NOUNMAP: Final = 1 << 15
UBLK_IO_F_SWAP: Final = 1 << 16

# --- ublk_cmd.h: parameters ----------------------------------------------------------

UBLK_ATTR_READ_ONLY: Final = 1 << 0
UBLK_ATTR_ROTATIONAL: Final = 1 << 1
UBLK_ATTR_VOLATILE_CACHE: Final = 1 << 2
UBLK_ATTR_FUA: Final = 1 << 3

UBLK_PARAM_TYPE_BASIC: Final = 1 << 0
UBLK_PARAM_TYPE_DISCARD: Final = 1 << 1
UBLK_PARAM_TYPE_DEVT: Final = 1 << 2
UBLK_PARAM_TYPE_ZONED: Final = 1 << 3

SECTOR_SHIFT: Final = 9  # ublk counts in 512-byte sectors whatever the logical block size

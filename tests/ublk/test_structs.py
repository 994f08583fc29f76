"""Every ublk and io_uring layout against the C layout of the kernel headers.

Each header struct is restated below as a ctypes.Structure, field by field
as `ublk_cmd.h` (6.12) and `io_uring.h` declare it; ctypes lays it out by the
platform's C rules (alignment, tail padding).  The struct.Struct formats
must give the same size and, with a distinct value in every field, the
same bytes.
"""

from __future__ import annotations

import ctypes

import pytest

from vhdblkd.ublk import constants as c
from vhdblkd.ublk.structs import (
    CQE,
    SQE_HEAD,
    CqringOffsets,
    CtrlCmd,
    DevInfo,
    IoCmd,
    IoDesc,
    ParamBasic,
    ParamDiscard,
    Params,
    SqringOffsets,
    UringParams,
)

u8, u16, u32, u64, s32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32


class C_ublksrv_ctrl_cmd(ctypes.Structure):
    _fields_ = [("dev_id", u32), ("queue_id", u16), ("len", u16), ("addr", u64), ("data", u64 * 1),
                ("dev_path_len", u16), ("pad", u16), ("reserved", u32)]


class C_ublksrv_ctrl_dev_info(ctypes.Structure):
    _fields_ = [("nr_hw_queues", u16), ("queue_depth", u16), ("state", u16), ("pad0", u16),
                ("max_io_buf_bytes", u32), ("dev_id", u32), ("ublksrv_pid", s32), ("pad1", u32),
                ("flags", u64), ("ublksrv_flags", u64), ("owner_uid", u32), ("owner_gid", u32),
                ("reserved1", u64), ("reserved2", u64)]


class C_ublksrv_io_desc(ctypes.Structure):
    _fields_ = [("op_flags", u32), ("nr_sectors", u32), ("start_sector", u64), ("addr", u64)]


class C_ublksrv_io_cmd(ctypes.Structure):
    _fields_ = [("q_id", u16), ("tag", u16), ("result", s32), ("addr", u64)]


class C_ublk_param_basic(ctypes.Structure):
    _fields_ = [("attrs", u32), ("logical_bs_shift", u8), ("physical_bs_shift", u8), ("io_opt_shift", u8),
                ("io_min_shift", u8), ("max_sectors", u32), ("chunk_sectors", u32), ("dev_sectors", u64),
                ("virt_boundary_mask", u64)]


class C_ublk_param_discard(ctypes.Structure):
    _fields_ = [("discard_alignment", u32), ("discard_granularity", u32), ("max_discard_sectors", u32),
                ("max_write_zeroes_sectors", u32), ("max_discard_segments", u16), ("reserved0", u16)]


class C_ublk_param_devt(ctypes.Structure):
    _fields_ = [("char_major", u32), ("char_minor", u32), ("disk_major", u32), ("disk_minor", u32)]


class C_ublk_param_zoned(ctypes.Structure):
    _fields_ = [("max_open_zones", u32), ("max_active_zones", u32), ("max_zone_append_sectors", u32),
                ("reserved", u8 * 20)]


class C_ublk_params(ctypes.Structure):
    _fields_ = [("len", u32), ("types", u32), ("basic", C_ublk_param_basic), ("discard", C_ublk_param_discard),
                ("devt", C_ublk_param_devt), ("zoned", C_ublk_param_zoned)]


class C_io_sqring_offsets(ctypes.Structure):
    _fields_ = [("head", u32), ("tail", u32), ("ring_mask", u32), ("ring_entries", u32), ("flags", u32),
                ("dropped", u32), ("array", u32), ("resv1", u32), ("user_addr", u64)]


class C_io_cqring_offsets(ctypes.Structure):
    _fields_ = [("head", u32), ("tail", u32), ("ring_mask", u32), ("ring_entries", u32), ("overflow", u32),
                ("cqes", u32), ("flags", u32), ("resv1", u32), ("user_addr", u64)]


class C_io_uring_params(ctypes.Structure):
    _fields_ = [("sq_entries", u32), ("cq_entries", u32), ("flags", u32), ("sq_thread_cpu", u32),
                ("sq_thread_idle", u32), ("features", u32), ("wq_fd", u32), ("resv", u32 * 3),
                ("sq_off", C_io_sqring_offsets), ("cq_off", C_io_cqring_offsets)]


class C_io_uring_sqe(ctypes.Structure):
    # The unions reduced to the member ublk uses (all members of each union have one size).
    _fields_ = [("opcode", u8), ("flags", u8), ("ioprio", u16), ("fd", s32), ("cmd_op", u32), ("pad1", u32),
                ("addr", u64), ("len", u32), ("op_flags", u32), ("user_data", u64), ("buf_index", u16),
                ("personality", u16), ("file_index", u32), ("cmd", u8 * 16)]


class C_io_uring_cqe(ctypes.Structure):
    _fields_ = [("user_data", u64), ("res", s32), ("flags", u32)]


# The sizes the headers' users rely on (ublksrv, liburing), stated independently of ctypes.
HEADER_SIZES = [
    (C_ublksrv_ctrl_cmd, 32), (C_ublksrv_ctrl_dev_info, 64), (C_ublksrv_io_desc, 24), (C_ublksrv_io_cmd, 16),
    (C_ublk_param_basic, 32), (C_ublk_param_discard, 20), (C_ublk_param_devt, 16), (C_ublk_param_zoned, 32),
    (C_ublk_params, 112), (C_io_sqring_offsets, 40), (C_io_cqring_offsets, 40), (C_io_uring_params, 120),
    (C_io_uring_sqe, 64), (C_io_uring_cqe, 16),
]


@pytest.mark.parametrize(("cstruct", "size"), HEADER_SIZES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_header_sizes(cstruct: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(cstruct) == size


def _filled(cstruct: type[ctypes.Structure], start: int = 1) -> tuple[ctypes.Structure, list[int]]:
    """A C struct with a distinct small value in every scalar field (values also returned in order)."""
    obj = cstruct()
    values: list[int] = []
    for name, ftype in cstruct._fields_:  # noqa: SLF001 - ctypes' own declaration
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            inner, inner_values = _filled(ftype, start + len(values))
            setattr(obj, name, inner)
            values.extend(inner_values)
        elif isinstance(ftype, type) and issubclass(ftype, ctypes.Array):
            arr = getattr(obj, name)
            for i in range(len(arr)):
                arr[i] = start + len(values)
                values.append(start + len(values))
        else:
            setattr(obj, name, start + len(values))
            values.append(start + len(values))
    return obj, values


SIMPLE = [
    (CtrlCmd, C_ublksrv_ctrl_cmd),
    (DevInfo, C_ublksrv_ctrl_dev_info),
    (IoDesc, C_ublksrv_io_desc),
    (IoCmd, C_ublksrv_io_cmd),
    (ParamBasic, C_ublk_param_basic),
    (ParamDiscard, C_ublk_param_discard),
]


@pytest.mark.parametrize(("layout", "cstruct"), SIMPLE, ids=lambda v: v.__name__)
def test_layout_matches_header(layout: type, cstruct: type[ctypes.Structure]) -> None:
    assert layout.SIZE == layout.STRUCT.size == ctypes.sizeof(cstruct)  # type: ignore[attr-defined]
    obj, values = _filled(cstruct)
    packed = layout(*values).pack()
    assert packed == bytes(obj)
    assert layout.unpack(packed) == layout(*values)


def test_params_matches_header() -> None:
    assert Params.SIZE == Params.STRUCT.size == ctypes.sizeof(C_ublk_params)
    basic = ParamBasic(1, 9, 12, 12, 9, 1024, 0, 2048, 0)
    discard = ParamDiscard(0, 4096, 2097152, 2097152, 1)
    c_params = C_ublk_params(len=112, types=3)
    ctypes.memmove(ctypes.addressof(c_params.basic), basic.pack(), ParamBasic.SIZE)
    ctypes.memmove(ctypes.addressof(c_params.discard), discard.pack(), ParamDiscard.SIZE)
    packed = Params(3, basic, discard).pack()
    assert packed == bytes(c_params)
    assert Params.unpack(packed) == Params(3, basic, discard)
    assert C_ublk_params.basic.offset == 8 and C_ublk_params.discard.offset == 40
    assert C_ublk_params.devt.offset == 60 and C_ublk_params.zoned.offset == 76


def test_uring_params_matches_header() -> None:
    assert UringParams.SIZE == UringParams.STRUCT.size == ctypes.sizeof(C_io_uring_params)
    assert SqringOffsets.STRUCT.size == ctypes.sizeof(C_io_sqring_offsets)
    assert CqringOffsets.STRUCT.size == ctypes.sizeof(C_io_cqring_offsets)
    obj, values = _filled(C_io_uring_params)
    got = UringParams.unpack(bytes(obj))
    assert (got.sq_entries, got.cq_entries, got.flags, got.wq_fd) == (1, 2, 3, 7)
    assert got.sq_off == SqringOffsets(*values[10:19])
    assert got.cq_off == CqringOffsets(*values[19:28])
    assert UringParams(5, 6, 7).pack() == bytes(C_io_uring_params(sq_entries=5, cq_entries=6, flags=7))


def test_sqe_and_cqe_match_header() -> None:
    assert SQE_HEAD.size == C_io_uring_sqe.cmd.offset == c.SQE_OFF_CMD
    assert C_io_uring_sqe.cmd_op.offset == c.SQE_OFF_CMD_OP
    assert C_io_uring_sqe.user_data.offset == c.SQE_OFF_USER_DATA
    assert C_io_uring_sqe.addr.offset == c.SQE_OFF_ADDR and C_io_uring_sqe.len.offset == c.SQE_OFF_LEN
    obj, values = _filled(C_io_uring_sqe)
    assert SQE_HEAD.pack(*values[: len(values) - 16]) == bytes(obj)[: SQE_HEAD.size]
    cqe = C_io_uring_cqe(user_data=2**64 - 1, res=-19, flags=7)
    assert CQE.size == c.CQE_SIZE and CQE.unpack(bytes(cqe)) == (2**64 - 1, -19, 7)


# Encoded opcodes: _IOR/_IOWR('u', nr, size) as asm-generic/ioctl.h computes them.
ENCODED = [
    (c.UBLK_U_CMD_GET_DEV_INFO, 0x80207502),
    (c.UBLK_U_CMD_ADD_DEV, 0xC0207504),
    (c.UBLK_U_CMD_DEL_DEV, 0xC0207505),
    (c.UBLK_U_CMD_START_DEV, 0xC0207506),
    (c.UBLK_U_CMD_STOP_DEV, 0xC0207507),
    (c.UBLK_U_CMD_SET_PARAMS, 0xC0207508),
    (c.UBLK_U_CMD_GET_PARAMS, 0x80207509),
    (c.UBLK_U_CMD_START_USER_RECOVERY, 0xC0207510),
    (c.UBLK_U_CMD_END_USER_RECOVERY, 0xC0207511),
    (c.UBLK_U_CMD_GET_FEATURES, 0x80207513),
    (c.UBLK_U_IO_FETCH_REQ, 0xC0107520),
    (c.UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xC0107521),
]


@pytest.mark.parametrize(("value", "expected"), ENCODED, ids=hex)
def test_encoded_opcodes(value: int, expected: int) -> None:
    assert value == expected
    assert value & 0xFF in (c.UBLK_CMD_GET_DEV_INFO, c.UBLK_CMD_ADD_DEV, c.UBLK_CMD_DEL_DEV, c.UBLK_CMD_START_DEV,
                            c.UBLK_CMD_STOP_DEV, c.UBLK_CMD_SET_PARAMS, c.UBLK_CMD_GET_PARAMS,
                            c.UBLK_CMD_START_USER_RECOVERY, c.UBLK_CMD_END_USER_RECOVERY, c.UBLK_CMD_GET_FEATURES,
                            c.UBLK_IO_FETCH_REQ, c.UBLK_IO_COMMIT_AND_FETCH_REQ)

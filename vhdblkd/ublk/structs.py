"""The ublk and io_uring structures, laid out as `ublk_cmd.h` and `io_uring.h` lay them out.

Each layout is a frozen dataclass with a class-level little-endian
`struct.Struct` and `SIZE`; `Layout` gives them `pack()` (the fields in
order) and `unpack(buf, offset)`, and the two with nested structs override
both.  Explicit pad bytes stand where the C compiler puts them, so `SIZE`
equals the C `sizeof` (tests/ublk/test_structs.py checks every one against
the header).
The queue loop uses `IO_DESC` and `IO_CMD` directly on its hot path.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import ClassVar, Self

from ..backend import Buffer

U32_MAX = 0xFFFFFFFF
U16_MAX = 0xFFFF


class Layout:
    """pack/unpack for a frozen dataclass whose fields are its STRUCT's items, in order."""

    __slots__ = ()
    STRUCT: ClassVar[struct.Struct]
    SIZE: ClassVar[int]

    def pack(self) -> bytes:
        return self.STRUCT.pack(*(getattr(self, f.name) for f in dataclasses.fields(self)))  # type: ignore[arg-type]  # every subclass is a dataclass

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> Self:
        return cls(*cls.STRUCT.unpack_from(buf, offset))


@dataclasses.dataclass(frozen=True, slots=True)
class CtrlCmd(Layout):
    """struct ublksrv_ctrl_cmd: the 32 bytes in a control SQE's command area."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IHHQQHHI")
    SIZE: ClassVar[int] = 32

    dev_id: int
    queue_id: int = U16_MAX  # -1: not a queue command
    len: int = 0
    addr: int = 0
    data0: int = 0  # data[1]
    dev_path_len: int = 0
    pad: int = 0
    reserved: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class DevInfo(Layout):
    """struct ublksrv_ctrl_dev_info (64 bytes): ADD_DEV's argument and GET_DEV_INFO's answer."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<HHHHIIiIQQIIQQ")
    SIZE: ClassVar[int] = 64

    nr_hw_queues: int
    queue_depth: int
    state: int = 0
    pad0: int = 0
    max_io_buf_bytes: int = 0
    dev_id: int = U32_MAX
    ublksrv_pid: int = 0
    pad1: int = 0
    flags: int = 0
    ublksrv_flags: int = 0
    owner_uid: int = 0
    owner_gid: int = 0
    reserved1: int = 0
    reserved2: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class IoDesc(Layout):
    """struct ublksrv_io_desc (24 bytes): one request, in the per-queue mmap'd array."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIQQ")
    SIZE: ClassVar[int] = 24

    op_flags: int  # op in bits 0-7, flags in bits 8-31
    nr_sectors: int
    start_sector: int
    addr: int

    @property
    def op(self) -> int:
        return self.op_flags & 0xFF


@dataclasses.dataclass(frozen=True, slots=True)
class IoCmd(Layout):
    """struct ublksrv_io_cmd (16 bytes): FETCH / COMMIT_AND_FETCH in an I/O SQE's command area."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<HHiQ")
    SIZE: ClassVar[int] = 16

    q_id: int
    tag: int
    result: int
    addr: int


@dataclasses.dataclass(frozen=True, slots=True)
class ParamBasic(Layout):
    """struct ublk_param_basic (32 bytes)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IBBBBIIQQ")
    SIZE: ClassVar[int] = 32

    attrs: int
    logical_bs_shift: int
    physical_bs_shift: int
    io_opt_shift: int
    io_min_shift: int
    max_sectors: int
    chunk_sectors: int
    dev_sectors: int
    virt_boundary_mask: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ParamDiscard(Layout):
    """struct ublk_param_discard (20 bytes)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIIIHH")
    SIZE: ClassVar[int] = 20

    discard_alignment: int
    discard_granularity: int
    max_discard_sectors: int
    max_write_zeroes_sectors: int
    max_discard_segments: int
    reserved0: int = 0


# struct ublk_param_devt (16 bytes, read-only: the kernel fills it) and struct
# ublk_param_zoned (32 bytes) are only carried as zeros to keep the layout.
PARAM_DEVT_SIZE = 16
PARAM_ZONED_SIZE = 32


@dataclasses.dataclass(frozen=True, slots=True)
class Params(Layout):
    """struct ublk_params as of 6.12: len, types, basic, discard, devt, zoned (112 bytes with tail padding).

    The kernel copies min(len, its own sizeof) bytes, so older kernels (80
    bytes) and newer ones (later members appended) both accept this layout.
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct(
        f"<II{ParamBasic.SIZE}s{ParamDiscard.SIZE}s{PARAM_DEVT_SIZE}s{PARAM_ZONED_SIZE}s4x"
    )
    SIZE: ClassVar[int] = 112

    types: int
    basic: ParamBasic
    discard: ParamDiscard | None = None

    def pack(self) -> bytes:
        discard = self.discard.pack() if self.discard is not None else bytes(ParamDiscard.SIZE)
        return self.STRUCT.pack(
            self.SIZE, self.types, self.basic.pack(), discard, bytes(PARAM_DEVT_SIZE), bytes(PARAM_ZONED_SIZE)
        )

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> Self:
        _len, types, basic, discard, _devt, _zoned = cls.STRUCT.unpack_from(buf, offset)
        return cls(types, ParamBasic.unpack(basic), ParamDiscard.unpack(discard))


# --- io_uring.h -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SqringOffsets(Layout):
    """struct io_sqring_offsets (40 bytes)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIIIIIIIQ")
    SIZE: ClassVar[int] = 40

    head: int
    tail: int
    ring_mask: int
    ring_entries: int
    flags: int
    dropped: int
    array: int
    resv1: int = 0
    user_addr: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class CqringOffsets(Layout):
    """struct io_cqring_offsets (40 bytes)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIIIIIIIQ")
    SIZE: ClassVar[int] = 40

    head: int
    tail: int
    ring_mask: int
    ring_entries: int
    overflow: int
    cqes: int
    flags: int = 0
    resv1: int = 0
    user_addr: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class UringParams(Layout):
    """struct io_uring_params (120 bytes): io_uring_setup's in/out argument."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct(f"<IIIIIII12x{SqringOffsets.SIZE}s{CqringOffsets.SIZE}s")
    SIZE: ClassVar[int] = 120

    sq_entries: int
    cq_entries: int
    flags: int
    sq_thread_cpu: int = 0
    sq_thread_idle: int = 0
    features: int = 0
    wq_fd: int = 0
    sq_off: SqringOffsets | None = None
    cq_off: CqringOffsets | None = None

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.sq_entries,
            self.cq_entries,
            self.flags,
            self.sq_thread_cpu,
            self.sq_thread_idle,
            self.features,
            self.wq_fd,
            bytes(SqringOffsets.SIZE),
            bytes(CqringOffsets.SIZE),
        )

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> Self:
        f = cls.STRUCT.unpack_from(buf, offset)
        return cls(
            f[0], f[1], f[2], f[3], f[4], f[5], f[6], sq_off=SqringOffsets.unpack(f[7]), cq_off=CqringOffsets.unpack(f[8])
        )


# struct io_uring_sqe (64 bytes) up to its command area, as the ublk commands fill it:
# opcode, flags, ioprio, fd, cmd_op (union with off), __pad1, addr, len, op flags,
# user_data, buf_index, personality, file_index; the command area (cmd[]) follows at 48.
SQE_HEAD = struct.Struct("<BBHiIIQIIQHHi")
# struct io_uring_cqe (16 bytes): user_data, res, flags.
CQE = struct.Struct("<QiI")

IO_DESC = IoDesc.STRUCT
IO_CMD = IoCmd.STRUCT

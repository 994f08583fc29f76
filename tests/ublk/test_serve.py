"""ublk requests onto a Backend: one table of operations, then every refusal and failure."""

from __future__ import annotations

import errno

import pytest

from vhdblkd.backend import FuaMode, MemoryBackend
from vhdblkd.errors import DiskFull
from vhdblkd.ublk import constants as c
from vhdblkd.ublk.serve import BackendHandler

SIZE = 1 << 20


class Recording(MemoryBackend):
    def __init__(self, size: int = SIZE, read_only: bool = False, fua: FuaMode = FuaMode.EMULATE) -> None:
        super().__init__(size, read_only)
        self.calls: list[tuple[str, int, int, bool]] = []
        self._fua = fua
        self.fail: BaseException | None = None

    @property
    def can_fua(self) -> FuaMode:
        return self._fua

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        if self.fail:
            raise self.fail
        self.calls.append(("write", offset, len(data), fua))
        super().write(offset, data, fua)

    def flush(self) -> None:
        if self.fail:
            raise self.fail
        self.calls.append(("flush", 0, 0, False))
        super().flush()

    def discard(self, offset: int, length: int) -> None:
        self.calls.append(("discard", offset, length, False))
        MemoryBackend.write_zeroes(self, offset, length)  # not the recording one

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        self.calls.append(("zeroes", offset, length, may_trim))
        super().write_zeroes(offset, length, may_trim, fua)


def _buf(data: bytes = b"", size: int = 65536) -> memoryview:
    b = bytearray(size)
    b[: len(data)] = data
    return memoryview(b)


def test_write_then_read_round_trip() -> None:
    be = Recording()
    h = BackendHandler(be)
    assert h(c.UBLK_IO_OP_WRITE, 0, 4096, 8192, _buf(b"x" * 8192)) == 8192
    out = _buf()
    assert h(c.UBLK_IO_OP_READ, 0, 4096, 8192, out) == 8192
    assert bytes(out[:8192]) == b"x" * 8192
    assert be.calls == [("write", 4096, 8192, False)]


@pytest.mark.parametrize(
    ("fua_mode", "expected"),
    [
        (FuaMode.EMULATE, [("write", 0, 512, False), ("flush", 0, 0, False)]),
        (FuaMode.NATIVE, [("write", 0, 512, True)]),
    ],
)
def test_fua_is_native_or_a_flush_after(fua_mode: FuaMode, expected: list[tuple[str, int, int, bool]]) -> None:
    be = Recording(fua=fua_mode)
    assert BackendHandler(be)(c.UBLK_IO_OP_WRITE, c.UBLK_IO_F_FUA, 0, 512, _buf(b"a" * 512)) == 512
    assert be.calls == expected


def test_flush_discard_write_zeroes() -> None:
    be = Recording()
    be.write(0, b"\xff" * 16384)
    be.calls.clear()
    h = BackendHandler(be)
    assert h(c.UBLK_IO_OP_FLUSH, 0, 0, 0, _buf()) == 0
    assert h(c.UBLK_IO_OP_DISCARD, 0, 0, 4096, _buf()) == 0
    assert h(c.UBLK_IO_OP_WRITE_ZEROES, c.UBLK_IO_F_NOUNMAP, 4096, 4096, _buf()) == 0
    assert h(c.UBLK_IO_OP_WRITE_ZEROES, 0, 8192, 4096, _buf()) == 0
    assert be.calls == [("flush", 0, 0, False), ("discard", 0, 4096, False), ("zeroes", 4096, 4096, False),
                        ("zeroes", 8192, 4096, True)]
    assert bytes(be.read(0, 16384)) == bytes(12288) + b"\xff" * 4096


def test_the_flush_threads_call_flushes_or_gives_the_errno() -> None:
    be = Recording()
    h = BackendHandler(be)
    assert h.flush() == 0 and be.calls == [("flush", 0, 0, False)]
    be.fail = OSError(errno.EIO, "disk gone")
    assert h.flush() == -errno.EIO


def test_refusals_at_the_edge() -> None:
    be = Recording()
    h = BackendHandler(be)
    assert h(c.UBLK_IO_OP_READ, 0, SIZE - 512, 1024, _buf()) == -errno.EINVAL
    assert h(c.UBLK_IO_OP_WRITE, 0, 0, 131072, _buf(size=65536)) == -errno.EINVAL  # larger than its buffer
    assert h(c.UBLK_IO_OP_DISCARD, 0, SIZE, 512, _buf()) == -errno.EINVAL
    assert h(c.UBLK_IO_OP_WRITE_SAME, 0, 0, 512, _buf()) == -errno.EOPNOTSUPP
    assert be.calls == []


def test_block_layer_hints_are_not_refused() -> None:
    be = Recording()
    h = BackendHandler(be)
    hints = c.UBLK_IO_F_FAILFAST_DEV | c.UBLK_IO_F_FAILFAST_TRANSPORT | c.UBLK_IO_F_FAILFAST_DRIVER  # readahead
    assert h(c.UBLK_IO_OP_READ, hints, 0, 4096, _buf()) == 4096
    assert h(c.UBLK_IO_OP_WRITE, c.UBLK_IO_F_SWAP, 0, 512, _buf(b"s" * 512)) == 512


def test_read_only_attachment_refuses_writes() -> None:
    be = Recording()
    h = BackendHandler(be, read_only=True)
    for op in (c.UBLK_IO_OP_WRITE, c.UBLK_IO_OP_DISCARD, c.UBLK_IO_OP_WRITE_ZEROES):
        assert h(op, 0, 0, 512, _buf(b"z" * 512)) == -errno.EPERM
    assert h(c.UBLK_IO_OP_READ, 0, 0, 512, _buf()) == 512
    assert be.calls == []


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
        (OSError(errno.EDQUOT, "quota"), errno.ENOSPC),
        (DiskFull("the disk is full"), errno.ENOSPC),
        (OSError(errno.EFBIG, "file too large"), errno.ENOSPC),
        (OSError(errno.EROFS, "read-only fs"), errno.EROFS),
        (OSError(errno.EIO, "bad sector"), errno.EIO),
        (RuntimeError("a bug"), errno.EIO),
    ],
    ids=["ENOSPC", "EDQUOT", "DiskFull", "EFBIG", "EROFS", "EIO", "bug"],
)
def test_backend_failures_become_errno(failure: BaseException, expected: int) -> None:
    be = Recording()
    be.fail = failure
    h = BackendHandler(be)
    assert h(c.UBLK_IO_OP_WRITE, 0, 0, 512, _buf(b"q" * 512)) == -expected
    assert h(c.UBLK_IO_OP_FLUSH, 0, 0, 0, _buf()) == -expected
    be.fail = None
    assert h(c.UBLK_IO_OP_WRITE, 0, 0, 512, _buf(b"q" * 512)) == 512  # the attachment carries on

"""The transport-independent request layer: its table, its dispatch, its errnos (no transport involved)."""

from __future__ import annotations

import errno
import itertools
import logging

import pytest

from vhdblkd.backend import Buffer, FuaMode, MemoryBackend
from vhdblkd.errors import BackendError, CorruptImage, DiskFull, OutOfRange, ReadOnlyImage
from vhdblkd.request import (
    FUA,
    NO_HOLE,
    RULES,
    UNKNOWN,
    Capabilities,
    Command,
    Request,
    RequestLayer,
    errno_for,
    validate,
)

SIZE = 1 << 20


class Recording(MemoryBackend):
    def __init__(self, read_only: bool = False, fua: FuaMode = FuaMode.EMULATE, discard: bool = True) -> None:
        super().__init__(SIZE, read_only)
        self.fua = fua
        self.discard_ok = discard
        self.calls: list[tuple[object, ...]] = []
        self.fail: BaseException | None = None

    @property
    def can_fua(self) -> FuaMode:
        return self.fua

    @property
    def can_discard(self) -> bool:
        return self.discard_ok

    def _call(self, *call: object) -> None:
        if self.fail is not None:
            raise self.fail
        self.calls.append(call)

    def read(self, offset: int, length: int) -> Buffer:
        self._call("read", offset, length)
        return super().read(offset, length)

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self._call("write", offset, bytes(data), fua)
        super().write(offset, data, fua)

    def flush(self) -> None:
        self._call("flush")

    def discard(self, offset: int, length: int) -> None:
        self._call("discard", offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        self._call("write_zeroes", offset, length, may_trim, fua)


@pytest.mark.parametrize(
    ("req", "read_only", "error"),
    [
        (Request(Command.READ, 0, 4096), False, None),
        (Request(Command.READ, 0, 4096, FUA), True, None),
        (Request(Command.READ, SIZE - 1, 2), False, errno.EINVAL),
        (Request(Command.READ, 2**64 - 1, 1), False, errno.EINVAL),
        (Request(Command.READ, 0, 1, NO_HOLE), False, errno.EINVAL),
        (Request(Command.READ, 0, 1, UNKNOWN), False, errno.EINVAL),
        (Request(Command.WRITE, 0, 3, FUA, b"abc"), False, None),
        (Request(Command.WRITE, 0, 3, 0, b"abc"), True, errno.EPERM),
        (Request(Command.WRITE, SIZE, 1, 0, b"a"), False, errno.EINVAL),
        (Request(Command.WRITE, 0, 1, UNKNOWN, b"a"), True, errno.EINVAL),  # flags are checked first
        (Request(Command.WRITE_ZEROES, 0, 512, FUA | NO_HOLE), False, None),
        (Request(Command.WRITE_ZEROES, SIZE - 1, 2), False, errno.EINVAL),
        (Request(Command.WRITE_ZEROES, 0, 512), True, errno.EPERM),
        (Request(Command.TRIM, 0, SIZE), False, None),
        (Request(Command.TRIM, 0, 1, NO_HOLE), False, errno.EINVAL),
        (Request(Command.TRIM, 0, 1), True, errno.EPERM),
        (Request(Command.FLUSH, 0, 0), True, None),
        (Request(Command.FLUSH, 2**64 - 1, 2**32 - 1), False, None),  # FLUSH has no range
        (Request(Command.FLUSH, 0, 0, NO_HOLE), False, errno.EINVAL),
        (Request(Command.CACHE, 0, SIZE), True, None),
        (Request(Command.CACHE, SIZE, 1), False, errno.EINVAL),
    ],
    ids=repr,
)
def test_validate_table(req: Request, read_only: bool, error: int | None) -> None:
    backend = Recording(read_only=read_only)
    caps = Capabilities.of(backend)
    assert validate(req, caps) == error
    assert RequestLayer(backend).validate(req) == error  # the folded table agrees with the plain one


def test_folded_table_agrees_everywhere() -> None:
    """Every command, flag bit, edge range and capability set: RequestLayer.validate == validate."""
    offsets = (0, SIZE - 1, SIZE, 2**64 - 1)
    lengths = (0, 1, 2, 64)
    flag_sets = (0, FUA, NO_HOLE, FUA | NO_HOLE, UNKNOWN, 1 << 5)
    for read_only, flush, discard, max_length in itertools.product((False, True), (False, True), (False, True), (1, 64)):
        caps = Capabilities(SIZE, read_only, flush, FuaMode.EMULATE, discard, max_length)
        layer = RequestLayer(MemoryBackend(SIZE), caps)
        for command, offset, length, flags in itertools.product(Command, offsets, lengths, flag_sets):
            req = Request(command, offset, length, flags)
            assert layer.validate(req) == validate(req, caps), (req, caps)


def test_missing_capabilities_are_einval() -> None:
    caps = Capabilities(SIZE, False, False, FuaMode.NONE, False)
    assert validate(Request(Command.FLUSH, 0, 0), caps) == errno.EINVAL
    assert validate(Request(Command.TRIM, 0, 512), caps) == errno.EINVAL
    caps = Capabilities(SIZE, False, True, FuaMode.NONE, True, max_length=4096)
    assert validate(Request(Command.READ, 0, 4097), caps) == errno.EINVAL
    assert validate(Request(Command.WRITE, 0, 4097, 0, bytes(4097)), caps) == errno.EINVAL
    assert validate(Request(Command.TRIM, 0, 8192), caps) is None  # no data moves: no length cap


def test_every_command_has_one_rule() -> None:
    assert set(RULES) == set(Command)
    assert Command.DISCARD is Command.TRIM


@pytest.mark.parametrize(
    ("fua", "req", "calls", "flush_after"),
    [
        (FuaMode.EMULATE, Request(Command.WRITE, 8, 3, FUA, b"abc"), [("write", 8, b"abc", False)], True),
        (FuaMode.NATIVE, Request(Command.WRITE, 8, 3, FUA, b"abc"), [("write", 8, b"abc", True)], False),
        (FuaMode.EMULATE, Request(Command.WRITE, 8, 3, 0, b"abc"), [("write", 8, b"abc", False)], False),
        (FuaMode.EMULATE, Request(Command.WRITE, 8, 0, FUA, b""), [], False),
        (FuaMode.EMULATE, Request(Command.WRITE_ZEROES, 0, 512, NO_HOLE), [("write_zeroes", 0, 512, False, False)], False),
        (FuaMode.NATIVE, Request(Command.WRITE_ZEROES, 0, 512, FUA), [("write_zeroes", 0, 512, True, True)], False),
        (FuaMode.EMULATE, Request(Command.WRITE_ZEROES, 0, 512, FUA), [("write_zeroes", 0, 512, True, False)], True),
        (FuaMode.EMULATE, Request(Command.TRIM, 0, 512, FUA), [("discard", 0, 512)], True),
        (FuaMode.EMULATE, Request(Command.TRIM, 0, 0), [], False),
        (FuaMode.EMULATE, Request(Command.FLUSH, 0, 0), [], True),
        (FuaMode.EMULATE, Request(Command.CACHE, 0, 4096), [], False),
        (FuaMode.EMULATE, Request(Command.READ, 0, 4, FUA), [("read", 0, 4)], False),
    ],
    ids=lambda v: repr(v) if isinstance(v, Request) else None,
)
def test_execute_and_flush_after(fua: FuaMode, req: Request, calls: list[tuple[object, ...]], flush_after: bool) -> None:
    backend = Recording(fua=fua)
    layer = RequestLayer(backend)
    assert layer.validate(req) is None
    data = layer.execute(req)
    assert (data is not None) == (req.command is Command.READ)
    assert backend.calls == calls
    assert layer.flush_after(req) is flush_after


def test_fua_without_flush_support_is_not_emulated() -> None:
    class NoFlush(Recording):
        @property
        def can_flush(self) -> bool:
            return False

    layer = RequestLayer(NoFlush(fua=FuaMode.NONE))
    assert not layer.flush_after(Request(Command.WRITE, 0, 1, FUA, b"x"))


def test_handle_runs_the_whole_path() -> None:
    backend = Recording()
    layer = RequestLayer(backend)
    assert layer.handle(Request(Command.WRITE, 0, 4, FUA, b"data")) == (0, None)
    assert backend.calls == [("write", 0, b"data", False), ("flush",)]
    error, data = layer.handle(Request(Command.READ, 0, 4))
    assert error == 0 and data is not None and bytes(data) == b"data"
    assert layer.handle(Request(Command.READ, SIZE, 1)) == (errno.EINVAL, None)
    backend.fail = DiskFull("image.vhd: no space")
    assert layer.handle(Request(Command.WRITE, 0, 1, 0, b"x")) == (errno.ENOSPC, None)


def test_short_backend_read_is_eio() -> None:
    class Short(Recording):
        def read(self, offset: int, length: int) -> Buffer:
            return bytes(length - 1)

    layer = RequestLayer(Short())
    with pytest.raises(BackendError) as info:
        layer.execute(Request(Command.READ, 0, 16))
    assert info.value.errno == errno.EIO
    assert layer.handle(Request(Command.READ, 0, 16)) == (errno.EIO, None)


@pytest.mark.parametrize(
    ("exc", "number", "level"),
    [
        (DiskFull("image.vhd: file system full"), errno.ENOSPC, logging.WARNING),
        (ReadOnlyImage("image.vhd: open read-only"), errno.EROFS, logging.WARNING),
        (OutOfRange("past the end"), errno.EINVAL, logging.WARNING),
        (BackendError("device gone", errno.EIO), errno.EIO, logging.ERROR),
        (BackendError("no memory", errno.ENOMEM), errno.ENOMEM, logging.ERROR),
        (OSError(errno.EDQUOT, "quota"), errno.EDQUOT, logging.WARNING),
        (OSError(errno.EIO, "bad sector"), errno.EIO, logging.ERROR),
        (OSError("no errno"), errno.EIO, logging.ERROR),
        (CorruptImage("image.vhd: BAT entry 3 points past the end"), errno.EIO, logging.ERROR),
        (RuntimeError("a bug"), errno.EIO, logging.ERROR),
    ],
)
def test_errno_for(exc: BaseException, number: int, level: int, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vhdblkd.request"):
        assert errno_for(exc, "WRITE 1@0") == number
    (record,) = caplog.records
    assert record.levelno == level and record.getMessage().startswith("WRITE 1@0")
    assert bool(record.exc_info) == isinstance(exc, RuntimeError), "only a bug carries its traceback"


def test_disk_full_is_a_backend_error_and_a_vhd_error() -> None:
    from vhdblkd.errors import VhdError

    exc = DiskFull("x")
    assert isinstance(exc, BackendError) and isinstance(exc, VhdError) and exc.errno == errno.ENOSPC
    assert BackendError("y").errno == errno.EIO and BackendError("z", errno.EPERM).errno == errno.EPERM

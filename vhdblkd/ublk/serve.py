"""ublk requests onto a Backend: checks at the edge, then one backend call, results as bytes or -errno.

The kernel has already split requests to the device's limits and keeps
them inside its size, but the checks are repeated here (a request past the
end gets -EINVAL, a write to a read-only attachment -EPERM, an unknown
operation -EOPNOTSUPP) so a backend only ever sees valid calls, as it does
from the NBD server.  Failures map to errno as the NBD server maps them:
no space -> ENOSPC, not permitted -> EPERM, anything else -> EIO.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from ..backend import Backend, FuaMode
from ..errors import DiskFull, OutOfRange, ReadOnlyImage, VhdblkError
from . import constants as c

log = logging.getLogger(__name__)

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NOT_PERMITTED = frozenset({errno.EPERM, errno.EROFS, errno.EACCES})


def errno_for(exc: Exception, what: str) -> int:
    """The errno a failed backend call is reported with; anything unexpected is logged as a bug."""
    if isinstance(exc, OSError):
        if exc.errno in _NO_SPACE:
            log.warning("%s: no space: %s", what, exc)
            return errno.ENOSPC
        if exc.errno in _NOT_PERMITTED:
            log.warning("%s: not permitted: %s", what, exc)
            return errno.EPERM
        log.error("%s: I/O error: %s", what, exc)
        return errno.EIO
    if isinstance(exc, DiskFull):
        log.warning("%s: %s", what, exc)
        return errno.ENOSPC
    if isinstance(exc, ReadOnlyImage):
        log.warning("%s: %s", what, exc)
        return errno.EPERM
    if isinstance(exc, OutOfRange):
        log.warning("%s: %s", what, exc)
        return errno.EINVAL
    if isinstance(exc, VhdblkError):
        log.error("%s: %s", what, exc)
        return errno.EIO
    log.exception("%s: unexpected failure (a bug)", what)
    return errno.EIO


class BackendHandler:
    """The queue loop's handler for one attachment (shared by all its queues)."""

    def __init__(self, backend: Backend, *, read_only: bool | None = None) -> None:
        self.backend = backend
        self.size = backend.size
        self.read_only = backend.read_only if read_only is None else (read_only or backend.read_only)
        self.can_flush = backend.can_flush
        self.fua_mode = backend.can_fua
        self.can_discard = backend.can_discard and not self.read_only

    def __call__(self, op: int, flags: int, offset: int, length: int, buf: memoryview) -> int:
        if op == c.UBLK_IO_OP_FLUSH:
            return self._run("FLUSH", self.backend.flush) if self.can_flush else 0
        data_op = op in (c.UBLK_IO_OP_READ, c.UBLK_IO_OP_WRITE)
        if offset + length > self.size or (data_op and length > len(buf)):
            log.warning("ublk request op %d at %d+%d outside the %d-byte disk", op, offset, length, self.size)
            return -errno.EINVAL
        if op == c.UBLK_IO_OP_READ:
            try:
                data = self.backend.read(offset, length)
                buf[:length] = data
            except Exception as exc:  # noqa: BLE001 - mapped to an errno and logged
                return -errno_for(exc, f"READ {offset}+{length}")
            return length
        if self.read_only:
            return -errno.EPERM
        fua = bool(flags & c.UBLK_IO_F_FUA)
        if op == c.UBLK_IO_OP_WRITE:
            native = fua and self.fua_mode is FuaMode.NATIVE
            res = self._run(f"WRITE {offset}+{length}", lambda: self.backend.write(offset, buf[:length], fua=native))
            if res == 0 and fua and not native and self.can_flush:
                res = self._run("FLUSH (FUA)", self.backend.flush)
            return length if res == 0 else res
        if op == c.UBLK_IO_OP_DISCARD:
            if not self.can_discard:
                return -errno.EOPNOTSUPP
            return self._run(f"DISCARD {offset}+{length}", lambda: self.backend.discard(offset, length))
        if op == c.UBLK_IO_OP_WRITE_ZEROES:
            may_trim = not flags & c.UBLK_IO_F_NOUNMAP
            res = self._run(
                f"WRITE_ZEROES {offset}+{length}",
                lambda: self.backend.write_zeroes(offset, length, may_trim=may_trim, fua=False),
            )
            if res == 0 and fua and self.can_flush:
                res = self._run("FLUSH (FUA)", self.backend.flush)
            return res
        log.warning("ublk request with unknown op %d", op)
        return -errno.EOPNOTSUPP

    @staticmethod
    def _run(what: str, call: Callable[[], object]) -> int:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - mapped to an errno and logged
            return -errno_for(exc, what)
        return 0

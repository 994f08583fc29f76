"""ublk requests through the shared request layer (vhdblkd/request.py): results as bytes or -errno.

A ublk descriptor becomes a `Request`: READ, WRITE, FLUSH, DISCARD (TRIM)
and WRITE_ZEROES, with UBLK_IO_F_FUA as FUA and UBLK_IO_F_NOUNMAP as
NO_HOLE.  The block layer's hints (fail-fast, meta, swap) carry no meaning
for an image and are dropped rather than refused: readahead sets them.
Operations ublk has but the layer does not (WRITE_SAME, zone commands) are
answered -EOPNOTSUPP here.  The layer checks range, read-only and
capabilities, runs the backend call and any flush (FLUSH, emulated FUA),
and maps failures to an errno; ublk completes READ and WRITE with the byte
count, the rest with 0.
"""

from __future__ import annotations

import dataclasses
import errno
import logging

from ..backend import Backend
from ..request import FUA, NO_HOLE, Capabilities, Command, Request, RequestLayer
from . import constants as c

log = logging.getLogger(__name__)

COMMANDS = {
    c.UBLK_IO_OP_READ: Command.READ,
    c.UBLK_IO_OP_WRITE: Command.WRITE,
    c.UBLK_IO_OP_FLUSH: Command.FLUSH,
    c.UBLK_IO_OP_DISCARD: Command.TRIM,
    c.UBLK_IO_OP_WRITE_ZEROES: Command.WRITE_ZEROES,
}
# The kernel maps errnos it does not know to a plain I/O error; a quota or
# file-size limit on the host is, for the guest file system, a full disk.
_AS_NO_SPACE = frozenset({errno.EDQUOT, errno.EFBIG})


def _flags(ublk_flags: int) -> int:
    flags = FUA if ublk_flags & c.UBLK_IO_F_FUA else 0
    if ublk_flags & c.UBLK_IO_F_NOUNMAP:
        flags |= NO_HOLE
    return flags


class BackendHandler:
    """The queue loop's handler for one attachment (shared by all its queues; the layer is stateless)."""

    def __init__(self, backend: Backend, *, read_only: bool = False, max_length: int | None = None) -> None:
        caps = Capabilities.of(backend)
        if read_only:
            caps = dataclasses.replace(caps, read_only=True)
        if max_length is not None:
            caps = dataclasses.replace(caps, max_length=max_length)
        self.layer = RequestLayer(backend, caps)
        self.read_only = caps.read_only

    def __call__(self, op: int, flags: int, offset: int, length: int, buf: memoryview) -> int:
        command = COMMANDS.get(op)
        if command is None:
            log.warning("ublk request with unsupported op %d", op)
            return -errno.EOPNOTSUPP
        is_data = command is Command.READ or command is Command.WRITE
        if is_data and length > len(buf):
            log.warning("ublk %s of %d bytes is larger than its %d-byte buffer", command.name, length, len(buf))
            return -errno.EINVAL
        req = Request(command, offset, length, _flags(flags), buf[:length] if command is Command.WRITE else b"")
        error, data = self.layer.handle(req)
        if error:
            return -(errno.ENOSPC if error in _AS_NO_SPACE else error)
        if command is Command.READ:
            assert data is not None
            buf[:length] = data
        return length if is_data else 0

    def flush(self) -> int:
        """A FLUSH, run on the queue's flush thread: 0 or -errno."""
        error, _ = self.layer.handle(_FLUSH)
        return -error if error else 0


_FLUSH = Request(Command.FLUSH, 0, 0)

"""The request path every transport shares: check a request, run it on the Backend, map its errno.

This layer sits between `vhdblkd.backend` and the transports (`vhdblkd.nbd`,
`vhdblkd.ublk`).  It knows no wire format: a transport decodes its own
framing (an NBD header, a ublk io descriptor) into a `Request`, and encodes
the outcome (data, or a Linux errno) back into its own reply.  Offsets and
lengths are bytes; errnos are the `errno` module's numbers.

Use, for each request, in order::

    layer = RequestLayer(backend)              # once per connection or queue
    req = Request(Command.WRITE, offset, length, FUA, payload)
    error = layer.validate(req)                # None, or the errno to answer
    if error is None:
        try:
            data = layer.execute(req)          # READ: the data; else None
            if layer.flush_after(req):         # FLUSH, and FUA on a backend without native FUA
                layer.flush()                  # complete the request only after this returns
        except Exception as exc:
            error = errno_for(exc, describe(req))   # logs; never re-raise: answer and go on

or the same in one call: ``error, data = layer.handle(req)``.  A transport
that keeps flushes off its I/O thread (the NBD connection does) calls
`flush()` later, from its own thread, and answers the request then; every
write it answered before is covered.

Rules, in the `RULES` table: a flag bit a command does not allow is EINVAL
(`UNKNOWN` marks a flag the transport could not translate: always refused);
a command that writes on a read-only backend is EPERM; a range past the end,
or a READ/WRITE longer than `Capabilities.max_length`, is EINVAL; FLUSH
without `can_flush` and TRIM without `can_discard` are EINVAL.  CACHE is
accepted and does nothing (it is advisory).  A zero-length WRITE, TRIM or
WRITE_ZEROES succeeds without calling the backend.  A rejected request
never reaches the backend; a WRITE's payload must still be consumed by the
transport before it answers.

Commands the layer does not know (NBD's DISC and BLOCK_STATUS, ublk's
driver commands) stay in the transport.  `Request.payload` of a WRITE may
be a memoryview into the transport's buffer: `execute` is done with it when
it returns.  `execute`'s READ data may be a memoryview into the image's
mapping, valid until the next write: send or copy it before the next
request.  Backend methods run on the calling thread; the Backend is
thread-safe, so several connections/queues may share one.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
from collections.abc import Callable
from typing import Final

from .backend import Backend, Buffer, FuaMode
from .errors import BackendError, VhdblkError

log = logging.getLogger(__name__)


class Command(enum.IntEnum):
    """What a request asks of the backend."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    TRIM = 3  # also called discard
    WRITE_ZEROES = 4
    CACHE = 5  # advisory prefetch; answered as a no-op

    DISCARD = TRIM


# Request flags: a bitmask.  The bits match NBD's command flags, so the NBD
# connection passes its known bits through untranslated; other transports map theirs.
FUA: Final = 1 << 0  # the write is durable when the request completes
NO_HOLE: Final = 1 << 1  # WRITE_ZEROES must not deallocate the range
UNKNOWN: Final = 1 << 31  # a transport flag with no meaning here; always refused (EINVAL)

_NO_LIMIT: Final = 1 << 128  # beyond any 64-bit offset plus length


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one command may carry and needs (a row of `RULES`)."""

    flags: int  # the flag bits allowed; any other bit is EINVAL
    writes: bool  # refused with EPERM on a read-only backend
    ranged: bool  # offset + length must lie within the disk
    payload: bool  # length is capped by Capabilities.max_length (data moves through memory)
    needs: str | None = None  # the Capabilities field that must be true, else EINVAL


RULES: Final[dict[Command, Rule]] = {
    Command.READ: Rule(FUA, writes=False, ranged=True, payload=True),
    Command.WRITE: Rule(FUA, writes=True, ranged=True, payload=True),
    Command.FLUSH: Rule(FUA, writes=False, ranged=False, payload=False, needs="can_flush"),
    Command.TRIM: Rule(FUA, writes=True, ranged=True, payload=False, needs="can_discard"),
    Command.WRITE_ZEROES: Rule(FUA | NO_HOLE, writes=True, ranged=True, payload=False),
    Command.CACHE: Rule(FUA, writes=False, ranged=True, payload=False),
}
assert set(RULES) == set(Command)

_WRITES: Final = frozenset(c for c, r in RULES.items() if r.writes)


class Request:
    """One request: `command` at byte `offset` for `length` bytes, `flags` (FUA|NO_HOLE), WRITE `payload`.

    A plain slotted class rather than a dataclass: one is made per request on
    the hot path, and this is the cheapest object Python builds.
    """

    __slots__ = ("command", "offset", "length", "flags", "payload")

    def __init__(self, command: Command, offset: int, length: int, flags: int = 0, payload: Buffer = b"") -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.flags = flags
        self.payload = payload

    def __repr__(self) -> str:
        return f"Request({self.command.name}, offset={self.offset}, length={self.length}, flags={self.flags:#x})"


def describe(req: Request) -> str:
    """A short name for logs: ``WRITE 4096@8192``."""
    return f"{req.command.name} {req.length}@{req.offset}"


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """A backend's answers, asked once so every request is judged alike."""

    size: int
    read_only: bool
    can_flush: bool
    can_fua: FuaMode
    can_discard: bool
    max_length: int = _NO_LIMIT  # largest READ/WRITE the transport moves in one request

    @classmethod
    def of(cls, backend: Backend, max_length: int = _NO_LIMIT) -> Capabilities:
        return cls(backend.size, backend.read_only, backend.can_flush, backend.can_fua, backend.can_discard, max_length)


def validate(req: Request, caps: Capabilities) -> int | None:
    """The errno to answer `req` with without running it, or None when it may run (the rules above)."""
    rule = RULES[req.command]
    if req.flags & ~rule.flags:
        return errno.EINVAL
    if rule.writes and caps.read_only:
        return errno.EPERM
    if rule.ranged and req.offset + req.length > caps.size:
        return errno.EINVAL
    if rule.payload and req.length > caps.max_length:
        return errno.EINVAL
    if rule.needs is not None and not getattr(caps, rule.needs):
        return errno.EINVAL
    return None


_NO_SPACE: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_EXPECTED: Final = _NO_SPACE | {errno.EPERM, errno.EROFS, errno.EACCES, errno.EINVAL}


def errno_for(exc: BaseException, what: str) -> int:
    """The errno that answers a request whose backend call raised `exc`; logs it.

    `BackendError` (a full disk is one) and `OSError` carry their errno; any
    other vhdblkd error is EIO.  Anything else is a bug and is logged with its
    traceback, and still answered with EIO so the transport keeps serving.
    """
    if isinstance(exc, (BackendError, OSError)):
        number = exc.errno or errno.EIO
    elif isinstance(exc, VhdblkError):
        number = errno.EIO
    else:
        log.exception("%s: unexpected failure (a bug)", what, exc_info=exc)
        return errno.EIO
    if number in _EXPECTED:
        log.warning("%s: %s", what, exc)
    else:
        log.error("%s: %s", what, exc)
    return number


class RequestLayer:
    """Validate and run requests on one backend (module docstring); cheap to make, one per connection."""

    def __init__(self, backend: Backend, caps: Capabilities | None = None) -> None:
        self.backend = backend
        self._read = backend.read  # bound once: read and write are on every request's path
        self._write = backend.write
        self.caps = caps if caps is not None else Capabilities.of(backend)
        caps = self.caps
        self._native_fua = caps.can_fua is FuaMode.NATIVE
        # FUA needs a flush after the write unless the backend makes the write durable itself.
        self._emulate_fua = not self._native_fua and caps.can_flush
        # The table folded with these capabilities: validate() is on every request's path.
        self._checks: dict[Command, tuple[int, int, int, int]] = {}
        for command, rule in RULES.items():
            refused = 0
            if rule.writes and caps.read_only:
                refused = errno.EPERM
            elif rule.needs is not None and not getattr(caps, rule.needs):
                refused = errno.EINVAL
            limit = caps.size if rule.ranged else _NO_LIMIT
            longest = caps.max_length if rule.payload else _NO_LIMIT
            self._checks[command] = (rule.flags, refused, limit, longest)

    def validate(self, req: Request) -> int | None:
        """As the module's `validate(req, self.caps)`, with the table folded in once."""
        return self.check(req.command, req.offset, req.length, req.flags)

    def check(self, command: Command, offset: int, length: int, flags: int) -> int | None:
        """`validate` on a request's fields, for a transport's hot path that builds no `Request`."""
        allowed, refused, limit, longest = self._checks[command]
        if flags & ~allowed:
            return errno.EINVAL
        if refused:
            return refused
        if offset + length > limit or length > longest:
            return errno.EINVAL
        return None

    def limits(self, command: Command) -> tuple[int, int, int, int]:
        """`check` for one command as numbers a hot path compares inline: (allowed flags, refused
        errno or 0, end of the range, longest length).  A request passes when it has no flag
        outside the allowed ones, nothing refuses it, offset + length <= end and length <= longest;
        otherwise `check` names its errno."""
        return self._checks[command]

    def reader(self) -> Callable[[int, int], Buffer]:
        """The backend's read, bound once, for a hot path that checks the data's length itself
        (a short result is a failed READ: raise `short_read`)."""
        return self._read

    @staticmethod
    def short_read(data: Buffer, offset: int, length: int) -> BackendError:
        return BackendError(f"backend returned {len(data)} bytes for a READ {length}@{offset}", errno.EIO)

    def writer(self) -> Callable[[int, Buffer, int], None]:
        """`write` for a non-empty payload, as a function of (offset, payload, flags), bound once."""
        backend_write = self._write
        if not self._native_fua:
            return lambda offset, payload, flags: backend_write(offset, payload, False)
        return lambda offset, payload, flags: backend_write(offset, payload, bool(flags & FUA))

    def execute(self, req: Request) -> Buffer | None:
        """Run a validated request's backend call; READ returns its data, the rest None.

        FLUSH, and the flush that emulates FUA, are not run here: see
        `flush_after`.  A backend failure propagates (map it with `errno_for`).
        """
        command = req.command
        if command is Command.READ:
            return self.read(req.offset, req.length)
        if not req.length:
            return None
        if command is Command.WRITE:
            self.write(req.offset, req.payload, req.flags)
        elif command is Command.WRITE_ZEROES:
            fua = self._native_fua and bool(req.flags & FUA)
            self.backend.write_zeroes(req.offset, req.length, not req.flags & NO_HOLE, fua)
        elif command is Command.TRIM:
            self.backend.discard(req.offset, req.length)
        return None  # FLUSH: flush_after; CACHE: advisory, nothing to do

    def read(self, offset: int, length: int) -> Buffer:
        """A validated READ's data (`execute` on scalars)."""
        data = self._read(offset, length)
        if len(data) != length:
            raise self.short_read(data, offset, length)
        return data

    def write(self, offset: int, payload: Buffer, flags: int) -> None:
        """A validated WRITE (`execute` on scalars); a zero-length one does nothing."""
        if payload:
            self._write(offset, payload, self._native_fua and bool(flags & FUA))

    def flush_after(self, req: Request) -> bool:
        """True when `req` completes only after a `flush()`: FLUSH itself, and FUA emulated by a flush."""
        return self.needs_flush(req.command, req.flags, req.length)

    def needs_flush(self, command: Command, flags: int, length: int) -> bool:
        """`flush_after` on a request's fields."""
        if command is Command.FLUSH:
            return True
        return self._emulate_fua and bool(flags & FUA) and length > 0 and command in _WRITES

    def flush(self) -> None:
        """Make every write completed so far durable (the backend's flush)."""
        self.backend.flush()

    def handle(self, req: Request) -> tuple[int, Buffer | None]:
        """validate, execute and flush in one call: (0, data) or (errno, None)."""
        error = self.validate(req)
        if error is not None:
            log.info("refusing %s flags=%#x: errno %d", describe(req), req.flags, error)
            return error, None
        try:
            data = self.execute(req)
            if self.flush_after(req):
                self.flush()
        except Exception as exc:  # noqa: BLE001 - mapped to an errno and logged
            return errno_for(exc, describe(req)), None
        return 0, data

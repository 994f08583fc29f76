"""The one exception tree of vhdblkd.

Every error the project raises on purpose derives from VhdblkError; anything
else escaping a layer is a bug and is logged with its traceback.  Messages
name the file, the offset, the field, and the expected and found values, and
say what to do next where there is something to do.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence


class VhdblkError(Exception):
    """Root of every error vhdblkd raises on purpose."""


# --- image format (vhdblkd/vhd/) -------------------------------------------


class VhdError(VhdblkError):
    """Something is wrong with a VHD file."""


class CorruptImage(VhdError):
    """The file is not a valid VHD, or its metadata is damaged."""


class UnsupportedImage(VhdError):
    """The file is a valid VHD that vhdblkd does not handle (type, size, version)."""


class ParentError(VhdError):
    """A differencing image's parent is missing, does not match, or is unsafe.

    `refused`: when a parent search raised it, each candidate passed over, as
    (found_by, path, reason, detail) with reason one of not-found, unsafe,
    unreadable, wrong-id, timestamp.
    """

    def __init__(self, message: str, refused: Sequence[tuple[str, str, str, str]] = ()) -> None:
        super().__init__(message)
        self.refused = tuple(refused)


class ParentSearchFailed(ParentError):
    """No candidate the child names (locators, parent name) is its parent."""


class ParentTimestampMismatch(ParentError):
    """The parent's mtime differs from the child's record, and strict_parent_timestamp refuses that."""


class ImageLocked(VhdError):
    """The image is already open read-write elsewhere (or read-only, for a writer)."""


# --- backend requests (vhdblkd/backend.py, vhdblkd/request.py) ---------------


class BackendError(VhdblkError):
    """A backend could not do a request; `errno` is what the transport answers.

    The request layer turns it into that errno (transports narrow it to what
    their protocol can carry), so transports never need the format layer's
    error types.
    """

    errno: int = _errno.EIO

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class OutOfRange(BackendError):
    """An I/O request falls outside the virtual disk."""

    errno = _errno.EINVAL


class ReadOnlyImage(BackendError):
    """A write was attempted on an image opened read-only."""

    errno = _errno.EROFS


# --- NBD protocol (vhdblkd/nbd/) --------------------------------------------


class NbdError(VhdblkError):
    """An NBD protocol error; carries the errno sent to the peer."""

    errno: int = _errno.EINVAL

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class LocalProtocolError(NbdError):
    """We were about to break the protocol (a bug or misuse of the codec)."""


class RemoteProtocolError(NbdError):
    """The peer broke the protocol (bad magic, oversized request, ...)."""


# --- kernel and daemon -------------------------------------------------------


class KernelError(VhdblkError):
    """The kernel's nbd interface refused or is missing."""


class DaemonError(VhdblkError):
    """A request to the daemon failed (unknown device, refused, not running)."""


class DetachFailed(DaemonError):
    """A detach stopped because the image could not be flushed; the attachment is kept for a retry."""


class ConfigError(VhdblkError):
    """A configuration file line or option is invalid."""


class DiskFull(VhdError, BackendError):
    """The file system holding an image has no space left (ENOSPC/EDQUOT)."""

    errno = _errno.ENOSPC

# --- ublk (vhdblkd/ublk/) ----------------------------------------------------


class UblkError(KernelError):
    """The kernel's ublk driver or io_uring refused a command; carries the errno."""

    errno: int = _errno.EIO

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class UblkUnavailable(UblkError):
    """This kernel cannot serve ublk devices (no driver, io_uring disabled, too old); the message says what to do."""

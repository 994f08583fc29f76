"""flock-based image locks.

A read-write open takes an exclusive lock, a read-only open (and every parent
of a differencing chain) a shared one, for the life of the open image.  flock
locks belong to an open file description, so a second open in the same
process conflicts too, which is what we want: two writers in one daemon are
as fatal as two daemons.  On conflict the holder is named from /proc/locks.
"""

from __future__ import annotations

import errno
import fcntl
import os

from vhdblkd.errors import ImageLocked


def _holders(dev: int, ino: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes holding a flock on (dev, ino)."""
    found: list[tuple[int, str]] = []
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        pid_field, ident = fields[4], fields[5]
        # /proc/locks prints the device in hex; the major/minor width varies.
        parts = ident.split(":")
        if len(parts) != 3:
            continue
        try:
            if (int(parts[0], 16), int(parts[1], 16), int(parts[2])) != (os.major(dev), os.minor(dev), ino):
                continue
            pid = int(pid_field)
        except ValueError:
            continue
        if all(pid != seen for seen, _ in found):
            found.append((pid, _cmdline(pid)))
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part) or "?"


class ImageLock:
    """A held flock on an image; release() (or close of the image) drops it."""

    def __init__(self, path: str, *, exclusive: bool) -> None:
        self.path = path
        self.exclusive = exclusive
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as exc:
            st = os.fstat(self._fd)
            os.close(self._fd)
            self._fd = -1
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise ImageLocked(self._conflict_message(st.st_dev, st.st_ino)) from None

    def _conflict_message(self, dev: int, ino: int) -> str:
        holders = _holders(dev, ino)
        if holders:
            who = "; ".join(f"pid {pid} ({cmd})" for pid, cmd in holders)
        else:
            who = "another process"
        want = "read-write" if self.exclusive else "read-only"
        return (
            f"{self.path}: cannot open {want}, the image is in use by {who}; "
            f"detach it first: vhdblkctl detach <device>, or stop the process using it"
        )

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

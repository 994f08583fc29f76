"""sd_notify: the daemon's channel to systemd (readiness, status, watchdog, the fd store).

This is the one module that imports sdnotify.  Without $NOTIFY_SOCKET every
call is a no-op, so the daemon runs the same under systemd, by hand and in
tests (which point $NOTIFY_SOCKET at a socket they read).  Descriptors for
the service manager's store (FDSTORE=1) go with SCM_RIGHTS, which sdnotify
does not do; the ones it hands back arrive as $LISTEN_FDS (`inherited_fds`).
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import select
import socket
from collections.abc import Iterable, Mapping, MutableMapping, Sequence

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self._enabled = bool(address)
        self._notifier: sdnotify.SystemdNotifier | None = None
        self._sock: socket.socket | None = None
        if address:
            # sdnotify would read os.environ; the address comes from the
            # mapping we were given, so connect here and let sdnotify send.
            # Its debug=False keeps a vanished socket from taking the daemon down.
            self._notifier = sdnotify.SystemdNotifier()
            self._sock = _connect(address)
            self._notifier.socket = self._sock
        self._watchdog_seconds = watchdog_interval(environ)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def watchdog_seconds(self) -> float | None:
        """How often to send WATCHDOG=1 (half of $WATCHDOG_USEC), or None when no watchdog is set."""
        return self._watchdog_seconds

    def send(self, *fields: str) -> None:
        text = "\n".join(fields)
        log.debug("sd_notify: %s", text.replace("\n", " | "))
        if self._notifier is not None:
            self._notifier.notify(text)

    def ready(self, status: str) -> None:
        self.send("READY=1", _status(status))

    def status(self, status: str) -> None:
        self.send(_status(status))

    def reloading(self) -> None:
        self.send("RELOADING=1", _status("reloading the configuration"))

    def stopping(self) -> None:
        self.send("STOPPING=1", _status("flushing and detaching"))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def _send_with_fds(self, text: str, fds: Sequence[int]) -> bool:
        log.debug("sd_notify: %s (%d fds)", text.replace("\n", " | "), len(fds))
        if self._sock is None:
            return False
        try:
            self._sock.sendmsg(
                [text.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            )
        except OSError as exc:
            log.warning("cannot pass descriptors to the service manager: %s", exc)
            return False
        return True

    def store_fds(self, items: Iterable[tuple[str, int]]) -> bool:
        """FDSTORE=1: the service manager keeps a copy of each descriptor and hands it to the next start.

        Only a unit with FileDescriptorStoreMax= takes them; systemd keeps them
        across `systemctl restart` and drops them when the unit stops.
        """
        ok = True
        for name, fd in items:
            ok = self._send_with_fds(f"FDSTORE=1\nFDNAME={name}", [fd]) and ok
        return ok and self._sock is not None

    def remove_fds(self, names: Iterable[str]) -> None:
        for name in names:
            self.send("FDSTOREREMOVE=1", f"FDNAME={name}")

    def barrier(self, timeout: float = 5.0) -> bool:
        """Wait until the service manager has read every message sent before (BARRIER=1, systemd 246+)."""
        if self._sock is None:
            return False
        r, w = os.pipe()
        try:
            sent = self._send_with_fds("BARRIER=1", [w])
            os.close(w)
            w = -1
            if not sent:
                return False
            poller = select.poll()
            poller.register(r, select.POLLHUP)
            return bool(poller.poll(int(timeout * 1000)))
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)


def _connect(address: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect("\0" + address[1:] if address.startswith("@") else address)
    except OSError as exc:
        log.warning("cannot reach the service manager at NOTIFY_SOCKET=%s: %s", address, exc)
        sock.close()
        return None
    return sock


def _status(text: str) -> str:
    # STATUS= is one line.
    return "STATUS=" + " ".join(text.split())


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of $WATCHDOG_USEC in seconds, if it is set and meant for us ($WATCHDOG_PID)."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid:
        if pid != str(os.getpid()):
            return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        return None
    if value <= 0:
        return None
    return value / 2_000_000


def inherited_fds(environ: MutableMapping[str, str], pid: int) -> dict[str, int]:
    """Descriptors the service manager passed to this process ($LISTEN_FDS from 3 on), by name.

    The variables are removed from `environ` so child processes do not
    believe the descriptors are theirs; each descriptor is made close-on-exec.
    """
    try:
        mine = environ.get("LISTEN_PID") == str(pid)
        count = int(environ.get("LISTEN_FDS", "0")) if mine else 0
    except ValueError:
        count = 0
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(key, None)
    found: dict[str, int] = {}
    for i in range(count):
        fd = 3 + i
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError:
            continue
        name = names[i] if i < len(names) and names[i] else f"unknown-{fd}"
        if name in found:  # a name stored twice: keep the first, close the other
            os.close(fd)
            continue
        found[name] = fd
    return found

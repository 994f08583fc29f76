"""sd_notify: the daemon's only channel to systemd (readiness, status, watchdog).

This is the one module that imports sdnotify.  Without $NOTIFY_SOCKET every
call is a no-op, so the daemon runs the same under systemd, by hand and in
tests (which point $NOTIFY_SOCKET at a socket they read).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self._enabled = bool(address)
        self._notifier: sdnotify.SystemdNotifier | None = None
        if address:
            # sdnotify would read os.environ; the address comes from the
            # mapping we were given, so connect here and let sdnotify send.
            # Its debug=False keeps a vanished socket from taking the daemon down.
            self._notifier = sdnotify.SystemdNotifier()
            self._notifier.socket = _connect(address)
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

    def mainpid(self, pid: int) -> None:
        self.send(f"MAINPID={pid}")


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

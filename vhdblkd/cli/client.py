"""The control-socket client: one JSON line out, one JSON line back.

The command line never touches devices or the kernel itself; everything a
device command does, the daemon does on its behalf.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

from ..errors import DaemonError

# typing costs a tenth of `vhdblkctl list`; mypy treats any TYPE_CHECKING name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_CONTROL = Path("/run/vhdblkd/control.sock")
CONTROL_ENV = "VHDBLKD_CONTROL"
MAX_REPLY_BYTES = 16 * 1024 * 1024

NOT_RUNNING = "vhdblkd is not running: start it with `systemctl start vhdblkd` (or run `vhdblkd` as root)"
NOT_ROOT = "vhdblkctl must run as root (the control socket is root-only)"


def control_path(arg: str | None = None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get(CONTROL_ENV)
    return Path(env) if env else DEFAULT_CONTROL


def request(path: Path, message: dict[str, Any], *, timeout: float = 300.0) -> dict[str, Any]:
    """Send one request; return the reply's fields, or raise DaemonError with the daemon's one-line error."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # Attaching opens and checks an image; detaching flushes it: both may take a while.
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonError(NOT_RUNNING) from None
        except PermissionError:
            raise DaemonError(NOT_ROOT) from None
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ENOENT):
                raise DaemonError(NOT_RUNNING) from None
            raise DaemonError(f"cannot reach vhdblkd at {path}: {exc.strerror}") from None
        try:
            sock.sendall(json.dumps(message).encode("utf-8") + b"\n")
            reply = _read_line(sock)
        except TimeoutError:
            raise DaemonError(f"vhdblkd did not answer within {timeout:.0f} s") from None
        except OSError as exc:
            raise DaemonError(f"lost the connection to vhdblkd: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        obj = json.loads(reply.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DaemonError("vhdblkd sent a malformed reply") from None
    if not isinstance(obj, dict):
        raise DaemonError("vhdblkd sent a malformed reply")
    if not obj.get("ok"):
        raise DaemonError(str(obj.get("error") or "vhdblkd refused the request"))
    return obj


def _read_line(sock: socket.socket) -> bytes:
    buf = bytearray()
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            return bytes(buf[:nl])
        if len(buf) > MAX_REPLY_BYTES:
            raise DaemonError("vhdblkd's reply is too large")
        chunk = sock.recv(65536)
        if not chunk:
            raise DaemonError("vhdblkd closed the connection without answering")
        buf += chunk

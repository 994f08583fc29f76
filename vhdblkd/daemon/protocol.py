"""The control protocol's framing: one JSON object per line, with no I/O here.

A request is `{"op": NAME, ...arguments}`; a reply is `{"ok": true, ...}` or
`{"ok": false, "error": "one line"}`.  Lines are capped so a client cannot
make the daemon buffer without bound; after an oversized line the decoder
stays broken (the connection is closed after the error reply).
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import DaemonError

MAX_LINE_BYTES = 64 * 1024


class ProtocolViolation(DaemonError):
    """A control client sent something that is not a request."""


class LineDecoder:
    """feed(bytes) -> complete lines; b"" means EOF."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_line_bytes
        self._broken: ProtocolViolation | None = None
        self.eof = False

    def feed(self, data: bytes) -> list[bytes]:
        if self._broken is not None:
            raise self._broken
        if not data:
            self.eof = True
            if self._buf:
                self._broken = ProtocolViolation("request truncated: connection closed before the end of the line")
                raise self._broken
            return []
        self._buf += data
        lines: list[bytes] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            if nl > self._max:
                break
            lines.append(bytes(self._buf[:nl]))
            del self._buf[: nl + 1]
        if len(self._buf) > self._max and self._buf.find(b"\n", 0, self._max + 1) < 0:
            self._broken = ProtocolViolation(f"request too large: over {self._max} bytes without a newline")
            raise self._broken
        return lines


def decode_request(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and integers over Python's digit limit;
        # RecursionError, nesting deeper than the parser's stack: all are the client's fault.
        raise ProtocolViolation(f"malformed request: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolViolation("malformed request: expected a JSON object")
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolViolation("malformed request: missing string field 'op'")
    return obj


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode("utf-8") + b"\n"


def error_reply(message: str) -> dict[str, Any]:
    return {"ok": False, "error": " ".join(message.split())}

"""/run/vhdblkd/state.json: what is attached where, so a restarted daemon can find its devices.

Written atomically (temporary file and rename) after every change; read at
start to re-adopt devices the kernel still has.  An attachment whose detach
failed after disconnecting its device is recorded as such: it has no device
left to adopt (its path may serve another attachment by then), so a
restarted daemon only reports that the image's last flush failed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .vhdtab import VhdtabEntry, atomic_write, parse_device

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_FILE = "state.json"


_COMMON = ("name", "image", "device", "transport", "options", "from_vhdtab", "detach_failed", "disconnected")


@dataclass(frozen=True, slots=True)
class StateRecord:
    """One attachment: what it is (name, image, options) and the transport's own fields (`device`)."""

    name: str
    image: str
    path: str  # /dev/nbd0
    transport: str
    device: dict[str, Any]  # e.g. nbd: index, backend_identifier, connections
    options: dict[str, Any]
    from_vhdtab: bool
    detach_failed: str | None = None  # why the last detach stopped, if it did
    disconnected: bool = False  # that detach had disconnected the device: nothing to adopt

    def to_json(self) -> dict[str, Any]:
        return {
            **self.device,
            "name": self.name,
            "image": self.image,
            "device": self.path,
            "transport": self.transport,
            "options": self.options,
            "from_vhdtab": self.from_vhdtab,
            "detach_failed": self.detach_failed,
            "disconnected": self.disconnected,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StateRecord:
        transport = str(obj.get("transport", "nbd"))  # the first daemons wrote nbd records only
        path = obj.get("device")
        if path is None and transport == "nbd":
            path = f"/dev/nbd{int(obj['index'])}"
        return cls(
            name=str(obj["name"]),
            image=str(obj["image"]),
            path=str(path),
            transport=transport,
            device={k: v for k, v in obj.items() if k not in _COMMON},
            options=dict(obj.get("options", {})),
            from_vhdtab=bool(obj.get("from_vhdtab", False)),
            detach_failed=None if obj.get("detach_failed") is None else str(obj["detach_failed"]),
            disconnected=bool(obj.get("disconnected", False)),
        )


def entry_from_record(record: StateRecord) -> VhdtabEntry:
    """The attachment's configuration as it was when the record was written."""
    o = record.options
    try:
        device = o.get("device")
        return VhdtabEntry(
            record.name,
            record.image,
            read_only=bool(o["read_only"]),
            device_index=None if device is None else parse_device(str(device)),
            connections=int(o["connections"]),
            timeout_seconds=int(o["timeout"]),
            dead_conn_timeout_seconds=int(o["dead_conn_timeout"]),
            block_size=int(o["block_size"]),
            allow_unsafe_parent=bool(o["allow_unsafe_parent"]),
            strict_parent_timestamp=bool(o.get("strict_parent_timestamp", False)),  # newer than the state format
            transport=record.transport,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"state record for {record.name!r} is incomplete: {exc}") from None


def write_state(path: Path, pid: int, records: list[StateRecord]) -> None:
    doc = {"version": STATE_VERSION, "pid": pid, "attachments": [r.to_json() for r in records]}
    atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"), 0o600)


def read_state(path: Path) -> list[StateRecord]:
    """The records of a previous run; an absent or unreadable file is an empty list (and logged)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable state file %s: %s", path, exc)
        return []
    try:
        if doc.get("version") != STATE_VERSION:
            log.warning("ignoring state file %s of version %r", path, doc.get("version"))
            return []
        return [StateRecord.from_json(item) for item in doc["attachments"]]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring malformed state file %s: %s", path, exc)
        return []

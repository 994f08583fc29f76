"""The state file: atomic round trip, and a damaged file is ignored rather than fatal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vhdblkd.daemon.state import StateRecord, entry_from_record, read_state, write_state
from vhdblkd.daemon.vhdtab import VhdtabEntry
from vhdblkd.errors import ConfigError


def test_round_trip(tmp_path: Path) -> None:
    entry = VhdtabEntry("d", "/a b.vhd", read_only=True, device_index=3, connections=2, block_size=4096)
    nbd = {"index": 3, "backend_identifier": "vhdblkd:d", "connections": 2}
    record = StateRecord("d", entry.image, "/dev/nbd3", "nbd", nbd, entry.options, True)
    path = tmp_path / "run" / "state.json"
    write_state(path, 42, [record])
    assert path.stat().st_mode & 0o777 == 0o600
    doc = json.loads(path.read_text())
    assert doc["pid"] == 42 and doc["attachments"][0]["device"] == "/dev/nbd3"
    assert doc["attachments"][0]["index"] == 3 and doc["attachments"][0]["transport"] == "nbd"
    assert read_state(path) == [record]
    assert entry_from_record(record) == entry
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


@pytest.mark.parametrize(
    "content",
    ["", "{", "[]", '{"version": 99, "attachments": []}', '{"version": 1, "attachments": [{"name": "x"}]}'],
)
def test_damaged_state_is_ignored(tmp_path: Path, content: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(content)
    assert read_state(path) == []


def test_missing_state_is_empty(tmp_path: Path) -> None:
    assert read_state(tmp_path / "none.json") == []


def test_incomplete_record_options() -> None:
    with pytest.raises(ConfigError, match="state record for 'x' is incomplete"):
        entry_from_record(StateRecord("x", "/x.vhd", "/dev/nbd0", "nbd", {"index": 0}, {}, False))

"""The transport option: vhdtab and state round trips, and the seam forwarding to NBD or ublk."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import pytest

from vhdblkd.backend import Backend, MemoryBackend
from vhdblkd.daemon.state import StateRecord, entry_from_record
from vhdblkd.daemon.transport import LiveDevice
from vhdblkd.daemon.transports import Transports
from vhdblkd.daemon.vhdtab import VhdtabEntry, parse_line
from vhdblkd.errors import ConfigError, UblkUnavailable


def test_vhdtab_transport_option_round_trips() -> None:
    entry = parse_line("disk /srv/disk.vhd transport=ublk,connections=2,block_size=4096")
    assert entry is not None
    assert (entry.transport, entry.connections, entry.block_size) == ("ublk", 2, 4096)
    assert entry.format_line() == "disk /srv/disk.vhd connections=2,block_size=4096,transport=ublk"
    assert parse_line(entry.format_line()) == entry
    default = parse_line("disk /srv/disk.vhd")
    assert default is not None and default.transport == "nbd" and "transport" not in default.format_line()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("disk /srv/d.vhd transport=iscsi", "expected nbd or ublk"),
        ("disk /srv/d.vhd transport=ublk,device=nbd3", "does not go with transport=ublk"),
    ],
)
def test_bad_transport_lines(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_line(line)


def test_state_record_keeps_the_transport() -> None:
    entry = VhdtabEntry("disk", "/srv/disk.vhd", transport="ublk", connections=2)
    record = StateRecord("disk", entry.image, "/dev/ublkb0", "ublk", {"transport": "ublk", "index": 0},
                         entry.options, False)
    assert entry_from_record(StateRecord.from_json(record.to_json())) == entry


class Recorder:
    def __init__(self, name: str, calls: list[tuple[str, str]], live: list[LiveDevice]) -> None:
        self.name = name
        self.calls = calls
        self.live = live

    def attach(self, image: Backend, entry: VhdtabEntry) -> Any:
        self.calls.append((self.name, f"attach {entry.name}"))
        return object()

    def adopt(self, image: Backend, entry: VhdtabEntry, record: Mapping[str, Any],
              inherited: MutableMapping[str, int]) -> Any:
        self.calls.append((self.name, f"adopt {record['index']}"))
        return object()

    def drop(self, record: Mapping[str, Any]) -> None:
        self.calls.append((self.name, f"drop {record['index']}"))

    def live_devices(self) -> list[LiveDevice]:
        return self.live

    def backend_identifier(self, name: str) -> str:
        return f"vhdblkd:{name}"

    def close(self) -> None:
        self.calls.append((self.name, "close"))


def test_each_call_goes_to_the_entrys_transport() -> None:
    calls: list[tuple[str, str]] = []
    made: list[str] = []
    nbd_live = [LiveDevice("/dev/nbd0", 0, "vhdblkd:a", True)]
    ublk_live = [LiveDevice("/dev/ublkb3", 3, "vhdblkd:b", True)]

    def make_ublk() -> Recorder:
        made.append("ublk")
        return Recorder("ublk", calls, ublk_live)

    t = Transports(Recorder("nbd", calls, nbd_live), make_ublk)
    img = MemoryBackend(4096)
    t.attach(img, VhdtabEntry("a", "/a.vhd"))
    assert made == []  # an NBD-only daemon never touches ublk
    t.attach(img, VhdtabEntry("b", "/b.vhd", transport="ublk"))
    t.adopt(img, VhdtabEntry("b", "/b.vhd", transport="ublk"), {"transport": "ublk", "index": 3}, {})
    t.drop({"index": 0})  # an old daemon's NBD record
    t.drop({"transport": "ublk", "index": 3})
    t.drop({"index": 5, "path": "/dev/ublkb5"})  # a live device no record names
    assert t.live_devices() == nbd_live + ublk_live
    t.close()
    assert calls == [("nbd", "attach a"), ("ublk", "attach b"), ("ublk", "adopt 3"), ("nbd", "drop 0"),
                     ("ublk", "drop 3"), ("ublk", "drop 5"), ("nbd", "close"), ("ublk", "close")]
    assert made == ["ublk"]


def test_ublk_trouble_does_not_hide_nbd_devices() -> None:
    class Broken(Recorder):
        def live_devices(self) -> list[LiveDevice]:
            raise UblkUnavailable("io_uring is disabled")

    nbd_live = [LiveDevice("/dev/nbd1", 1, "vhdblkd:a", True)]
    t = Transports(Recorder("nbd", [], nbd_live), lambda: Broken("ublk", [], []))
    assert t.live_devices() == nbd_live

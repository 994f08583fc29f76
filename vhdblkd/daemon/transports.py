"""Both transports behind the one seam: each attachment's `transport` option picks NBD or ublk.

The attachment manager and the service hold one `Transport`; this one
forwards each call to the transport an entry (attach, adopt) or a device
record (drop) names, and answers `live_devices` with the devices of both.
The ublk transport is made on first use, so a daemon on a kernel without
ublk_drv starts and serves NBD as before, and says what to do only when an
attachment asks for ublk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from ..backend import Backend
from ..errors import VhdblkError
from .transport import Device, LiveDevice, Transport
from .vhdtab import VhdtabEntry

log = logging.getLogger(__name__)

def _kind(record: Mapping[str, Any]) -> str:
    if record.get("transport") == "ublk" or str(record.get("path", "")).startswith("/dev/ublkb"):
        return "ublk"
    return "nbd"  # the records of daemons before ublk carry no transport


class Transports:
    name = "nbd+ublk"

    def __init__(self, nbd: Transport, make_ublk: Callable[[], Transport]) -> None:
        self._nbd = nbd
        self._make_ublk = make_ublk
        self._ublk: Transport | None = None

    def _get(self, kind: str) -> Transport:
        if kind == "nbd":
            return self._nbd
        if self._ublk is None:
            self._ublk = self._make_ublk()
        return self._ublk

    def attach(self, image: Backend, entry: VhdtabEntry) -> Device:
        return self._get(entry.transport).attach(image, entry)

    def adopt(
        self, image: Backend, entry: VhdtabEntry, record: Mapping[str, Any], inherited: MutableMapping[str, int]
    ) -> Device:
        return self._get(entry.transport).adopt(image, entry, record, inherited)

    def drop(self, record: Mapping[str, Any]) -> None:
        self._get(_kind(record)).drop(record)

    def live_devices(self) -> list[LiveDevice]:
        nbd = self._nbd.live_devices()
        try:
            return nbd + self._get("ublk").live_devices()
        except VhdblkError as exc:  # the NBD devices are still worth taking back
            log.warning("%s; not taking back ublk devices", exc)
            return nbd

    def backend_identifier(self, name: str) -> str:
        return self._nbd.backend_identifier(name)  # the same "vhdblkd:NAME" for both

    def close(self) -> None:
        self._nbd.close()
        if self._ublk is not None:
            self._ublk.close()

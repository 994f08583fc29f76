"""The seam between an attachment and the kernel interface that makes its block device.

An attachment is an image (a `Backend`) plus a `Device`; a `Transport`
makes devices.  NBD (netlink + socketpairs, `nbd_device.py`) is one
transport; ublk is the other.  The attachment manager only ever calls what
is here, so a transport brings:

* `attach`: a new device serving the image;
* `adopt`: take back a device a previous daemon left in the kernel, either
  handed over (`inherited` descriptors from the service manager's store) or
  after a crash (NBD: RECONFIGURE with fresh sockets; ublk: user recovery);
* on the device: `disconnect` (the device goes away), `handover` (stop
  between two requests and return the descriptors the next daemon needs),
  `release` (stop serving but leave the device waiting for the next daemon);
* `live_devices`: what the kernel has now, so a start never attaches an
  image a second time;
* `record`: what the state file keeps for a later `adopt`.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..backend import Backend
from .vhdtab import VhdtabEntry


@dataclass(frozen=True, slots=True)
class LiveDevice:
    """A device the kernel has now: its path and the backend identifier it was made with."""

    path: str
    index: int
    backend_identifier: str | None
    connected: bool


class Device(Protocol):
    @property
    def path(self) -> str:
        """/dev/nbd0, /dev/ublkb0."""

    @property
    def kernel_name(self) -> str:
        """The name under /sys/block (nbd0)."""

    @property
    def connections(self) -> int: ...

    @property
    def reconnects(self) -> int: ...

    def stats(self) -> dict[str, int]:
        """Request counters for `vhdblkctl list`."""

    def record(self) -> dict[str, Any]:
        """The transport's part of the state-file record (index, backend identifier, ...)."""

    def disconnect(self) -> None:
        """Remove the device from the kernel, then let the serving threads finish what they read."""

    def handover(self) -> Sequence[tuple[str, int]] | None:
        """Stop serving between two requests; (name, fd) pairs the next daemon needs, or None if it cannot."""

    def release(self) -> None:
        """Stop serving and let go of the device, which waits for the next daemon (its timeout applies)."""

    def close(self) -> None:
        """Close our copies of handed-over descriptors (the service manager holds its own)."""


class Transport(Protocol):
    name: str

    def attach(self, image: Backend, entry: VhdtabEntry) -> Device: ...

    def adopt(
        self, image: Backend, entry: VhdtabEntry, record: Mapping[str, Any], inherited: MutableMapping[str, int]
    ) -> Device:
        """Take over the device `record` names.

        `inherited` holds handed-over descriptors by name; the transport takes
        (pops) the ones of this device, whether it uses them or closes them.
        """

    def drop(self, record: Mapping[str, Any]) -> None:
        """Remove a device left behind that nobody will serve (nothing uses it)."""

    def live_devices(self) -> list[LiveDevice]: ...

    def backend_identifier(self, name: str) -> str:
        """The identifier an attachment called `name` gives its device."""

    def close(self) -> None: ...

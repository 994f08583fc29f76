"""The ublk transport: an image served to /dev/ublkbN by queue threads on io_uring (vhdblkd.ublk).

attach: ADD_DEV, SET_PARAMS (discard only for dynamic and differencing
images), every queue armed, START_DEV.  adopt: a device a previous daemon
left (it was made with UBLK_F_USER_RECOVERY, so the kernel kept it and
queued its I/O when that daemon died or released it) is re-adopted with
START/END_USER_RECOVERY; ublk has no descriptors to hand over, so a
handover is a release.  disconnect: flush, STOP_DEV (the queues serve what
is in flight to the end), flush again, DEL_DEV.

udev learns a device's attachment name from /run/vhdblkd/ublk/ublkbN
(written before START_DEV, so the first "add" event finds it), as it learns
an NBD device's from /sys/block/nbdN/backend.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from ..backend import Backend
from ..errors import DaemonError, UblkError, VhdblkError
from ..ublk import constants as uc
from ..ublk.control import Control
from ..ublk.device import DeviceConfig, UblkDevice
from ..ublk.serve import BackendHandler
from .transport import LiveDevice
from .vhdtab import VhdtabEntry

log = logging.getLogger(__name__)

NAME_DIR = Path("/run/vhdblkd/ublk")


class UblkAttachment:
    """The daemon's side of one ublk device (the `Device` protocol)."""

    def __init__(self, transport: UblkTransport, image: Backend, dev: UblkDevice) -> None:
        self._transport = transport
        self.image = image
        self.dev = dev

    @property
    def path(self) -> str:
        return self.dev.path

    @property
    def kernel_name(self) -> str:
        return f"ublkb{self.dev.dev_id}"

    @property
    def connections(self) -> int:
        return len(self.dev.queues)

    @property
    def reconnects(self) -> int:
        return 0

    def stats(self) -> dict[str, int]:
        """The NBD attachment's counters (reads, writes, bytes, flushes, trims, errors), summed over queues."""
        total: dict[str, int] = {}
        for q in self.dev.queues:
            for name, value in q.stats.as_dict().items():
                total[name] = total.get(name, 0) + value
        return total

    def record(self) -> dict[str, Any]:
        return {"transport": "ublk", "index": self.dev.dev_id, "queues": len(self.dev.queues)}

    def disconnect(self) -> None:
        # The kernel sends no FLUSH when a device goes away: flush around STOP_DEV,
        # whose in-flight requests are still served.
        try:
            self.image.flush()
        except (OSError, VhdblkError) as exc:
            log.error("%s: flush before removing the device failed: %s", self.path, exc)
        try:
            self.dev.stop()
        finally:
            self._transport.forget_name(self.dev.dev_id)
        # The device is gone now whatever happens next: a failing flush must not make the caller
        # believe it is still connected (it flushes again itself and keeps the image on failure).
        try:
            self.image.flush()
        except (OSError, VhdblkError) as exc:
            log.error("%s: flush after removing the device failed: %s", self.path, exc)

    def handover(self) -> Sequence[tuple[str, int]] | None:
        # Nothing to hand over: the device survives its server (user recovery).
        self.release()
        return []

    def release(self) -> None:
        self.dev.release()
        try:
            self.image.flush()
        except VhdblkError as exc:
            log.error("%s: flush after releasing the device failed: %s", self.path, exc)

    def close(self) -> None:
        pass


class UblkTransport:
    name = "ublk"

    def __init__(self, *, name_dir: Path = NAME_DIR) -> None:
        self.name_dir = name_dir

    @staticmethod
    def backend_identifier(name: str) -> str:
        return f"vhdblkd:{name}"

    def _config(self, image: Backend, entry: VhdtabEntry) -> DeviceConfig:
        read_only = entry.read_only or image.read_only
        disk_type = str(getattr(image, "disk_type", ""))
        return DeviceConfig(
            size=image.size,
            logical_block_size=entry.block_size,
            read_only=read_only,
            can_flush=image.can_flush,
            discard=disk_type in ("dynamic", "differencing") and image.can_discard,
            queues=entry.connections,
        )

    def _write_name(self, dev_id: int, name: str) -> None:
        self.name_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.name_dir / f".ublkb{dev_id}.tmp"
        tmp.write_text(self.backend_identifier(name) + "\n")
        os.replace(tmp, self.name_dir / f"ublkb{dev_id}")

    def forget_name(self, dev_id: int) -> None:
        try:
            (self.name_dir / f"ublkb{dev_id}").unlink()
        except FileNotFoundError:
            pass

    def _identifier(self, dev_id: int) -> str | None:
        try:
            return (self.name_dir / f"ublkb{dev_id}").read_text().strip() or None
        except OSError:
            return None

    def attach(self, image: Backend, entry: VhdtabEntry) -> UblkAttachment:
        config = self._config(image, entry)
        handler = BackendHandler(image, read_only=config.read_only)
        dev = UblkDevice.create(handler, config, before_start=lambda dev_id: self._write_name(dev_id, entry.name))
        return UblkAttachment(self, image, dev)

    def adopt(
        self, image: Backend, entry: VhdtabEntry, record: Mapping[str, Any], inherited: MutableMapping[str, int]
    ) -> UblkAttachment:
        dev_id = int(record["index"])
        config = self._config(image, entry)
        dev = UblkDevice.recover(dev_id, BackendHandler(image, read_only=config.read_only), config)
        self._write_name(dev_id, entry.name)
        return UblkAttachment(self, image, dev)

    def drop(self, record: Mapping[str, Any]) -> None:
        dev_id = int(record["index"])
        with Control() as control:
            try:
                control.stop_dev(dev_id)  # a device without a server: its held I/O fails
                control.del_dev(dev_id)
            except UblkError as exc:
                log.warning("removing /dev/ublkb%d left behind: %s", dev_id, exc)
        self.forget_name(dev_id)

    def live_devices(self) -> list[LiveDevice]:
        found: list[LiveDevice] = []
        try:
            names = os.listdir("/sys/class/ublk-char")
        except FileNotFoundError:
            return found  # no ublk driver loaded: no ublk devices
        ids = sorted(int(n[5:]) for n in names if n.startswith("ublkc") and n[5:].isdigit())
        if not ids:
            return found
        try:
            with Control() as control:
                for dev_id in ids:
                    try:
                        info = control.get_dev_info(dev_id)
                    except UblkError:
                        continue  # went away meanwhile
                    # A device whose server died is QUIESCED (its I/O held): that is one to take back.
                    found.append(LiveDevice(f"/dev/ublkb{dev_id}", dev_id, self._identifier(dev_id),
                                            info.state != uc.UBLK_S_DEV_DEAD))
        except UblkError as exc:
            raise DaemonError(f"cannot ask the kernel which ublk devices exist: {exc}") from None
        return found

    def close(self) -> None:
        pass

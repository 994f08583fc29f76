"""Attachments: an image, the kernel device a transport made for it, and the table of them all.

attach and adopt are one path: check that neither the name nor the image
(through any symlink) nor the device is taken, open the image (locked), let
the transport make or take over the device.  detach: write back the
device's page cache, flush the image (the kernel's disconnect sends no
FLUSH), disconnect, flush what the last requests wrote, close the image.
A flush that fails (a full or failing host disk) stops the detach where it
is: the attachment stays in the table as detach-failed with the error, its
image open and locked (closing would drop what is not durable yet), and the
device connected if it still was; `detach` again, once the disk is fixed,
goes on from there.  The slow parts of attach and detach
run outside the table's lock, so `list` and `status` answer meanwhile; a
name being attached or detached is reserved, so a second attach or detach
of it is refused until the first is done.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..backend import Backend
from ..errors import DaemonError, DetachFailed, VhdblkError
from .inuse import device_in_use, mounted_on
from .state import StateRecord
from .transport import Device, Transport
from .vhdtab import VhdtabEntry, clash, same_image

log = logging.getLogger(__name__)

SYNC_SECONDS = 30.0


class ImageOpener(Protocol):
    def __call__(self, path: str, *, read_only: bool, allow_unsafe_parent: bool,
                 strict_parent_timestamp: bool) -> Backend: ...


BusyCheck = Callable[[str], str | None]  # kernel name (nbd0) -> why it is in use, or None
DeviceSync = Callable[[str], None]


def default_opener(path: str, *, read_only: bool, allow_unsafe_parent: bool,
                   strict_parent_timestamp: bool) -> Backend:
    from ..vhd.image import open_image

    image: Backend = open_image(path, read_only=read_only, allow_unsafe_parent=allow_unsafe_parent,
                                strict_parent_timestamp=strict_parent_timestamp)
    return image


def sync_device(kernel_name: str) -> None:
    """Write back what the kernel holds for the device and FLUSH it (bounded: runs in a thread).

    A file system still mounted on it (a forced detach, or a poweroff without
    an unmount first) gets a sync(2) so its dirty data lands before the
    device goes; then an fsync of the device writes back its own page cache.
    """
    path = f"/dev/{kernel_name}"

    def work() -> None:
        if mounted_on(kernel_name):
            os.sync()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            log.warning("fsync of %s failed: %s", path, exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=work, name=f"sync-{kernel_name}", daemon=True)
    thread.start()
    thread.join(SYNC_SECONDS)
    if thread.is_alive():
        log.warning("fsync of %s did not finish in %.0f s; detaching anyway", path, SYNC_SECONDS)


@dataclass(eq=False)
class Attachment:
    entry: VhdtabEntry
    image: Backend
    device: Device
    transport: str
    from_vhdtab: bool
    started: float
    failed: str | None = None  # why the last detach stopped; the attachment waits for another
    disconnected: bool = False  # that detach got as far as disconnecting the device

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def path(self) -> str:
        return self.device.path

    def describe(self) -> dict[str, Any]:
        disk_type = getattr(self.image, "disk_type", None)
        return {
            "name": self.name,
            "device": self.path,
            "image": self.entry.image,
            "type": None if disk_type is None else str(getattr(disk_type, "name", disk_type)).lower(),
            "size": self.image.size,
            "read_only": self.image.read_only,
            "transport": self.transport,
            "connections": self.device.connections,
            "from_vhdtab": self.from_vhdtab,
            "reconnects": self.device.reconnects,
            "options": self.entry.options,
            "stats": self.device.stats(),
            "state": "attached" if self.failed is None else "detach-failed",
            "error": self.failed,
            "disconnected": self.disconnected,
        }

    def record(self) -> StateRecord:
        return StateRecord(self.name, self.entry.image, self.path, self.transport, self.device.record(),
                           self.entry.options, self.from_vhdtab, detach_failed=self.failed,
                           disconnected=self.disconnected)


class AttachmentManager:
    def __init__(
        self,
        transport: Transport,
        *,
        opener: ImageOpener = default_opener,
        busy: BusyCheck = device_in_use,
        sync: DeviceSync = sync_device,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.transport = transport
        self._opener = opener
        self._busy = busy
        self._sync = sync
        self._on_change = on_change
        self._lock = threading.Lock()
        self._table: dict[str, Attachment] = {}
        self._reserved: dict[str, VhdtabEntry] = {}  # being attached or detached right now

    def attachments(self) -> list[Attachment]:
        with self._lock:
            return sorted(self._table.values(), key=lambda a: a.path)

    def names(self) -> set[str]:
        with self._lock:
            return set(self._table) | set(self._reserved)

    def get(self, name: str) -> Attachment | None:
        with self._lock:
            return self._table.get(name)

    def find(self, key: str) -> Attachment:
        """By name, device (/dev/nbd0 or nbd0) or image path."""
        with self._lock:
            return self._find(key)

    def _find(self, key: str) -> Attachment:
        if key in self._table:
            return self._table[key]
        for att in self._table.values():
            if key in (att.path, os.path.basename(att.path)):
                return att
        if key.startswith("/"):
            for att in self._table.values():
                if same_image(key, att.entry.image):
                    return att
        raise DaemonError(f"no attachment named {key!r} (give a device such as /dev/nbd0, a name or an image path)")

    def busy_reason(self, att: Attachment) -> str | None:
        return self._busy(att.device.kernel_name)

    def busy_path(self, path: str) -> str | None:
        """Why the device at `path` (/dev/nbd0) is in use, or None."""
        return self._busy(os.path.basename(path))

    # --- attach and adopt: one path -------------------------------------------

    def attach(self, entry: VhdtabEntry, *, from_vhdtab: bool) -> Attachment:
        att = self._bring_up(entry, from_vhdtab, lambda image: self.transport.attach(image, entry))
        log.info("attached %s as %s (%s)", entry.image, att.path, entry.name)
        return att

    def adopt(
        self, entry: VhdtabEntry, record: StateRecord, inherited: MutableMapping[str, int], *, from_vhdtab: bool
    ) -> Attachment:
        """Take over a device a previous daemon left behind (handed over, or after a crash)."""
        att = self._bring_up(
            entry, from_vhdtab, lambda image: self.transport.adopt(image, entry, record.device, inherited)
        )
        log.info("re-adopted %s as %s (%s)", entry.image, att.path, entry.name)
        return att

    def _bring_up(self, entry: VhdtabEntry, from_vhdtab: bool, make: Callable[[Backend], Device]) -> Attachment:
        with self._lock:
            self._check_free(entry)
            self._reserved[entry.name] = entry
        try:
            image = self._open(entry)
            try:
                device = make(image)
            except BaseException:
                image.close()
                raise
            att = Attachment(entry, image, device, entry.transport, from_vhdtab, time.time())
            with self._lock:
                self._table[entry.name] = att
        finally:
            with self._lock:
                del self._reserved[entry.name]
        self._changed()
        return att

    def _check_free(self, entry: VhdtabEntry) -> None:
        entries = [a.entry for a in self._table.values()] + list(self._reserved.values())
        found = clash(entry, entries)
        if found is not None:
            what, other = found
            att = self._table.get(other.name)
            where = "being attached or detached" if att is None else f"attached as {att.path}"
            if what == "name":
                raise DaemonError(f"the name {entry.name!r} is already {where}")
            if what == "image":
                raise DaemonError(f"{entry.image} is already {where} ({other.name})")
            raise DaemonError(f"/dev/nbd{entry.device_index} is already wanted by {other.name} ({other.image})")
        if entry.device_index is not None:
            wanted = f"/dev/nbd{entry.device_index}"
            for att in self._table.values():
                if att.path == wanted:
                    raise DaemonError(f"{att.path} is already in use by {att.name} ({att.entry.image})")

    def _open(self, entry: VhdtabEntry) -> Backend:
        if not os.path.exists(entry.image):
            raise DaemonError(f"{entry.image}: no such file")
        try:
            return self._opener(entry.image, read_only=entry.read_only, allow_unsafe_parent=entry.allow_unsafe_parent,
                                strict_parent_timestamp=entry.strict_parent_timestamp)
        except VhdblkError:
            raise
        except OSError as exc:
            raise DaemonError(f"{entry.image}: cannot open: {exc.strerror or exc}") from None

    # --- detach -----------------------------------------------------------------

    def detach(self, key: str, *, force: bool = False) -> Attachment:
        with self._lock:
            att = self._find(key)
            if att.name in self._reserved:
                raise DaemonError(f"{att.path} ({att.name}) is already being detached")
            if not force and not att.disconnected:
                reason = self._busy(att.device.kernel_name)
                if reason is not None:
                    raise DaemonError(
                        f"{att.path} ({att.name}) is in use: {reason}; unmount it first or detach with --force"
                    )
            self._reserved[att.name] = att.entry
        try:
            self._detach_steps(att)  # up to a minute of syncing and draining: not under the lock
        except BaseException:
            with self._lock:
                del self._reserved[att.name]  # kept in the table: listed, locked, ready for a retry
            self._changed()
            raise
        with self._lock:
            del self._table[att.name]
            del self._reserved[att.name]
        log.info("detached %s (%s) from %s", att.path, att.name, att.entry.image)
        self._changed()
        return att

    def _detach_steps(self, att: Attachment) -> None:
        """The detach's teardown, resumed where a failed one stopped; DetachFailed keeps the attachment."""
        if not att.disconnected:
            self._sync(att.device.kernel_name)
            self._flush_or_keep(att)  # the kernel's disconnect sends no FLUSH
            att.device.disconnect()
            att.disconnected = True
        self._flush_or_keep(att)  # what the last requests before the disconnect wrote
        att.failed = None
        self._close(att)

    @staticmethod
    def _flush_or_keep(att: Attachment) -> None:
        if att.image.read_only or not att.image.can_flush:
            return
        try:
            att.image.flush()
        except (OSError, VhdblkError) as exc:
            att.failed = f"flushing {att.entry.image} failed: {exc}"
            log.error("%s: detach stopped: %s", att.name, att.failed)
            where = ("the device is disconnected, but the image" if att.disconnected
                     else f"{att.path} stays attached and the image")
            raise DetachFailed(
                f"{att.path} ({att.name}): detach stopped: flushing {att.entry.image} failed: {exc}. What was "
                f"written may not be on disk yet, so {where} stays open and locked (listed as detach-failed); "
                f"free space on or repair the disk holding the image, then run `vhdblkctl detach {att.name}` "
                "again") from exc

    def _teardown(self, att: Attachment) -> None:
        if not att.disconnected:
            self._sync(att.device.kernel_name)
            self._flush(att)
            att.device.disconnect()
        self._close(att)

    @staticmethod
    def _flush(att: Attachment) -> None:
        if att.image.read_only or not att.image.can_flush:
            return
        try:
            att.image.flush()
        except (OSError, VhdblkError) as exc:
            log.error("%s: flushing %s failed: %s", att.name, att.entry.image, exc)

    @staticmethod
    def _close(att: Attachment) -> None:
        try:
            att.image.close()
        except (OSError, VhdblkError) as exc:
            log.error("%s: closing %s failed: %s", att.name, att.entry.image, exc)

    # --- the service stopping -----------------------------------------------------

    def _take_all(self) -> list[Attachment]:
        with self._lock:
            atts = sorted(self._table.values(), key=lambda a: a.path)
            self._table.clear()
        return atts

    def shutdown(self) -> None:
        """Flush and detach everything, in use or not (the system is going down)."""
        for att in self._take_all():
            self._teardown(att)
            log.info("detached %s (%s)", att.path, att.name)
        self._changed()

    def handover(self) -> tuple[list[StateRecord], list[tuple[str, int]], list[Device]]:
        """Stop every device between two requests, flush, close; keep the devices for the next daemon.

        Returns the records to keep, the descriptors to hand over and the
        devices whose copies of them to close once handed over; a device
        that could not stop cleanly is released (it waits for the next daemon
        to give it fresh connections).
        """
        kept: list[StateRecord] = []
        fds: list[tuple[str, int]] = []
        devices: list[Device] = []
        for att in self._take_all():
            if att.disconnected:  # a detach stopped after the disconnect: no device left to hand over
                self._teardown(att)
                continue
            handed = att.device.handover()
            self._flush(att)
            if handed is None:
                att.device.release()
            else:
                fds.extend(handed)
                devices.append(att.device)
            kept.append(att.record())
            self._close(att)
            log.info("%s (%s) flushed and kept for the next daemon", att.path, att.name)
        return kept, fds, devices

    def stop(self) -> list[StateRecord]:
        """Detach what is free; flush and keep what is in use for the next daemon (`systemctl stop`)."""
        kept: list[StateRecord] = []
        for att in self._take_all():
            reason = self._busy(att.device.kernel_name)
            if reason is None:
                self._teardown(att)
                log.info("detached %s (%s)", att.path, att.name)
                continue
            self._sync(att.device.kernel_name)
            self._flush(att)
            att.device.release()
            self._flush(att)  # what the last requests wrote
            self._close(att)
            kept.append(att.record())
            log.warning(
                "%s (%s) is in use (%s): flushed and left waiting for the next vhdblkd, which takes it back "
                "if it starts within dead_conn_timeout (%d s); after that its I/O fails",
                att.path, att.name, reason, att.entry.dead_conn_timeout_seconds,
            )
        return kept

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

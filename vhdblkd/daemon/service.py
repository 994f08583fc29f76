"""`vhdblkd run`: the service that owns every attachment.

Start: open the control socket, take back the devices a previous daemon
left (handed over at a restart, or after a crash), attach each vhdtab line
(a bad line or a failed attach is logged, shown in STATUS and skipped),
READY=1.  SIGHUP re-reads the vhdtab.  SIGTERM/SIGINT: STOPPING=1, refuse
new requests, then by why we stop (see intent.py): a restart flushes and
hands every device to the next daemon; a stop detaches the free devices and
keeps the ones in use waiting for the next daemon; a shutdown flushes and
detaches everything.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import ConfigError, DaemonError, VhdblkError
from .attachments import AttachmentManager
from .control import DEFAULT_CONTROL, ControlServer
from .intent import Intent, probe
from .notify import Notifier, inherited_fds
from .reload import plan_reload
from .state import STATE_FILE, StateRecord, entry_from_record, read_state, write_state
from .transport import Transport
from .vhdtab import (
    VhdtabEntry,
    append_entry,
    check_appendable,
    check_name,
    config_path,
    load_vhdtab,
    name_for_image,
    parse_device,
)

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/vhdblkd")


class Service:
    def __init__(
        self,
        *,
        config: Path,
        control: Path,
        state_dir: Path,
        transport: Transport,
        notifier: Notifier,
        make_manager: Callable[[Transport, Callable[[], None]], AttachmentManager] | None = None,
        control_factory: Callable[[Path, Callable[[dict[str, Any]], dict[str, Any]]], ControlServer] | None = None,
        clock: Callable[[], float] = time.time,
        intent: Callable[[], tuple[Intent, str]] | None = None,
        inherited: dict[str, int] | None = None,
    ) -> None:
        self.config = config
        self.state_path = state_dir / STATE_FILE
        self.notifier = notifier
        self.transport = transport
        self._clock = clock
        self._intent = intent or partial(probe, os.environ)
        self._inherited = dict(inherited or {})
        self.started = clock()
        self.config_errors: list[str] = []
        self.attach_errors: dict[str, str] = {}
        self._table_names: set[str] = set()
        # Names whose image still has a device in use that could not be taken
        # back: attaching them again would put one image on two devices.
        self._blocked: dict[str, str] = {}
        factory = make_manager or (lambda t, cb: AttachmentManager(t, on_change=cb))
        self.manager = factory(transport, self._save_state)
        self.control = (control_factory or ControlServer)(control, self.handle)
        self._state_lock = threading.Lock()
        self._config_lock = threading.Lock()  # one reload or persisted attach at a time
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._want_reload = False
        self._want_stop = False

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self.control.start()  # refuses to start when another daemon is live
        self._take_back()
        self._apply_config(initial=True)
        self.notifier.ready(self.status_line())
        log.info("ready: %s", self.status_line())

    def request_stop(self) -> None:
        self._want_stop = True
        self._wake.set()

    def request_reload(self) -> None:
        self._want_reload = True
        self._wake.set()

    def run_forever(self) -> None:
        interval = self.notifier.watchdog_seconds
        while True:
            if interval is not None:
                self.notifier.watchdog()
            self._wake.wait(interval)
            self._wake.clear()
            if self._want_stop:
                break
            if self._want_reload:
                self._want_reload = False
                self.reload()
        self.stop()

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.notifier.stopping()
        intent, why = self._intent()
        count = len(self.manager.attachments())
        log.info("stopping (%s: %s) with %d attachment(s)", intent.value, why, count)
        self.control.stop()
        if intent is Intent.RESTART:
            kept = self._hand_over()
        elif intent is Intent.STOP:
            kept = self.manager.stop()
        else:
            self.manager.shutdown()
            kept = []
        self._write_state(kept)
        try:
            self.transport.close()
        except VhdblkError as exc:
            log.warning("%s", exc)
        log.info("stopped")

    def _hand_over(self) -> list[StateRecord]:
        kept, fds, devices = self.manager.handover()
        if fds and not (self.notifier.store_fds(fds) and self.notifier.barrier()):
            log.warning(
                "the service manager did not take the devices' sockets (no FileDescriptorStoreMax=?): "
                "the next vhdblkd gives the devices new ones within their dead_conn_timeout"
            )
        for device in devices:
            device.close()
        return kept

    def reload(self) -> None:
        self.notifier.reloading()
        log.info("reloading %s", self.config)
        self._apply_config(initial=False)
        self.notifier.ready(self.status_line())

    # --- configuration ------------------------------------------------------

    def _apply_config(self, *, initial: bool) -> None:
        table = load_vhdtab(self.config)
        self.config_errors = [str(e) for e in table.errors]
        for err in self.config_errors:
            log.error("%s (line skipped)", err)
        # Failures of entries taken out of the file are forgotten.
        wanted = {e.name for e in table.entries}
        removed = self._table_names - wanted
        self.attach_errors = {k: v for k, v in self.attach_errors.items() if k not in removed}
        self._table_names = wanted | table.bad_names
        with self._config_lock:
            live: dict[str, VhdtabEntry] = {}
            for att in self.manager.attachments():
                if att.from_vhdtab:
                    live[att.name] = att.entry
                elif att.name in wanted and att.entry in table.entries:
                    att.from_vhdtab = True  # the same line was added by hand: adopt it
                    live[att.name] = att.entry
            plan = plan_reload(live, table.entries)
            for name in plan.detach:
                if name in table.bad_names:
                    log.warning("%s: its vhdtab line is invalid now; leaving the attachment as it is", name)
                    continue
                self._try(name, partial(self.manager.detach, name, force=False))
            for entry in plan.change:
                self._reattach(entry)
            for entry in plan.attach:
                if entry.name in self._blocked:
                    self.attach_errors[entry.name] = self._blocked[entry.name]
                    continue
                self._try(entry.name, partial(self.manager.attach, entry, from_vhdtab=True))
        if not initial:
            log.info(
                "reloaded: %d attached, %d detached, %d changed, %d unchanged",
                len(plan.attach),
                len(plan.detach),
                len(plan.change),
                len(plan.unchanged),
            )

    def _reattach(self, entry: VhdtabEntry) -> None:
        """A changed vhdtab line: detach and attach again, unless the device is in use."""
        current = self.manager.get(entry.name)
        assert current is not None
        reason = self.manager.busy_reason(current)
        if reason is not None:
            msg = f"vhdtab entry {entry.name!r} changed but {current.path} is in use ({reason}): detach it to apply the change"
            log.warning("%s", msg)
            self.attach_errors[entry.name] = msg
            return
        self._try(entry.name, partial(self.manager.detach, entry.name, force=False))
        if self.manager.get(entry.name) is None:
            self._try(entry.name, partial(self.manager.attach, entry, from_vhdtab=True))

    def _take_back(self) -> None:
        """Take over the devices a previous daemon left in the kernel, before anything is attached.

        Each one named in the state file and still connected is adopted: with
        the sockets it handed over (a restart) or with fresh ones (a crash, a
        stop).  One that cannot be adopted is removed if nothing uses it, and
        otherwise left alone with its image blocked, so the image never gets
        a second device.  A device carrying our backend identifier that no
        record names is treated the same way.
        """
        inherited = self._inherited
        self._inherited = {}
        self.notifier.remove_fds(inherited)  # ours now; a crash from here on must not hand them on
        try:
            live = {d.path: d for d in self.transport.live_devices()}
        except VhdblkError as exc:
            log.warning("%s; not taking back devices", exc)
            live = {}
        records = read_state(self.state_path)
        for record in records:
            if record.disconnected:  # its path may serve a later attachment now: leave `live` alone
                self._report_failed_detach(record)
                continue
            dev = live.pop(record.path, None)
            if dev is None or not dev.connected:
                log.info("%s: %s is no longer connected; not taking it back", record.name, record.path)
                continue
            expected = self.transport.backend_identifier(record.name)
            # `live` is keyed by device path, so a record only meets a device of its own transport.
            if dev.backend_identifier not in (None, expected):
                log.error("%s: %s now belongs to %s; leaving it alone", record.name, record.path, dev.backend_identifier)
                continue
            try:
                entry = entry_from_record(record)
                self.manager.adopt(entry, record, inherited, from_vhdtab=record.from_vhdtab)
            except VhdblkError as exc:
                self._cannot_take_back(record.name, record.path, record.device, f"cannot be taken back: {exc}")
        for fd in inherited.values():  # descriptors of devices no record names any more
            os.close(fd)
        taken = self.manager.names()
        for dev in live.values():
            for name in self._table_names_from_identifier(dev.backend_identifier):
                if name not in taken:
                    self._cannot_take_back(name, dev.path, {"index": dev.index, "path": dev.path},
                                           "no state record names it")

    def _report_failed_detach(self, record: StateRecord) -> None:
        msg = (
            f"the earlier vhdblkd's detach of {record.image} stopped after disconnecting {record.path}: "
            f"{record.detach_failed or 'its flush failed'}; what was written last may not be on disk; "
            f"run `vhdblkctl check {record.image}` before using it again"
        )
        log.error("%s: %s", record.name, msg)
        self.attach_errors[record.name] = msg

    def _table_names_from_identifier(self, identifier: str | None) -> list[str]:
        prefix = self.transport.backend_identifier("")
        if identifier is None or not identifier.startswith(prefix) or identifier == prefix:
            return []
        return [identifier[len(prefix) :]]

    def _cannot_take_back(self, name: str, path: str, device: dict[str, Any], why: str) -> None:
        reason = self.manager.busy_path(path)
        if reason is None:
            msg = f"{path} was left by an earlier vhdblkd and {why}; nothing used it, so it was removed"
            log.warning("%s: %s", name, msg)
            self.attach_errors[name] = msg
            try:
                self.transport.drop(device)
            except VhdblkError as exc:
                log.warning("%s: %s", path, exc)
            return
        msg = (
            f"{path} still serves {name!r} from an earlier vhdblkd and is in use ({reason}), but {why}: "
            f"not attaching the image again; unmount it and restart vhdblkd"
        )
        log.error("%s", msg)
        self._blocked[name] = msg
        self.attach_errors[name] = msg

    def _try(self, name: str, action: Callable[[], object]) -> None:
        try:
            action()
        except VhdblkError as exc:
            log.error("%s: %s", name, exc)
            self.attach_errors[name] = str(exc)
        else:
            self.attach_errors.pop(name, None)

    def _save_state(self) -> None:
        if self._stopping.is_set():
            return  # stop() writes the final state itself
        self._write_state([a.record() for a in self.manager.attachments()])
        self.notifier.status(self.status_line())

    def _write_state(self, records: list[StateRecord]) -> None:
        with self._state_lock:
            try:
                write_state(self.state_path, os.getpid(), records)
            except OSError as exc:
                log.error("cannot write %s: %s", self.state_path, exc)

    # --- status -------------------------------------------------------------

    def status_line(self) -> str:
        atts = self.manager.attachments()
        text = f"{len(atts)} attached"
        if atts:
            text += ": " + " ".join(f"{a.name}={a.path}" for a in atts)
        problems = len(self.config_errors) + len(self.attach_errors)
        if problems:
            first = (self.config_errors + list(self.attach_errors.values()))[0]
            text += f"; {problems} error{'s' if problems != 1 else ''}: {first}"
        return text

    # --- control requests ---------------------------------------------------

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if self._stopping.is_set():
            raise DaemonError("vhdblkd is shutting down")
        if op == "attach":
            return self._op_attach(request)
        if op == "detach":
            att = self.manager.detach(_str(request, "target"), force=bool(request.get("force", False)))
            return {"ok": True, "device": att.path, "name": att.name}
        if op == "list":
            return {"ok": True, "attachments": [a.describe() for a in self.manager.attachments()]}
        if op == "status":
            return {"ok": True, **self._status()}
        if op == "ping":
            return {"ok": True}
        raise DaemonError(f"unknown request {op!r} (expected attach, detach, list, status)")

    def _status(self) -> dict[str, Any]:
        atts = self.manager.attachments()
        return {
            "pid": os.getpid(),
            "uptime_seconds": round(self._clock() - self.started, 1),
            "config": str(self.config),
            "config_errors": list(self.config_errors),
            "attach_errors": dict(self.attach_errors),
            "attachments": [{"name": a.name, "device": a.path, "image": a.entry.image, "error": a.failed}
                            for a in atts],
            "status": self.status_line(),
        }

    def _op_attach(self, request: dict[str, Any]) -> dict[str, Any]:
        image = _str(request, "image")
        if not os.path.isabs(image):
            raise DaemonError(f"image path {image!r} must be absolute")
        persist = bool(request.get("persist", False))
        with self._config_lock:
            name = request.get("name")
            if name is None:
                name = name_for_image(image, self.manager.names() | self._vhdtab_names())
            elif not isinstance(name, str):
                raise DaemonError("'name' must be a string")
            check_name(name)
            device = request.get("device")
            try:
                entry = VhdtabEntry(
                    name,
                    image,
                    read_only=bool(request.get("read_only", False)),
                    device_index=None if device is None else parse_device(str(device)),
                    connections=int(request.get("connections", 1)),
                    allow_unsafe_parent=bool(request.get("allow_unsafe_parent", False)),
                    strict_parent_timestamp=bool(request.get("strict_parent_timestamp", False)),
                    transport=str(request.get("transport", "nbd")),
                )
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"bad attach request: {exc}") from None
            if persist:
                check_appendable(self.config, load_vhdtab(self.config), entry)
            if entry.name in self._blocked:
                raise DaemonError(self._blocked[entry.name])
            att = self.manager.attach(entry, from_vhdtab=persist)
            if persist:
                try:
                    append_entry(self.config, entry)
                except (OSError, ConfigError) as exc:
                    self.manager.detach(entry.name, force=True)
                    raise DaemonError(f"attached, but cannot add the line to {self.config} ({exc}); detached again") from None
            return {"ok": True, **att.describe()}

    def _vhdtab_names(self) -> set[str]:
        return {e.name for e in load_vhdtab(self.config).entries}


def _str(request: Mapping[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise DaemonError(f"request field {key!r} must be a non-empty string")
    return value


# --- command line -------------------------------------------------------------


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="run the service (the default)", description=__doc__)
    p.add_argument("--config", help="the vhdtab (default $VHDBLKD_CONFIG or /etc/vhdblkd/vhdtab)")
    p.add_argument("--control", default=str(DEFAULT_CONTROL), help="control socket path (default %(default)s)")
    p.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help="runtime state directory (default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    configure_logging(bool(getattr(args, "verbose", False)), os.environ)
    from ..nbd.netlink import NbdNetlink
    from .nbd_device import NbdTransport
    from .transports import Transports
    from .ublk_device import UblkTransport

    inherited = inherited_fds(os.environ, os.getpid())
    notifier = Notifier(os.environ)
    try:
        transport = Transports(NbdTransport(NbdNetlink()), UblkTransport)
    except VhdblkError:
        raise
    except OSError as exc:
        raise DaemonError(f"cannot open the kernel's nbd netlink interface: {exc}") from exc
    service = Service(
        config=config_path(args.config, os.environ),
        control=Path(args.control),
        state_dir=Path(args.state_dir),
        transport=transport,
        notifier=notifier,
        inherited=inherited,
    )
    install_signals(service)
    try:
        service.start()
    except BaseException:
        service.stop()
        raise
    service.run_forever()
    return 0


class JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority (<3> error ... <7> debug), which journald reads."""

    PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def configure_logging(verbose: bool, environ: Mapping[str, str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if environ.get("JOURNAL_STREAM"):  # stderr goes to the journal: it adds time and name itself
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s vhdblkd: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # The netlink library's own debug output would drown ours.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


def install_signals(service: Service) -> None:
    def on_stop(signum: int, frame: FrameType | None) -> None:
        service.request_stop()

    def on_reload(signum: int, frame: FrameType | None) -> None:
        service.request_reload()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)

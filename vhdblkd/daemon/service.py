"""`vhdblkd run`: the service that owns every attachment.

Start: attach each vhdtab line (a bad line or a failed attach is logged,
shown in STATUS and skipped), open the control socket, READY=1.  SIGHUP
re-reads the vhdtab.  SIGTERM/SIGINT: STOPPING=1, refuse new requests,
flush and detach everything, exit 0.
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
from .kernel import Kernel
from .notify import Notifier
from .reload import plan_reload
from .state import STATE_FILE, entry_from_record, read_state, write_state
from .vhdtab import VhdtabEntry, append_entry, check_name, config_path, load_vhdtab, name_for_image, parse_device

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/vhdblkd")


class Service:
    def __init__(
        self,
        *,
        config: Path,
        control: Path,
        state_dir: Path,
        kernel: Kernel,
        notifier: Notifier,
        make_manager: Callable[[Kernel, Callable[[], None]], AttachmentManager] | None = None,
        control_factory: Callable[[Path, Callable[[dict[str, Any]], dict[str, Any]]], ControlServer] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.state_path = state_dir / STATE_FILE
        self.notifier = notifier
        self.kernel = kernel
        self._clock = clock
        self.started = clock()
        self.config_errors: list[str] = []
        self.attach_errors: dict[str, str] = {}
        self._table_names: set[str] = set()
        factory = make_manager or (lambda k, cb: AttachmentManager(k, on_change=cb))
        self.manager = factory(kernel, self._save_state)
        self.control = (control_factory or ControlServer)(control, self.handle)
        self._state_lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._want_reload = False
        self._want_stop = False

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self.control.start()  # refuses to start when another daemon is live
        self._readopt()
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
        log.info("stopping: flushing and detaching %d attachment(s)", len(self.manager.attachments()))
        self.control.stop()
        self.manager.shutdown()
        try:
            self.kernel.close()
        except VhdblkError as exc:
            log.warning("%s", exc)
        log.info("stopped")

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
        with self.manager.locked():
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
                current = self.manager.get(entry.name)
                assert current is not None
                reason = self.manager.busy_reason(current)
                if reason is not None:
                    msg = f"vhdtab entry {entry.name!r} changed but {current.device} is in use ({reason}): detach it to apply the change"
                    log.warning("%s", msg)
                    self.attach_errors[entry.name] = msg
                    continue
                self._try(entry.name, partial(self.manager.detach, entry.name, force=False))
                if self.manager.get(entry.name) is None:
                    self._try(entry.name, partial(self.manager.attach, entry, from_vhdtab=True))
            for entry in plan.attach:
                self._try(entry.name, partial(self.manager.attach, entry, from_vhdtab=True))
        if not initial:
            log.info(
                "reloaded: %d attached, %d detached, %d changed, %d unchanged",
                len(plan.attach),
                len(plan.detach),
                len(plan.change),
                len(plan.unchanged),
            )

    def _readopt(self) -> None:
        """Take back the devices a daemon that died left in the kernel (state file + NBD_CMD_STATUS)."""
        records = read_state(self.state_path)
        if not records:
            return
        try:
            known = self.kernel.status()
        except VhdblkError as exc:
            log.warning("cannot ask the kernel which nbd devices exist (%s); not re-adopting", exc)
            return
        for record in records:
            if not known.get(record.index, False):
                log.info("%s: /dev/nbd%d is no longer connected; not re-adopting", record.name, record.index)
                continue
            try:
                entry = entry_from_record(record)
                self.manager.adopt(entry, record.index, from_vhdtab=record.from_vhdtab)
            except VhdblkError as exc:
                log.error("%s: cannot re-adopt /dev/nbd%d: %s; disconnecting it", record.name, record.index, exc)
                self.attach_errors[record.name] = f"cannot re-adopt /dev/nbd{record.index}: {exc}"
                # Nobody can serve it now: fail its I/O at once and free the index.
                try:
                    self.kernel.disconnect(record.index)
                except VhdblkError as again:
                    log.warning("/dev/nbd%d: %s", record.index, again)

    def _try(self, name: str, action: Callable[[], object]) -> None:
        try:
            action()
        except VhdblkError as exc:
            log.error("%s: %s", name, exc)
            self.attach_errors[name] = str(exc)
        else:
            self.attach_errors.pop(name, None)

    def _save_state(self) -> None:
        records = [a.record() for a in self.manager.attachments()]
        with self._state_lock:
            try:
                write_state(self.state_path, os.getpid(), records)
            except OSError as exc:
                log.error("cannot write %s: %s", self.state_path, exc)
        if not self._stopping.is_set():
            self.notifier.status(self.status_line())

    # --- status -------------------------------------------------------------

    def status_line(self) -> str:
        atts = self.manager.attachments()
        text = f"{len(atts)} attached"
        if atts:
            text += ": " + " ".join(f"{a.name}={a.device}" for a in atts)
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
            return {"ok": True, "device": att.device, "name": att.name}
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
            "attachments": [{"name": a.name, "device": a.device, "image": a.entry.image} for a in atts],
            "status": self.status_line(),
        }

    def _op_attach(self, request: dict[str, Any]) -> dict[str, Any]:
        image = _str(request, "image")
        if not os.path.isabs(image):
            raise DaemonError(f"image path {image!r} must be absolute")
        persist = bool(request.get("persist", False))
        with self.manager.locked():
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
                )
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"bad attach request: {exc}") from None
            if persist:
                self._check_persistable(entry)
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

    def _check_persistable(self, entry: VhdtabEntry) -> None:
        for existing in load_vhdtab(self.config).entries:
            if existing.name == entry.name:
                raise DaemonError(f"{self.config} already has an entry named {entry.name!r}")
            if os.path.realpath(existing.image) == os.path.realpath(entry.image):
                raise DaemonError(f"{self.config} already has an entry for {entry.image} ({existing.name!r})")


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
    from .kernel import NetlinkKernel

    notifier = Notifier(os.environ)
    try:
        kernel = NetlinkKernel()
    except VhdblkError:
        raise
    except OSError as exc:
        raise DaemonError(f"cannot open the kernel's nbd netlink interface: {exc}") from exc
    service = Service(
        config=config_path(args.config, os.environ),
        control=Path(args.control),
        state_dir=Path(args.state_dir),
        kernel=kernel,
        notifier=notifier,
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

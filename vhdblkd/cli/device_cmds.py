"""Device commands: attach, detach, list, status; each is one request to vhdblkd.

Exit codes: 0 success; 1 the daemon refused or failed (the reason is one
line on stderr), or it is not running.
"""

from __future__ import annotations

import argparse
import os

from ..errors import ConfigError
from .parent_args import add_parent_args
from .sizes import format_size

# typing costs a tenth of `vhdblkctl list`; mypy treats any TYPE_CHECKING name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The control-socket client (socket, json) is imported when a command runs, not by the parser;
# in_daemon=True tells main() that nothing here logs, so it need not set up logging.

COMMANDS = ("attach", "detach", "list", "status")  # what register() adds, in order


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add attach, detach, list and status to vhdblkctl's argparse tree."""
    p = subparsers.add_parser(
        "attach",
        help="attach an image as /dev/nbdN (or /dev/ublkbN)",
        description="Ask vhdblkd to attach IMAGE as a block device and print the device path.",
    )
    p.add_argument("--read-only", "-r", action="store_true", help="attach read-only")
    p.add_argument("--name", help="attachment name (default: the image's file name without .vhd)")
    p.add_argument("--device", help="use this device (/dev/nbdN) instead of a free one")
    p.add_argument("--connections", type=int, default=None, help="NBD connections (several only for images that allow it)")
    p.add_argument("--transport", choices=("nbd", "ublk"), default="nbd",
                   help="the kernel interface: nbd (default) or ublk (Linux 6.1+, modprobe ublk_drv)")
    p.add_argument("--queues", type=int, default=None, help="ublk queues, each served by its own thread (default 1)")
    p.add_argument("--persist", action="store_true", help="also add the attachment to the vhdtab, so it comes back at boot")
    add_parent_args(p)
    p.add_argument("--json", action="store_true", help="print the attachment as JSON")
    _control_arg(p)
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_attach, in_daemon=True)

    p = subparsers.add_parser(
        "detach",
        help="flush and detach a device",
        description="Flush the image and detach it. A mounted or otherwise busy device is refused unless --force.",
    )
    p.add_argument("--force", action="store_true", help="detach even if the device is mounted or in use (data in use is lost)")
    _control_arg(p)
    p.add_argument("target", metavar="DEVICE|NAME|IMAGE")
    p.set_defaults(func=cmd_detach, in_daemon=True)

    p = subparsers.add_parser("list", help="list attached devices", description="List vhdblkd's attachments.")
    p.add_argument("--json", action="store_true", help="print JSON")
    _control_arg(p)
    p.set_defaults(func=cmd_list, in_daemon=True)

    p = subparsers.add_parser("status", help="show the daemon's state", description="Show vhdblkd's pid, uptime, attachments and configuration errors.")
    p.add_argument("--json", action="store_true", help="print JSON")
    _control_arg(p)
    p.set_defaults(func=cmd_status, in_daemon=True)


def _control_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", help="the daemon's control socket (default $VHDBLKD_CONTROL or /run/vhdblkd/control.sock)")


def _request(control: str | None, message: dict[str, Any]) -> dict[str, Any]:
    from .client import control_path, request

    return request(control_path(control), message)


def _print_json(obj: Any) -> None:
    import json

    print(json.dumps(obj, indent=2, sort_keys=True))


def cmd_attach(args: argparse.Namespace) -> int:
    if args.queues is not None and args.transport != "ublk":
        raise ConfigError("--queues is for --transport ublk; NBD uses --connections")
    if args.connections is not None and args.transport == "ublk":
        raise ConfigError("--connections is for NBD; ublk uses --queues")
    count = args.queues if args.transport == "ublk" else args.connections
    message: dict[str, Any] = {
        "op": "attach",
        # The daemon's working directory is not ours.
        "image": os.path.abspath(args.image),
        "read_only": args.read_only,
        "connections": 1 if count is None else count,
        "transport": args.transport,
        "persist": args.persist,
        "allow_unsafe_parent": args.allow_unsafe_parent,
        "strict_parent_timestamp": args.strict_parent_timestamp,
    }
    if args.name is not None:
        message["name"] = args.name
    if args.device is not None:
        message["device"] = args.device
    reply = _request(args.control, message)
    reply.pop("ok", None)
    if args.json:
        _print_json(reply)
    else:
        print(reply["device"])
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    target = args.target
    # An image path is resolved here (relative to our directory); names and devices pass as given.
    if not target.startswith("/dev/") and (os.sep in target or os.path.isfile(target)):
        target = os.path.abspath(target)
    _request(args.control, {"op": "detach", "target": target, "force": args.force})
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    reply = _request(args.control, {"op": "list"})
    atts: list[dict[str, Any]] = reply["attachments"]
    if args.json:
        _print_json(atts)
        return 0
    rows = [("DEVICE", "NAME", "TRANSPORT", "TYPE", "SIZE", "MODE", "CONN", "READS", "WRITES", "FLUSHES", "IMAGE")]
    for a in atts:
        stats = a.get("stats", {})
        rows.append(
            (
                a["device"],
                a["name"],
                str(a.get("transport", "nbd")),
                str(a.get("type") or "-"),
                format_size(int(a["size"])),
                ("ro" if a["read_only"] else "rw") + (" DETACH-FAILED" if a.get("error") else ""),
                str(a["connections"]),
                str(stats.get("reads", "-")),
                str(stats.get("writes", "-")),
                str(stats.get("flushes", "-")),
                a["image"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    reply = _request(args.control, {"op": "status"})
    reply.pop("ok", None)
    if args.json:
        _print_json(reply)
        return 0
    print(f"vhdblkd running: pid {reply['pid']}, up {_duration(float(reply['uptime_seconds']))}")
    print(f"config: {reply['config']}")
    atts = reply["attachments"]
    print(f"{len(atts)} attached" + (":" if atts else ""))
    for a in atts:
        print(f"  {a['device']}  {a['name']}  {a['image']}")
    errors = list(reply.get("config_errors", [])) + [f"{k}: {v}" for k, v in reply.get("attach_errors", {}).items()]
    errors += [f"{a['name']}: detach failed, still attached: {a['error']}" for a in atts if a.get("error")]
    if errors:
        print(f"{len(errors)} error{'s' if len(errors) != 1 else ''}:")
        for e in errors:
            print(f"  {e}")
    return 0


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"

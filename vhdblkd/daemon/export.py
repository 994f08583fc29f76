"""`vhdblkd export`: serve one VHD image to NBD clients over a unix socket or TCP.

No kernel device is involved: qemu-img, qemu-io, nbdcopy, nbdinfo, fio or a
remote nbd-client connect to the socket.  The image is opened locked, served
in the foreground until SIGINT or SIGTERM, then the server stops accepting,
answers what its clients have already sent, flushes and closes the image.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from types import FrameType
from typing import Any

from ..errors import ConfigError
from ..nbd.server import Export, SocketServer

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="serve one image over a unix socket or TCP (no kernel device)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--read-only", action="store_true", help="refuse writes; open the image read-only")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="PATH", help="listen on this unix socket path")
    where.add_argument("--tcp", metavar="HOST:PORT", help="listen on this TCP address (loopback unless --allow-remote)")
    p.add_argument("--name", metavar="EXPORT", help="export name (default: the image's file name; \"\" always works)")
    p.add_argument("--allow-remote", action="store_true", help="allow a TCP address other than loopback")
    p.add_argument("image", metavar="IMAGE", help="the VHD image to serve")
    p.set_defaults(func=run)


def parse_tcp(value: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 hosts in brackets: [::1]:10809)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"--tcp {value!r}: expected HOST:PORT, e.g. 127.0.0.1:10809 or [::1]:10809")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--tcp: cannot resolve {host!r}: {exc}") from exc
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="vhdblkd export: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    tcp = parse_tcp(args.tcp) if args.tcp is not None else None
    if tcp is not None and not args.allow_remote and not is_loopback(tcp[0]):
        raise ConfigError(
            f"--tcp {args.tcp}: {tcp[0]} is not a loopback address; NBD has no authentication here, so "
            "serving on the network needs --allow-remote (or use 127.0.0.1 / a unix socket)"
        )
    name = args.name if args.name is not None else os.path.basename(args.image)

    from ..vhd.image import open_image  # the format layer is only needed once arguments are valid

    try:
        image = open_image(args.image, read_only=args.read_only, lock=True)
    except OSError as exc:
        raise ConfigError(f"{args.image}: cannot open: {exc.strerror or exc}") from exc
    try:
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server = SocketServer(Export(image, name), unix_path=args.unix, tcp=tcp)
            server.start()
            address = server.address
            where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
            log.info(
                "serving %s as %r (%s, %d bytes) on %s",
                args.image,
                name,
                "read-only" if args.read_only else "read-write",
                image.size,
                where,
            )
            while not stop.wait(1.0):  # a timed wait lets the signal handler run promptly
                pass
            log.info("stopping: finishing requests in flight and flushing")
            server.shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        image.close()
    log.info("%s closed", args.image)
    return 0

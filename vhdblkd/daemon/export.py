"""`vhdblkd export`: serve VHD images to NBD clients over a unix socket or TCP.

No kernel device is involved: qemu-img, qemu-io, nbdcopy, nbdinfo, fio or a
remote nbd-client connect to the socket.  Each IMAGE is exported under its
file name, NAME=IMAGE picks the name, and --dir exports every *.vhd of a
directory; the first export is also the default one (the empty name).
Every image is opened and locked when the server starts, so a missing or
busy image stops the start instead of failing a client later; the images
are held until the server stops.

TLS (X.509, the standard library's ssl): --tls-cert and --tls-key turn it
on; --tls=require (the default with a certificate) refuses every option but
STARTTLS before the upgrade, --tls=on lets plain clients in too.  With
--tls-ca, clients must present a certificate signed by that CA.  A TCP
address other than loopback needs TLS required or --allow-remote.

The server runs in the foreground until SIGINT or SIGTERM, then stops
accepting, answers what its clients have already sent, flushes and closes
the images.  Under systemd (Type=notify) it reports READY once it listens.
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
from collections.abc import Sequence
from types import FrameType
from typing import Any

from ..errors import ConfigError
from ..nbd.handshake import TlsMode
from ..nbd.server import Catalog, Export, SocketServer
from ..nbd.tls import TlsConfig, server_context
from .notify import Notifier

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="serve images over a unix socket or TCP (no kernel device)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--read-only", action="store_true", help="refuse writes; open the images read-only")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="PATH", help="listen on this unix socket path")
    where.add_argument("--tcp", metavar="HOST:PORT", help="listen on this TCP address (loopback unless TLS or --allow-remote)")
    p.add_argument("--name", metavar="EXPORT", help="export name of a single IMAGE (default: its file name)")
    p.add_argument("--description", metavar="TEXT", help="export description shown to clients (default: type and file name)")
    p.add_argument("--dir", metavar="DIR", help="also export every *.vhd in DIR, named by file name")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback TCP address without TLS required")
    p.add_argument("--no-structured-replies", action="store_true",
                   help="speak simple replies only (no sparse reads, no block status), for clients that need it")
    p.add_argument("--tls", choices=[m.value for m in TlsMode], help="off, on (optional) or require (default with a certificate)")
    p.add_argument("--tls-cert", metavar="PEM", help="the server's certificate (chain)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--tls-ca", metavar="PEM", help="verify client certificates against this CA; clients without one are refused")
    p.add_argument("--allow-unsafe-parent", action="store_true",
                   help="follow a differencing image's parent even outside the image's folder (trust the image first)")
    p.add_argument("--strict-parent-timestamp", action="store_true",
                   help="refuse a parent whose modification time differs from what its child records "
                   "(by default the unique id alone identifies it)")
    p.add_argument("images", metavar="[NAME=]IMAGE", nargs="*", help="the VHD images to serve")
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


def export_list(images: Sequence[str], directory: str | None, name: str | None) -> list[tuple[str, str]]:
    """(export name, image path) pairs from the arguments, in order, names unique."""
    pairs: list[tuple[str, str]] = []
    for item in images:
        label, sep, path = item.partition("=")
        if not sep or os.path.exists(item) or not label:
            label, path = os.path.basename(item), item  # a path that itself holds "=" stays a path
        pairs.append((label, path))
    if name is not None:
        if len(pairs) != 1 or directory is not None:
            raise ConfigError("--name names a single IMAGE; with several, write NAME=IMAGE")
        pairs = [(name, pairs[0][1])]
    if directory is not None:
        try:
            found = sorted(e for e in os.listdir(directory) if e.lower().endswith(".vhd"))
        except OSError as exc:
            raise ConfigError(f"--dir {directory}: cannot list: {exc.strerror or exc}") from exc
        pairs += [(e, os.path.join(directory, e)) for e in found if os.path.isfile(os.path.join(directory, e))]
    if not pairs:
        raise ConfigError("nothing to export: give an IMAGE, NAME=IMAGE or a --dir holding *.vhd files")
    seen: dict[str, str] = {}
    for label, path in pairs:
        if label in seen:
            raise ConfigError(f"export name {label!r} is given twice ({seen[label]} and {path}); use NAME=IMAGE")
        seen[label] = path
    return pairs


def tls_config(args: argparse.Namespace) -> TlsConfig:
    cert, key = args.tls_cert, args.tls_key
    mode = TlsMode(args.tls) if args.tls is not None else (TlsMode.REQUIRE if cert else TlsMode.OFF)
    if mode is TlsMode.OFF:
        if cert or key or args.tls_ca:
            raise ConfigError("--tls=off with TLS files given: drop --tls=off or the --tls-* options")
        return TlsConfig(mode)
    if not cert or not key:
        raise ConfigError(f"--tls={mode.value} needs --tls-cert and --tls-key")
    return TlsConfig(mode, server_context(cert, key, args.tls_ca))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="vhdblkd export: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    tcp = parse_tcp(args.tcp) if args.tcp is not None else None
    tls = tls_config(args)
    if tcp is not None and tls.mode is not TlsMode.REQUIRE and not args.allow_remote and not is_loopback(tcp[0]):
        raise ConfigError(
            f"--tcp {args.tcp}: {tcp[0]} is not a loopback address; without TLS anyone on the network could "
            "read and write the images, so require TLS (--tls-cert, --tls-key, --tls-ca), or pass "
            "--allow-remote, or use 127.0.0.1 / a unix socket"
        )
    pairs = export_list(args.images, args.dir, args.name)

    from ..vhd.image import open_image  # the format layer is only needed once arguments are valid

    images: list[Any] = []
    try:
        exports = []
        for label, path in pairs:
            try:
                image = open_image(path, read_only=args.read_only, lock=True,
                                   allow_unsafe_parent=getattr(args, "allow_unsafe_parent", False),
                                   strict_parent_timestamp=getattr(args, "strict_parent_timestamp", False))
            except OSError as exc:
                raise ConfigError(f"{path}: cannot open: {exc.strerror or exc}") from exc
            images.append(image)
            description = args.description if args.description is not None else (
                f"{image.disk_type} VHD image {os.path.basename(path)}"
            )
            exports.append(Export(image, label, description=description))
        structured = not getattr(args, "no_structured_replies", False)
        _serve(Catalog(tuple(exports), tls=tls, structured=structured), args, tcp, pairs)
    finally:
        for image in reversed(images):
            image.close()
    for _, path in pairs:
        log.info("%s closed", path)
    return 0


def _serve(catalog: Catalog, args: argparse.Namespace, tcp: tuple[str, int] | None, pairs: list[tuple[str, str]]) -> None:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    notifier = Notifier(os.environ)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = SocketServer(catalog, unix_path=args.unix, tcp=tcp)
        server.start()
        address = server.address
        where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        mode = "read-only" if args.read_only else "read-write"
        for export, (_, path) in zip(catalog.exports, pairs, strict=True):
            log.info("export %r: %s (%s, %d bytes)", export.name, path, mode, export.size)
        log.info(
            "serving %d export(s), TLS %s, on %s", len(catalog.exports), catalog.tls.mode.value, where
        )
        notifier.ready(f"serving {len(catalog.exports)} export(s) on {where}")
        while not stop.wait(1.0):  # a timed wait lets the signal handler run promptly
            pass
        log.info("stopping: finishing requests in flight and flushing")
        notifier.stopping()
        server.shutdown()
        for export in catalog.exports:
            st = export.stats
            log.info(
                "export %r served %d reads (%d data bytes sent, %d bytes as holes), %d writes, %d block status",
                export.name, st.reads, st.bytes_read, st.hole_bytes, st.writes, st.block_status,
            )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

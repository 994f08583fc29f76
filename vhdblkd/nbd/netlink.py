"""The kernel's nbd driver through its generic-netlink family "nbd" (version 1).

Names follow the kernel's include/uapi/linux/nbd-netlink.h; client flags come
from include/uapi/linux/nbd.h.  This is the only module that imports
pyroute2, and the only one allowed `Any` (pyroute2 is untyped).

`NbdNetlink` sends the commands (CONNECT, DISCONNECT, RECONFIGURE, STATUS);
each command uses a fresh netlink socket, so one instance may be shared by
threads (pyroute2 sockets are bound to the thread that made them).
`NbdEvents` listens on the family's multicast group for LINK_DEAD events.
Kernel refusals become `KernelError` with a message saying what to do.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from pyroute2.netlink import NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

from ..errors import KernelError

log = logging.getLogger(__name__)

# --- include/uapi/linux/nbd-netlink.h ------------------------------------------

NBD_GENL_FAMILY_NAME: Final = "nbd"
NBD_GENL_VERSION: Final = 0x1
NBD_GENL_MCAST_GROUP_NAME: Final = "nbd_mc_group"

NBD_ATTR_UNSPEC: Final = 0
NBD_ATTR_INDEX: Final = 1
NBD_ATTR_SIZE_BYTES: Final = 2
NBD_ATTR_BLOCK_SIZE_BYTES: Final = 3
NBD_ATTR_TIMEOUT: Final = 4
NBD_ATTR_SERVER_FLAGS: Final = 5
NBD_ATTR_CLIENT_FLAGS: Final = 6
NBD_ATTR_SOCKETS: Final = 7
NBD_ATTR_DEAD_CONN_TIMEOUT: Final = 8
NBD_ATTR_DEVICE_LIST: Final = 9
NBD_ATTR_BACKEND_IDENTIFIER: Final = 10

NBD_DEVICE_ITEM_UNSPEC: Final = 0
NBD_DEVICE_ITEM: Final = 1

NBD_DEVICE_UNSPEC: Final = 0
NBD_DEVICE_INDEX: Final = 1
NBD_DEVICE_CONNECTED: Final = 2

NBD_SOCK_ITEM_UNSPEC: Final = 0
NBD_SOCK_ITEM: Final = 1

NBD_SOCK_UNSPEC: Final = 0
NBD_SOCK_FD: Final = 1

NBD_CMD_UNSPEC: Final = 0
NBD_CMD_CONNECT: Final = 1
NBD_CMD_DISCONNECT: Final = 2
NBD_CMD_RECONFIGURE: Final = 3
NBD_CMD_LINK_DEAD: Final = 4
NBD_CMD_STATUS: Final = 5

# --- include/uapi/linux/nbd.h (client flags, netlink only) ----------------------

NBD_CFLAG_DESTROY_ON_DISCONNECT: Final = 1 << 0
NBD_CFLAG_DISCONNECT_ON_CLOSE: Final = 1 << 1

# The transmission flag the driver checks before accepting several sockets.
NBD_FLAG_CAN_MULTI_CONN: Final = 1 << 8

NETLINK_GENERIC: Final = 16
SOL_NETLINK: Final = 270
NETLINK_ADD_MEMBERSHIP: Final = 1

# EBUSY on CONNECT usually means udev's blkid (or another prober) has the
# device open for a moment; these waits (seconds) add up to about 3 s.
BUSY_BACKOFF: Final = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


class nbd_msg(genlmsg):  # type: ignore[misc]  # pyroute2 is untyped; lower-case as its own families
    """A message of the nbd family; attribute numbers are positions in nla_map.

    Nested attributes carry NLA_F_NESTED as a third field: pyroute2 0.7.2
    (Debian 12's python3-pyroute2) knows only that spelling, not "type|nested".
    """

    prefix = "NBD_ATTR_"
    nla_map = (
        ("NBD_ATTR_UNSPEC", "none"),
        ("NBD_ATTR_INDEX", "uint32"),
        ("NBD_ATTR_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_TIMEOUT", "uint64"),
        ("NBD_ATTR_SERVER_FLAGS", "uint64"),
        ("NBD_ATTR_CLIENT_FLAGS", "uint64"),
        ("NBD_ATTR_SOCKETS", "sock_list", NLA_F_NESTED),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", "uint64"),
        ("NBD_ATTR_DEVICE_LIST", "device_list", NLA_F_NESTED),
        ("NBD_ATTR_BACKEND_IDENTIFIER", "asciiz"),
    )

    class sock_list(nla):  # type: ignore[misc]  # pyroute2 is untyped
        prefix = "NBD_SOCK_"
        nla_map = (
            ("NBD_SOCK_ITEM_UNSPEC", "none"),
            ("NBD_SOCK_ITEM", "sock_item", NLA_F_NESTED),
        )

        class sock_item(nla):  # type: ignore[misc]  # pyroute2 is untyped
            prefix = "NBD_SOCK_"
            nla_map = (
                ("NBD_SOCK_UNSPEC", "none"),
                ("NBD_SOCK_FD", "uint32"),
            )

    class device_list(nla):  # type: ignore[misc]  # pyroute2 is untyped
        prefix = "NBD_DEVICE_"
        nla_map = (
            ("NBD_DEVICE_ITEM_UNSPEC", "none"),
            ("NBD_DEVICE_ITEM", "device_item", NLA_F_NESTED),
        )

        class device_item(nla):  # type: ignore[misc]  # pyroute2 is untyped
            prefix = "NBD_DEVICE_"
            nla_map = (
                ("NBD_DEVICE_UNSPEC", "none"),
                ("NBD_DEVICE_INDEX", "uint32"),
                ("NBD_DEVICE_CONNECTED", "uint8"),
            )


# One entry of NBD_CMD_STATUS: (index of /dev/nbd<index>, whether a server is attached).
DeviceStatus = tuple[int, bool]


# --- message building (no I/O; the unit tests encode and decode these) ----------


def _new(cmd: int) -> Any:
    msg = nbd_msg()
    msg["cmd"] = cmd
    msg["version"] = NBD_GENL_VERSION
    return msg


def _put(msg: Any, *attrs: tuple[str, Any]) -> Any:
    """Append the attributes whose value is set, in order, and return `msg`.

    One left out (None) keeps the kernel's default (CONNECT) or the device's current value (RECONFIGURE).
    """
    msg["attrs"].extend([name, value] for name, value in attrs if value is not None)
    return msg


def _sockets_attr(sock_fds: Sequence[int]) -> list[Any]:
    items = [("NBD_SOCK_ITEM", {"attrs": [("NBD_SOCK_FD", int(fd))]}) for fd in sock_fds]
    return ["NBD_ATTR_SOCKETS", {"attrs": items}]


def connect_message(
    sock_fds: Sequence[int],
    size_bytes: int,
    *,
    index: int | None = None,
    block_size: int = 512,
    timeout: int | None = None,
    dead_conn_timeout: int | None = None,
    server_flags: int = 0,
    client_flags: int = 0,
    backend_identifier: str | None = None,
) -> Any:
    """NBD_CMD_CONNECT; checks the arguments the kernel would only reject with EINVAL."""
    if not sock_fds:
        raise KernelError("connecting an nbd device needs at least one socket")
    if len(sock_fds) > 1 and not server_flags & NBD_FLAG_CAN_MULTI_CONN:
        raise KernelError(
            f"{len(sock_fds)} connections need the server flag CAN_MULTI_CONN; the export does not allow it"
        )
    if size_bytes <= 0:
        raise KernelError(f"an nbd device needs a positive size, not {size_bytes} bytes")
    if block_size < 512 or block_size > 4096 or block_size & (block_size - 1):
        raise KernelError(f"block size {block_size} is not a power of two from 512 to 4096")
    msg = _put(
        _new(NBD_CMD_CONNECT),
        ("NBD_ATTR_INDEX", index),
        ("NBD_ATTR_SIZE_BYTES", size_bytes),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", block_size),
        ("NBD_ATTR_SERVER_FLAGS", server_flags),
        ("NBD_ATTR_CLIENT_FLAGS", client_flags),
        ("NBD_ATTR_TIMEOUT", timeout),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", dead_conn_timeout),
        ("NBD_ATTR_BACKEND_IDENTIFIER", backend_identifier),
    )
    msg["attrs"].append(_sockets_attr(sock_fds))
    return msg


def disconnect_message(index: int) -> Any:
    return _put(_new(NBD_CMD_DISCONNECT), ("NBD_ATTR_INDEX", index))


def reconfigure_message(
    index: int,
    sock_fds: Sequence[int] = (),
    *,
    backend_identifier: str | None = None,
    timeout: int | None = None,
    dead_conn_timeout: int | None = None,
    client_flags: int | None = None,
) -> Any:
    msg = _put(
        _new(NBD_CMD_RECONFIGURE),
        ("NBD_ATTR_INDEX", index),
        ("NBD_ATTR_TIMEOUT", timeout),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", dead_conn_timeout),
        ("NBD_ATTR_CLIENT_FLAGS", client_flags),
        ("NBD_ATTR_BACKEND_IDENTIFIER", backend_identifier),
    )
    if sock_fds:
        msg["attrs"].append(_sockets_attr(sock_fds))
    return msg


def status_message(index: int | None = None) -> Any:
    return _put(_new(NBD_CMD_STATUS), ("NBD_ATTR_INDEX", index))


# --- reply parsing -------------------------------------------------------------


def parse_status(replies: Sequence[Any]) -> list[DeviceStatus]:
    """The devices listed by NBD_CMD_STATUS replies, sorted by index."""
    found: dict[int, bool] = {}
    for reply in replies:
        if reply.get("cmd") != NBD_CMD_STATUS:
            continue
        for dev_list in reply.get_attrs("NBD_ATTR_DEVICE_LIST"):
            for item in dev_list.get_attrs("NBD_DEVICE_ITEM"):
                index = item.get_attr("NBD_DEVICE_INDEX")
                if index is not None:
                    found[int(index)] = bool(item.get_attr("NBD_DEVICE_CONNECTED"))
    return sorted(found.items())


def parse_connect_index(replies: Sequence[Any]) -> int:
    for reply in replies:
        if reply.get("cmd") == NBD_CMD_CONNECT:
            index = reply.get_attr("NBD_ATTR_INDEX")
            if index is not None:
                return int(index)
    raise KernelError("the kernel connected an nbd device but did not say which (no NBD_ATTR_INDEX in its reply)")


def parse_link_dead(data: bytes) -> list[int]:
    """Device indexes of the NBD_CMD_LINK_DEAD events in one datagram of the multicast group."""
    dead: list[int] = []
    offset = 0
    while offset + 16 <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "little")
        if length < 16 or offset + length > len(data):
            break
        msg = nbd_msg(data[offset : offset + length])
        msg.decode()
        if msg.get("cmd") == NBD_CMD_LINK_DEAD:
            index = msg.get_attr("NBD_ATTR_INDEX")
            if index is not None:
                dead.append(int(index))
        offset += (length + 3) & ~3
    return dead


# --- errors --------------------------------------------------------------------

NO_DRIVER: Final = "the kernel has no nbd driver loaded: run `modprobe nbd`"


def _explain(exc: NetlinkError | OSError, what: str, index: int | None = None) -> KernelError:
    code = exc.code if isinstance(exc, NetlinkError) else (exc.errno or 0)
    device = f"/dev/nbd{index}" if index is not None else "the nbd device"
    if code in (errno.EPERM, errno.EACCES):
        text = f"{what}: permission denied; the nbd driver needs root (CAP_SYS_ADMIN)"
    elif code == errno.EBUSY:
        text = f"{what}: {device} is already in use (connected, or held open by another program)"
    elif code == errno.ENOSPC and what.startswith("reconfiguring"):
        text = f"{what}: {device} has no dead connection to replace"
    elif code in (errno.EBADF, errno.ENOTSOCK):
        text = f"{what}: a socket handed to the kernel is not an open stream socket"
    elif code == errno.EINVAL:
        text = (
            f"{what}: the kernel refused the request as invalid for {device} "
            "(no such device, not connected, or a mismatched backend identifier; dmesg says which)"
        )
    else:
        text = f"{what}: {os.strerror(code) if code else exc}"
    return KernelError(text)


def run_modprobe() -> bool:
    """`modprobe nbd` once, as root only; True if it claims success."""
    if os.geteuid() != 0:
        return False
    exe = shutil.which("modprobe") or "/sbin/modprobe"
    try:
        done = subprocess.run([exe, "nbd"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("modprobe nbd failed: %s", exc)
        return False
    if done.returncode != 0:
        log.debug("modprobe nbd exited %d: %s", done.returncode, done.stderr.decode(errors="replace").strip())
    return done.returncode == 0


class _NbdSocket(GenericNetlinkSocket):  # type: ignore[misc]  # pyroute2 is untyped
    # A missing family is reported by us, with advice; pyroute2 would log it as an error.
    module_err_level = "debug"


def _open_socket() -> Any:
    """A pyroute2 socket bound to the nbd family; NetlinkError(ENOENT) if there is none."""
    sock = _NbdSocket()
    try:
        sock.bind(NBD_GENL_FAMILY_NAME, nbd_msg)
    except BaseException:
        sock.close()
        raise
    return sock


def _family_missing(exc: NetlinkError) -> bool:
    return exc.code in (errno.ENOENT, errno.ENOTSUP)


class NbdNetlink:
    """Commands to the kernel's nbd driver.  Use as a context manager or call close()."""

    def __init__(
        self,
        *,
        modprobe: Callable[[], bool] | None = run_modprobe,
        sleep: Callable[[float], None] = time.sleep,
        busy_backoff: Sequence[float] = BUSY_BACKOFF,
    ) -> None:
        self._sleep = sleep
        self._busy_backoff = tuple(busy_backoff)
        self.mcast_group_id = 0
        self.family_id = 0
        try:
            sock = self._probe()
        except NetlinkError as exc:
            if not _family_missing(exc):
                raise _explain(exc, "resolving the nbd netlink family") from exc
            if modprobe is None or not modprobe():
                raise KernelError(NO_DRIVER) from exc
            try:
                sock = self._probe()
            except NetlinkError as again:
                raise KernelError(NO_DRIVER) from again
        sock.close()

    def _probe(self) -> Any:
        sock = _open_socket()
        self.family_id = int(sock.prid)
        self.mcast_group_id = int(sock.mcast_groups.get(NBD_GENL_MCAST_GROUP_NAME, 0))
        return sock

    def close(self) -> None:
        """Nothing stays open between commands; kept for the context-manager protocol."""

    def __enter__(self) -> NbdNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, msg: Any, what: str, index: int | None) -> list[Any]:
        try:
            sock = _open_socket()
        except NetlinkError as exc:
            if _family_missing(exc):
                raise KernelError(NO_DRIVER) from exc
            raise _explain(exc, what, index) from exc
        try:
            return list(sock.nlm_request(msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK))
        finally:
            sock.close()

    def connect(
        self,
        sock_fds: Sequence[int],
        size_bytes: int,
        *,
        index: int | None = None,
        block_size: int = 512,
        timeout: int | None = None,
        dead_conn_timeout: int | None = None,
        server_flags: int,
        client_flags: int = 0,
        backend_identifier: str | None = None,
    ) -> int:
        """Hand the connected sockets to a device (index, or one the kernel picks); returns its index.

        The kernel takes its own reference to each socket: the caller may close
        its copies of the descriptors afterwards.
        """
        msg = connect_message(
            sock_fds,
            size_bytes,
            index=index,
            block_size=block_size,
            timeout=timeout,
            dead_conn_timeout=dead_conn_timeout,
            server_flags=server_flags,
            client_flags=client_flags,
            backend_identifier=backend_identifier,
        )
        what = f"connecting /dev/nbd{index}" if index is not None else "connecting an nbd device"
        waits = list(self._busy_backoff)
        while True:
            try:
                return parse_connect_index(self._request(msg, what, index))
            except NetlinkError as exc:
                if exc.code == errno.EBUSY and waits:
                    delay = waits.pop(0)
                    log.debug("%s: device busy, retrying in %.2f s", what, delay)
                    self._sleep(delay)
                    continue
                raise _explain(exc, what, index) from exc

    def disconnect(self, index: int) -> None:
        """Disconnect /dev/nbd<index>; the kernel sends NBD_CMD_DISC and drops its sockets."""
        what = f"disconnecting /dev/nbd{index}"
        try:
            self._request(disconnect_message(index), what, index)
        except NetlinkError as exc:
            raise _explain(exc, what, index) from exc

    def reconfigure(
        self,
        index: int,
        sock_fds: Sequence[int] = (),
        *,
        backend_identifier: str | None = None,
        timeout: int | None = None,
        dead_conn_timeout: int | None = None,
        client_flags: int | None = None,
    ) -> None:
        """Give a connected device fresh sockets in place of dead ones (or change its timeouts).

        The backend identifier must match the one given at connect time.
        """
        what = f"reconfiguring /dev/nbd{index}"
        msg = reconfigure_message(
            index,
            sock_fds,
            backend_identifier=backend_identifier,
            timeout=timeout,
            dead_conn_timeout=dead_conn_timeout,
            client_flags=client_flags,
        )
        try:
            self._request(msg, what, index)
        except NetlinkError as exc:
            raise _explain(exc, what, index) from exc

    def status(self, index: int | None = None) -> list[DeviceStatus]:
        """Every nbd device (or just `index`) with whether it is connected."""
        what = "asking the nbd driver for its devices"
        try:
            return parse_status(self._request(status_message(index), what, index))
        except NetlinkError as exc:
            raise _explain(exc, what, index) from exc


class NbdEvents:
    """A subscriber to the nbd multicast group: yields device indexes whose link died.

    Uses a plain netlink socket (pollable with `fileno()`), decoding with the
    same attribute map as the commands.
    """

    def __init__(self, *, modprobe: Callable[[], bool] | None = run_modprobe) -> None:
        group = NbdNetlink(modprobe=modprobe).mcast_group_id
        if not group:
            raise KernelError(f"the nbd driver has no multicast group {NBD_GENL_MCAST_GROUP_NAME!r}")
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        try:
            self._sock.bind((0, 0))
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except OSError as exc:
            self._sock.close()
            raise _explain(exc, "subscribing to nbd events") from exc

    def fileno(self) -> int:
        return self._sock.fileno()

    def wait(self, timeout: float | None = None) -> list[int]:
        """Indexes of LINK_DEAD events that arrive within `timeout` seconds (empty if none)."""
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return []
        data = self._sock.recv(65536)
        return parse_link_dead(data)

    def __iter__(self) -> Iterator[int]:
        while True:
            yield from self.wait(None)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NbdEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

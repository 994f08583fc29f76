"""What the daemon needs from the kernel's nbd driver, as a small Protocol.

The service talks to `NetlinkKernel` (the generic-netlink `nbd` family);
tests hand the attachment manager a fake that serves the socketpairs itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from ..errors import KernelError

log = logging.getLogger(__name__)


class Kernel(Protocol):
    def connect(
        self,
        sock_fds: Sequence[int],
        size_bytes: int,
        *,
        index: int | None,
        block_size: int,
        timeout: int,
        dead_conn_timeout: int,
        server_flags: int,
        backend_identifier: str,
    ) -> int:
        """Hand the sockets to a device (the one named by index, or a free one); returns its index."""

    def disconnect(self, index: int) -> None: ...

    def reconfigure(self, index: int, sock_fds: Sequence[int], *, backend_identifier: str) -> None:
        """Give a device whose connections died fresh sockets."""

    def status(self) -> dict[int, bool]:
        """Every nbd device the kernel knows: index -> connected."""

    def close(self) -> None: ...


def backend_identifier(name: str) -> str:
    """The identifier a udev rule turns into /dev/disk/by-vhd/NAME."""
    return f"vhdblkd:{name}"


class NetlinkKernel:
    """The real driver, through vhdblkd.nbd.netlink.NbdNetlink (kept open for the daemon's life)."""

    def __init__(self) -> None:
        from ..nbd.netlink import NbdNetlink

        self._nl: Any = NbdNetlink()
        enter = getattr(self._nl, "__enter__", None)
        if enter is not None:
            self._nl = enter()

    def connect(
        self,
        sock_fds: Sequence[int],
        size_bytes: int,
        *,
        index: int | None,
        block_size: int,
        timeout: int,
        dead_conn_timeout: int,
        server_flags: int,
        backend_identifier: str,
    ) -> int:
        result = self._nl.connect(
            list(sock_fds),
            size_bytes,
            index=index,
            block_size=block_size,
            timeout=timeout,
            dead_conn_timeout=dead_conn_timeout,
            server_flags=server_flags,
            client_flags=0,
            backend_identifier=backend_identifier,
        )
        return int(result)

    def disconnect(self, index: int) -> None:
        self._nl.disconnect(index)

    def reconfigure(self, index: int, sock_fds: Sequence[int], *, backend_identifier: str) -> None:
        self._nl.reconfigure(index, list(sock_fds), backend_identifier=backend_identifier)

    def status(self) -> dict[int, bool]:
        raw = self._nl.status()
        if isinstance(raw, dict):
            return {int(k): bool(v) for k, v in raw.items()}
        result: dict[int, bool] = {}
        for item in raw:
            if isinstance(item, tuple):
                result[int(item[0])] = bool(item[1])
            else:
                result[int(item.index)] = bool(item.connected)
        return result

    def close(self) -> None:
        try:
            exit_ = getattr(self._nl, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
            else:
                self._nl.close()
        except OSError as exc:
            raise KernelError(f"closing the nbd netlink socket failed: {exc}") from exc

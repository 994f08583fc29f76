"""What the daemon needs from the kernel's nbd driver, as a small Protocol.

The service talks to `NetlinkKernel` (the generic-netlink `nbd` family);
tests hand the attachment manager a fake that serves the socketpairs itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


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
    """The real driver, through vhdblkd.nbd.netlink (one netlink socket per command)."""

    def __init__(self) -> None:
        from ..nbd.netlink import NbdNetlink

        self._nl = NbdNetlink()

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
        return self._nl.connect(
            sock_fds,
            size_bytes,
            index=index,
            block_size=block_size,
            timeout=timeout,
            dead_conn_timeout=dead_conn_timeout,
            server_flags=server_flags,
            client_flags=0,
            backend_identifier=backend_identifier,
        )

    def disconnect(self, index: int) -> None:
        self._nl.disconnect(index)

    def reconfigure(self, index: int, sock_fds: Sequence[int], *, backend_identifier: str) -> None:
        self._nl.reconfigure(index, sock_fds, backend_identifier=backend_identifier)

    def status(self) -> dict[int, bool]:
        return {index: connected for index, connected in self._nl.status()}

    def close(self) -> None:
        self._nl.close()

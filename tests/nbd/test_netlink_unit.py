"""vhdblkd.nbd.netlink without the driver: message bytes, reply parsing, error paths.

Messages are encoded with pyroute2, then checked twice: by walking the raw
netlink attributes (numbers and the NESTED flag as in nbd-netlink.h) and by
decoding them again with pyroute2.  The host running these tests has no nbd
family, which exercises the "no driver" path for real.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from vhdblkd.errors import KernelError
from vhdblkd.nbd import netlink as nl

GENL_HEADER = 16 + 4  # nlmsghdr + genlmsghdr
NESTED = 1 << 15


def encode(msg: Any) -> bytes:
    msg.encode()
    return bytes(msg.data)


def raw_attrs(data: bytes) -> list[tuple[int, bool, bytes]]:
    """(type, nested flag, payload) of each attribute in `data`."""
    out = []
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        out.append((kind & ~NESTED & 0x7FFF, bool(kind & NESTED), data[offset + 4 : offset + length]))
        offset += (length + 3) & ~3
    return out


def top_attrs(data: bytes) -> dict[int, tuple[bool, bytes]]:
    return {kind: (nested, payload) for kind, nested, payload in raw_attrs(data[GENL_HEADER:])}


def decode(data: bytes) -> Any:
    msg = nl.nbd_msg(data)
    msg.decode()
    return msg


def u64(value: int) -> bytes:
    return struct.pack("=Q", value)


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


CONNECT_CASES = [
    (
        "minimal",
        dict(sock_fds=[7], size_bytes=1 << 20, server_flags=0x5),
        {
            nl.NBD_ATTR_SIZE_BYTES: u64(1 << 20),
            nl.NBD_ATTR_BLOCK_SIZE_BYTES: u64(512),
            nl.NBD_ATTR_SERVER_FLAGS: u64(0x5),
            nl.NBD_ATTR_CLIENT_FLAGS: u64(0),
        },
    ),
    (
        "everything",
        dict(
            sock_fds=[3, 9],
            size_bytes=10 << 30,
            index=4,
            block_size=4096,
            timeout=60,
            dead_conn_timeout=120,
            server_flags=0x10D,
            client_flags=nl.NBD_CFLAG_DISCONNECT_ON_CLOSE,
            backend_identifier="vhdblkd:data-1",
        ),
        {
            nl.NBD_ATTR_INDEX: u32(4),
            nl.NBD_ATTR_SIZE_BYTES: u64(10 << 30),
            nl.NBD_ATTR_BLOCK_SIZE_BYTES: u64(4096),
            nl.NBD_ATTR_TIMEOUT: u64(60),
            nl.NBD_ATTR_DEAD_CONN_TIMEOUT: u64(120),
            nl.NBD_ATTR_SERVER_FLAGS: u64(0x10D),
            nl.NBD_ATTR_CLIENT_FLAGS: u64(2),
            nl.NBD_ATTR_BACKEND_IDENTIFIER: b"vhdblkd:data-1\0",
        },
    ),
]


@pytest.mark.parametrize("name,kwargs,expected", CONNECT_CASES, ids=[c[0] for c in CONNECT_CASES])
def test_connect_message_bytes(name: str, kwargs: dict[str, Any], expected: dict[int, bytes]) -> None:
    data = encode(nl.connect_message(**kwargs))
    cmd, version = struct.unpack_from("=BB", data, 16)
    assert (cmd, version) == (nl.NBD_CMD_CONNECT, nl.NBD_GENL_VERSION)
    attrs = top_attrs(data)
    for kind, payload in expected.items():
        assert attrs[kind] == (False, payload), f"attribute {kind}"
    assert set(attrs) == set(expected) | {nl.NBD_ATTR_SOCKETS}
    nested, sockets = attrs[nl.NBD_ATTR_SOCKETS]
    assert nested
    items = raw_attrs(sockets)
    assert [(k, n) for k, n, _ in items] == [(nl.NBD_SOCK_ITEM, True)] * len(kwargs["sock_fds"])
    fds = []
    for _, _, item in items:
        ((kind, item_nested, payload),) = raw_attrs(item)
        assert (kind, item_nested) == (nl.NBD_SOCK_FD, False)
        fds.append(struct.unpack("=I", payload)[0])
    assert fds == kwargs["sock_fds"]


@pytest.mark.parametrize("name,kwargs,expected", CONNECT_CASES, ids=[c[0] for c in CONNECT_CASES])
def test_connect_message_round_trip(name: str, kwargs: dict[str, Any], expected: dict[int, bytes]) -> None:
    msg = decode(encode(nl.connect_message(**kwargs)))
    assert msg["cmd"] == nl.NBD_CMD_CONNECT
    assert msg.get_attr("NBD_ATTR_SIZE_BYTES") == kwargs["size_bytes"]
    assert msg.get_attr("NBD_ATTR_INDEX") == kwargs.get("index")
    assert msg.get_attr("NBD_ATTR_BACKEND_IDENTIFIER") == kwargs.get("backend_identifier")
    items = msg.get_attr("NBD_ATTR_SOCKETS").get_attrs("NBD_SOCK_ITEM")
    assert [i.get_attr("NBD_SOCK_FD") for i in items] == kwargs["sock_fds"]


@pytest.mark.parametrize(
    "msg,cmd,expected",
    [
        (nl.disconnect_message(3), nl.NBD_CMD_DISCONNECT, {nl.NBD_ATTR_INDEX: u32(3)}),
        (nl.status_message(), nl.NBD_CMD_STATUS, {}),
        (nl.status_message(11), nl.NBD_CMD_STATUS, {nl.NBD_ATTR_INDEX: u32(11)}),
        (
            nl.reconfigure_message(2, backend_identifier="vhdblkd:a", dead_conn_timeout=5),
            nl.NBD_CMD_RECONFIGURE,
            {
                nl.NBD_ATTR_INDEX: u32(2),
                nl.NBD_ATTR_DEAD_CONN_TIMEOUT: u64(5),
                nl.NBD_ATTR_BACKEND_IDENTIFIER: b"vhdblkd:a\0",
            },
        ),
    ],
    ids=["disconnect", "status-all", "status-one", "reconfigure-no-sockets"],
)
def test_simple_messages(msg: Any, cmd: int, expected: dict[int, bytes]) -> None:
    data = encode(msg)
    assert data[16] == cmd
    assert {k: p for k, (_, p) in top_attrs(data).items()} == expected


def test_reconfigure_carries_sockets_nested() -> None:
    msg = decode(encode(nl.reconfigure_message(6, [12], backend_identifier="vhdblkd:x", timeout=30)))
    assert msg["cmd"] == nl.NBD_CMD_RECONFIGURE
    assert msg.get_attr("NBD_ATTR_TIMEOUT") == 30
    (item,) = msg.get_attr("NBD_ATTR_SOCKETS").get_attrs("NBD_SOCK_ITEM")
    assert item.get_attr("NBD_SOCK_FD") == 12


def status_reply(devices: list[tuple[int, int]]) -> bytes:
    """A STATUS reply laid out as nbd.c's populate_nbd_status builds it."""
    msg = nl.nbd_msg()
    msg["cmd"] = nl.NBD_CMD_STATUS
    msg["version"] = 1
    items = [
        ("NBD_DEVICE_ITEM", {"attrs": [("NBD_DEVICE_INDEX", i), ("NBD_DEVICE_CONNECTED", c)]}) for i, c in devices
    ]
    msg["attrs"] = [("NBD_ATTR_DEVICE_LIST", {"attrs": items})]
    return encode(msg)


def test_status_reply_parses() -> None:
    data = status_reply([(1, 0), (0, 1), (15, 1)])
    lst = top_attrs(data)[nl.NBD_ATTR_DEVICE_LIST]
    assert lst[0], "DEVICE_LIST must carry NLA_F_NESTED"
    assert nl.parse_status([decode(data)]) == [(0, True), (1, False), (15, True)]
    assert nl.parse_status([]) == []


def test_connect_reply_index() -> None:
    msg = nl.nbd_msg()
    msg["cmd"] = nl.NBD_CMD_CONNECT
    msg["attrs"] = [("NBD_ATTR_INDEX", 9)]
    assert nl.parse_connect_index([decode(encode(msg))]) == 9
    with pytest.raises(KernelError, match="did not say which"):
        nl.parse_connect_index([])


def link_dead(index: int) -> bytes:
    msg = nl.nbd_msg()
    msg["cmd"] = nl.NBD_CMD_LINK_DEAD
    msg["version"] = 1
    msg["attrs"] = [("NBD_ATTR_INDEX", index)]
    return encode(msg)


def test_link_dead_datagram() -> None:
    assert nl.parse_link_dead(link_dead(3)) == [3]
    assert nl.parse_link_dead(link_dead(3) + link_dead(7)) == [3, 7]
    assert nl.parse_link_dead(status_reply([(1, 1)])) == []
    assert nl.parse_link_dead(b"") == []
    assert nl.parse_link_dead(link_dead(3)[:10]) == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sock_fds=[], size_bytes=4096, server_flags=1), "at least one socket"),
        (dict(sock_fds=[3, 4], size_bytes=4096, server_flags=1), "CAN_MULTI_CONN"),
        (dict(sock_fds=[3], size_bytes=0, server_flags=1), "positive size"),
        (dict(sock_fds=[3], size_bytes=4096, server_flags=1, block_size=1000), "power of two"),
        (dict(sock_fds=[3], size_bytes=4096, server_flags=1, block_size=8192), "power of two"),
    ],
)
def test_connect_arguments_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(KernelError, match=match):
        nl.connect_message(**kwargs)


def test_no_driver_on_this_host() -> None:
    """The host kernel has no nbd family: one modprobe attempt, then a clear error."""
    calls: list[int] = []

    def modprobe() -> bool:
        calls.append(1)
        return True  # claims success, but the family still is not there

    with pytest.raises(KernelError) as info:
        nl.NbdNetlink(modprobe=modprobe)
    assert str(info.value) == "the kernel has no nbd driver loaded: run `modprobe nbd`"
    assert calls == [1]


def test_no_driver_without_modprobe() -> None:
    with pytest.raises(KernelError, match="modprobe nbd"):
        nl.NbdNetlink(modprobe=None)
    with pytest.raises(KernelError, match="modprobe nbd"):
        nl.NbdEvents(modprobe=None)


class _Closable:
    def close(self) -> None:
        pass


def _offline_client(monkeypatch: pytest.MonkeyPatch, outcomes: list[Any], sleeps: list[float]) -> nl.NbdNetlink:
    """An NbdNetlink whose kernel answers are `outcomes` (exceptions are raised)."""
    monkeypatch.setattr(nl.NbdNetlink, "_probe", lambda self: _Closable())

    def request(self: nl.NbdNetlink, msg: Any, what: str, index: int | None) -> list[Any]:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return list(outcome)

    monkeypatch.setattr(nl.NbdNetlink, "_request", request)
    return nl.NbdNetlink(sleep=sleeps.append, busy_backoff=(0.1, 0.2, 0.4))


def connect_reply(index: int) -> Any:
    msg = nl.nbd_msg()
    msg["cmd"] = nl.NBD_CMD_CONNECT
    msg["attrs"] = [("NBD_ATTR_INDEX", index)]
    return decode(encode(msg))


def test_connect_retries_while_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    busy = NetlinkError(errno.EBUSY)
    client = _offline_client(monkeypatch, [busy, busy, [connect_reply(5)]], sleeps)
    assert client.connect([3], 4096, server_flags=1) == 5
    assert sleeps == [0.1, 0.2]


def test_connect_busy_gives_up_naming_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    client = _offline_client(monkeypatch, [NetlinkError(errno.EBUSY)] * 4, sleeps)
    with pytest.raises(KernelError, match=r"/dev/nbd2 is already in use"):
        client.connect([3], 4096, index=2, server_flags=1)
    assert sleeps == [0.1, 0.2, 0.4]


@pytest.mark.parametrize(
    "code,call,match",
    [
        (errno.EPERM, "connect", "needs root"),
        (errno.EINVAL, "disconnect", r"disconnecting /dev/nbd1: .*dmesg"),
        (errno.ENOSPC, "reconfigure", "no dead connection"),
        (errno.EBADF, "connect", "not an open stream socket"),
        (errno.EIO, "status", "Input/output error"),
    ],
)
def test_kernel_refusals_explained(monkeypatch: pytest.MonkeyPatch, code: int, call: str, match: str) -> None:
    client = _offline_client(monkeypatch, [NetlinkError(code)], [])
    with pytest.raises(KernelError, match=match):
        if call == "connect":
            client.connect([3], 4096, server_flags=1)
        elif call == "disconnect":
            client.disconnect(1)
        elif call == "reconfigure":
            client.reconfigure(1, [4], backend_identifier="vhdblkd:a")
        else:
            client.status()


def test_status_returns_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _offline_client(monkeypatch, [[decode(status_reply([(2, 1), (0, 0)]))]], [])
    with client:
        assert client.status() == [(0, False), (2, True)]

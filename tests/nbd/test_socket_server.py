"""SocketServer: unix and TCP listeners, several clients, shutdown that drains and flushes."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from vhdblkd.backend import MemoryBackend
from vhdblkd.errors import ConfigError
from vhdblkd.nbd import constants as c
from vhdblkd.nbd.server import Export, SocketServer

from .client import Client

pytestmark = pytest.mark.timeout(60)


class CountingBackend(MemoryBackend):
    pass


def connect_unix(path: str) -> Client:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return Client(sock)


def test_unix_several_clients_share_the_export(tmp_path: Path) -> None:
    backend = MemoryBackend(1 << 20)
    path = str(tmp_path / "s.sock")
    with SocketServer(Export(backend, "d"), unix_path=path) as server:
        server.start()
        assert server.address == path
        clients = [connect_unix(path) for _ in range(4)]
        for i, client in enumerate(clients):
            assert client.handshake_go("d" if i % 2 else "")[0] == 1 << 20
            client.call(c.NBD_CMD_WRITE, i * 512, data=bytes([i + 1]) * 512)
        # CAN_MULTI_CONN: a write completed on one connection is visible on all of them.
        assert clients[0].read(0, 2048) == b"".join(bytes([i + 1]) * 512 for i in range(4))
        for client in clients:
            client.disconnect()
            client.sock.close()
    assert not Path(path).exists()


def test_tcp_loopback_and_port_zero() -> None:
    backend = MemoryBackend(4096)
    server = SocketServer(Export(backend), tcp=("127.0.0.1", 0))
    server.start()
    try:
        address = server.address
        assert isinstance(address, tuple)
        host, port = address
        assert host == "127.0.0.1" and port > 0
        with socket.create_connection((host, port)) as sock:
            client = Client(sock)
            client.handshake_go()
            client.call(c.NBD_CMD_WRITE, 0, data=b"tcp")
            assert client.read(0, 3) == b"tcp"
            client.disconnect()
    finally:
        server.shutdown()


def test_shutdown_ends_idle_clients_and_flushes(tmp_path: Path) -> None:
    backend = MemoryBackend(4096)
    path = str(tmp_path / "s.sock")
    server = SocketServer(Export(backend), unix_path=path)
    server.start()
    client = connect_unix(path)
    client.handshake_go()
    client.call(c.NBD_CMD_WRITE, 0, data=b"x")
    idle = connect_unix(path)  # reads the greeting, then never answers
    assert idle.sock.recv(18)[:8] == b"NBDMAGIC"
    flushes = backend.flushes
    server.shutdown()
    assert backend.flushes > flushes
    assert client.sock.recv(1) == b""
    assert idle.sock.recv(1) == b""
    client.sock.close()
    idle.sock.close()
    server.shutdown()  # a second shutdown is harmless


def test_shutdown_cuts_off_a_client_that_stopped_reading(tmp_path: Path) -> None:
    backend = MemoryBackend(32 << 20)
    path = str(tmp_path / "s.sock")
    server = SocketServer(Export(backend), unix_path=path, drain_seconds=0.5)
    server.start()
    client = connect_unix(path)
    client.handshake_go()
    for _ in range(8):  # 256 MiB of READ replies nobody reads: the server blocks in send
        client.send(c.NBD_CMD_READ, 0, 32 << 20)
    done = threading.Event()

    def stop() -> None:
        server.shutdown()
        done.set()

    threading.Thread(target=stop, daemon=True).start()
    assert done.wait(30)
    client.sock.close()


def test_stale_unix_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    with SocketServer(Export(MemoryBackend(512)), unix_path=path) as server:
        server.start()
        connect_unix(path).sock.close()


def test_live_unix_socket_is_not_stolen(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with SocketServer(Export(MemoryBackend(512)), unix_path=path) as first:
        first.start()
        with pytest.raises(ConfigError, match="already listening"):
            SocketServer(Export(MemoryBackend(512)), unix_path=path)


def test_exactly_one_address() -> None:
    with pytest.raises(ConfigError):
        SocketServer(Export(MemoryBackend(512)))
    with pytest.raises(ConfigError):
        SocketServer(Export(MemoryBackend(512)), unix_path="/x", tcp=("127.0.0.1", 0))


def test_unbindable_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot listen"):
        SocketServer(Export(MemoryBackend(512)), unix_path=str(tmp_path / "missing-dir" / "s.sock"))

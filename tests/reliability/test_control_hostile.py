"""Hostile control-socket clients, against the real ControlServer on a temporary path.

Oversized and malformed requests get a one-line error; clients that connect
and stall (sending nothing, or half a line) never hold up another client;
and nothing a client sends makes the server report an internal error (the
server's name for a bug).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vhdblkd.daemon.control import ControlServer

MAX_LINE = 4096


def handler(req: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "op": req["op"]}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    srv = ControlServer(tmp_path / "control.sock", handler, client_timeout=30.0, max_line_bytes=MAX_LINE)
    srv.start()
    yield srv
    srv.stop()


def connect(srv: ControlServer) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)  # only reached if the server is stuck, which is the failure under test
    s.connect(str(srv.path))
    return s


def reply(sock: socket.socket) -> dict[str, Any]:
    buf = b""
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before a reply ({buf!r})"
        buf += chunk
    obj = json.loads(buf.split(b"\n", 1)[0])
    assert isinstance(obj, dict)
    return obj


def ask(srv: ControlServer, line: bytes) -> dict[str, Any]:
    with connect(srv) as s:
        s.sendall(line)
        return reply(s)


def test_stalled_clients_do_not_block_others(server: ControlServer) -> None:
    silent = [connect(server) for _ in range(8)]
    partial = [connect(server) for _ in range(8)]
    for s in partial:
        s.sendall(b'{"op": "sta')
    try:
        for _ in range(5):
            assert ask(server, b'{"op": "status"}\n') == {"ok": True, "op": "status"}
        # A stalled client also does not block a request on a connection opened before it.
        early = connect(server)
        late_stall = connect(server)
        late_stall.sendall(b"{")
        early.sendall(b'{"op": "list"}\n')
        assert reply(early)["op"] == "list"
        early.close()
        late_stall.close()
    finally:
        for s in silent + partial:
            s.close()


def test_many_concurrent_requests_all_answered(server: ControlServer) -> None:
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one(n: int) -> None:
        got = ask(server, json.dumps({"op": f"op{n}"}).encode() + b"\n")
        with lock:
            results.append(got)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r["op"] for r in results) == sorted(f"op{n}" for n in range(20))


@pytest.mark.parametrize("size", [MAX_LINE + 1, 10 * MAX_LINE, 2 * 1024 * 1024])
def test_oversized_request_is_refused(server: ControlServer, size: int) -> None:
    with connect(server) as s:
        sender = threading.Thread(target=lambda: _send_quietly(s, b"x" * size + b"\n"))
        sender.start()
        got = reply(s)
        sender.join(30)
    assert got["ok"] is False and "too large" in got["error"]
    assert ask(server, b'{"op": "after"}\n')["ok"] is True


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server may close after its error reply; that is the expected outcome


MALFORMED = [
    b"not json\n",
    b"{\n",
    b"[1, 2]\n",
    b'"op"\n',
    b"null\n",
    b'{"op": 5}\n',
    b'{"no_op": "x"}\n',
    b"\xff\xfe\x00{\n",
    b'{"op": "\xc3\x28"}\n',
    b"\n",
    b"\x00\x00\x00\n",
    b'{"op": "a", "op": 3}\n',
    b'{"op": NaN}\n',
]


@pytest.mark.parametrize("line", MALFORMED)
def test_malformed_request_gets_an_error_not_an_internal_error(server: ControlServer, line: bytes) -> None:
    got = ask(server, line)
    assert got["ok"] is False
    assert "internal error" not in got["error"]
    assert ask(server, b'{"op": "after"}\n')["ok"] is True


def test_deeply_nested_json_is_a_malformed_request(server: ControlServer) -> None:
    got = ask(server, b"[" * 4000 + b"\n")
    assert got["ok"] is False
    assert "internal error" not in got["error"], got


def test_huge_number_is_a_malformed_request(tmp_path: Path) -> None:
    srv = ControlServer(tmp_path / "big.sock", handler)  # the default line limit (64 KiB)
    srv.start()
    try:
        got = ask(srv, b'{"op": "x", "n": ' + b"9" * 4400 + b"}\n")
    finally:
        srv.stop()
    assert got["ok"] is False
    assert "internal error" not in got["error"], got


def test_several_requests_in_one_packet_and_split_across_packets(server: ControlServer) -> None:
    with connect(server) as s:
        s.sendall(b'{"op": "a"}\n{"op": "b"}\n{"op"')
        buf = b""
        while buf.count(b"\n") < 2:
            chunk = s.recv(4096)
            assert chunk
            buf += chunk
        s.sendall(b': "c"}\n')
        while buf.count(b"\n") < 3:
            chunk = s.recv(4096)
            assert chunk
            buf += chunk
        assert [json.loads(x)["op"] for x in buf.splitlines()] == ["a", "b", "c"]


def test_client_closing_mid_line_does_not_hurt_the_server(server: ControlServer) -> None:
    for _ in range(5):
        s = connect(server)
        s.sendall(b'{"op": "half')
        s.close()
    assert ask(server, b'{"op": "ok"}\n')["ok"] is True

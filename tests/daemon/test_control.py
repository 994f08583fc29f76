"""The control socket: framing, size limit, malformed JSON, peer refusal, stuck clients."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vhdblkd.cli.client import NOT_ROOT, NOT_RUNNING, request
from vhdblkd.daemon.control import ControlServer, root_only
from vhdblkd.daemon.protocol import LineDecoder, ProtocolViolation, decode_request
from vhdblkd.errors import DaemonError, ImageLocked


def echo(req: dict[str, Any]) -> dict[str, Any]:
    if req["op"] == "fail":
        raise DaemonError("no such   device\nnbd9")
    if req["op"] == "locked":
        raise ImageLocked("/x.vhd is open read-write by pid 7 (qemu-nbd)")
    if req["op"] == "bug":
        raise RuntimeError("boom")
    return {"ok": True, "echo": req}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    srv = ControlServer(tmp_path / "run" / "control.sock", echo, client_timeout=2.0, max_line_bytes=1024)
    srv.start()
    yield srv
    srv.stop()


def connect(srv: ControlServer) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(srv.path))
    return s


def lines(sock: socket.socket) -> Iterator[dict[str, Any]]:
    buf = b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)
        chunk = sock.recv(4096)
        if not chunk:
            return
        buf += chunk


def test_socket_is_root_only_file(server: ControlServer) -> None:
    mode = os.stat(server.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_several_requests_one_byte_at_a_time(server: ControlServer) -> None:
    with connect(server) as s:
        for b in b'{"op":"a"}\n{"op":"b","x":1}\n':
            s.send(bytes([b]))
        replies = lines(s)
        assert next(replies) == {"ok": True, "echo": {"op": "a"}}
        assert next(replies) == {"ok": True, "echo": {"op": "b", "x": 1}}


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"not json\n", "malformed request"),
        (b"[1,2]\n", "expected a JSON object"),
        (b'{"x":1}\n', "missing string field 'op'"),
        (b"\xff\xfe\n", "malformed request"),
    ],
)
def test_malformed_requests_get_an_error_reply_and_the_connection_goes_on(
    server: ControlServer, data: bytes, error: str
) -> None:
    with connect(server) as s:
        s.sendall(data + b'{"op":"ping"}\n')
        replies = lines(s)
        first = next(replies)
        assert first["ok"] is False and error in first["error"]
        assert next(replies)["ok"] is True


def test_oversized_request_is_refused_and_closed(server: ControlServer) -> None:
    with connect(server) as s:
        s.sendall(b'{"op":"' + b"a" * 2000)
        replies = list(lines(s))
        assert len(replies) == 1
        assert replies[0]["ok"] is False and "too large" in replies[0]["error"]


def test_handler_errors_become_one_line_replies(server: ControlServer) -> None:
    with connect(server) as s:
        s.sendall(b'{"op":"fail"}\n{"op":"locked"}\n{"op":"bug"}\n')
        replies = lines(s)
        assert next(replies) == {"ok": False, "error": "no such device nbd9"}
        assert "pid 7" in next(replies)["error"]
        assert next(replies)["error"] == "internal error: RuntimeError: boom"


def test_stuck_client_does_not_block_others(server: ControlServer) -> None:
    stuck = connect(server)
    stuck.sendall(b'{"op":"half')  # never finishes its line
    try:
        assert request(server.path, {"op": "ping"}, timeout=10) == {"ok": True, "echo": {"op": "ping"}}
        # The stuck one is dropped after the client timeout.
        assert stuck.recv(100) == b""
    finally:
        stuck.close()


def test_peer_check_refusal_is_sent_to_the_client(tmp_path: Path) -> None:
    srv = ControlServer(tmp_path / "c.sock", echo, check_peer=lambda s: "vhdblkctl must run as root (the control socket is root-only)")
    srv.start()
    try:
        with pytest.raises(DaemonError, match=r"must run as root \(the control socket is root-only\)"):
            request(srv.path, {"op": "ping"})
    finally:
        srv.stop()


def test_root_only_accepts_our_own_uid() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert root_only(a) is None


def _as_nobody(fn: Any) -> tuple[int, str]:
    """Run fn() in a forked child as uid 65534; return its exit status and what it wrote."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            msg = fn()
            os.write(w, msg.encode())
            os._exit(0)
        except BaseException as exc:
            os.write(w, f"{type(exc).__name__}: {exc}".encode())
            os._exit(1)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_non_root_caller_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    # pytest's own temporary directories are 0700: use one that another user may enter.
    where = Path(tempfile.mkdtemp(prefix="vhdblkd-ctl-", dir="/tmp"))
    where.chmod(0o755)
    srv = ControlServer(where / "c.sock", echo)
    srv.start()
    try:

        def call() -> str:
            request(srv.path, {"op": "ping"})
            return "accepted"

        # The 0600 mode refuses the connect itself.
        rc, out = _as_nobody(call)
        assert rc == 1 and out == f"DaemonError: {NOT_ROOT}"
        assert "refused a control client" not in caplog.text
        # With the mode opened by hand, SO_PEERCRED still refuses.
        os.chmod(srv.path, 0o666)
        with caplog.at_level("WARNING", logger="vhdblkd.daemon.control"):
            rc, out = _as_nobody(call)
        assert rc == 1 and out == f"DaemonError: {NOT_ROOT}"
        assert "refused a control client" in caplog.text
    finally:
        srv.stop()
        shutil.rmtree(where)


def test_client_without_daemon(tmp_path: Path) -> None:
    with pytest.raises(DaemonError) as info:
        request(tmp_path / "nothing.sock", {"op": "ping"})
    assert str(info.value) == NOT_RUNNING
    # A stale socket file with nobody listening reads the same.
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "stale.sock"))
    s.close()
    with pytest.raises(DaemonError, match="vhdblkd is not running"):
        request(tmp_path / "stale.sock", {"op": "ping"})


def test_second_server_on_live_socket_refused_stale_replaced(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # stale
    first = ControlServer(path, echo)
    first.start()
    try:
        with pytest.raises(DaemonError, match="another vhdblkd is already listening"):
            ControlServer(path, echo).start()
    finally:
        first.stop()
    assert not path.exists()


def test_stop_refuses_new_requests(tmp_path: Path) -> None:
    srv = ControlServer(tmp_path / "c.sock", lambda r: {"ok": True})
    srv.start()
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(srv.path))
    srv.stop()
    s.settimeout(5)
    try:
        s.sendall(b'{"op":"ping"}\n')
        data = s.recv(1000)
    except OSError:
        data = b""
    s.close()
    assert data == b"" or b"shutting down" in data
    with pytest.raises(DaemonError, match="not running"):
        request(srv.path, {"op": "ping"})


def test_line_decoder_caps_and_eof() -> None:
    d = LineDecoder(max_line_bytes=8)
    assert d.feed(b"12345678\nab") == [b"12345678"]
    assert d.feed(b"c\n") == [b"abc"]
    with pytest.raises(ProtocolViolation, match="too large"):
        d.feed(b"123456789")
    with pytest.raises(ProtocolViolation):
        d.feed(b"\n")  # stays broken
    e = LineDecoder()
    e.feed(b'{"op"')
    with pytest.raises(ProtocolViolation, match="truncated"):
        e.feed(b"")
    assert decode_request(b'{"op":"list"}') == {"op": "list"}

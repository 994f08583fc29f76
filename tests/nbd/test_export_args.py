"""`vhdblkd export` argument handling that needs no image or peer tool."""

from __future__ import annotations

import argparse

import pytest

from vhdblkd.daemon.export import is_loopback, parse_tcp, register
from vhdblkd.daemon.main import main
from vhdblkd.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:10809", ("127.0.0.1", 10809)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:10809", ("::1", 10809)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_tcp(value: str, expected: tuple[str, int]) -> None:
    assert parse_tcp(value) == expected


@pytest.mark.parametrize("value", ["10809", ":10809", "host:", "host:port", "host:65536", "host:-1"])
def test_parse_tcp_rejects(value: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_tcp(value)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("::", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_address_is_required_and_exclusive() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "x.vhd"])
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--unix", "/s", "--tcp", "127.0.0.1:1", "x.vhd"])
    args = parser.parse_args(["export", "--read-only", "--name", "", "--unix", "/s", "x.vhd"])
    assert (args.read_only, args.name, args.unix, args.tcp, args.allow_remote) == (True, "", "/s", None, False)


def test_remote_refused_before_the_image_is_touched(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--tcp", "0.0.0.0:10809", "/nonexistent/image.vhd"]) == 1
    err = capsys.readouterr().err
    assert "--allow-remote" in err and "image.vhd" not in err


def test_missing_image_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    rc = main(["export", "--unix", f"{tmp_path}/s.sock", f"{tmp_path}/missing.vhd"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("vhdblkd: ") and "missing.vhd: cannot open: No such file or directory" in err

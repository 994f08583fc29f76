"""vhdblkctl attach/detach/list/status against an in-process daemon with a fake kernel."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.fakes import ServiceRig, make_rig
from vhdblkd.cli.main import main


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[ServiceRig]:
    r = make_rig(tmp_path)
    r.service.start()
    yield r
    r.service.stop()


def run(rig: ServiceRig, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main([argv[0], "--control", str(rig.control), *argv[1:]])
    out, err = capsys.readouterr()
    return rc, out, err


def test_attach_prints_the_device(rig: ServiceRig, capsys: pytest.CaptureFixture[str]) -> None:
    img = rig.image("data.vhd")
    assert run(rig, capsys, "attach", img) == (0, "/dev/nbd0\n", "")
    rc, out, _ = run(rig, capsys, "attach", "--json", "--read-only", "--name", "two", "--device", "/dev/nbd5", rig.image("b.vhd"))
    assert rc == 0
    info = json.loads(out)
    assert info["device"] == "/dev/nbd5" and info["name"] == "two" and info["read_only"] is True
    assert rig.kernel.devices[5].backend_identifier == "vhdblkd:two"


def test_attach_relative_path_is_made_absolute(
    rig: ServiceRig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    img = Path(rig.image("rel.vhd"))
    monkeypatch.chdir(img.parent)
    assert run(rig, capsys, "attach", "rel.vhd")[0] == 0
    assert rig.service.manager.get("rel") is not None
    assert rig.service.manager.find(str(img)).name == "rel"
    assert run(rig, capsys, "detach", "./rel.vhd")[0] == 0
    assert rig.kernel.devices == {}
    assert run(rig, capsys, "attach", "rel.vhd")[0] == 0
    assert run(rig, capsys, "detach", "rel.vhd")[0] == 0  # a file here, not a name
    assert rig.kernel.devices == {}


def test_list_and_status(rig: ServiceRig, capsys: pytest.CaptureFixture[str]) -> None:
    rig.config.write_text("bad line here now\n")
    rig.service.reload()
    img = rig.image("data.vhd")
    run(rig, capsys, "attach", img)
    rc, out, _ = run(rig, capsys, "list")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:4] == ["DEVICE", "NAME", "TRANSPORT", "TYPE"]
    assert lines[1].split() == ["/dev/nbd0", "data", "nbd", "dynamic", "1", "MiB", "rw", "1", "0", "0", "0", img]
    rc, out, _ = run(rig, capsys, "list", "--json")
    listed = json.loads(out)
    assert [a["device"] for a in listed] == ["/dev/nbd0"]
    assert listed[0]["transport"] == "nbd"
    assert set(listed[0]["stats"]) >= {"reads", "writes", "bytes_read", "bytes_written", "flushes"}
    rc, out, _ = run(rig, capsys, "status")
    assert rc == 0
    assert out.startswith("vhdblkd running: pid ")
    assert "1 attached:" in out and "/dev/nbd0  data" in out
    assert "1 error:" in out and "vhdtab:1:" in out
    rc, out, _ = run(rig, capsys, "status", "--json")
    assert json.loads(out)["attachments"][0]["name"] == "data"


def test_detach_by_device_name_or_image(rig: ServiceRig, capsys: pytest.CaptureFixture[str]) -> None:
    for target in ("/dev/nbd0", "a", None):
        img = rig.image("a.vhd")
        assert run(rig, capsys, "attach", img)[0] == 0
        assert run(rig, capsys, "detach", target or img) == (0, "", "")
        assert rig.kernel.devices == {}


def test_detach_busy_needs_force(rig: ServiceRig, capsys: pytest.CaptureFixture[str]) -> None:
    run(rig, capsys, "attach", rig.image("a.vhd"))
    rig.busy[0] = "mounted on /mnt"
    rc, out, err = run(rig, capsys, "detach", "a")
    assert rc == 1 and out == ""
    assert err == "vhdblkctl: /dev/nbd0 (a) is in use: mounted on /mnt; unmount it first or detach with --force\n"
    assert 0 in rig.kernel.devices
    assert run(rig, capsys, "detach", "--force", "a")[0] == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["attach", "/nonexistent/x.vhd"], "vhdblkctl: /nonexistent/x.vhd: no such file\n"),
        (["detach", "/dev/nbd9"], "vhdblkctl: no attachment named '/dev/nbd9'"),
        (["attach", "--device", "sda", "/x.vhd"], "vhdblkctl: device 'sda' is not an nbd device"),
    ],
)
def test_errors_are_one_line_and_exit_1(
    rig: ServiceRig, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    rc, out, err = run(rig, capsys, *argv)
    assert rc == 1 and out == "" and err.startswith(message) and err.count("\n") == 1
    assert rig.kernel.devices == {}


def test_daemon_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in (["list"], ["status"], ["attach", "x.vhd"], ["detach", "nbd0"]):
        rc = main([cmd[0], "--control", str(tmp_path / "none.sock"), *cmd[1:]])
        _, err = capsys.readouterr()
        assert rc == 1
        assert err == (
            "vhdblkctl: vhdblkd is not running: start it with `systemctl start vhdblkd` (or run `vhdblkd` as root)\n"
        )


def test_control_path_from_environment(
    rig: ServiceRig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VHDBLKD_CONTROL", str(rig.control))
    assert main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_transport_options_are_checked(rig: ServiceRig, capsys: pytest.CaptureFixture[str]) -> None:
    img = rig.image("data.vhd")
    rc, _, err = run(rig, capsys, "attach", "--queues", "2", img)
    assert rc == 1 and "--queues is for --transport ublk" in err
    rc, _, err = run(rig, capsys, "attach", "--transport", "ublk", "--connections", "2", img)
    assert rc == 1 and "ublk uses --queues" in err
    assert rig.kernel.devices == {}

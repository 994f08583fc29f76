"""The service with a fake kernel: start, readiness, control requests, SIGHUP reload, stop."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhdblkd.cli.client import request
from vhdblkd.daemon.intent import Intent
from vhdblkd.daemon.reload import plan_reload
from vhdblkd.daemon.vhdtab import VhdtabEntry
from vhdblkd.errors import DaemonError

from .fakes import ServiceRig, eventually, make_rig
from .test_notify import NotifySocket


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify")
    yield ns
    ns.sock.close()


@pytest.fixture
def rig(tmp_path: Path, notify: NotifySocket) -> Iterator[ServiceRig]:
    r = make_rig(tmp_path, {"NOTIFY_SOCKET": str(notify.path)})
    yield r
    r.service.stop()


def ask(rig: ServiceRig, **req: object) -> dict[str, object]:
    return request(rig.control, dict(req), timeout=30)


def test_start_attaches_good_lines_reports_bad_ones_then_ready(rig: ServiceRig, notify: NotifySocket) -> None:
    a, b = rig.image("a.vhd"), rig.image("b.vhd")
    rig.config.write_text(f"# test\na {a}\nb {b} ro,block_size=4096\nc {a}.nope bogus\nd /missing.vhd\n")
    rig.service.start()
    msgs = notify.messages()
    ready = [m for m in msgs if m.startswith("READY=1")]
    assert len(ready) == 1 and msgs[-1] == ready[0]
    assert ready[0] == (
        f"READY=1\nSTATUS=2 attached: a=/dev/nbd0 b=/dev/nbd1; 2 errors: {rig.config}:4: unknown option 'bogus'"
    )
    assert sorted(rig.kernel.devices) == [0, 1]
    assert rig.kernel.devices[1].block_size == 4096
    state = json.loads(rig.state.read_text())
    assert [(x["name"], x["index"], x["backend_identifier"]) for x in state["attachments"]] == [
        ("a", 0, "vhdblkd:a"),
        ("b", 1, "vhdblkd:b"),
    ]
    assert state["attachments"][1]["options"]["read_only"] is True
    status = ask(rig, op="status")
    assert status["config_errors"] == [f"{rig.config}:4: unknown option 'bogus'"]
    assert status["attach_errors"] == {"d": "/missing.vhd: no such file"}


def test_attach_list_detach_over_the_socket(rig: ServiceRig) -> None:
    rig.service.start()
    img = rig.image("My Disk.vhd")
    reply = ask(rig, op="attach", image=img)
    assert reply["device"] == "/dev/nbd0" and reply["name"] == "My_Disk"
    rig.kernel.devices[0].write(0, b"q" * 512)

    def written_once() -> None:
        listed = ask(rig, op="list")["attachments"]
        assert isinstance(listed, list) and listed[0]["stats"]["writes"] == 1

    eventually(written_once)
    listed = ask(rig, op="list")["attachments"]
    assert isinstance(listed, list)
    assert listed[0]["size"] == 1 << 20 and listed[0]["connections"] == 1
    ask(rig, op="detach", target="My_Disk")
    assert rig.kernel.devices == {} and rig.opener.images[0].closed
    assert json.loads(rig.state.read_text())["attachments"] == []


def test_error_cases_change_nothing(rig: ServiceRig) -> None:
    rig.service.start()
    img = rig.image("d.vhd")
    bad = rig.image("bad.vhd", b"corrupt!")
    ask(rig, op="attach", image=img)
    before = (dict(rig.kernel.devices), rig.state.read_text())
    cases = [
        ({"op": "attach", "image": str(rig.root / "none.vhd")}, "none.vhd: no such file"),
        ({"op": "attach", "image": bad}, "footer cookie"),
        ({"op": "attach", "image": img}, "already attached as /dev/nbd0"),
        ({"op": "attach", "image": "rel.vhd"}, "must be absolute"),
        ({"op": "attach", "image": img, "name": "../x"}, "name '../x' is invalid"),
        ({"op": "detach", "target": "/dev/nbd7"}, "no attachment named '/dev/nbd7'"),
        ({"op": "frobnicate"}, "unknown request 'frobnicate'"),
    ]
    for req, message in cases:
        with pytest.raises(DaemonError, match=message.replace("(", r"\(")):
            request(rig.control, req)
    assert (dict(rig.kernel.devices), rig.state.read_text()) == before


def test_persist_appends_to_vhdtab(rig: ServiceRig) -> None:
    rig.config.write_text("# mine\n")
    rig.service.start()
    img = rig.image("p.vhd")
    ask(rig, op="attach", image=img, persist=True, read_only=True, device="nbd4")
    assert rig.config.read_text() == f"# mine\np {img} ro,device=nbd4\n"
    # A reload sees it as unchanged: nothing is re-attached.
    rig.service.reload()
    assert rig.kernel.log == [("connect", 4)]
    with pytest.raises(DaemonError, match="already has an entry named 'p'"):
        ask(rig, op="attach", image=rig.image("q.vhd"), name="p", persist=True)
    assert rig.kernel.log == [("connect", 4)]


def test_reload_diffs_the_vhdtab(rig: ServiceRig, notify: NotifySocket) -> None:
    imgs = {n: rig.image(f"{n}.vhd") for n in "abcde"}
    rig.config.write_text(f"a {imgs['a']}\nb {imgs['b']}\nc {imgs['c']}\nd {imgs['d']}\n")
    rig.service.start()
    runtime = ask(rig, op="attach", image=imgs["e"])  # not from the vhdtab: reload leaves it alone
    assert runtime["device"] == "/dev/nbd4"
    rig.busy[3] = "mounted on /srv/d"
    notify.messages()
    # a removed, b unchanged, c changed (free), d changed (busy), f new
    f = rig.image("f.vhd")
    rig.config.write_text(f"b {imgs['b']}\nc {imgs['c']} ro\nd {imgs['d']} ro\nf {f}\n")
    rig.service.reload()
    names = {a.name: a for a in rig.service.manager.attachments()}
    assert sorted(names) == ["b", "c", "d", "e", "f"]
    assert names["c"].entry.read_only and not names["d"].entry.read_only
    assert names["b"].path == "/dev/nbd1"
    assert "detach it to apply the change" in rig.service.attach_errors["d"]
    msgs = notify.messages()
    assert msgs[0].startswith("RELOADING=1") and msgs[-1].startswith("READY=1")
    assert [x for x in rig.kernel.log if x[0] == "disconnect"] == [("disconnect", 0), ("disconnect", 2)]


def test_shutdown_flushes_detaches_and_says_stopping(rig: ServiceRig, notify: NotifySocket) -> None:
    a = rig.image("a.vhd")
    rig.config.write_text(f"a {a}\n")
    rig.service.start()
    rig.kernel.devices[0].write(512, b"w" * 512)
    rig.busy[0] = "mounted on /mnt"  # shutdown detaches busy devices too
    rig.intent[0] = Intent.SHUTDOWN
    notify.messages()
    runner = threading.Thread(target=rig.service.run_forever)
    runner.start()
    rig.service.request_stop()
    runner.join(30)
    assert not runner.is_alive()
    assert notify.messages()[0].startswith("STOPPING=1")
    assert rig.kernel.devices == {} and rig.kernel.closed
    img = rig.opener.images[0]
    assert img.closed and rig.opener.events[0] == f"flush {a}"
    assert bytes(img.read(512, 512)) == b"w" * 512
    assert not rig.control.exists()
    with pytest.raises(DaemonError, match="not running"):
        ask(rig, op="status")


def test_sighup_request_reloads_from_the_loop(rig: ServiceRig) -> None:
    rig.service.start()
    runner = threading.Thread(target=rig.service.run_forever)
    runner.start()
    try:
        rig.config.write_text(f"n {rig.image('n.vhd')}\n")
        rig.service.request_reload()
        for _ in range(200):
            if rig.kernel.devices:
                break
            threading.Event().wait(0.05)
        assert list(rig.kernel.devices) == [0]
    finally:
        rig.service.request_stop()
        runner.join(30)


E = VhdtabEntry


@pytest.mark.parametrize(
    ("live", "wanted", "attach", "detach", "change", "unchanged"),
    [
        ({}, [E("a", "/a")], ["a"], [], [], []),
        ({"a": E("a", "/a")}, [], [], ["a"], [], []),
        ({"a": E("a", "/a")}, [E("a", "/a")], [], [], [], ["a"]),
        ({"a": E("a", "/a")}, [E("a", "/a", read_only=True)], [], [], ["a"], []),
        ({"a": E("a", "/a")}, [E("a", "/b")], [], [], ["a"], []),
        ({"a": E("a", "/a"), "b": E("b", "/b")}, [E("b", "/b"), E("c", "/c")], ["c"], ["a"], [], ["b"]),
    ],
)
def test_plan_reload(
    live: dict[str, VhdtabEntry],
    wanted: list[VhdtabEntry],
    attach: list[str],
    detach: list[str],
    change: list[str],
    unchanged: list[str],
) -> None:
    plan = plan_reload(live, wanted)
    assert [e.name for e in plan.attach] == attach
    assert list(plan.detach) == detach
    assert [e.name for e in plan.change] == change
    assert list(plan.unchanged) == unchanged


def test_start_readopts_devices_a_dead_daemon_left(rig: ServiceRig) -> None:
    kept, gone = rig.image("kept.vhd"), rig.image("gone.vhd")
    rig.state.parent.mkdir(parents=True, exist_ok=True)
    options = {
        "read_only": False,
        "device": None,
        "connections": 1,
        "timeout": 30,
        "dead_conn_timeout": 60,
        "block_size": 512,
        "allow_unsafe_parent": False,
    }
    records = [
        {"name": "kept", "image": kept, "index": 5, "backend_identifier": "vhdblkd:kept", "options": options, "from_vhdtab": True},
        {"name": "gone", "image": gone, "index": 6, "backend_identifier": "vhdblkd:gone", "options": options, "from_vhdtab": True},
    ]
    rig.state.write_text(json.dumps({"version": 1, "pid": 1, "attachments": records}))
    rig.kernel.orphan(5, 1 << 20, "vhdblkd:kept")
    rig.config.write_text(f"kept {kept}\ngone {gone}\n")
    rig.service.start()
    atts = {a.name: a.path for a in rig.service.manager.attachments()}
    # kept: same device, fresh sockets; gone: its device timed out, so attached anew; nothing twice.
    assert atts == {"kept": "/dev/nbd5", "gone": "/dev/nbd0"}
    assert rig.kernel.log == [("reconfigure", 5), ("connect", 0)]
    dev = rig.kernel.devices[5]
    dev.write(0, b"k" * 512)
    assert dev.read(0, 512) == b"k" * 512
    state = json.loads(rig.state.read_text())
    assert sorted((a["name"], a["index"]) for a in state["attachments"]) == [("gone", 0), ("kept", 5)]


def test_watchdog_pings_from_the_loop(tmp_path: Path, notify: NotifySocket) -> None:
    r = make_rig(tmp_path, {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "20000"})
    r.service.start()
    runner = threading.Thread(target=r.service.run_forever)
    runner.start()
    try:
        seen: list[str] = []

        def pinged_twice() -> None:
            seen.extend(notify.messages())
            assert seen.count("WATCHDOG=1") >= 2

        eventually(pinged_twice)
    finally:
        r.service.request_stop()
        runner.join(30)
    assert not runner.is_alive()


def test_run_is_registered_with_its_options() -> None:
    from vhdblkd.daemon.main import build_parser
    from vhdblkd.daemon.service import run

    args = build_parser().parse_args(["run", "--config", "/x", "--control", "/c.sock", "--state-dir", "/s"])
    assert (args.func, args.config, args.control, args.state_dir) == (run, "/x", "/c.sock", "/s")
    args = build_parser().parse_args(["run"])
    assert (args.config, args.control, args.state_dir) == (None, "/run/vhdblkd/control.sock", "/run/vhdblkd")


def test_reload_keeps_an_attachment_whose_line_became_invalid(rig: ServiceRig) -> None:
    a = rig.image("a.vhd")
    rig.config.write_text(f"a {a}\n")
    rig.service.start()
    rig.config.write_text(f"a {a} rox\n")  # a typo
    rig.service.reload()
    assert [x.name for x in rig.service.manager.attachments()] == ["a"]
    assert rig.kernel.log == [("connect", 0)]
    assert rig.service.config_errors == [f"{rig.config}:1: unknown option 'rox'"]


def test_journal_lines_carry_their_priority() -> None:
    import logging

    from vhdblkd.daemon.service import JournalFormatter

    fmt = JournalFormatter("%(message)s")
    rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "bad\nworse", None, None)
    assert fmt.format(rec) == "<3>bad\n<3>worse"
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "fine", None, None)
    assert fmt.format(rec) == "<6>fine"


def test_a_device_that_cannot_be_readopted_is_released(rig: ServiceRig) -> None:
    lost = str(rig.root / "images" / "lost.vhd")  # the image is gone
    rig.state.parent.mkdir(parents=True, exist_ok=True)
    options = {"read_only": False, "device": "/dev/nbd2", "connections": 1, "timeout": 30,
               "dead_conn_timeout": 60, "block_size": 512, "allow_unsafe_parent": False}
    record = {"name": "lost", "image": lost, "index": 2, "backend_identifier": "vhdblkd:lost",
              "options": options, "from_vhdtab": False}
    rig.state.write_text(json.dumps({"version": 1, "pid": 1, "attachments": [record]}))
    rig.kernel.orphan(2, 1 << 20, "vhdblkd:lost")
    rig.service.start()
    assert rig.kernel.log == [("disconnect", 2)] and rig.kernel.devices == {}
    assert "/dev/nbd2 was left by an earlier vhdblkd and cannot be taken back" in rig.service.attach_errors["lost"]


def test_list_and_status_answer_while_a_detach_syncs(tmp_path: Path) -> None:
    syncing, release = threading.Event(), threading.Event()

    def slow_sync(name: str) -> None:
        syncing.set()
        assert release.wait(30)

    r = make_rig(tmp_path, sync=slow_sync)
    r.config.write_text(f"a {r.image('a.vhd')}\n")
    r.service.start()
    replies: list[dict[str, object]] = []
    detacher = threading.Thread(target=lambda: replies.append(ask(r, op="detach", target="a")))
    detacher.start()
    try:
        assert syncing.wait(30)
        assert [a["name"] for a in ask(r, op="list")["attachments"]] == ["a"]  # type: ignore[union-attr]
        assert ask(r, op="status")["status"] == "1 attached: a=/dev/nbd0"
        with pytest.raises(DaemonError, match="already being detached"):
            ask(r, op="detach", target="/dev/nbd0")
    finally:
        release.set()
        detacher.join(30)
        r.service.stop()
    assert replies == [{"ok": True, "device": "/dev/nbd0", "name": "a"}]

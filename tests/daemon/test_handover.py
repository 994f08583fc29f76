"""Restart, stop and shutdown of the service against a fake kernel and a fake service manager.

A restart hands the kernel's sockets over through the fd store: the next
daemon serves them from the very next request, the kernel never sees a
CONNECT, RECONFIGURE or DISCONNECT, and a request sent while no daemon runs
is answered by the next one.  A stop detaches free devices and keeps the
ones in use for the next daemon; a shutdown detaches everything.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhdblkd.daemon.intent import Intent

from .fakes import FakeServiceManager, ServiceRig, make_rig


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[FakeServiceManager]:
    m = FakeServiceManager(tmp_path / "notify")
    yield m
    m.close()


def start(tmp_path: Path, manager: FakeServiceManager, **kw: object) -> ServiceRig:
    rig = make_rig(tmp_path, {"NOTIFY_SOCKET": str(manager.path)}, **kw)  # type: ignore[arg-type]
    rig.service.start()
    return rig


def test_restart_hands_the_sockets_over_and_the_kernel_notices_nothing(
    tmp_path: Path, manager: FakeServiceManager
) -> None:
    first = start(tmp_path, manager)
    a, b = first.image("a.vhd"), first.image("b.vhd")
    first.config.write_text(f"a {a}\nb {b} connections=2\n")
    first.service.reload()
    kernel = first.kernel
    kernel.devices[0].write(0, b"1" * 512)
    first.intent[0] = Intent.RESTART
    first.service.stop()
    assert kernel.log == [("connect", 0), ("connect", 1)]  # no DISCONNECT
    assert sorted(manager.store) == ["vhdblkd-nbd0-0", "vhdblkd-nbd1-0", "vhdblkd-nbd1-1"]
    assert all(img.closed for img in first.opener.images)
    assert [f"flush {a}" in first.opener.events, f"flush {b}" in first.opener.events] == [True, True]
    # The kernel sends a request while no daemon runs: it waits in the socket.
    pending = threading.Thread(target=kernel.devices[0].write, args=(512, b"2" * 512))
    pending.start()
    second = start(tmp_path, manager, kernel=kernel, inherited=manager.hand_back())
    pending.join(30)
    assert not pending.is_alive()
    assert kernel.log == [("connect", 0), ("connect", 1)]  # no RECONFIGURE, no second CONNECT
    assert {x.name: x.path for x in second.service.manager.attachments()} == {"a": "/dev/nbd0", "b": "/dev/nbd1"}
    # (The fake images live in memory: each daemon's opener has its own copy.)
    assert bytes(first.opener.images[0].read(0, 512)) == b"1" * 512
    assert kernel.devices[0].read(512, 512) == b"2" * 512
    kernel.devices[1].write(0, b"3" * 512, conn=1)
    assert kernel.devices[1].read(0, 512, conn=0) == b"3" * 512
    assert manager.store == {}  # taken out of the store: a crash from now on goes through RECONFIGURE
    assert second.service.attach_errors == {}
    second.service.stop()


def test_stop_detaches_free_devices_and_keeps_the_ones_in_use(tmp_path: Path, manager: FakeServiceManager) -> None:
    first = start(tmp_path, manager)
    first.config.write_text(f"free {first.image('free.vhd')}\nused {first.image('used.vhd')}\n")
    first.service.reload()
    kernel = first.kernel
    first.busy[1] = "mounted on /srv"
    kernel.devices[1].write(0, b"u" * 512)
    first.service.stop()  # the rig's intent is STOP
    assert kernel.log == [("connect", 0), ("connect", 1), ("disconnect", 0)]
    assert manager.store == {}
    state = json.loads(first.state.read_text())
    assert [(x["name"], x["device"]) for x in state["attachments"]] == [("used", "/dev/nbd1")]
    used = first.opener.images[1]
    assert used.closed and bytes(used.read(0, 512)) == b"u" * 512
    # Its sockets died with the daemon; the next one gives the device fresh ones.
    kernel.devices[1].dead.add(0)
    second = start(tmp_path, manager, kernel=kernel)
    assert kernel.log[3:] == [("reconfigure", 1), ("connect", 0)]
    assert {x.name: x.path for x in second.service.manager.attachments()} == {"free": "/dev/nbd0", "used": "/dev/nbd1"}
    kernel.devices[1].write(512, b"v" * 512)
    assert kernel.devices[1].read(512, 512) == b"v" * 512
    second.service.stop()


def test_shutdown_detaches_everything(tmp_path: Path, manager: FakeServiceManager) -> None:
    rig = start(tmp_path, manager)
    rig.config.write_text(f"a {rig.image('a.vhd')}\n")
    rig.service.reload()
    rig.busy[0] = "mounted on /srv"  # at poweroff the mount is gone first; if not, it is synced and detached
    rig.intent[0] = Intent.SHUTDOWN
    rig.service.stop()
    assert rig.kernel.log == [("connect", 0), ("disconnect", 0)] and manager.store == {}
    assert json.loads(rig.state.read_text())["attachments"] == []


def test_a_device_in_use_that_cannot_be_taken_back_blocks_its_image(
    tmp_path: Path, manager: FakeServiceManager
) -> None:
    first = start(tmp_path, manager)
    image = first.image("d.vhd")
    first.config.write_text(f"d {image}\n")
    first.service.reload()
    kernel = first.kernel
    first.busy[0] = "mounted on /srv"
    first.service.stop()
    first.state.unlink()  # the record is lost: only /sys/block/nbd0/backend says whose it is
    second = make_rig(tmp_path, kernel=kernel)
    second.busy[0] = "mounted on /srv"
    second.service.start()
    assert kernel.log == [("connect", 0)]  # neither disconnected under the mount nor attached a second time
    assert second.service.manager.attachments() == []
    assert "/dev/nbd0 still serves 'd' from an earlier vhdblkd and is in use (mounted on /srv)" in (
        second.service.attach_errors["d"]
    )
    second.service.stop()


def test_a_leftover_device_nothing_uses_is_removed_and_the_image_attached_anew(
    tmp_path: Path, manager: FakeServiceManager
) -> None:
    first = start(tmp_path, manager)
    first.config.write_text(f"d {first.image('d.vhd')}\n")
    first.service.reload()
    kernel = first.kernel
    first.busy[0] = "mounted on /srv"
    first.service.stop()
    first.state.unlink()
    second = make_rig(tmp_path, kernel=kernel)  # unmounted meanwhile
    second.service.start()
    assert kernel.log == [("connect", 0), ("disconnect", 0), ("connect", 0)]
    assert [a.name for a in second.service.manager.attachments()] == ["d"]
    second.service.stop()

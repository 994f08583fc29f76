"""The attachment manager against a fake kernel: attach, I/O through the real server, flush-then-disconnect."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhdblkd.daemon.attachments import AttachmentManager
from vhdblkd.daemon.vhdtab import VhdtabEntry
from vhdblkd.errors import DaemonError, ImageLocked, KernelError

from .fakes import FakeKernel, FakeOpener, busy_check, eventually, make_transport


@pytest.fixture
def image(tmp_path: Path) -> str:
    p = tmp_path / "disk.vhd"
    p.write_bytes(b"conectix")
    return str(p)


def make(busy: dict[int, str] | None = None) -> tuple[AttachmentManager, FakeKernel, FakeOpener, list[str]]:
    kernel = FakeKernel()
    opener = FakeOpener()
    synced: list[int] = []
    reasons = busy if busy is not None else {}
    mgr = AttachmentManager(make_transport(kernel), opener=opener, busy=busy_check(reasons), sync=synced.append)
    return mgr, kernel, opener, synced


def test_attach_hands_kernel_the_sockets_and_serves_them(image: str) -> None:
    mgr, kernel, opener, _ = make()
    att = mgr.attach(VhdtabEntry("data", image, timeout_seconds=7, block_size=4096), from_vhdtab=False)
    assert att.path == "/dev/nbd0"
    dev = kernel.devices[0]
    assert dev.size == 1 << 20
    assert dev.block_size == 4096 and dev.timeout == 7 and dev.dead_conn_timeout == 60
    assert dev.backend_identifier == "vhdblkd:data"
    assert dev.server_flags == att.device.export.flags
    dev.write(4096, b"x" * 512)
    assert dev.read(4096, 512) == b"x" * 512
    assert bytes(opener.images[0].read(4096, 512)) == b"x" * 512
    eventually(lambda: _assert_counts(att.describe()["stats"], writes=1, reads=1))
    desc = att.describe()
    assert desc["name"] == "data" and desc["type"] == "dynamic" and desc["read_only"] is False
    mgr.shutdown()


def test_detach_flushes_before_disconnect_then_closes(image: str) -> None:
    mgr, kernel, opener, synced = make()
    mgr.attach(VhdtabEntry("data", image), from_vhdtab=False)
    kernel.devices[0].write(0, b"y" * 4096)
    mgr.detach("/dev/nbd0")
    img = opener.images[0]
    assert synced == ["nbd0"]
    # flush before DISCONNECT (the kernel sends none), the server flushes again on DISC, then close.
    assert opener.events[0] == f"flush {image}"
    assert opener.events[-1] == f"close {image}"
    assert opener.events.count(f"flush {image}") >= 2
    assert kernel.log == [("connect", 0), ("disconnect", 0)]
    assert img.closed and mgr.attachments() == []
    assert bytes(img.read(0, 4096)) == b"y" * 4096


def test_detach_of_busy_device_refused_unless_forced(image: str) -> None:
    busy = {0: "mounted on /mnt"}
    mgr, kernel, opener, _ = make(busy)
    mgr.attach(VhdtabEntry("data", image), from_vhdtab=False)
    with pytest.raises(DaemonError, match=r"/dev/nbd0 \(data\) is in use: mounted on /mnt.*--force"):
        mgr.detach("data")
    assert 0 in kernel.devices and not opener.images[0].closed
    mgr.detach("data", force=True)
    assert 0 not in kernel.devices and opener.images[0].closed


def test_find_by_name_device_and_image(image: str) -> None:
    mgr, _, _, _ = make()
    att = mgr.attach(VhdtabEntry("data", image), from_vhdtab=False)
    assert mgr.find("data") is att
    assert mgr.find("nbd0") is att
    assert mgr.find("/dev/nbd0") is att
    assert mgr.find(image) is att
    with pytest.raises(DaemonError, match="no attachment named '/dev/nbd5'"):
        mgr.find("/dev/nbd5")
    mgr.shutdown()


def test_errors_change_nothing(image: str, tmp_path: Path) -> None:
    mgr, kernel, opener, _ = make()
    with pytest.raises(DaemonError, match="no such file"):
        mgr.attach(VhdtabEntry("x", str(tmp_path / "missing.vhd")), from_vhdtab=False)
    mgr.attach(VhdtabEntry("data", image), from_vhdtab=False)
    with pytest.raises(DaemonError, match="already attached as /dev/nbd0"):
        mgr.attach(VhdtabEntry("other", image), from_vhdtab=False)
    with pytest.raises(DaemonError, match="name 'data' is already attached"):
        mgr.attach(VhdtabEntry("data", image + "2"), from_vhdtab=False)
    assert list(kernel.devices) == [0] and len(opener.images) == 1
    mgr.shutdown()


def test_image_locked_elsewhere_is_reported(image: str) -> None:
    mgr, kernel, opener, _ = make()
    opener.locks[image] = "pid 4242 (qemu-nbd)"
    with pytest.raises(ImageLocked, match="pid 4242"):
        mgr.attach(VhdtabEntry("data", image), from_vhdtab=False)
    assert kernel.devices == {}


def test_kernel_refusal_closes_the_image_and_stops_threads(image: str) -> None:
    mgr, kernel, opener, _ = make()
    kernel.fail_connect = KernelError("nbd CONNECT failed: Device or resource busy")
    with pytest.raises(KernelError, match="busy"):
        mgr.attach(VhdtabEntry("data", image, connections=2), from_vhdtab=False)
    assert opener.images[0].closed
    assert mgr.attachments() == []


def test_named_device_and_several_connections(image: str) -> None:
    mgr, kernel, opener, _ = make()
    att = mgr.attach(VhdtabEntry("data", image, device_index=3, connections=3), from_vhdtab=False)
    assert att.path == "/dev/nbd3" and att.device.connections == 3
    dev = kernel.devices[3]
    assert len(dev.socks) == 3
    dev.write(0, b"a" * 512, conn=2)
    dev.flush(conn=1)
    assert dev.read(0, 512, conn=0) == b"a" * 512
    mgr.shutdown()
    assert opener.images[0].closed and kernel.devices == {}


def test_shutdown_flushes_every_attachment(tmp_path: Path) -> None:
    mgr, kernel, opener, _ = make({0: "mounted on /a"})
    paths = []
    for i in range(3):
        p = tmp_path / f"d{i}.vhd"
        p.write_bytes(b"conectix")
        paths.append(str(p))
        mgr.attach(VhdtabEntry(f"d{i}", str(p)), from_vhdtab=True)
        kernel.devices[i].write(512 * i, b"z" * 512)
    mgr.shutdown()  # busy devices too: the service is stopping
    assert kernel.devices == {}
    for p, img in zip(paths, opener.images, strict=False):
        assert img.closed
        assert opener.events.index(f"flush {p}") < opener.events.index(f"close {p}")


def _assert_counts(stats: dict[str, int], **expected: int) -> None:
    assert {k: stats[k] for k in expected} == expected


def test_a_connection_the_kernel_drops_is_replaced(image: str) -> None:
    mgr, kernel, opener, _ = make()
    att = mgr.attach(VhdtabEntry("data", image, connections=2), from_vhdtab=False)
    dev = kernel.devices[0]
    dev.write(0, b"1" * 512, conn=1)
    kernel.kill_connection(0, 1)
    eventually(lambda: _assert_reconnected(kernel, att.device.reconnects))
    dev.write(512, b"2" * 512, conn=1)  # the new socket in slot 1 is served
    assert dev.read(0, 1024, conn=0) == b"1" * 512 + b"2" * 512
    assert att.describe()["reconnects"] == 1
    mgr.detach("data")  # a detach's connection ends are expected: no reconnect
    assert kernel.log[-1] == ("disconnect", 0) and att.device.reconnects == 1


def _assert_reconnected(kernel: FakeKernel, reconnects: int) -> None:
    assert ("reconfigure", 0) in kernel.log and reconnects == 1


def test_detach_runs_outside_the_lock_and_a_second_one_is_refused(image: str, tmp_path: Path) -> None:
    import threading

    kernel = FakeKernel()
    opener = FakeOpener()
    syncing, release = threading.Event(), threading.Event()

    def slow_sync(name: str) -> None:  # a file system taking its time to write back
        syncing.set()
        assert release.wait(30)

    mgr = AttachmentManager(make_transport(kernel), opener=opener, busy=busy_check({}), sync=slow_sync)
    mgr.attach(VhdtabEntry("data", image), from_vhdtab=False)
    other = tmp_path / "other.vhd"
    other.write_bytes(b"conectix")
    first = threading.Thread(target=mgr.detach, args=("data",))
    first.start()
    try:
        assert syncing.wait(30)
        # The table answers while the detach syncs: list, find, another attach.
        assert [a.name for a in mgr.attachments()] == ["data"]
        assert mgr.find("/dev/nbd0").name == "data"
        assert mgr.attach(VhdtabEntry("other", str(other)), from_vhdtab=False).path == "/dev/nbd1"
        with pytest.raises(DaemonError, match=r"/dev/nbd0 \(data\) is already being detached"):
            mgr.detach("/dev/nbd0")
        with pytest.raises(DaemonError, match="'data' is already attached as /dev/nbd0"):
            mgr.attach(VhdtabEntry("data", image), from_vhdtab=False)
    finally:
        release.set()
        first.join(30)
    assert not first.is_alive()
    assert [a.name for a in mgr.attachments()] == ["other"]
    assert kernel.log == [("connect", 0), ("connect", 1), ("disconnect", 0)]
    mgr.shutdown()


def test_the_same_image_through_a_symlink_is_refused(image: str, tmp_path: Path) -> None:
    mgr, kernel, opener, _ = make()
    link = tmp_path / "link.vhd"
    link.symlink_to(image)
    mgr.attach(VhdtabEntry("data", image), from_vhdtab=False)
    with pytest.raises(DaemonError, match=f"{link} is already attached as /dev/nbd0 \\(data\\)"):
        mgr.attach(VhdtabEntry("again", str(link)), from_vhdtab=False)
    assert mgr.find(str(link)).name == "data"
    with pytest.raises(DaemonError, match="/dev/nbd0 is already in use by data"):
        mgr.attach(VhdtabEntry("third", image + ".x", device_index=0), from_vhdtab=False)
    assert list(kernel.devices) == [0] and len(opener.images) == 1
    mgr.shutdown()


def test_adopt_goes_through_the_attach_checks_and_cleans_up_alike(image: str, tmp_path: Path) -> None:
    from vhdblkd.daemon.state import StateRecord

    mgr, kernel, opener, _ = make()
    mgr.attach(VhdtabEntry("data", image), from_vhdtab=False)
    link = tmp_path / "link.vhd"
    link.symlink_to(image)
    record = StateRecord("again", str(link), "/dev/nbd3", "nbd", {"index": 3, "connections": 1}, {}, False)
    # The duplicate check is attach's: the same file through a symlink, refused before it is opened.
    with pytest.raises(DaemonError, match=f"{link} is already attached as /dev/nbd0 \\(data\\)"):
        mgr.adopt(VhdtabEntry("again", str(link)), record, {}, from_vhdtab=False)
    with pytest.raises(DaemonError, match="the name 'data' is already attached as /dev/nbd0"):
        mgr.adopt(VhdtabEntry("data", str(tmp_path / "x.vhd")), record, {}, from_vhdtab=False)
    assert len(opener.images) == 1
    # A device the kernel no longer has: the image is closed and the name is free again, as for attach.
    other = tmp_path / "other.vhd"
    other.write_bytes(b"conectix")
    lost = StateRecord("other", str(other), "/dev/nbd3", "nbd", {"index": 3, "connections": 1}, {}, False)
    with pytest.raises(KernelError, match="/dev/nbd3 is not connected"):
        mgr.adopt(VhdtabEntry("other", str(other)), lost, {}, from_vhdtab=False)
    assert opener.images[-1].closed and mgr.names() == {"data"}
    assert mgr.attach(VhdtabEntry("other", str(other)), from_vhdtab=False).path == "/dev/nbd1"
    mgr.shutdown()

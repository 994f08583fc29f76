"""A detach whose flush fails keeps the attachment (listed, locked) until a retry succeeds."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest

from tests.reliability.faultfile import FaultFactory, FaultLog
from vhdblkd.backend import Backend
from vhdblkd.cli.main import main
from vhdblkd.daemon.attachments import AttachmentManager
from vhdblkd.daemon.vhdtab import VhdtabEntry
from vhdblkd.errors import DetachFailed, ImageLocked
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_dynamic
from vhdblkd.vhd.image import open_image

from .fakes import FakeKernel, busy_check, make_rig, make_transport

SIZE = 1 << 20
BS = 64 * 1024


def rig(tmp_path: Path) -> tuple[AttachmentManager, FakeKernel, str, FaultLog]:
    """A manager serving a real dynamic image through a file layer whose failures the test turns on."""
    path = str(tmp_path / "disk.vhd")
    create_dynamic(path, SIZE, block_size=BS, exact_size=True)
    faults = FaultFactory()

    def opener(image: str, *, read_only: bool, allow_unsafe_parent: bool,
               strict_parent_timestamp: bool) -> Backend:
        opened: Backend = open_image(image, read_only=read_only, allow_unsafe_parent=allow_unsafe_parent,
                                     strict_parent_timestamp=strict_parent_timestamp, file_factory=faults)
        return opened

    kernel = FakeKernel()
    mgr = AttachmentManager(make_transport(kernel), opener=opener, busy=busy_check({}), sync=lambda name: None)
    return mgr, kernel, path, faults.log_for(path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failed_flush_keeps_the_attachment_until_a_retry(tmp_path: Path, code: int) -> None:
    mgr, kernel, path, log = rig(tmp_path)
    mgr.attach(VhdtabEntry("data", path), from_vhdtab=False)
    kernel.devices[0].write(3 * BS, b"z" * 8192)  # allocates a block: metadata to make durable
    log.failing = lambda kind, off, n: code if kind == "fdatasync" else None
    with pytest.raises(DetachFailed) as info:
        mgr.detach("data")
    text = str(info.value)
    assert "flushing" in text and "vhdblkctl detach data" in text and "stays attached" in text
    # Still listed, with why; the device is still there; the image is still open and locked.
    [att] = mgr.attachments()
    desc = att.describe()
    assert desc["state"] == "detach-failed" and "flushing" in desc["error"] and not desc["disconnected"]
    assert 0 in kernel.devices
    with pytest.raises(ImageLocked):
        open_image(path)
    assert kernel.devices[0].read(3 * BS, 8192) == b"z" * 8192
    # A second try while the disk is still failing fails the same way and keeps it again.
    with pytest.raises(DetachFailed):
        mgr.detach("/dev/nbd0")
    assert [a.name for a in mgr.attachments()] == ["data"]
    log.failing = None  # the disk is fixed
    mgr.detach("data")
    assert mgr.attachments() == [] and 0 not in kernel.devices
    assert check_image(path).clean
    with open_image(path, read_only=True) as image:
        assert bytes(image.read(3 * BS, 8192)) == b"z" * 8192


def test_a_flush_failing_after_the_disconnect_resumes_there(tmp_path: Path) -> None:
    mgr, kernel, path, log = rig(tmp_path)
    att = mgr.attach(VhdtabEntry("data", path), from_vhdtab=False)
    kernel.devices[0].write(5 * BS, b"q" * 4096)
    disconnect = att.device.disconnect

    def disconnect_then_fail() -> None:
        disconnect()
        log.failing = lambda kind, off, n: errno.EIO if kind == "fdatasync" else None

    att.device.disconnect = disconnect_then_fail  # type: ignore[method-assign]  # the disk fails mid-detach
    with pytest.raises(DetachFailed, match="the device is disconnected, but the image stays open and locked"):
        mgr.detach("data")
    [kept] = mgr.attachments()
    assert kept.describe()["state"] == "detach-failed" and kept.describe()["disconnected"] is True
    assert 0 not in kernel.devices
    with pytest.raises(ImageLocked):
        open_image(path)
    log.failing = None
    mgr.detach("data")  # no second disconnect: it goes on from the flush
    assert mgr.attachments() == []
    with open_image(path, read_only=True) as image:
        assert bytes(image.read(5 * BS, 4096)) == b"q" * 4096
    assert check_image(path).clean


def test_vhdblkctl_shows_a_failed_detach(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rig = make_rig(tmp_path)
    rig.service.start()
    try:
        img = rig.image("data.vhd")
        ctl = ["--control", str(rig.control)]
        assert main(["attach", *ctl, img]) == 0
        image = rig.opener.images[0]

        def full_disk() -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        image.flush = full_disk  # type: ignore[method-assign]  # the host disk is full
        capsys.readouterr()
        assert main(["detach", *ctl, "data"]) != 0
        err = capsys.readouterr().err
        assert "No space left on device" in err and "vhdblkctl detach data" in err
        assert main(["list", *ctl]) == 0
        assert "DETACH-FAILED" in capsys.readouterr().out
        assert main(["status", *ctl]) == 0
        assert "data: detach failed, still attached: flushing" in capsys.readouterr().out
        del image.flush  # space is back
        assert main(["detach", *ctl, "data"]) == 0
        assert rig.kernel.devices == {} and image.closed
    finally:
        rig.service.stop()


def test_a_handover_does_not_pass_on_a_device_a_failed_detach_disconnected(tmp_path: Path) -> None:
    mgr, kernel, path, log = rig(tmp_path)
    att = mgr.attach(VhdtabEntry("data", path), from_vhdtab=False)
    kernel.devices[0].write(0, b"h" * 4096)
    disconnect = att.device.disconnect

    def disconnect_then_fail() -> None:
        disconnect()
        log.failing = lambda kind, off, n: errno.EIO if kind == "fdatasync" else None

    att.device.disconnect = disconnect_then_fail  # type: ignore[method-assign]
    with pytest.raises(DetachFailed):
        mgr.detach("data")
    log.failing = None
    kept, fds, devices = mgr.handover()
    assert kept == [] and fds == [] and devices == []
    with open_image(path, read_only=True) as image:  # closed, unlocked, and what was written is there
        assert bytes(image.read(0, 4096)) == b"h" * 4096


def test_a_restarted_daemon_reports_a_disconnected_failed_detach_and_adopts_only_live_devices(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The failed detach freed /dev/nbd0 and "b" got it; a crash then leaves both in the state file."""
    first = make_rig(tmp_path)
    first.service.start()
    mgr, kernel = first.service.manager, first.kernel
    att = mgr.attach(VhdtabEntry("a", first.image("a.vhd")), from_vhdtab=False)
    image = first.opener.images[0]
    disconnect = att.device.disconnect

    def full_disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def disconnect_then_fail() -> None:
        disconnect()
        image.flush = full_disk  # type: ignore[method-assign]  # the host disk fills mid-detach

    att.device.disconnect = disconnect_then_fail  # type: ignore[method-assign]
    with pytest.raises(DetachFailed):
        mgr.detach("a")
    b = mgr.attach(VhdtabEntry("b", first.image("b.vhd")), from_vhdtab=False)
    assert b.path == att.path == "/dev/nbd0"
    at_crash = first.state.read_text()
    [rec_a] = [r for r in json.loads(at_crash)["attachments"] if r["name"] == "a"]
    assert rec_a["disconnected"] is True and "No space left" in rec_a["detach_failed"]
    first.busy[0] = "mounted on /srv"  # so stopping keeps b's device connected, as a crash would
    first.service.stop()
    first.state.write_text(at_crash)  # the daemon died: the state file is as the crash left it
    second = make_rig(tmp_path, kernel=kernel)
    with caplog.at_level(logging.ERROR):
        second.service.start()
    try:
        assert [x.name for x in second.service.manager.attachments()] == ["b"]  # adopted, not lost
        assert second.service.manager.get("b").path == "/dev/nbd0"  # type: ignore[union-attr]
        assert kernel.log.count(("disconnect", 0)) == 1  # only the failed detach's own
        why = second.service.attach_errors["a"]
        assert "stopped after disconnecting /dev/nbd0" in why and "No space left on device" in why
        assert "vhdblkctl check" in why and "b" not in second.service.attach_errors
        assert any("No space left on device" in r.getMessage() and r.levelno == logging.ERROR
                   for r in caplog.records)
    finally:
        second.service.stop()

"""ublk on Debian's 6.12 kernel: file systems on all three image kinds, read-only, two queues under fio, the daemon,
release and recovery, kill -9 under a mounted ext4, SIGTERM, a full host disk.

One guest boot runs tests/kernel/ublk_guest.py, which leaves a result file
per check and the images (and raw dumps of what the devices showed) in a
share; the tests here judge them on the host with the real peers:
`qemu-img compare` (image against the device's contents), `debugfs`
(the files inside the file system), and vhdblkd's own image check.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vhdblkd.vhd.check import check_image

from .uml import GuestResult

pytestmark = [pytest.mark.kernel, pytest.mark.ublk]


@pytest.fixture(scope="module")
def out(debian_guest: Callable[..., GuestResult], tmp_path_factory: pytest.TempPathFactory) -> Path:
    share = tmp_path_factory.mktemp("ublk")
    result = debian_guest(
        f"python tests/kernel/ublk_guest.py {share}", shares=[share], modules=("ublk_drv", "nbd"), timeout=1500
    )
    (share / "guest-output.txt").write_text(result.stdout + result.stderr)
    return share


def _result(out: Path, name: str) -> dict[str, Any]:
    path = out / f"{name}.json"
    assert path.exists(), f"the guest left no result for {name}: {(out / 'guest-output.txt').read_text()[-3000:]}"
    result: dict[str, Any] = json.loads(path.read_text())
    assert result["ok"], result.get("error")
    return result


def _debugfs_cat(fs_image: Path, name: str) -> bytes:
    r = subprocess.run(["debugfs", "-R", f"cat /{name}", str(fs_image)], capture_output=True, check=True)
    return r.stdout


@pytest.mark.parametrize("kind", ["fixed", "dynamic", "differencing"])
def test_filesystem_on_each_image_kind(out: Path, kind: str) -> None:
    r = _result(out, f"fs_{kind}")
    assert r["device_gone"], "the device outlived its detach"
    assert check_image(r["image"]).clean
    # The image holds exactly what the kernel saw on the device ...
    cmp = subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", r["image"], r["raw"]],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # ... and the file system in it has the files that were written and fsynced.
    part = out / f"{kind}.part"
    with open(r["raw"], "rb") as src, open(part, "wb") as dst:
        src.seek(r["part_start_sector"] * 512)
        dst.write(src.read())
    for i in range(3):
        assert _debugfs_cat(part, f"file{i}") == (out / f"{kind}.file{i}").read_bytes()
    fsck = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_read_only_attachment_refuses_writes(out: Path) -> None:
    r = _result(out, "read_only")
    assert r["getro"] == "1"
    assert r["write_rc"] != 0 and "not permitted" in r["write_err"]
    assert r["read_rc"] == 0


def test_two_queues_under_a_verifying_fio(out: Path) -> None:
    r = _result(out, "fio_two_queues")
    assert r["fio_rc"] == 0, r["fio_err"]
    assert len(r["per_queue"]) == 2 and all(n > 0 for n in r["per_queue"]), r["per_queue"]
    assert check_image(r["image"]).clean


def test_release_holds_io_until_recovery(out: Path) -> None:
    r = _result(out, "release_recover")
    assert r["waited"], "a write went through while no server was serving"
    assert r["writer_rc"] == 0
    assert r["read"] == "firstsecond"


def test_kill_9_under_mounted_ext4(out: Path) -> None:
    r = _result(out, "kill_recovery")
    assert r["writer_rc"] == 0, "the fsync'ing writer saw an error across the server's death"
    assert r["acked"] > r["acked_at_kill"], "no record was written after the recovery"
    assert r["server_rc"] == 0 and r["device_gone"], "SIGTERM did not flush and remove the device"
    assert check_image(r["image"]).clean
    raw = out / "kill.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", r["image"], str(raw)], check=True)
    lines = _debugfs_cat(raw, "log").decode().splitlines()
    assert len(lines) >= r["acked"]
    assert lines == [f"record {i}" for i in range(1, len(lines) + 1)]


def test_full_host_disk_under_ext4_on_a_dynamic_image(out: Path) -> None:
    r = _result(out, "full_disk")
    assert r["host_free_when_full"] < 4 << 20, "the image's host file system never filled up"
    assert r["full_rc"] != 0, f"ext4 saw no error on a full host disk: {r['dmesg']}"
    assert r["fsck_rc"] in (0, 1), "e2fsck could not repair the file system once space was back"
    assert r["again_rc"] == 0, f"writes did not work again once space was back: {r['again_err']}"
    assert r["before_ok"], "a file fsynced before the disk filled up is gone"
    assert r["fsck_after_rc"] == 0, r["fsck_after"]
    assert r["ctl_check_rc"] == 0, r["ctl_check"]
    assert r["check_clean"], r["check"]
    assert check_image(r["image"]).clean


def test_daemon_attaches_over_ublk_and_survives_kill_9(out: Path) -> None:
    r = _result(out, "daemon")
    assert r["device"].startswith("/dev/ublkb")
    assert [(a["transport"], a["connections"]) for a in r["listed"]] == [("ublk", 2)]
    # The counters `vhdblkctl list` shows, as for NBD: the restarted daemon counted the writer's records.
    stats = r["listed_after"][0]["stats"]
    assert stats["writes"] > 0 and stats["bytes_written"] >= 512 * stats["writes"], stats
    assert stats["flushes"] > 0 and stats["errors"] == 0, stats
    assert stats["requests"] >= stats["reads"] + stats["writes"] + stats["flushes"], stats
    assert all(cell.isdigit() for cell in r["list_text"].splitlines()[1].split()[7:10]), r["list_text"]
    # Real udev with the project's rule: /dev/disk/by-vhd/NAME is the device while attached, gone after.
    assert r["by_vhd"] == r["device"], r["udev"]
    assert r["by_vhd_after_detach"] is None, r["udev"]
    assert r["writer_rc"] == 0, "the fsync'ing writer saw an error across the daemon's kill -9"
    assert r["acked"] > r["acked_at_kill"], "no record was written after the restarted daemon took the device back"
    assert r["detach_rc"] == 0, r["detach_err"]
    assert r["daemon_rc"] == 0 and r["device_gone"]
    assert check_image(r["image"]).clean
    raw = out / "daemon.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", r["image"], str(raw)], check=True)
    lines = _debugfs_cat(raw, "log").decode().splitlines()
    assert len(lines) >= r["acked"]
    assert lines == [f"record {i}" for i in range(1, len(lines) + 1)]

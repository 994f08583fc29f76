"""The ublk checks, run inside one QEMU guest on Debian's 6.12 kernel by tests/kernel/test_ublk.py.

One Python process runs every check (the guest's Python is slow to start):
each check writes OUT/<name>.json ({"ok": ..., "error": traceback, ...}),
and leaves images and raw dumps in OUT for the host to examine with
qemu-img, debugfs and vhdblkctl check.  Devices are served in this process
(the checks only run mkfs, mount, dd, fio as child processes, so this
process never holds its own device open); the crash checks serve from a
child process (tests/kernel/ublk_server.py) that can be killed.

    python tests/kernel/ublk_guest.py OUT
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vhdblkd.ublk.device import DeviceConfig, UblkDevice  # noqa: E402
from vhdblkd.ublk.serve import BackendHandler  # noqa: E402
from vhdblkd.vhd.check import check_image  # noqa: E402
from vhdblkd.vhd.create import create_differencing, create_dynamic, create_fixed  # noqa: E402
from vhdblkd.vhd.image import open_image  # noqa: E402

MiB = 1 << 20
SERVER = [sys.executable, str(Path(__file__).with_name("ublk_server.py"))]


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd!r} exited {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}")
    return r


def serve(path: str, *, read_only: bool = False, queues: int = 1) -> tuple[UblkDevice, Any]:
    image = open_image(path, read_only=read_only)
    config = DeviceConfig(size=image.size, read_only=read_only, discard=image.disk_type != "fixed", queues=queues)
    return UblkDevice.create(BackendHandler(image, read_only=read_only), config), image


def finish(dev: UblkDevice, image: Any) -> None:
    image.flush()  # the kernel sends no FLUSH of its own when a device goes away
    dev.stop()
    image.close()


def check_filesystem(out: Path, kind: str) -> dict[str, Any]:
    """Attach, partition, mkfs.ext4, mount, write + fsync, unmount, detach; dump what the device showed."""
    path = str(out / f"{kind}.vhd")
    if kind == "fixed":
        create_fixed(path, 64 * MiB)
    elif kind == "dynamic":
        create_dynamic(path, 64 * MiB)
    else:
        create_dynamic(str(out / "parent.vhd"), 64 * MiB)
        parent, pimage = serve(str(out / "parent.vhd"))
        sh(f"dd if=/dev/urandom of={parent.path} bs=1M count=2 seek=40 oflag=direct status=none")
        finish(parent, pimage)
        create_differencing(path, str(out / "parent.vhd"))
    dev, image = serve(path)
    mnt = Path(f"/mnt/{kind}")
    mnt.mkdir(parents=True, exist_ok=True)
    sh(f"sgdisk -n 1:2048:0 -t 1:8300 {dev.path} >/dev/null && blockdev --rereadpt {dev.path}")
    part = f"{dev.path}p1"
    for _ in range(50):
        if os.path.exists(part):
            break
        time.sleep(0.1)
    sh(f"mkfs.ext4 -q -F {part} && mount {part} {mnt}")
    files = {}
    for i in range(3):
        data = os.urandom(100_000 + i * 4096)
        with open(mnt / f"file{i}", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        files[f"file{i}"] = data.hex()[:64]
    (out / f"{kind}.files.json").write_text(json.dumps(files))
    for i in range(3):
        (out / f"{kind}.file{i}").write_bytes((mnt / f"file{i}").read_bytes())
    sh(f"umount {mnt}")
    sh(f"dd if={dev.path} of={out / kind}.raw bs=1M iflag=direct status=none")
    start = int(sh(f"cat /sys/block/{dev.path[5:]}/{dev.path[5:]}p1/start").stdout)
    finish(dev, image)
    gone = not os.path.exists(dev.path)
    return {"image": path, "raw": f"{out / kind}.raw", "part_start_sector": start, "device_gone": gone}


def check_read_only(out: Path) -> dict[str, Any]:
    path = str(out / "ro.vhd")
    create_dynamic(path, 16 * MiB)
    dev, image = serve(path, read_only=True)
    ro = sh(f"blockdev --getro {dev.path}").stdout.strip()
    write = sh(f"dd if=/dev/zero of={dev.path} bs=4k count=1 oflag=direct status=none", check=False)
    read = sh(f"dd if={dev.path} of=/dev/null bs=4k count=4 iflag=direct status=none", check=False)
    finish(dev, image)
    return {"getro": ro, "write_rc": write.returncode, "write_err": write.stderr, "read_rc": read.returncode}


def check_fio_two_queues(out: Path) -> dict[str, Any]:
    path = str(out / "fio.vhd")
    create_dynamic(path, 64 * MiB)
    dev, image = serve(path, queues=2)
    r = sh(
        f"fio --name=verify --filename={dev.path} --ioengine=libaio --direct=1 --rw=randwrite --bs=4k "
        "--iodepth=16 --numjobs=2 --offset_increment=16M --size=4M --verify=crc32c --verify_fatal=1 "
        "--do_verify=1 --group_reporting --output-format=terse",
        check=False,
    )
    per_queue = [q.requests for q in dev.queues]
    finish(dev, image)
    return {"fio_rc": r.returncode, "fio_err": r.stderr[-2000:], "per_queue": per_queue, "image": path}


def check_release_and_recover(out: Path) -> dict[str, Any]:
    """In-process: release the device (no STOP_DEV), re-adopt it; data written before and after is there."""
    path = str(out / "rel.vhd")
    create_dynamic(path, 16 * MiB)
    dev, image = serve(path)
    sh(f"printf first | dd of={dev.path} bs=512 conv=sync oflag=direct status=none")
    dev.release()
    held = subprocess.Popen(f"printf second | dd of={dev.path} bs=512 seek=1 conv=sync oflag=direct status=none",
                            shell=True)
    time.sleep(1)
    waited = held.poll() is None  # the write waits for a server
    dev2 = UblkDevice.recover(dev.dev_id, BackendHandler(image), dev.config)
    rc = held.wait(60)
    got = sh(f"dd if={dev2.path} bs=512 count=2 iflag=direct status=none | tr -d '\\0'").stdout
    finish(dev2, image)
    return {"waited": waited, "writer_rc": rc, "read": got}


def check_kill_recovery(out: Path) -> dict[str, Any]:
    """kill -9 the server under a mounted ext4 with an fsync'ing writer; a new server recovers the device."""
    path = str(out / "kill.vhd")
    create_dynamic(path, 64 * MiB)
    idfile = out / "kill.id"
    srv = subprocess.Popen([*SERVER, "create", path, str(idfile)])
    dev_id = _wait_id(idfile, srv)
    devpath = f"/dev/ublkb{dev_id}"
    sh(f"mkfs.ext4 -q {devpath} && mkdir -p /mnt/kill && mount {devpath} /mnt/kill")
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, "/mnt/kill/log", str(out / "kill.acked")])
    _wait_acked(out / "kill.acked", 3)
    srv.send_signal(signal.SIGKILL)
    srv.wait()
    acked_at_kill = int((out / "kill.acked").read_text() or 0)
    idfile.unlink()
    srv = subprocess.Popen([*SERVER, str(dev_id), path, str(idfile)])
    _wait_id(idfile, srv)
    _wait_acked(out / "kill.acked", acked_at_kill + 3)
    writer.send_signal(signal.SIGTERM)
    writer_rc = writer.wait(60)
    sh("umount /mnt/kill")
    srv.send_signal(signal.SIGTERM)  # flushed and removed
    server_rc = srv.wait(60)
    return {"image": path, "acked_at_kill": acked_at_kill, "acked": int((out / "kill.acked").read_text()),
            "writer_rc": writer_rc, "server_rc": server_rc, "device_gone": not os.path.exists(devpath)}


def check_full_disk(out: Path) -> dict[str, Any]:
    """ext4 on a dynamic image whose host file system is small: fill it until ext4 gets an error;
    the image stays valid, and once space is back (and e2fsck ran) writes work again."""
    small = Path("/mnt/small")
    small.mkdir(parents=True, exist_ok=True)
    sh(f"mount -t tmpfs -o size=40m tmpfs {small}")
    path = str(small / "full.vhd")
    create_dynamic(path, 128 * MiB)
    dev, image = serve(path)
    mnt = Path("/mnt/full")
    mnt.mkdir(parents=True, exist_ok=True)
    sh(f"mkfs.ext4 -q -E lazy_itable_init=1,lazy_journal_init=1 {dev.path} && mount {dev.path} {mnt}")
    sh(f"head -c 4096 /dev/urandom >{mnt}/before && sync {mnt}/before")
    # What mkfs allocated stays; a filler takes all but 12 MiB of the rest.
    sh(f"fallocate -l $(( $(stat -f -c '%a*%S' {small}) - 12*1024*1024 )) {small}/filler")
    full = sh(f"dd if=/dev/urandom of={mnt}/big bs=1M count=80 conv=fsync status=none", check=False)
    dmesg = sh("dmesg | tail -20", check=False).stdout
    sh(f"umount {mnt}", check=False)  # the journal may have aborted: the file system is read-only now
    host_free_when_full = int(sh(f"echo $(( $(stat -f -c '%a*%S' {small}) ))").stdout)
    sh(f"rm {small}/filler")
    fsck = sh(f"e2fsck -fy {dev.path}", check=False)
    sh(f"mount {dev.path} {mnt}")
    again = sh(f"rm -f {mnt}/big && dd if=/dev/urandom of={mnt}/after bs=1M count=4 conv=fsync status=none",
               check=False)
    before_ok = sh(f"test -s {mnt}/before", check=False).returncode == 0
    sh(f"umount {mnt}")
    fsck_after = sh(f"e2fsck -fn {dev.path}", check=False)
    finish(dev, image)
    ctl = sh(f"{Path(sys.executable).parent / 'vhdblkctl'} check {path}", check=False)
    report = check_image(path)
    sh(f"cp {path} {out / 'full.vhd'} && umount {small}")
    return {"full_rc": full.returncode, "full_err": full.stderr[-500:], "dmesg": dmesg[-2000:],
            "host_free_when_full": host_free_when_full, "fsck_rc": fsck.returncode,
            "again_rc": again.returncode, "again_err": again.stderr[-500:], "before_ok": before_ok,
            "fsck_after_rc": fsck_after.returncode, "fsck_after": fsck_after.stdout[-1000:],
            "ctl_check_rc": ctl.returncode, "ctl_check": ctl.stdout[-1000:] + ctl.stderr[-1000:],
            "check_clean": report.clean, "check": str(report.problems), "image": str(out / "full.vhd")}


def check_daemon(out: Path) -> dict[str, Any]:
    """Through vhdblkd: attach --transport ublk, kill -9 the daemon under a mounted ext4, restart, detach."""
    path = str(out / "daemon.vhd")
    create_dynamic(path, 64 * MiB)
    env = {**os.environ, "VHDBLKD_CONTROL": "/run/vd/control.sock"}
    os.makedirs("/run/vd", exist_ok=True)
    (out / "vhdtab").write_text("")
    bindir = Path(sys.executable).parent
    ctl = [str(bindir / "vhdblkctl")]

    def start() -> subprocess.Popen[bytes]:
        log = open(out / "daemon.log", "ab")  # noqa: SIM115 - the daemon's output for the host
        d = subprocess.Popen([str(bindir / "vhdblkd"), "run", "--config", str(out / "vhdtab"), "--control",
                              env["VHDBLKD_CONTROL"], "--state-dir", "/run/vd"], env=env, stdout=log, stderr=log)
        for _ in range(600):
            if subprocess.run([*ctl, "status"], env=env, capture_output=True).returncode == 0:
                return d
            time.sleep(0.2)
        raise RuntimeError("vhdblkd did not come up")

    udevd = _start_udev(out / "udev.log")
    daemon = start()
    attach = subprocess.run([*ctl, "attach", "--transport", "ublk", "--queues", "2", path], env=env,
                            capture_output=True, text=True, check=True)
    dev = attach.stdout.strip()
    listed = subprocess.run([*ctl, "list", "--json"], env=env, capture_output=True, text=True, check=True).stdout
    sh("udevadm settle -t 60")
    by_vhd = _link("/dev/disk/by-vhd/daemon")
    sh(f"mkfs.ext4 -q {dev} && mkdir -p /mnt/daemon && mount {dev} /mnt/daemon")
    acked = out / "daemon.acked"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, "/mnt/daemon/log", str(acked)])
    _wait_acked(acked, 3)
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    at_kill = int(acked.read_text() or 0)
    daemon = start()
    _wait_acked(acked, at_kill + 3)
    writer.send_signal(signal.SIGTERM)
    writer_rc = writer.wait(60)
    sh("umount /mnt/daemon")
    listed_after = subprocess.run([*ctl, "list", "--json"], env=env, capture_output=True, text=True, check=True).stdout
    list_text = subprocess.run([*ctl, "list"], env=env, capture_output=True, text=True, check=True).stdout
    detach = subprocess.run([*ctl, "detach", dev], env=env, capture_output=True, text=True)
    sh("udevadm settle -t 60")
    by_vhd_after = _link("/dev/disk/by-vhd/daemon")
    daemon.send_signal(signal.SIGTERM)
    daemon_rc = daemon.wait(60)
    udevd.terminate()
    udevd.wait(30)
    udev_log = "\n".join(line for line in (out / "udev.log").read_text(errors="replace").splitlines()
                          if "ublk" in line or "by-vhd" in line)[-3000:]
    return {"image": path, "device": dev, "listed": json.loads(listed), "listed_after": json.loads(listed_after),
            "list_text": list_text, "by_vhd": by_vhd, "by_vhd_after_detach": by_vhd_after, "udev": udev_log,
            "writer_rc": writer_rc,
            "acked_at_kill": at_kill, "acked": int(acked.read_text()), "detach_rc": detach.returncode,
            "detach_err": detach.stderr, "daemon_rc": daemon_rc, "device_gone": not os.path.exists(dev)}


def _start_udev(log: Path) -> subprocess.Popen[bytes]:
    """systemd-udevd from the host's root, with the project's rule (the guest has no udev of its own)."""
    rules = Path("/etc/udev/rules.d")
    rules.mkdir(parents=True, exist_ok=True)  # the overlay on the guest's root: the host's stays untouched
    (rules / "61-vhdblkd.rules").write_bytes((REPO / "packaging/udev/61-vhdblkd.rules").read_bytes())
    with open(log, "wb") as f:
        udevd = subprocess.Popen(["/lib/systemd/systemd-udevd", "--debug"], stdout=f, stderr=subprocess.STDOUT)
    for _ in range(300):
        if sh("udevadm control --ping", check=False).returncode == 0:
            return udevd
        time.sleep(0.1)
    raise RuntimeError("systemd-udevd did not answer")


def _link(path: str) -> str | None:
    return os.path.realpath(path) if os.path.islink(path) else None


_WRITER = """
import os, signal, sys
log, acked = sys.argv[1], sys.argv[2]
stop = False
def on_term(*a):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
i = 0
while not stop:
    i += 1
    os.write(fd, b"record %d\\n" % i)
    os.fsync(fd)
    with open(acked + ".tmp", "w") as f:
        f.write(str(i))
    os.replace(acked + ".tmp", acked)
os.close(fd)
"""


def _wait_id(idfile: Path, srv: subprocess.Popen[bytes], timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while not (idfile.exists() and idfile.read_text()):
        if srv.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ublk server exited ({srv.returncode}) or timed out before its device was up")
        time.sleep(0.1)
    return int(idfile.read_text())


def _wait_acked(acked: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if acked.exists() and int(acked.read_text() or 0) >= n:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the writer did not reach record {n}")


CHECKS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "fs_fixed": lambda out: check_filesystem(out, "fixed"),
    "fs_dynamic": lambda out: check_filesystem(out, "dynamic"),
    "fs_differencing": lambda out: check_filesystem(out, "differencing"),
    "read_only": check_read_only,
    "fio_two_queues": check_fio_two_queues,
    "release_recover": check_release_and_recover,
    "kill_recovery": check_kill_recovery,
    "full_disk": check_full_disk,
    "daemon": check_daemon,
}


def main() -> None:
    out = Path(sys.argv[1])
    only = sys.argv[2:] or list(CHECKS)
    for name in only:
        t = time.monotonic()
        try:
            result = {"ok": True, **CHECKS[name](out)}
        except Exception:  # noqa: BLE001 - reported to the host test, which fails on it
            result = {"ok": False, "error": traceback.format_exc()}
        result["seconds"] = round(time.monotonic() - t, 1)
        (out / f"{name}.json").write_text(json.dumps(result))
        print(name, result["seconds"], "ok" if result["ok"] else result["error"], flush=True)


if __name__ == "__main__":
    main()

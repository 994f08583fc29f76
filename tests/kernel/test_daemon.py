"""vhdblkd and vhdblkctl against the real nbd driver in user-mode Linux.

Each test is one guest boot with several checks: the guest script does the
device work and leaves outputs in the test's temporary directory (visible in
the guest through hostfs); the host then checks the images with vhdblkctl,
qemu-img and debugfs.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from vhdblkd.vhd.create import create_differencing, create_dynamic
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.structs import DynamicHeader

from .uml import REPO_ROOT, GuestResult

Guest = Callable[..., GuestResult]

pytestmark = pytest.mark.kernel

VHDBLKCTL = str(REPO_ROOT / ".venv" / "bin" / "vhdblkctl")

# Starts the daemon in the background on a tmpfs control dir and waits for it.
PRELUDE = r"""
set -euo pipefail
T=$TESTDIR
mkdir -p /run/vt /mnt/a /mnt/b
export VHDBLKD_CONTROL=/run/vt/control.sock
"${VHDBLKD_BIN:-vhdblkd}" -v run --config "$T/vhdtab" --control /run/vt/control.sock --state-dir /run/vt >"$T/daemon.log" 2>&1 &
DPID=$!
for i in $(seq 150); do vhdblkctl status >/dev/null 2>&1 && break; sleep 0.2; done
vhdblkctl status
# record RC NAME CMD...: run a command expected to fail, keep its exit code and stderr.
record() { local name=$1; shift; set +e; "$@" >"$T/$name.out" 2>"$T/$name.err"; echo $? >"$T/$name.rc"; set -e; }
wait_for_node() { for i in $(seq 50); do [ -b "$1" ] && return 0; sleep 0.1; done; return 1; }
stop_daemon() { kill -TERM $DPID; set +e; wait $DPID; echo $? >"$T/daemon.rc"; set -e; }
"""


def guest_env(tmp_path: Path) -> dict[str, str]:
    env = {"TESTDIR": str(tmp_path)}
    if "VHDBLKD_BIN" in os.environ:  # run another build of the daemon in the guest
        env["VHDBLKD_BIN"] = os.environ["VHDBLKD_BIN"]
    return env


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VHDBLKCTL, *args], capture_output=True, text=True, timeout=120)


def create(path: Path, *args: str) -> Path:
    subprocess.run([VHDBLKCTL, "create", *args, str(path)], check=True, capture_output=True, timeout=60)
    return path


def fs_file(image: Path, inner: str, tmp: Path, *, partition_offset: int = 0, replay: bool = False, flatten: bool = False
) -> str:
    """The content of `inner` in the ext4 inside `image`, read on the host (qemu-img convert + debugfs)."""
    raw = tmp / (image.name + ".raw")
    raw.unlink(missing_ok=True)
    if flatten:  # QEMU's vpc driver ignores a differencing image's parent: flatten with our own reader
        subprocess.run([VHDBLKCTL, "convert", "--to", "raw", str(image), str(raw)], check=True, timeout=120)
    else:
        subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(image), str(raw)], check=True, timeout=120)
    if partition_offset:
        part = tmp / (image.name + ".part")
        with raw.open("rb") as src, part.open("wb") as dst:
            src.seek(partition_offset)
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        raw = part
    if replay:  # fsync'ed data may still sit in the journal: let e2fsck replay it
        subprocess.run(["e2fsck", "-fy", str(raw)], capture_output=True, timeout=120)
    out = subprocess.run(["debugfs", "-R", f"cat {inner}", str(raw)], capture_output=True, text=True, timeout=60)
    return out.stdout


def assert_clean(image: Path) -> None:
    check = ctl("check", str(image))
    assert check.returncode == 0, check.stdout + check.stderr
    info = subprocess.run(["qemu-img", "info", "-f", "vpc", str(image)], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr


def test_attach_mkfs_mount_detach_and_error_cases(tmp_path: Path, guest: Guest) -> None:
    create(tmp_path / "dyn.vhd", "--size", "64M")
    create(tmp_path / "fixed.vhd", "--type", "fixed", "--size", "32M")
    create(tmp_path / "gpt.vhd", "--size", "64M")
    create(tmp_path / "locked.vhd", "--size", "8M")
    corrupt = tmp_path / "corrupt.vhd"
    corrupt.write_bytes(bytes(range(256)) * 4096)
    (tmp_path / "vhdtab").write_text("# empty\n")
    script = PRELUDE + r"""
# --- dynamic: mkfs, mount, files, detach refused while mounted, umount, detach
DEV=$(vhdblkctl attach "$T/dyn.vhd")
echo "$DEV" >"$T/dyn.dev"
[ "$(cat /sys/block/${DEV#/dev/}/backend)" = "vhdblkd:dyn" ]
mkfs.ext4 -q "$DEV"
mount "$DEV" /mnt/a
echo "hello from the guest" >/mnt/a/hello.txt
seq 1 20000 >/mnt/a/numbers.txt
sync
record busy vhdblkctl detach "$DEV"
record second vhdblkctl attach "$T/dyn.vhd"
vhdblkctl list >"$T/list.out"
vhdblkctl list --json >"$T/list.json"
umount /mnt/a
vhdblkctl detach "$DEV"

# --- fixed
DEV=$(vhdblkctl attach --name fx --connections 2 "$T/fixed.vhd")
mkfs.ext4 -q "$DEV"; mount "$DEV" /mnt/a; echo fixed-data >/mnt/a/f.txt; umount /mnt/a
vhdblkctl list --json >"$T/fx.json"
vhdblkctl detach fx

# --- GPT: partition on the device, re-attach, the partition appears and holds data
DEV=$(vhdblkctl attach "$T/gpt.vhd")
sgdisk -o -n 1:2048:0 -t 1:8300 "$DEV" >"$T/sgdisk.out"
blockdev --rereadpt "$DEV" || partx -u "$DEV"
wait_for_node "${DEV}p1"
mkfs.ext4 -q "${DEV}p1"; mount "${DEV}p1" /mnt/a; echo in-a-partition >/mnt/a/p.txt; umount /mnt/a
vhdblkctl detach gpt
DEV=$(vhdblkctl attach "$T/gpt.vhd")
wait_for_node "${DEV}p1" || { blockdev --rereadpt "$DEV"; wait_for_node "${DEV}p1"; }
mount -o ro "${DEV}p1" /mnt/a; cat /mnt/a/p.txt >"$T/gpt.read"; umount /mnt/a
vhdblkctl detach "$T/gpt.vhd"

# --- read-only: mounts read-only, writes fail, the image is untouched
sha256sum "$T/dyn.vhd" >"$T/ro.before"
DEV=$(vhdblkctl attach --read-only "$T/dyn.vhd")
mount -o ro "$DEV" /mnt/b
cat /mnt/b/hello.txt >"$T/ro.read"
record ro_touch touch /mnt/b/new
record ro_dd dd if=/dev/zero of="$DEV" bs=4096 count=1 oflag=direct
umount /mnt/b
vhdblkctl detach "$DEV"
sha256sum "$T/dyn.vhd" >"$T/ro.after"

# --- error cases: clear message, non-zero exit, nothing changes
vhdblkctl list --json >"$T/before_errors.json"
record missing vhdblkctl attach "$T/missing.vhd"
record corrupt vhdblkctl attach "$T/corrupt.vhd"
record unknown vhdblkctl detach /dev/nbd9
# The uid is dropped once the command's modules are loaded: the checkout may sit in a directory only root can
# enter (mktemp -d makes 0700), and what is tested is the control socket's refusal.
record nonroot python3 -c "
import os, sys
import contextlib
from vhdblkd.cli.main import main
with open(os.devnull, 'w') as null, contextlib.redirect_stdout(null):
    assert main(['list']) == 0  # as root first, so every module the command needs is loaded
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(main(['list']))
"
python3 -c "
import sys, time
from vhdblkd.vhd.image import open_image
img = open_image(sys.argv[1])
print('held', flush=True)
time.sleep(120)
" "$T/locked.vhd" >"$T/holder.out" &
HOLDER=$!
for i in $(seq 100); do grep -q held "$T/holder.out" 2>/dev/null && break; sleep 0.1; done
echo $HOLDER >"$T/holder.pid"
record locked vhdblkctl attach "$T/locked.vhd"
kill $HOLDER
vhdblkctl list --json >"$T/after_errors.json"

# --persist: attached now and written to the vhdtab for the next start
vhdblkctl attach --persist --read-only --json "$T/fixed.vhd" >"$T/persist.json"
stop_daemon
"""
    result = guest(script, env=guest_env(tmp_path), timeout=400)
    result.check()
    t = tmp_path

    # dynamic
    assert (t / "dyn.dev").read_text().strip().startswith("/dev/nbd")
    assert (t / "busy.rc").read_text().strip() == "1"
    assert "is in use: mounted on /mnt/a" in (t / "busy.err").read_text()
    assert (t / "second.rc").read_text().strip() == "1"
    assert "is already attached as /dev/nbd" in (t / "second.err").read_text()
    assert "dyn" in (t / "list.out").read_text()
    assert_clean(t / "dyn.vhd")
    assert fs_file(t / "dyn.vhd", "/hello.txt", t) == "hello from the guest\n"
    assert fs_file(t / "dyn.vhd", "/numbers.txt", t) == "".join(f"{i}\n" for i in range(1, 20001))
    # fixed, over two connections (the kernel takes several only with CAN_MULTI_CONN)
    fx = json.loads((t / "fx.json").read_text())[0]
    assert fx["connections"] == 2 and fx["type"] == "fixed" and fx["stats"]["writes"] > 0
    assert_clean(t / "fixed.vhd")
    assert fs_file(t / "fixed.vhd", "/f.txt", t) == "fixed-data\n"
    # GPT
    assert (t / "gpt.read").read_text() == "in-a-partition\n"
    assert_clean(t / "gpt.vhd")
    assert fs_file(t / "gpt.vhd", "/p.txt", t, partition_offset=2048 * 512) == "in-a-partition\n"
    # read-only
    assert (t / "ro.read").read_text() == "hello from the guest\n"
    assert (t / "ro_touch.rc").read_text().strip() != "0"
    assert "Read-only file system" in (t / "ro_touch.err").read_text()
    assert (t / "ro_dd.rc").read_text().strip() != "0"
    assert (t / "ro.before").read_text().split()[0] == (t / "ro.after").read_text().split()[0]
    # errors
    expected = {
        "missing": f"vhdblkctl: {t}/missing.vhd: no such file",
        "corrupt": f"{t}/corrupt.vhd",
        "unknown": "vhdblkctl: no attachment named '/dev/nbd9'",
        "nonroot": "vhdblkctl: vhdblkctl must run as root (the control socket is root-only)",
        "locked": (t / "holder.pid").read_text().strip(),
    }
    for name, message in expected.items():
        err = (t / f"{name}.err").read_text()
        assert (t / f"{name}.rc").read_text().strip() == "1", name
        assert message in err, (name, err)
        assert err.count("\n") == 1, (name, err)
    assert (t / "before_errors.json").read_text() == (t / "after_errors.json").read_text() == "[]\n"
    persisted = json.loads((t / "persist.json").read_text())
    assert persisted["name"] == "fixed" and persisted["read_only"] is True
    assert (t / "vhdtab").read_text() == f"# empty\nfixed {t}/fixed.vhd ro\n"
    assert (t / "daemon.rc").read_text().strip() == "0", (t / "daemon.log").read_text()
    assert "Traceback" not in (t / "daemon.log").read_text()


def test_differencing_image_keeps_its_parent(tmp_path: Path, guest: Guest) -> None:
    base = create(tmp_path / "base.vhd", "--size", "48M")
    (tmp_path / "vhdtab").write_text("")
    script = PRELUDE + r"""
DEV=$(vhdblkctl attach "$T/base.vhd")
mkfs.ext4 -q "$DEV"; mount "$DEV" /mnt/a; echo from-base >/mnt/a/base.txt; umount /mnt/a
vhdblkctl detach base
sha256sum "$T/base.vhd" >"$T/base.before"
vhdblkctl create --parent "$T/base.vhd" "$T/child.vhd"
DEV=$(vhdblkctl attach "$T/child.vhd")
mount "$DEV" /mnt/a
cat /mnt/a/base.txt >"$T/child.base"
echo from-child >/mnt/a/child.txt
echo changed >/mnt/a/base.txt
umount /mnt/a
vhdblkctl detach child
sha256sum "$T/base.vhd" >"$T/base.after"
# SIGHUP re-reads the vhdtab: a new line attaches, a removed one detaches.
echo "kid $T/child.vhd ro" >"$T/vhdtab"
kill -HUP $DPID
for i in $(seq 100); do vhdblkctl list | grep -q kid && break; sleep 0.1; done
vhdblkctl list --json >"$T/hup1.json"
echo "# nothing" >"$T/vhdtab"
kill -HUP $DPID
for i in $(seq 100); do vhdblkctl list | grep -q kid || break; sleep 0.1; done
vhdblkctl list --json >"$T/hup2.json"
stop_daemon
"""
    guest(script, env=guest_env(tmp_path), timeout=300).check()
    t = tmp_path
    assert (t / "child.base").read_text() == "from-base\n"
    hup1 = json.loads((t / "hup1.json").read_text())
    assert [(a["name"], a["read_only"], a["type"]) for a in hup1] == [("kid", True, "differencing")]
    assert json.loads((t / "hup2.json").read_text()) == []
    assert (t / "base.before").read_text().split()[0] == (t / "base.after").read_text().split()[0]
    assert_clean(t / "base.vhd")
    assert_clean(t / "child.vhd")
    assert fs_file(t / "child.vhd", "/child.txt", t, flatten=True) == "from-child\n"
    assert fs_file(t / "child.vhd", "/base.txt", t, flatten=True) == "changed\n"
    assert fs_file(base, "/base.txt", t) == "from-base\n"
    assert (t / "daemon.rc").read_text().strip() == "0"


def test_copied_chain_with_a_windows10_child_attaches(tmp_path: Path, guest: Guest) -> None:
    """A chain copied with new mtimes whose child records parent timestamp 0 attaches and reads the
    chain's data; the strict option (command line and vhdtab) refuses it, naming itself."""
    made, copy = tmp_path / "made", tmp_path / "copy"
    made.mkdir()
    copy.mkdir()
    size = 4 << 20
    model = bytearray(size)
    create_dynamic(str(made / "base.vhd"), size, block_size=1 << 16, exact_size=True)
    create_differencing(str(made / "child.vhd"), str(made / "base.vhd"))
    for name, writes in (("base.vhd", [(0, b"B" * 70000), (3 << 20, b"b" * 5000)]),
                         ("child.vhd", [(4096, b"C" * 9000), (size - 512, b"c" * 512)])):
        with open_image(str(made / name)) as image:
            for off, data in writes:
                image.write(off, data)
                model[off : off + len(data)] = data
    with open(made / "child.vhd", "r+b") as f:  # as Windows 10 writes it: no parent timestamp
        f.seek(512)
        header = DynamicHeader.unpack(f.read(1024))
        f.seek(512)
        f.write(header.replace(parent_timestamp=0).pack())
    for name in ("base.vhd", "child.vhd"):
        (copy / name).write_bytes((made / name).read_bytes())  # a plain copy: new mtimes
    (tmp_path / "vhdtab").write_text("")
    script = PRELUDE + r"""
DEV=$(vhdblkctl attach --read-only "$T/copy/child.vhd")
dd if="$DEV" of="$T/dev.raw" bs=64k status=none
vhdblkctl detach child
record strict vhdblkctl attach --strict-parent-timestamp "$T/copy/child.vhd"
echo "kid $T/copy/child.vhd ro,strict_parent_timestamp" >"$T/vhdtab"
kill -HUP $DPID
for i in $(seq 100); do vhdblkctl status --json | grep -q strict_parent_timestamp && break; sleep 0.1; done
vhdblkctl status --json >"$T/status.json"
stop_daemon
"""
    guest(script, env=guest_env(tmp_path), timeout=300).check()
    t = tmp_path
    assert (t / "dev.raw").read_bytes() == model
    assert (t / "strict.rc").read_text().strip() == "1"
    assert "--strict-parent-timestamp" in (t / "strict.err").read_text()
    status = json.loads((t / "status.json").read_text())
    assert "strict_parent_timestamp" in status["attach_errors"]["kid"]
    assert (t / "daemon.rc").read_text().strip() == "0"


WRITER = r"""
import os, sys
data, log = sys.argv[1], sys.argv[2]
fd = os.open(data, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
lfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
i = 0
while True:
    try:
        os.write(fd, f"record {i:06d} {'x' * 90}\n".encode())
        os.fsync(fd)
    except OSError as exc:
        print("writer stopped:", exc, flush=True)
        break
    os.write(lfd, f"{i}\n".encode())
    os.fsync(lfd)
    i += 1
"""


def test_sigterm_keeps_every_fsynced_write(tmp_path: Path, guest: Guest) -> None:
    create(tmp_path / "w.vhd", "--size", "64M")
    (tmp_path / "writer.py").write_text(WRITER)
    (tmp_path / "vhdtab").write_text(f"w {tmp_path}/w.vhd\n")
    script = PRELUDE + r"""
DEV=$(vhdblkctl list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["device"])')
mkfs.ext4 -q "$DEV"
mount "$DEV" /mnt/a
python3 "$T/writer.py" /mnt/a/log.txt "$T/acked" >"$T/writer.out" 2>&1 &
WPID=$!
for i in $(seq 600); do [ "$(wc -l <"$T/acked" 2>/dev/null || echo 0)" -ge 40 ] && break; sleep 0.1; done
echo "never fsynced" >/mnt/a/unsynced.txt  # the daemon syncs a mounted fs before it lets go
stop_daemon
for i in $(seq 300); do kill -0 $WPID 2>/dev/null || break; sleep 0.2; done
kill -9 $WPID 2>/dev/null || true
umount -l /mnt/a || true
"""
    guest(script, env=guest_env(tmp_path), timeout=400).check()
    t = tmp_path
    assert (t / "daemon.rc").read_text().strip() == "0", (t / "daemon.log").read_text()
    acked = [int(x) for x in (t / "acked").read_text().split()]
    assert len(acked) >= 40 and acked == list(range(len(acked)))
    assert_clean(t / "w.vhd")
    assert fs_file(t / "w.vhd", "/unsynced.txt", t, replay=True) == "never fsynced\n"
    content = fs_file(t / "w.vhd", "/log.txt", t, replay=True).splitlines()
    for i in acked:
        assert content[i] == f"record {i:06d} {'x' * 90}", i


def test_restarted_daemon_readopts_a_mounted_device(tmp_path: Path, guest: Guest) -> None:
    create(tmp_path / "r.vhd", "--size", "64M")
    (tmp_path / "vhdtab").write_text(f"r {tmp_path}/r.vhd\n")
    script = PRELUDE + r"""
DEV=$(vhdblkctl list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["device"])')
mkfs.ext4 -q "$DEV"
mount "$DEV" /mnt/a
echo before >/mnt/a/before.txt; sync
kill -KILL $DPID; wait $DPID || true
# The device survives the daemon: writes wait (dead_conn_timeout) for a new one.
( echo during >/mnt/a/during.txt; sync; echo done >"$T/during.done" ) &
SYNCER=$!
sleep 1
"${VHDBLKD_BIN:-vhdblkd}" -v run --config "$T/vhdtab" --control /run/vt/control.sock --state-dir /run/vt >"$T/daemon2.log" 2>&1 &
DPID=$!
for i in $(seq 150); do vhdblkctl status >/dev/null 2>&1 && break; sleep 0.2; done
wait $SYNCER
vhdblkctl list --json >"$T/list2.json"
echo after >/mnt/a/after.txt
umount /mnt/a
vhdblkctl detach r
stop_daemon
"""
    guest(script, env=guest_env(tmp_path), timeout=300).check()
    t = tmp_path
    listed = json.loads((t / "list2.json").read_text())
    assert [a["name"] for a in listed] == ["r"]
    assert "re-adopted" in (t / "daemon2.log").read_text()
    assert (t / "during.done").read_text() == "done\n"
    assert (t / "daemon.rc").read_text().strip() == "0"
    assert_clean(t / "r.vhd")
    for name in ("before", "during", "after"):
        assert fs_file(t / "r.vhd", f"/{name}.txt", t) == f"{name}\n"


def test_connection_dropped_by_a_kernel_timeout_is_replaced(tmp_path: Path, guest: Guest) -> None:
    create(tmp_path / "t.vhd", "--size", "64M")
    payload = os.urandom(8 << 20)
    (tmp_path / "payload").write_bytes(payload)
    # A 2 s request timeout: stopping the daemon for 5 s makes the kernel drop the connection.
    (tmp_path / "vhdtab").write_text(f"t {tmp_path}/t.vhd timeout=2\n")
    script = PRELUDE + r"""
DEV=/dev/nbd0
( for i in $(seq 0 7); do
    dd if="$T/payload" of=$DEV bs=1M skip=$i seek=$i count=1 oflag=direct conv=fsync 2>/dev/null || exit 1
    sleep 0.3
  done; echo wrote ) >"$T/dd.out" 2>&1 &
W=$!
sleep 0.5
kill -STOP $DPID
sleep 5
kill -CONT $DPID
set +e; wait $W; echo $? >"$T/dd.rc"; set -e
head -c 8M $DEV >"$T/readback"
vhdblkctl list --json >"$T/list.json"
stop_daemon
"""
    guest(script, env=guest_env(tmp_path), timeout=300).check()
    t = tmp_path
    assert (t / "dd.rc").read_text().strip() == "0" and (t / "dd.out").read_text() == "wrote\n"
    assert json.loads((t / "list.json").read_text())[0]["reconnects"] >= 1
    assert "ended unexpectedly; reconnecting" in (t / "daemon.log").read_text()
    assert (t / "readback").read_bytes() == payload
    assert (t / "daemon.rc").read_text().strip() == "0"
    assert_clean(t / "t.vhd")
    raw = t / "t.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(t / "t.vhd"), str(raw)], check=True, timeout=120)
    with raw.open("rb") as f:
        assert f.read(len(payload)) == payload

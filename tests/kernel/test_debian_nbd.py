"""vhdblkd over NBD on Debian's own 6.12 kernel (QEMU), not only on UML's 6.1.

The NBD tests proper run on UML (faster); this is the one smoke test on the
kernel users run: attach, mkfs.ext4, mount, write and fsync, unmount,
detach, and the image checks clean on the host.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .test_daemon import assert_clean, create, fs_file
from .uml import GuestResult

pytestmark = pytest.mark.kernel  # and debian_kernel, from the debian_guest fixture

# Every Python start costs seconds in this guest: the daemon's readiness is read
# from its log with shell builtins, and vhdblkctl runs only to attach and detach.
SCRIPT = r"""
set -euo pipefail
T=$TESTDIR
uname -r >"$T/uname"
mkdir -p /run/vt /mnt/a
export VHDBLKD_CONTROL=/run/vt/control.sock
vhdblkd -v run --config "$T/vhdtab" --control /run/vt/control.sock --state-dir /run/vt >"$T/daemon.log" 2>&1 &
DPID=$!
for _ in $(seq 1500); do [[ $(<"$T/daemon.log") == *"ready: "* ]] && break; sleep 0.2; done
DEV=$(vhdblkctl attach "$T/dyn.vhd")
echo "$DEV" >"$T/dev"
SYS=/sys/block/${DEV#/dev/}
cat "$SYS/backend" >"$T/backend"
mkfs.ext4 -q "$DEV"
mount "$DEV" /mnt/a
seq 1 20000 >/mnt/a/numbers.txt
dd if="$T/blob" of=/mnt/a/blob bs=64k conv=fsync status=none
sync /mnt/a/numbers.txt
umount /mnt/a
vhdblkctl detach "$DEV"
[ -e "$SYS/pid" ] && echo connected >"$T/after-detach" || echo disconnected >"$T/after-detach"
kill -TERM $DPID
set +e; wait $DPID; echo $? >"$T/daemon.rc"
"""


def test_nbd_attach_mkfs_mount_write_detach_on_debian_612(
    debian_guest: Callable[..., GuestResult], tmp_path: Path
) -> None:
    image = create(tmp_path / "dyn.vhd", "--size", "64M")
    (tmp_path / "vhdtab").write_text("# empty\n")
    blob = os.urandom(1 << 20)
    (tmp_path / "blob").write_bytes(blob)
    result = debian_guest(SCRIPT, shares=[tmp_path], env={"TESTDIR": str(tmp_path)}, timeout=600)
    result.check()
    t = tmp_path
    assert (t / "uname").read_text().startswith("6.12.")
    assert (t / "dev").read_text().strip().startswith("/dev/nbd")
    assert (t / "backend").read_text().strip() == "vhdblkd:dyn"
    assert (t / "after-detach").read_text().strip() == "disconnected"
    assert (t / "daemon.rc").read_text().strip() == "0"
    assert_clean(image)
    assert fs_file(image, "/numbers.txt", t) == "".join(f"{i}\n" for i in range(1, 20001))
    raw = t / "dyn.vhd.raw"  # left by fs_file: the image as raw, checked by the file system's own checker
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    out = subprocess.run(["debugfs", "-R", "cat /blob", str(raw)], capture_output=True, timeout=60)
    assert out.stdout == blob

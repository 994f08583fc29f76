"""The QEMU guest's boot artifacts: which 6.12 kernel, its vmlinux, the initramfs.

Both are built once and cached in CACHE_DIR (VHDBLKD_GUEST_CACHE overrides
it), under names that hash their inputs, so a changed kernel, busybox,
module or init script gives a new file and the old one is dropped.  Writes
are atomic: parallel test runs may build the same entry.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import stat
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

from .uml import GuestError

BUSYBOX = Path("/bin/busybox")
KERNEL_GLOB = "vmlinuz-6.12.*+deb12-amd64"
CACHE_DIR = Path(os.environ.get("VHDBLKD_GUEST_CACHE", "/var/cache/vhdblkd-tests"))
# Loaded by the initramfs, in dependency order (virtio_pci is built in).
INITRAMFS_MODULES = ("netfs", "9pnet", "9pnet_virtio", "9p", "overlay")
# The largest msize Linux's virtio transport takes (125 pages of a 128-entry ring).
MSIZE = 512000
# A cache entry replaced by a newer build is deleted after this long.
STALE_SECONDS = 3600


def kernel_version() -> str:
    """The newest installed bookworm-backports 6.12 kernel with a module tree."""
    wanted = os.environ.get("VHDBLKD_GUEST_KERNEL")
    found = []
    for image in Path("/boot").glob(KERNEL_GLOB):
        version = image.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / version / "modules.dep").exists():
            found.append(version)
    if wanted:
        if wanted not in found:
            raise GuestError(f"kernel {wanted} (VHDBLKD_GUEST_KERNEL) is not installed with its modules")
        return wanted
    if not found:
        raise GuestError(
            f"no /boot/{KERNEL_GLOB} with /lib/modules: run `bash .ci/setup` "
            "(it installs bookworm-backports' linux-image-6.12)"
        )
    return max(found, key=lambda v: [int(n) if n.isdigit() else n for n in re.split(r"[.+-]", v)])


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _stat_id(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def _store(name: str, prefix: str, data: bytes) -> Path:
    """Write a cache entry atomically (parallel runs may build the same one) and drop stale ones."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    target = CACHE_DIR / name
    fd, tmp = tempfile.mkstemp(dir=CACHE_DIR, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    # Older builds go once nothing can be about to boot them (another checkout's run may).
    for old in CACHE_DIR.glob(prefix + "*"):
        if old != target and time.time() - old.stat().st_mtime > STALE_SECONDS:
            old.unlink(missing_ok=True)
    return target


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (boot protocol 2.08+ payload fields)."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise GuestError("not a bzImage: no HdrS setup header")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    # The build appends the uncompressed size (le32) to the compressed stream.
    body, size = payload[:-4], struct.unpack("<I", payload[-4:])[0]
    if body.startswith(b"\x28\xb5\x2f\xfd"):
        out = subprocess.run(["zstd", "-dcq"], input=body, capture_output=True, check=True).stdout
    elif body.startswith(b"\xfd7zXZ\x00"):
        out = lzma.LZMADecompressor().decompress(body)
    elif body.startswith(b"\x1f\x8b"):
        out = zlib.decompressobj(31).decompress(body)
    else:
        raise GuestError(f"unknown compression in bzImage payload (magic {body[:6].hex()})")
    if not out.startswith(b"\x7fELF") or len(out) != size:
        raise GuestError(f"bzImage payload did not decompress to a {size}-byte ELF kernel")
    return out


def vmlinux(version: str) -> Path:
    bzimage = Path("/boot") / f"vmlinuz-{version}"
    name = f"vmlinux-{version}-{_key(_stat_id(bzimage))}"
    path = CACHE_DIR / name
    if not path.exists():
        path = _store(name, f"vmlinux-{version}-", extract_vmlinux(bzimage.read_bytes()))
    return path


def _cpio(entries: Iterable[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive of (name, mode, data, rdev) entries."""
    out = bytearray()

    def add(ino: int, name: str, mode: int, data: bytes, rdev: int) -> None:
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev), len(raw), 0)
        out.extend(b"070701" + b"".join(b"%08X" % v for v in fields) + raw)
        out.extend(b"\0" * (-len(out) % 4) + data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, 1):
        add(ino, name, mode, data, rdev)
    add(0, "TRAILER!!!", 0, b"", 0)
    return bytes(out)


# PID 1 of the initramfs: mount the host root (read-only 9p + tmpfs overlay) and
# the work share at its host path, then let the run's own boot.sh switch root.
_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
die() { echo "GUEST: $*"; echo o >/proc/sysrq-trigger; sleep 30; }
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in MODULES; do insmod /lib/modules/$m.ko || die "insmod $m failed"; done
W=
for a in $(cat /proc/cmdline); do case $a in vhdblkd.work=*) W=${a#vhdblkd.work=};; esac; done
[ -n "$W" ] || die "no vhdblkd.work= on the kernel command line"
O="trans=virtio,version=9p2000.L,msize=MSIZE"
mount -t 9p -o ro,$O,cache=loose hostroot /lower || die "mounting the host root failed"
mount -t tmpfs -o mode=0755 tmpfs /ovl && mkdir /ovl/upper /ovl/work
mount -t overlay -o lowerdir=/lower,upperdir=/ovl/upper,workdir=/ovl/work overlay /newroot || die "overlay failed"
mount -t 9p -o $O,cache=mmap work "/newroot$W" || die "mounting the work share failed"
. "/newroot$W/boot.sh"
die "boot.sh returned"
"""


def _init_script() -> str:
    return _INIT.replace("MODULES", " ".join(INITRAMFS_MODULES)).replace("MSIZE", str(MSIZE))


def _module_file(version: str, name: str) -> Path:
    base = Path("/lib/modules") / version
    for line in (base / "modules.dep").read_text().splitlines():
        path = line.split(":", 1)[0]
        if Path(path).name.split(".ko")[0].replace("-", "_") == name:
            return base / path
    raise GuestError(f"no {name} module in {base}/modules.dep")


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dcq", str(path)], capture_output=True, check=True).stdout
    if path.name.endswith(".gz"):
        return zlib.decompress(data, 31)
    return data


def initramfs(version: str) -> Path:
    modules = [_module_file(version, m) for m in INITRAMFS_MODULES]
    init = _init_script()
    name = f"initramfs-{version}-{_key(init, _stat_id(BUSYBOX), [_stat_id(m) for m in modules])}.cpio"
    path = CACHE_DIR / name
    if path.exists():
        return path
    dirs = ("bin", "dev", "proc", "sys", "lib", "lib/modules", "lower", "ovl", "newroot")
    entries = [(d, stat.S_IFDIR | 0o755, b"", 0) for d in dirs]
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes(), 0))
    entries.append(("init", stat.S_IFREG | 0o755, init.encode(), 0))
    for name_, path_ in zip(INITRAMFS_MODULES, modules, strict=True):
        entries.append((f"lib/modules/{name_}.ko", stat.S_IFREG | 0o644, _module_bytes(path_), 0))
    return _store(name, f"initramfs-{version}-", _cpio(entries))

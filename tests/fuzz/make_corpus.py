"""Regenerate the seed corpus in corpus/ (run by hand; the files are committed).

    .venv/bin/python -m tests.fuzz.make_corpus

corpus/vhd/: small images made by create_* (dynamic with 512-byte and 4 KiB
blocks holding data, a differencing child beside its parent, fixed) and by
qemu-img when it is installed.  Paths inside the differencing child's
locators are those of the in-memory tree the fuzz target uses (/fz/NAME).
corpus/nbd/: NBD programs for nbdfuzz.run (mode byte, split seed, stream).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.fuzz import nbdfuzz
from tests.fuzz.vhdfuzz import CORPUS, ROOT
from vhdblkd.vhd.create import create_differencing, create_dynamic, create_fixed
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.memfile import MemoryDisk, MemoryFileFactory


def vhd_seeds() -> dict[str, bytes]:
    disks: dict[str, MemoryDisk] = {}
    mem = MemoryFileFactory(disks)

    def path(name: str) -> str:
        return f"{ROOT}/{name}"

    create_dynamic(path("dynamic-4k.vhd"), 16 * 4096, block_size=4096, exact_size=True, file_factory=mem)
    with open_image(path("dynamic-4k.vhd"), lock=False, file_factory=mem) as image:
        for i in range(0, 16, 3):
            image.write(i * 4096 + 100, bytes([i + 1]) * 1000)
    create_dynamic(path("dynamic-512b.vhd"), 8 * 1024, block_size=512, file_factory=mem)
    with open_image(path("dynamic-512b.vhd"), lock=False, file_factory=mem) as image:
        image.write(1024, b"x" * 1536)
    create_dynamic(path("parent-dynamic.vhd"), 16 * 4096, block_size=8192, exact_size=True, file_factory=mem)
    with open_image(path("parent-dynamic.vhd"), lock=False, file_factory=mem) as image:
        image.write(0, b"p" * 20000)
    create_differencing(path("diff-child.vhd"), path("parent-dynamic.vhd"), block_size=4096, lock=False,
                        file_factory=mem)
    with open_image(path("diff-child.vhd"), lock=False, file_factory=mem) as image:
        image.write(5000, b"c" * 3000)
        image.write(40000, b"d" * 100)
    create_fixed(path("fixed-16k.vhd"), 16 * 1024, exact_size=True, file_factory=mem)
    return {name.rsplit("/", 1)[1]: bytes(disk.data) for name, disk in disks.items()}


def qemu_seeds() -> dict[str, bytes]:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        return {}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, opts, size in [("qemu-dynamic.vhd", "subformat=dynamic", "1M"),
                                 ("qemu-fixed.vhd", "subformat=fixed", "32K"),
                                 ("qemu-dynamic-forcesize.vhd", "subformat=dynamic,force_size=on", "3M")]:
            target = Path(tmp) / name
            subprocess.run([qemu_img, "create", "-q", "-f", "vpc", "-o", opts, str(target), size], check=True)
            out[name] = target.read_bytes()
    return out


def main() -> None:
    CORPUS.mkdir(parents=True, exist_ok=True)
    for name, data in {**vhd_seeds(), **qemu_seeds()}.items():
        (CORPUS / name).write_bytes(data)
    nbd_dir = CORPUS.parent / "nbd"
    nbd_dir.mkdir(parents=True, exist_ok=True)
    for name, data in nbdfuzz.seed_programs().items():
        (nbd_dir / f"{name}.bin").write_bytes(data)


if __name__ == "__main__":
    main()

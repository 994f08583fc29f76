"""Interoperability with QEMU: its images read right through open_image, ours open right in qemu-img.

QEMU's vpc driver is the most widely used second implementation of the format,
so the two must agree byte for byte on fixed and dynamic disks.  QEMU reads
differencing disks as plain dynamic ones (the parent reads as zeros), so for
those the flattened `vhdblkctl convert --to raw` output is compared with the
model instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_differencing, create_dynamic, create_fixed
from vhdblkd.vhd.image import open_image

pytestmark = pytest.mark.peers

MIB = 1 << 20
VHDBLKCTL = Path(sys.executable).with_name("vhdblkctl")
# Above this, comparing every byte costs seconds (reading holes of a sparse
# file is not free); larger disks are compared where data is plus probes.
FULL_COMPARE_LIMIT = 160 * MIB


def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], check=check, capture_output=True, text=True, timeout=300)


def qemu_virtual_size(path: Path) -> int:
    out = run("qemu-img", "info", "-f", "vpc", "--output=json", path).stdout
    size: int = json.loads(out)["virtual-size"]
    return size


def raw_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for offset, length in raw_data_extents(path):
            f.seek(offset)
            digest.update(offset.to_bytes(8, "big") + f.read(length))
    return digest.hexdigest()


def raw_data_extents(path: Path) -> Iterator[tuple[int, int]]:
    """Where a sparse file holds data (SEEK_DATA/SEEK_HOLE)."""
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        offset = 0
        while offset < end:
            try:
                start = os.lseek(f.fileno(), offset, os.SEEK_DATA)
            except OSError:
                return
            stop = min(os.lseek(f.fileno(), start, os.SEEK_HOLE), end)
            yield start, stop - start
            offset = stop


def windows_to_compare(size: int, extents: list[tuple[int, int]], rng: random.Random) -> list[tuple[int, int]]:
    """Every byte for small disks; else the data extents, the ends, and random probes into holes."""
    if size <= FULL_COMPARE_LIMIT:
        return [(0, size)]
    windows = list(extents)
    windows.append((0, min(size, 4 * MIB)))
    windows.append((max(0, size - 4 * MIB), min(size, 4 * MIB)))
    for _ in range(32):
        offset = rng.randrange(0, size // 512) * 512
        windows.append((offset, min(256 * 1024, size - offset)))
    return windows


def assert_reads_like(image_path: Path, raw_path: Path, seed: int = 1) -> None:
    """open_image(image_path) reads exactly what the raw file holds."""
    rng = random.Random(seed)
    size = raw_path.stat().st_size
    with open_image(str(image_path), read_only=True) as image, open(raw_path, "rb") as raw:
        assert image.size == size
        for offset, length in windows_to_compare(size, list(raw_data_extents(raw_path)), rng):
            done = 0
            while done < length:
                piece = min(4 * MIB, length - done)
                expected = os.pread(raw.fileno(), piece, offset + done)
                got = bytes(image.read(offset + done, piece))
                assert got == expected, f"{image_path}: data differs from qemu's in [{offset + done}, +{piece})"
                done += piece


# --- QEMU's images, read by us -------------------------------------------------

QEMU_CASES = [
    # (subformat, size, force_size)
    ("dynamic", "100M", False),
    ("dynamic", "64M", False),
    ("dynamic", "1G", False),
    ("dynamic", "3000000512", False),
    ("dynamic", "100M", True),
    ("dynamic", "3000000512", True),
    ("fixed", "100M", False),
    ("fixed", "64M", False),
    ("fixed", "3000000512", False),
    ("fixed", "64M", True),
    ("fixed", "1G", True),
]


@pytest.mark.parametrize(("subformat", "size", "force_size"), QEMU_CASES)
def test_qemu_images_read_identically(tmp_path: Path, subformat: str, size: str, force_size: bool) -> None:
    image = tmp_path / "qemu.vhd"
    options = f"subformat={subformat}" + (",force_size=on" if force_size else "")
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", options, image, size)
    virtual_size = qemu_virtual_size(image)
    # Patterns at the start, across block boundaries, and in the last sectors.
    last = virtual_size - 64 * 1024
    run(
        "qemu-io", "-f", "vpc",
        "-c", "write -P 0x5a 1M 3M",
        "-c", "write -P 0x33 512 1024",
        "-c", f"write -P 0xa5 {last} 65536",
        image,
    )  # fmt: skip
    raw = tmp_path / "qemu.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", image, raw)
    assert raw.stat().st_size == virtual_size
    assert_reads_like(image, raw)
    with open_image(str(image), read_only=True) as opened:
        assert opened.disk_type == subformat
        assert opened.size == virtual_size
    before = raw_digest(image)
    report = check_image(str(image))
    assert report.clean, report.problems
    assert raw_digest(image) == before


# --- our images, read by QEMU --------------------------------------------------


def scribble(image_path: Path, model: bytearray, seed: int, operations: int = 60) -> None:
    """Random sector-aligned writes, discards and zero writes through open_image, mirrored in `model`."""
    rng = random.Random(seed)
    size = len(model)
    sectors = size // 512
    with open_image(str(image_path)) as image:
        for _ in range(operations):
            sector = rng.randrange(sectors)
            count = min(rng.choice([1, 7, 8, 64, 513, 4096]), sectors - sector)
            offset, length = sector * 512, count * 512
            action = rng.random()
            if action < 0.7:
                data = rng.randbytes(length)
                image.write(offset, data)
                model[offset : offset + length] = data
            elif action < 0.85:
                image.discard(offset, length)
                model[offset : offset + length] = bytes(length)
            else:
                image.write_zeroes(offset, length)
                model[offset : offset + length] = bytes(length)
        image.flush()
    # Also the very first and very last sector, where off-by-ones live.
    with open_image(str(image_path)) as image:
        for offset in (0, size - 512):
            data = rng.randbytes(512)
            image.write(offset, data)
            model[offset : offset + 512] = data


def write_model(path: Path, model: bytearray) -> Path:
    """The model as a sparse raw file: zero MiBs stay holes, so qemu-img compare skips them."""
    view = memoryview(model)
    zeros = bytes(MIB)
    with open(path, "wb") as f:
        f.truncate(len(model))
        for offset in range(0, len(model), MIB):
            piece = view[offset : offset + MIB]
            if piece != zeros[: len(piece)]:
                f.seek(offset)
                f.write(piece)
    return path


def assert_clean(image_path: Path) -> None:
    result = run(VHDBLKCTL, "check", image_path, check=False)
    assert result.returncode == 0, f"vhdblkctl check: {result.stdout}{result.stderr}"


OUR_CASES = [
    # (kind, size, exact_size, block_size)
    ("fixed", 64 * MIB, False, None),
    ("fixed", 100 * MIB, True, None),
    ("fixed", 3 * MIB + 512, True, None),
    ("dynamic", 64 * MIB, False, 2 * MIB),
    ("dynamic", 100 * MIB, True, 2 * MIB),
    ("dynamic", 40 * MIB + 512, True, 512 * 1024),
    ("dynamic", 1024 * MIB, False, 2 * MIB),
]


@pytest.mark.parametrize(("kind", "size", "exact_size", "block_size"), OUR_CASES)
def test_our_images_open_in_qemu(tmp_path: Path, kind: str, size: int, exact_size: bool, block_size: int | None) -> None:
    image = tmp_path / "ours.vhd"
    if kind == "fixed":
        create_fixed(str(image), size, exact_size=exact_size)
    else:
        assert block_size is not None
        create_dynamic(str(image), size, block_size=block_size, exact_size=exact_size)
    with open_image(str(image), read_only=True) as opened:
        virtual_size = opened.size
    if exact_size:
        assert virtual_size == size
    else:
        assert virtual_size >= size
    assert qemu_virtual_size(image) == virtual_size

    model = bytearray(virtual_size)
    scribble(image, model, seed=size)
    assert qemu_virtual_size(image) == virtual_size
    raw = write_model(tmp_path / "model.raw", model)
    result = run("qemu-img", "compare", "-f", "vpc", "-F", "raw", image, raw, check=False)
    assert result.returncode == 0, f"qemu-img compare: {result.stdout}{result.stderr}"
    assert_clean(image)


def test_our_differencing_chain_flattens_like_the_model(tmp_path: Path) -> None:
    size = 48 * MIB
    base = tmp_path / "base.vhd"
    child = tmp_path / "child.vhd"
    create_dynamic(str(base), size, exact_size=True)
    model = bytearray(size)
    scribble(base, model, seed=11)
    base_model = bytes(model)
    create_differencing(str(child), str(base))
    scribble(child, model, seed=12)

    # QEMU opens the child as a dynamic disk: it must at least accept it and see its size.
    assert qemu_virtual_size(child) == size
    # The parent was never written through the child.
    base_raw = write_model(tmp_path / "base.raw", bytearray(base_model))
    assert run("qemu-img", "compare", "-f", "vpc", "-F", "raw", base, base_raw, check=False).returncode == 0

    flat = tmp_path / "flat.raw"
    run(VHDBLKCTL, "convert", "--to", "raw", child, flat)
    assert flat.read_bytes() == bytes(model)
    # And through qemu once more: the flattened chain as a dynamic VHD.
    flat_vhd = tmp_path / "flat.vhd"
    run(VHDBLKCTL, "convert", "--to", "dynamic", child, flat_vhd)
    model_raw = write_model(tmp_path / "model.raw", model)
    result = run("qemu-img", "compare", "-f", "vpc", "-F", "raw", flat_vhd, model_raw, check=False)
    assert result.returncode == 0, f"qemu-img compare: {result.stdout}{result.stderr}"
    for path in (base, child, flat_vhd):
        assert_clean(path)


def test_qemu_converts_our_dynamic_image_back_to_the_model(tmp_path: Path) -> None:
    """qemu-img convert reads our image exactly, block allocation and bitmaps included."""
    image = tmp_path / "ours.vhd"
    create_dynamic(str(image), 32 * MIB, exact_size=True)
    model = bytearray(32 * MIB)
    scribble(image, model, seed=5)
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", image, out)
    assert out.read_bytes() == bytes(model)

#!/usr/bin/env python3
"""Random 4k reads through backend.read: a dynamic image against differencing chains, in-library.

The images hold nbdbench.py's data pattern, written here through the library
(no server): the dynamic image every other 2 MiB block (make_half_dynamic);
the 3-level chain base <- mid <- top as make_chain (base blocks 0, 4, 8, ...,
mid 1, 5, 9, ..., top the first 64 KiB of base's blocks, so bitmaps are
partly set); the 2-level chain base <- top with base holding what base and
mid hold together.  Every image gets the same seeded 4k-aligned offsets; the
rounds alternate between images and each cell is the median of the rounds,
so the ratios come from one run under the same load.

    .venv/bin/python bench/chainread.py [--size-mib 256] [--reads 20000] [--rounds 7]
    .venv/bin/python bench/chainread.py --count   # callgrind instructions per read instead

--count runs each image's reads in a child under `valgrind --tool=callgrind`,
once with the reads and once without, and divides the difference by the
reads: a number the machine's load cannot move.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vhdblkd.vhd.create import create_differencing, create_dynamic  # noqa: E402
from vhdblkd.vhd.image import open_image  # noqa: E402

MiB = 1024 * 1024
BLOCK = 2 * MiB
TOP_PART = 64 * 1024
READ = 4096
IMAGES = ("dynamic", "chain2", "chain3")


def _fill(path: Path, size: int, blocks: list[int], length: int, seed: int) -> None:
    rng = random.Random(seed)
    with open_image(str(path)) as image:
        for block in blocks:
            if block * BLOCK < size:
                image.write(block * BLOCK, rng.randbytes(min(length, size - block * BLOCK)))


def make_images(workdir: Path, size: int) -> dict[str, Path]:
    n = size // BLOCK
    dyn = workdir / "dynamic.vhd"
    create_dynamic(str(dyn), size, block_size=BLOCK)
    _fill(dyn, size, list(range(0, n, 2)), BLOCK, 1)
    paths = {"dynamic": dyn}
    for levels in (2, 3):
        base = workdir / f"chain{levels}-base.vhd"
        create_dynamic(str(base), size, block_size=BLOCK)
        below = [b for b in range(n) if b % 4 == 0 or (levels == 2 and b % 4 == 1)]
        _fill(base, size, below, BLOCK, 2)
        parent = base
        if levels == 3:
            mid = workdir / "chain3-mid.vhd"
            create_differencing(str(mid), str(parent))
            _fill(mid, size, list(range(1, n, 4)), BLOCK, 3)
            parent = mid
        top = workdir / f"chain{levels}-top.vhd"
        create_differencing(str(top), str(parent))
        _fill(top, size, list(range(0, n, 4)), TOP_PART, 4)
        paths[f"chain{levels}"] = top
    return paths


def offsets(size: int, reads: int, seed: int = 16) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(size // READ) * READ for _ in range(reads)]


def time_reads(path: Path, offs: list[int]) -> float:
    """Seconds per read, one pass (after a warm-up pass over the same offsets)."""
    with open_image(str(path), read_only=True) as image:
        read = image.read
        for off in offs[:2000]:
            read(off, READ)
        t0 = time.perf_counter()
        for off in offs:
            read(off, READ)
        return (time.perf_counter() - t0) / len(offs)


def wall(paths: dict[str, Path], size: int, reads: int, rounds: int) -> None:
    offs = offsets(size, reads)
    times: dict[str, list[float]] = {name: [] for name in IMAGES}
    for r in range(rounds):
        order = IMAGES if r % 2 == 0 else IMAGES[::-1]
        for name in order:
            times[name].append(time_reads(paths[name], offs))
    med = {name: statistics.median(v) for name, v in times.items()}
    for name in IMAGES:
        v = times[name]
        print(f"{name:8} {med[name] * 1e6:7.2f} us/read (min {min(v) * 1e6:.2f}, max {max(v) * 1e6:.2f})"
              f"  dynamic/{name}: {med['dynamic'] / med[name]:.2f}x")


def _child(path: str, size: int, reads: int) -> None:
    """Run under callgrind: the same warm-up whatever `reads` is, then `reads` reads."""
    with open_image(path, read_only=True) as image:
        read = image.read
        for off in offsets(size, 200, seed=99):
            read(off, READ)
        for off in offsets(size, reads):
            read(off, READ)


def count(paths: dict[str, Path], size: int, reads: int) -> None:
    """Instructions per read: a child doing `reads` reads minus one doing none (open, warm-up, exit)."""
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed")
    per: dict[str, float] = {}
    for name in IMAGES:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "cg.out")
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                   sys.executable, __file__, "--child", str(paths[name]), str(size)]
            per[name] = (_ir(cmd + [str(reads)], out) - _ir(cmd + ["0"], out)) / reads
    for name in IMAGES:
        print(f"{name:8} {per[name]:10.0f} instructions/read  dynamic/{name}: {per['dynamic'] / per[name]:.2f}x")


def _ir(cmd: list[str], out: str) -> int:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(r"Collected : (\d+)", proc.stderr)
    if m is None:
        m = re.search(r"summary: (\d+)", Path(out).read_text())
    assert m is not None, proc.stderr[-2000:]
    return int(m.group(1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--reads", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--count", action="store_true", help="callgrind instructions per read")
    ap.add_argument("--workdir", help="keep the images here (made if missing)")
    a = ap.parse_args()
    size = a.size_mib * MiB
    tmp = None
    if a.workdir:
        workdir = Path(a.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="chainread-")
        workdir = Path(tmp)
    try:
        marker = workdir / f"made-{size}"
        paths = {"dynamic": workdir / "dynamic.vhd", "chain2": workdir / "chain2-top.vhd",
                 "chain3": workdir / "chain3-top.vhd"}
        if not marker.exists():
            paths = make_images(workdir, size)
            marker.touch()
        if a.count:
            count(paths, size, a.reads)
        else:
            wall(paths, size, a.reads, a.rounds)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Block status and sparse reads against real peers: nbdinfo --map, qemu-img map/convert, nbdcopy."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from vhdblkd.vhd.create import create_differencing, create_dynamic
from vhdblkd.vhd.image import open_image

from .test_export_cmd import MiB, exporting, run

pytestmark = [pytest.mark.peers, pytest.mark.timeout(600)]

BS = 2 * MiB  # the default block size
SIZE = 64 * MiB


def write(path: Path, *pieces: tuple[int, bytes]) -> None:
    image = open_image(str(path), allow_unsafe_parent=True)
    try:
        for offset, data in pieces:
            image.write(offset, data)
    finally:
        image.close()


def nbdinfo_map(uri: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
    out = json.loads(run("nbdinfo", "--json", f"--map={context}", uri))
    return [(e["offset"], e["length"], e["type"]) for e in out]


def merged(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for off, n, kind in runs:
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, kind)
        elif n:
            out.append((off, n, kind))
    return out


def from_blocks(size: int, blocks: set[int], held: int, empty: int) -> list[tuple[int, int, int]]:
    return merged([(b * BS, min(BS, size - b * BS), held if b in blocks else empty) for b in range((size + BS - 1) // BS)])


def served(err: str) -> tuple[int, int]:
    """(data bytes sent, hole bytes) from the export's closing report."""
    found = re.findall(r"\((\d+) data bytes sent, (\d+) bytes as holes\)", err)
    assert found, err
    return int(found[-1][0]), int(found[-1][1])


def test_sparse_dynamic_map_matches_the_bat_and_qemu(tmp_path: Path) -> None:
    path = tmp_path / "sparse.vhd"
    create_dynamic(str(path), SIZE)
    write(path, (0, b"a" * 4096), (5 * BS + 123, b"b" * 10), (6 * BS, b"c" * BS), (31 * BS, b"d" * 512))
    with open_image(str(path), read_only=True) as image:
        size, blocks = image.size, set(image.allocated_block_indexes())
    assert blocks == {0, 5, 6, 31}
    expected = from_blocks(size, blocks, 0, 3)  # nbdinfo's type: 0 = data, 3 = hole,zero
    with exporting(path, "--read-only", sock=tmp_path / "s.sock") as exp:
        assert merged(nbdinfo_map(exp.uri)) == expected
        depth = merged(nbdinfo_map(exp.uri, "qemu:allocation-depth"))
        assert depth == from_blocks(size, blocks, 1, 0)
    # qemu's own vpc driver reads the same BAT: its data ranges are ours.
    qmap = json.loads(run("qemu-img", "map", "-f", "vpc", "--output=json", str(path)))
    qemu_data = merged([(e["start"], e["length"], 0 if e["data"] else 3) for e in qmap])
    assert [r for r in qemu_data if r[2] == 0] == [r for r in expected if r[2] == 0]


def test_three_level_chain_depths(tmp_path: Path) -> None:
    base, mid, top = tmp_path / "base.vhd", tmp_path / "mid.vhd", tmp_path / "top.vhd"
    create_dynamic(str(base), SIZE)
    write(base, (0, b"a" * MiB), (5 * BS, b"b" * 4096))
    create_differencing(str(mid), str(base))
    write(mid, (2 * BS, b"c" * 8192), (0, b"d" * 4096))
    create_differencing(str(top), str(mid))
    write(top, (10 * BS, b"e" * 512), (2 * BS + 4096, b"f" * 1024))
    with open_image(str(top), read_only=True) as image:
        size = image.size
    end = size
    expected_depth = merged([
        (0, 4096, 2), (4096, BS - 4096, 3), (BS, BS, 0),
        (2 * BS, 4096, 2), (2 * BS + 4096, 1024, 1), (2 * BS + 5120, 3072, 2), (2 * BS + 8192, 3 * BS - 8192, 0),
        (5 * BS, BS, 3), (6 * BS, 4 * BS, 0), (10 * BS, 512, 1), (10 * BS + 512, end - 10 * BS - 512, 0),
    ])
    with exporting(top, "--read-only", sock=tmp_path / "s.sock") as exp:
        assert merged(nbdinfo_map(exp.uri, "qemu:allocation-depth")) == expected_depth
        assert merged(nbdinfo_map(exp.uri)) == merged([(o, n, 3 if d == 0 else 0) for o, n, d in expected_depth])
        run("nbdcopy", exp.uri, str(tmp_path / "top.raw"))
    data = (tmp_path / "top.raw").read_bytes()
    assert data[:4096] == b"d" * 4096 and data[4096:MiB] == b"a" * (MiB - 4096)
    assert data[2 * BS : 2 * BS + 4096] == b"c" * 4096 and data[2 * BS + 4096 : 2 * BS + 5120] == b"f" * 1024
    assert data[5 * BS : 5 * BS + 4096] == b"b" * 4096 and data[10 * BS : 10 * BS + 512] == b"e" * 512


def data_ranges(path: Path) -> list[tuple[int, int]]:
    runs, pos, fd = [], 0, os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            runs.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return runs


def same_content(a: Path, b: Path) -> bool:
    """Two sparse files hold the same bytes (read only where either stores data)."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in sorted(set(data_ranges(a)) | set(data_ranges(b))):
            for off in range(start, end, 8 * MiB):
                n = min(8 * MiB, end - off)
                fa.seek(off)
                fb.seek(off)
                if fa.read(n) != fb.read(n):
                    return False
    return True


@pytest.mark.parametrize("tool", ["nbdcopy", "qemu-img"])
def test_copy_of_a_big_sparse_image_reads_only_its_data(tmp_path: Path, tool: str) -> None:
    path = tmp_path / "big.vhd"
    create_dynamic(str(path), 10 << 30)
    payload = os.urandom(MiB)
    # 100 MiB of data in 50 blocks spread over 10 GiB.
    write(path, *[(b * 101 * BS, payload * 2) for b in range(50)])
    with open_image(str(path), read_only=True) as image:
        size = image.size
        stored = len(image.allocated_block_indexes()) * BS
    assert stored == 100 * MiB
    out = tmp_path / "copy.raw"
    with exporting(path, "--read-only", sock=tmp_path / "s.sock") as exp:
        if tool == "nbdcopy":
            run("nbdcopy", exp.uri, str(out))
        else:
            run("qemu-img", "convert", "-f", "raw", "-O", "raw", exp.uri, str(out))
        rc, err = exp.stop()
    assert rc == 0, err
    sent, _ = served(err)
    assert stored <= sent <= stored + 4 * MiB, f"{sent} bytes of data served for {stored} stored"
    reference = tmp_path / "ref.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", str(path), str(reference))
    assert out.stat().st_size == size
    assert same_content(out, reference)

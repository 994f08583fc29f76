"""compact: zero blocks freed, holes closed, data kept; every crash point recovers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vhdblkd.errors import ImageLocked, UnsupportedImage
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.compact import compact
from vhdblkd.vhd.create import create_differencing, create_dynamic, create_fixed
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.lock import ImageLock
from vhdblkd.vhd.memfile import MemoryDisk, MemoryFileFactory, Op

K = 1024
BS = 64 * K
SIZE = 24 * BS


def fill(path: str, model: bytearray, writes: list[tuple[int, bytes]], **kw: object) -> None:
    with open_image(path, **kw) as image:  # type: ignore[arg-type]  # keyword pass-through of test options
        for off, data in writes:
            image.write(off, data)
            model[off : off + len(data)] = data


# Blocks 0, 3, 7, 10 get zeros (allocated but empty); others data; block 5 a few bytes.
WRITES = [(0, bytes(BS)), (BS, b"\x11" * BS), (3 * BS, bytes(BS)), (5 * BS + 4096, b"abc" * 100),
          (7 * BS, bytes(BS)), (9 * BS, b"\x22" * BS), (10 * BS, bytes(BS)), (20 * BS, b"\x33" * 512)]


def read_all(path: str, **kw: object) -> bytes:
    with open_image(path, read_only=True, **kw) as image:  # type: ignore[arg-type]  # test options
        return bytes(image.read(0, image.size))


def test_compact_dynamic_frees_zero_blocks_and_truncates(tmp_path: Path) -> None:
    path = str(tmp_path / "d.vhd")
    create_dynamic(path, SIZE, block_size=BS, exact_size=True)
    model = bytearray(SIZE)
    fill(path, model, WRITES)
    before = os.path.getsize(path)
    seen: list[tuple[int, int]] = []
    r = compact(path, progress=lambda d, t: seen.append((d, t)))
    assert (r.blocks_before, r.blocks_freed, r.blocks_after) == (8, 4, 4)
    assert r.file_size_before == before
    assert os.path.getsize(path) == r.file_size_after == before - 4 * (BS + 512)
    assert seen[-1] == (8, 8)
    assert check_image(path).clean
    assert read_all(path) == model
    again = compact(path)
    assert again.blocks_freed == 0 and again.file_size_after == r.file_size_after


def test_compact_differencing_keeps_blocks_that_hide_parent_data(tmp_path: Path) -> None:
    parent = str(tmp_path / "p.vhd")
    child = str(tmp_path / "c.vhd")
    create_dynamic(parent, SIZE, block_size=BS, exact_size=True)
    model = bytearray(SIZE)
    fill(parent, model, [(BS, b"\x55" * BS), (2 * BS, b"\x66" * BS)])
    create_differencing(child, parent)
    # Zeros over parent data must stay (they hide it); zeros over zeros may go.
    fill(child, model, [(BS, bytes(BS)), (4 * BS, bytes(BS)), (6 * BS, b"\x77" * 1024)])
    with open_image(child) as image:  # a block allocated with nothing present: discard-free
        image.write(8 * BS, b"\x01" * 512)
        image.write(8 * BS, bytes(512))
        model[8 * BS : 8 * BS + 512] = bytes(512)
    r = compact(child)
    assert r.disk_type == "differencing"
    assert (r.blocks_before, r.blocks_freed) == (4, 2)
    assert check_image(child).clean
    assert read_all(child) == model


def test_compact_refuses_fixed_and_locked(tmp_path: Path) -> None:
    fixed = str(tmp_path / "f.vhd")
    create_fixed(fixed, 1024 * K)
    with pytest.raises(UnsupportedImage):
        compact(fixed)
    dyn = str(tmp_path / "d.vhd")
    create_dynamic(dyn, SIZE, block_size=BS)
    holder = ImageLock(dyn, exclusive=False)
    try:
        with pytest.raises(ImageLocked, match="in use by pid"):
            compact(dyn)
    finally:
        holder.release()


@pytest.mark.peers
def test_compact_result_matches_qemu(tmp_path: Path) -> None:
    path = str(tmp_path / "d.vhd")
    create_dynamic(path, SIZE, block_size=BS)
    with open_image(path, read_only=True) as image:
        model = bytearray(image.size)
    fill(path, model, WRITES)
    compact(path)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    info = subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", path],
                          capture_output=True, text=True, check=True)
    assert f'"virtual-size": {len(model)}' in info.stdout
    subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", path, str(raw)], check=True,
                   capture_output=True)


# --- crash replay -------------------------------------------------------------------


def crash_states(ops: list[Op]) -> list[list[Op]]:
    """Every prefix, plus each prefix with its un-synced tail dropped and with only the last kept."""
    states: list[list[Op]] = []
    last_sync = 0
    for k in range(len(ops) + 1):
        if k and ops[k - 1].kind == "sync":
            last_sync = k
        states.append(ops[:k])
        if k - last_sync >= 2:
            states.append(ops[:last_sync] + [ops[k - 1]])
            states.append(ops[:last_sync] + ops[last_sync : k : 2])
    return states


def assert_recovers(disks: dict[str, MemoryDisk], path: str, state: bytes, model: bytes) -> None:
    trial = dict(disks)
    trial[path] = MemoryDisk(state)
    factory = MemoryFileFactory(trial)
    with open_image(path, lock=False, file_factory=factory) as image:  # read-write: recovery runs
        assert bytes(image.read(0, image.size)) == model
    report = check_image(path, lock=False, file_factory=factory)
    assert report.clean, report.problems


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_every_crash_point_of_compact_recovers(kind: str) -> None:
    disks: dict[str, MemoryDisk] = {}
    factory = MemoryFileFactory(disks)
    parent, path = "/mem/p.vhd", "/mem/c.vhd"
    model = bytearray(SIZE)
    if kind == "dynamic":
        create_dynamic(path, SIZE, block_size=BS, exact_size=True, file_factory=factory)
    else:
        create_dynamic(parent, SIZE, block_size=BS, exact_size=True, file_factory=factory)
        fill(parent, model, [(BS, b"\x55" * BS)], lock=False, file_factory=factory)
        create_differencing(path, parent, lock=False, file_factory=factory)
    fill(path, model, WRITES, lock=False, file_factory=factory)
    disk = MemoryDisk(bytes(disks[path].data))
    disks[path] = disk
    compact(path, lock=False, file_factory=factory)
    assert any(op.kind == "truncate" for op in disk.ops)
    states = crash_states(disk.ops)
    assert len(states) > 20
    for ops in states:
        assert_recovers(disks, path, disk.replay(ops), bytes(model))


@pytest.mark.peers
def test_sigkilled_compact_leaves_a_valid_image(tmp_path: Path) -> None:
    """A real process killed mid-way (after it printed progress on a pseudo-terminal)."""
    path = str(tmp_path / "d.vhd")
    create_dynamic(path, 64 * BS, block_size=BS, exact_size=True)
    model = bytearray(64 * BS)
    fill(path, model, [(i * BS, (bytes(BS) if i % 2 else bytes([i]) * BS)) for i in range(64)])
    import pty
    import signal
    pid, fd = pty.fork()
    if pid == 0:  # the child: run the command with its stderr on the terminal
        try:
            os.execv(sys.executable, [sys.executable, "-m", "vhdblkd.cli.main", "compact", path])
        finally:
            os._exit(127)
    got = b""
    while b"compact [" not in got:
        try:
            got += os.read(fd, 4096)
        except OSError:
            break
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(fd)
    assert read_all_rw(path) == model
    assert check_image(path).clean


def read_all_rw(path: str) -> bytes:
    with open_image(path) as image:
        return bytes(image.read(0, image.size))

"""Crash replay: every prefix of the recorded file operations, under three crash models.

For each crash state (see crashsim.py) the image must open read-write
(recovery), hold every write a completed flush or FUA write acknowledged
(workload.verify), read the same after close, and check clean.  Identical
states are replayed once; the number of distinct crash points is asserted
per workload so the suite as a whole replays well over a thousand.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.reliability.crashsim import CrashState, crash_states
from tests.reliability.workload import CHILD, Recording, record, verify
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.memfile import MemoryFileFactory

# kind, block size, blocks (more than 128 blocks: the BAT spans two sectors and a flush can tear between them)
WORKLOADS = [
    ("dynamic", 4096, 192, 11),
    ("dynamic", 8192, 160, 12),
    ("dynamic", 16384, 136, 13),
    ("differencing", 4096, 192, 21),
    ("differencing", 8192, 160, 22),
    ("differencing", 16384, 136, 23),
]
MIN_POINTS_PER_WORKLOAD = 250  # 6 workloads: at least 1500 distinct crash points in all


def replay(rec: Recording, state: CrashState) -> tuple[bytes, bytes]:
    """Recover one crash state; return (content read after recovery, file after close)."""
    disks = rec.disks(state.data)
    factory = MemoryFileFactory(disks)
    where = f"{rec.kind} bs={rec.block_size} crash after op {state.k} ({state.model})"
    with open_image(CHILD, lock=False, file_factory=factory) as image:
        got = bytes(image.read(0, rec.size))
    verify(rec, state.k, got)
    report = check_image(CHILD, lock=False, file_factory=factory)
    assert report.clean, f"{where}: {report.problems}"
    with open_image(CHILD, read_only=True, lock=False, file_factory=factory) as image:
        assert bytes(image.read(0, rec.size)) == got, f"{where}: content changed across close and reopen"
    return got, bytes(disks[CHILD].data)


@pytest.mark.parametrize("kind,block_size,blocks,seed", WORKLOADS,
                         ids=[f"{w[0]}-{w[1] // 1024}k" for w in WORKLOADS])
def test_every_crash_point_recovers(kind: str, block_size: int, blocks: int, seed: int,
                                    crash_tally: dict[str, int]) -> None:
    rec = record(kind, block_size, blocks, seed)
    assert sum(op.kind == "sync" for op in rec.log.ops) >= 20
    seen: set[bytes] = set()
    by_model: dict[str, int] = {}
    generated = 0
    for state in crash_states(rec.initial, rec.log.ops, random.Random(seed), subsets=1, pagecache=2,
                               torn=1):
        generated += 1
        digest = hashlib.sha256(state.data).digest() + state.k.to_bytes(4, "big")
        if digest in seen:
            continue
        seen.add(digest)
        replay(rec, state)
        by_model[state.model] = by_model.get(state.model, 0) + 1
    print(f"\ncrash replay {kind} bs={block_size}: {len(rec.log.ops)} ops, {generated} states, "
          f"{len(seen)} distinct replayed {by_model}")
    crash_tally[f"{kind}-{block_size // 1024}k"] = len(seen)
    assert len(seen) >= MIN_POINTS_PER_WORKLOAD
    assert all(by_model.get(model, 0) > 0 for model in ("prefix", "drop-all", "drop-subset", "pagecache", "torn"))


@pytest.mark.peers
@pytest.mark.parametrize("seed", [11, 12])
def test_qemu_reads_recovered_images_as_we_do(tmp_path: Path, seed: int) -> None:
    qemu_img = shutil.which("qemu-img")
    assert qemu_img is not None, "qemu-img is a declared peer tool"
    rec = record("dynamic", 4096, 192, seed)
    states = list(crash_states(rec.initial, rec.log.ops, random.Random(seed), subsets=1, pagecache=1))
    sample = random.Random(seed).sample(states, 12)
    for n, state in enumerate(sample):
        got, recovered = replay(rec, state)
        vhd = tmp_path / f"crash{n}.vhd"
        raw = tmp_path / f"crash{n}.raw"
        vhd.write_bytes(recovered)
        raw.write_bytes(got)
        info = subprocess.run([qemu_img, "info", "-f", "vpc", str(vhd)], capture_output=True, text=True)
        assert info.returncode == 0, info.stderr
        cmp = subprocess.run([qemu_img, "compare", "-f", "vpc", "-F", "raw", str(vhd), str(raw)],
                             capture_output=True, text=True)
        assert cmp.returncode == 0, f"op {state.k} ({state.model}): {cmp.stdout}{cmp.stderr}"
        # The raw crash state (before our recovery) must open in QEMU too.
        crashed = tmp_path / f"crash{n}-unrecovered.vhd"
        crashed.write_bytes(state.data)
        info = subprocess.run([qemu_img, "info", "-f", "vpc", str(crashed)], capture_output=True, text=True)
        assert info.returncode == 0, f"op {state.k} ({state.model}): {info.stderr}"


def test_the_model_check_is_not_vacuous() -> None:
    """verify() rejects a lost acknowledged write and a sector mixing old and new bytes."""
    rec = record("dynamic", 4096, 192, 11)
    k = len(rec.log.ops)
    final = rec.flushes[-1][1]
    verify(rec, k, final)
    off, data = next((o, d) for _, o, d in reversed(rec.writes) if any(d))
    lost = bytearray(final)
    lost[off : off + len(data)] = bytes(len(data)) if any(data) else b"\x01" * len(data)
    with pytest.raises(AssertionError):
        verify(rec, k, bytes(lost))
    # Just before the last flush, a sector written once since may be old or new but not half of each.
    durable_at = rec.flushes[-2][0]
    issued, off, data = next(w for w in rec.writes if w[0] >= durable_at and len(w[2]) >= 512) \
        if any(w[0] >= durable_at and len(w[2]) >= 512 for w in rec.writes) else (None, 0, b"")
    if issued is not None:
        start = (off + 511) // 512 * 512
        if start + 512 <= off + len(data):
            mixed = bytearray(rec.flushes[-2][1])
            mixed[start : start + 256] = data[start - off : start - off + 256]
            if bytes(mixed[start : start + 512]) != rec.flushes[-2][1][start : start + 512]:
                with pytest.raises(AssertionError):
                    verify(rec, rec.flushes[-1][0] - 1, bytes(mixed))

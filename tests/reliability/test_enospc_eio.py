"""ENOSPC and EIO from the host file system, seen through an NBD connection.

The image is a real file under the fault layer, served by serve_connection
over a socketpair.  A failing pwrite or fdatasync must turn into an NBD
error reply for exactly the request that hit it; the connection stays up,
later requests succeed once the fault is gone ("space is back"), and the
image reopens and checks clean with every acknowledged write in place.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from tests.reliability.faultfile import Fault, FaultFactory
from tests.reliability.nbdpeer import Peer
from vhdblkd.nbd import constants as c
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_differencing, create_dynamic
from vhdblkd.vhd.image import open_image

BS = 4096
BLOCKS = 64
SIZE = BS * BLOCKS
SECTOR = 512


def make_image(tmp_path: Path, kind: str) -> str:
    path = str(tmp_path / "disk.vhd")
    if kind == "dynamic":
        create_dynamic(path, SIZE, block_size=BS, exact_size=True)
        return path
    parent = str(tmp_path / "parent.vhd")
    create_dynamic(parent, SIZE, block_size=BS, exact_size=True)
    with open_image(parent) as image:
        image.write(0, bytes(range(256)) * (SIZE // 256))
    create_differencing(path, parent, block_size=BS)
    return path


def content(path: str) -> bytes:
    with open_image(path, read_only=True) as image:
        return bytes(image.read(0, SIZE))


def assert_clean(path: str) -> None:
    report = check_image(path)
    assert report.clean, report.problems


def test_disk_full_then_space_back(tmp_path: Path) -> None:
    path = make_image(tmp_path, "dynamic")
    faults = FaultFactory()
    image = open_image(path, file_factory=faults)
    log = faults.log_for(path)
    model = bytearray(SIZE)
    with Peer(image) as peer:
        assert peer.write(0, b"a" * BS) == 0
        assert peer.flush() == 0
        full_at = os.path.getsize(path)
        # The file system is full: nothing may grow the file, rewriting in place still works.
        log.failing = lambda kind, off, n: errno.ENOSPC if kind == "pwrite" and off + n > full_at else None
        assert peer.write(5 * BS, b"b" * BS) == c.NBD_ENOSPC
        assert peer.write(9 * BS + 100, b"c" * 300, fua=True) == c.NBD_ENOSPC
        assert peer.write(100, b"d" * 1000) == 0
        model[0:BS] = b"a" * BS
        model[100:1100] = b"d" * 1000
        assert peer.read(5 * BS, BS) == (0, bytes(BS))
        assert peer.flush() == 0
        assert log.injected == 2
        log.failing = None  # space is back
        assert peer.write(5 * BS, b"b" * BS) == 0
        assert peer.write(9 * BS + 100, b"c" * 300, fua=True) == 0
        model[5 * BS : 6 * BS] = b"b" * BS
        model[9 * BS + 100 : 9 * BS + 400] = b"c" * 300
        assert peer.flush() == 0
        assert peer.read(0, SIZE) == (0, bytes(model))
    image.close()
    assert_clean(path)
    assert content(path) == model


@pytest.mark.parametrize("code,nbd_error", [(errno.EIO, c.NBD_EIO), (errno.ENOSPC, c.NBD_ENOSPC)])
def test_failed_fdatasync_fails_the_flush_and_a_retry_succeeds(tmp_path: Path, code: int, nbd_error: int) -> None:
    path = make_image(tmp_path, "dynamic")
    faults = FaultFactory()
    image = open_image(path, file_factory=faults)
    log = faults.log_for(path)
    with Peer(image) as peer:
        assert peer.write(3 * BS, b"x" * BS) == 0
        log.faults.append(Fault("fdatasync", log.calls.get("fdatasync", 0) + 1, code))
        assert peer.flush() == nbd_error
        assert peer.read(3 * BS, BS) == (0, b"x" * BS)
        assert peer.flush() == 0
    image.close()
    assert_clean(path)
    assert content(path)[3 * BS : 4 * BS] == b"x" * BS


def script(seed: int) -> list[tuple[str, int, bytes]]:
    """A request sequence with allocations, partial writes, trims, zeroes, FUA writes and flushes."""
    rng = random.Random(seed)
    out: list[tuple[str, int, bytes]] = []
    for _ in range(24):
        r = rng.random()
        off = rng.randrange(SIZE - 2 * BS)
        if r < 0.55:
            out.append(("write" if rng.random() < 0.8 else "fua", off, rng.randbytes(rng.choice([200, 512, BS, BS + 900]))))
        elif r < 0.7:
            out.append(("trim", off - off % BS, bytes(BS)))
        elif r < 0.8:
            out.append(("zeroes", off, bytes(rng.randrange(1, BS))))
        else:
            out.append(("flush", 0, b""))
    return out


def run_script(peer: Peer, steps: list[tuple[str, int, bytes]]) -> list[int]:
    errors = []
    for what, off, data in steps:
        if what == "write":
            errors.append(peer.write(off, data))
        elif what == "fua":
            errors.append(peer.write(off, data, fua=True))
        elif what == "trim":
            errors.append(peer.trim(off, len(data)))
        elif what == "zeroes":
            errors.append(peer.zeroes(off, len(data), c.NBD_CMD_FLAG_NO_HOLE))
        else:
            errors.append(peer.flush())
    return errors


def _check_model(got: bytes, before: bytes, steps: list[tuple[str, int, bytes]], failed: int | None) -> None:
    """Every request but the failed one applied; the failed one's sectors are old or new."""
    model = bytearray(before)
    alt: bytearray | None = None
    for i, (what, off, data) in enumerate(steps):
        if what == "flush":
            continue
        if i == failed:
            alt = bytearray(model)
            alt[off : off + len(data)] = data
            continue
        model[off : off + len(data)] = data
        if alt is not None:
            alt[off : off + len(data)] = data
    for start in range(0, SIZE, SECTOR):
        sector = got[start : start + SECTOR]
        ok = sector == model[start : start + SECTOR] or (alt is not None and sector == alt[start : start + SECTOR])
        assert ok, f"sector {start // SECTOR} is neither the value before nor after request {failed}"


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_every_pwrite_and_fdatasync_may_fail(tmp_path: Path, kind: str) -> None:
    """Inject EIO or ENOSPC at each pwrite and each fdatasync of a request script in turn."""
    steps = script(7 if kind == "dynamic" else 8)
    (tmp_path / "base").mkdir()
    base = make_image(tmp_path / "base", kind)
    before = content(base)
    # A clean run counts the calls each fault position can hit.
    probe = FaultFactory()
    image = open_image(base, file_factory=probe)
    with Peer(image) as peer:
        assert run_script(peer, steps) == [0] * len(steps)
    image.close()
    calls = dict(probe.log_for(base).calls)
    assert calls["pwrite"] > 30 and calls["fdatasync"] > 10
    cases = [(kind_, n) for kind_ in ("pwrite", "fdatasync") for n in range(1, calls[kind_] + 1)]
    unclean: list[str] = []
    for i, (op, n) in enumerate(cases):
        work = tmp_path / f"case{i}"
        work.mkdir()
        path = make_image(work, kind)
        code, nbd_error = (errno.ENOSPC, c.NBD_ENOSPC) if i % 3 == 0 else (errno.EIO, c.NBD_EIO)
        faults = FaultFactory()
        faults.log_for(path).faults.append(Fault(op, n, code))
        image = open_image(path, file_factory=faults)
        with Peer(image) as peer:
            errors = run_script(peer, steps + [("flush", 0, b"")])
            if errors[-1]:
                # The fault hit this flush; the next one must succeed.
                assert peer.flush() == 0, f"{op} #{n}: a flush after the failed one failed too: {errors}"
        closed_with_error = False
        try:
            image.close()
        except OSError:
            # The fault fell in close()'s own flush or tidying: reported to the caller, as it must be.
            closed_with_error = True
        assert not closed_with_error or faults.log_for(path).injected
        where = f"{kind}: {op} #{n} failing with {errno.errorcode[code]}"
        failed = [j for j, e in enumerate(errors) if e]
        if faults.log_for(path).injected:
            # The fault fell in a request, or in the flush at disconnect (nobody left to tell).
            assert len(failed) <= 1, f"{where}: several requests failed: {errors}"
            assert all(errors[j] == nbd_error for j in failed), f"{where}: {errors}"
        else:
            assert not failed, f"{where}: {errors}"
        report = check_image(path)
        if not report.clean:
            unclean.append(f"{where}: {[p.code for p in report.problems]}")
        got = content(path)
        _check_model(got, before, steps, failed[0] if failed else None)
        with open_image(path):
            pass  # a read-write open repairs what an interrupted operation left
        report = check_image(path)
        assert report.clean, f"{where}, after a read-write reopen: {report.problems}"
        assert content(path) == got, f"{where}: the repair changed the content"
    print(f"\n{kind}: {len(cases)} injected faults; not clean before reopen: {unclean}")


def test_failed_bitmap_write_of_an_allocation_leaves_a_clean_file_after_close(tmp_path: Path) -> None:
    path = make_image(tmp_path, "dynamic")
    faults = FaultFactory()
    log = faults.log_for(path)
    image = open_image(path, file_factory=faults)
    # An allocation writes the footer at the new end of file first (pwrite #1), then the bitmap (#2).
    log.faults.append(Fault("pwrite", 2, errno.EIO))
    with pytest.raises(OSError):
        image.write(7 * BS, b"z" * BS)
    assert log.ops[-1].offset > os.path.getsize(path) - BS - 1024  # the footer at the new end did land
    image.close()
    report = check_image(path)
    assert report.clean, report.problems


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_close_failing_with_eio_leaves_a_recoverable_image(tmp_path: Path, kind: str) -> None:
    """The flush at close fails (the disk died): the file still recovers, with every flushed write."""
    path = make_image(tmp_path, kind)
    before = content(path)
    faults = FaultFactory()
    log = faults.log_for(path)
    image = open_image(path, file_factory=faults)
    image.write(2 * BS, b"f" * BS)
    image.flush()
    image.write(6 * BS + 10, b"u" * 100)  # never flushed: may or may not survive
    log.failing = lambda op, off, n: errno.EIO if op in ("pwrite", "fdatasync") else None
    with pytest.raises(OSError):
        image.close()
    with open_image(path):
        pass  # recovery
    assert_clean(path)
    got = content(path)
    assert got[2 * BS : 3 * BS] == b"f" * BS
    assert got[6 * BS + 10 : 6 * BS + 110] in (b"u" * 100, before[6 * BS + 10 : 6 * BS + 110])

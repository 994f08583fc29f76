"""A really full file system (a small tmpfs), no injection: ENOSPC reaches the NBD client.

The image lives on a 1 MiB tmpfs that a filler file fills up.  Writes that
need a new block fail with NBD_ENOSPC, writes into allocated blocks and
flushes still work, the connection stays up, and once the filler is deleted
("space is back") the same writes succeed.  The image then checks clean and
holds exactly what was acknowledged.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.nbdpeer import Peer
from vhdblkd.nbd import constants as c
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_dynamic
from vhdblkd.vhd.image import open_image

BS = 4096
SIZE = 4 * 1024 * 1024  # more virtual space than the file system holds


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(path: Path) -> int:
    """Write until the file system is full; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        chunk = b"\xff" * 4096
        while True:
            try:
                written += f.write(chunk) or 0
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return written


def test_a_full_file_system_gives_enospc_and_recovers(small_fs: Path) -> None:
    image_path = str(small_fs / "disk.vhd")
    create_dynamic(image_path, SIZE, block_size=BS, exact_size=True)
    model = bytearray(SIZE)
    image = open_image(image_path)
    with Peer(image) as peer:
        assert peer.write(0, b"a" * BS) == 0
        assert peer.flush() == 0
        filler = small_fs / "filler"
        assert fill(filler) > 0
        model[0:BS] = b"a" * BS
        refused: list[int] = []
        for block in range(1, 40):
            error = peer.write(block * BS, bytes([block]) * BS)
            if error:
                assert error == c.NBD_ENOSPC, f"block {block}: error {error}"
                refused.append(block)
            else:
                model[block * BS : (block + 1) * BS] = bytes([block]) * BS
        assert refused, "the file system never filled up"
        assert peer.write(100, b"in place") == 0  # an allocated block needs no new space
        model[100:108] = b"in place"
        assert peer.flush() == 0
        os.unlink(filler)  # space is back
        for block in refused:
            assert peer.write(block * BS, bytes([block]) * BS) == 0
            model[block * BS : (block + 1) * BS] = bytes([block]) * BS
        assert peer.flush() == 0
        assert peer.read(0, 40 * BS) == (0, bytes(model[: 40 * BS]))
    image.close()
    with open_image(image_path):
        pass  # recovery, in case an allocation was torn by the full disk
    report = check_image(image_path)
    assert report.clean, report.problems
    with open_image(image_path, read_only=True) as reopened:
        assert bytes(reopened.read(0, SIZE)) == bytes(model)

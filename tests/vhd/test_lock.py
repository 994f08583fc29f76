"""Image locks: one writer, or any number of readers; conflicts name the holder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vhdblkd.errors import CorruptImage, ImageLocked
from vhdblkd.vhd.create import create_dynamic
from vhdblkd.vhd.image import open_image


@pytest.fixture()
def image_path(tmp_path: Path) -> str:
    path = str(tmp_path / "l.vhd")
    create_dynamic(path, 1024 * 1024, block_size=64 * 1024, exact_size=True)
    return path


def test_second_rw_open_names_our_pid(image_path: str) -> None:
    with open_image(image_path):
        with pytest.raises(ImageLocked) as info:
            open_image(image_path)
    message = str(info.value)
    assert f"pid {os.getpid()}" in message
    assert "detach it first: vhdblkctl detach" in message
    assert image_path in message


def test_readers_share_writers_exclude(image_path: str) -> None:
    with open_image(image_path, read_only=True), open_image(image_path, read_only=True):
        with pytest.raises(ImageLocked, match="cannot open read-write"):
            open_image(image_path)
    with open_image(image_path):
        with pytest.raises(ImageLocked, match="cannot open read-only"):
            open_image(image_path, read_only=True)


def test_lock_released_on_close_and_on_failed_open(image_path: str, tmp_path: Path) -> None:
    image = open_image(image_path)
    image.close()
    image.close()  # idempotent
    with open_image(image_path):
        pass
    junk = tmp_path / "junk.vhd"
    junk.write_bytes(b"x" * 4096)
    for _ in range(2):  # a leaked lock would turn the second failure into ImageLocked
        with pytest.raises(CorruptImage):
            open_image(str(junk))


def test_other_process_holder_is_named(image_path: str) -> None:
    code = (
        "import sys, time\n"
        "from vhdblkd.vhd.image import open_image\n"
        f"img = open_image({image_path!r})\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with pytest.raises(ImageLocked) as info:
            open_image(image_path, read_only=True)
        assert f"pid {proc.pid}" in str(info.value)
        assert "-c" in str(info.value)
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(timeout=30)
    with open_image(image_path):
        pass

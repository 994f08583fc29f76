"""Interoperability with libvhdi: vhdiinfo accepts our images and reads their headers right.

libvhdi takes the media size from the footer's original size field and misreads
some differencing bitmaps, so these tests check headers and sizes only, never
differencing data.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

import pytest

from vhdblkd.vhd.create import create_differencing, create_dynamic, create_fixed
from vhdblkd.vhd.image import open_image

pytestmark = pytest.mark.peers

MIB = 1 << 20


def vhdiinfo(path: Path) -> dict[str, str]:
    """vhdiinfo's "Name : value" lines as a dict; the tool must succeed."""
    result = subprocess.run(["vhdiinfo", str(path)], capture_output=True, text=True, timeout=60, cwd=path.parent)
    assert result.returncode == 0, f"vhdiinfo {path}: {result.stdout}{result.stderr}"
    fields: dict[str, str] = {}
    for line in result.stdout.splitlines():
        name, sep, value = line.partition(":")
        if sep and line.startswith("\t"):
            fields[name.strip()] = value.strip()
    return fields


def media_size(fields: dict[str, str]) -> int:
    match = re.search(r"\((\d+) bytes\)", fields["Media size"])
    assert match is not None, fields["Media size"]
    return int(match.group(1))


def our_info(path: Path) -> dict[str, object]:
    with open_image(str(path), read_only=True) as image:
        return image.info().as_dict()


def same_uuid(text: str, value: object) -> bool:
    return uuid.UUID(text.strip()) == uuid.UUID(str(value))


@pytest.mark.parametrize(
    ("size", "exact_size"),
    [(64 * MIB, False), (100 * MIB, True), (3 * MIB + 512, True)],
)
def test_fixed(tmp_path: Path, size: int, exact_size: bool) -> None:
    image = tmp_path / "fixed.vhd"
    create_fixed(str(image), size, exact_size=exact_size)
    fields = vhdiinfo(image)
    info = our_info(image)
    assert fields["Disk type"] == "Fixed"
    assert media_size(fields) == info["virtual_size"]
    assert same_uuid(fields["Identifier"], info["unique_id"])


@pytest.mark.parametrize(
    ("size", "exact_size", "block_size"),
    [(64 * MIB, False, 2 * MIB), (100 * MIB, True, 2 * MIB), (40 * MIB + 512, True, 512 * 1024), (1 << 40, True, 2 * MIB)],
)
def test_dynamic(tmp_path: Path, size: int, exact_size: bool, block_size: int) -> None:
    image = tmp_path / "dynamic.vhd"
    create_dynamic(str(image), size, block_size=block_size, exact_size=exact_size)
    with open_image(str(image)) as opened:
        opened.write(0, b"\x5a" * 4096)
        opened.write(opened.size - 512, b"\xa5" * 512)
    fields = vhdiinfo(image)
    info = our_info(image)
    assert fields["Disk type"] == "Dynamic"
    assert media_size(fields) == info["virtual_size"]
    assert same_uuid(fields["Identifier"], info["unique_id"])


def test_differencing(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    child = tmp_path / "child.vhd"
    create_dynamic(str(base), 48 * MIB, exact_size=True)
    create_differencing(str(child), str(base))
    with open_image(str(child)) as opened:
        opened.write(MIB, b"\x11" * 8192)
    fields = vhdiinfo(child)
    info = our_info(child)
    base_info = our_info(base)
    assert fields["Disk type"] == "Differential"
    assert media_size(fields) == info["virtual_size"] == base_info["virtual_size"]
    assert same_uuid(fields["Identifier"], info["unique_id"])
    assert same_uuid(fields["Parent identifier"], base_info["unique_id"])
    assert fields["Parent filename"].replace("\\", "/").endswith("base.vhd")

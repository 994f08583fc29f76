"""Differencing images: locating and vetting the parent, and keeping it untouched."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from vhdblkd.errors import ImageLocked, ParentError
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_differencing, create_dynamic, create_fixed
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.structs import DynamicHeader, ParentLocator

BS = 4096
SIZE = 32 * BS


def make_parent(path: Path, fixed: bool = False) -> bytes:
    if fixed:
        create_fixed(str(path), SIZE, exact_size=True)
    else:
        create_dynamic(str(path), SIZE, block_size=BS, exact_size=True)
    content = bytearray(SIZE)
    with open_image(str(path)) as parent:
        for i, off in enumerate((0, 3 * BS + 17, 10 * BS - 100, SIZE - 700)):
            data = bytes([0x41 + i]) * 600
            parent.write(off, data)
            content[off : off + 600] = data
    return bytes(content)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def locators(path: Path) -> DynamicHeader:
    return DynamicHeader.unpack(path.read_bytes(), 512)


def rewrite_header(path: Path, header: DynamicHeader) -> None:
    with open(path, "r+b") as f:
        f.seek(512)
        f.write(header.pack())


@pytest.mark.parametrize("fixed_parent", [False, True])
def test_child_reads_parent_and_never_writes_it(tmp_path: Path, fixed_parent: bool) -> None:
    parent = tmp_path / "base.vhd"
    content = bytearray(make_parent(parent, fixed=fixed_parent))
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(parent))
    before = digest(parent)
    with open_image(str(child)) as image:
        assert image.disk_type == "differencing" and image.size == SIZE
        assert bytes(image.read(0, SIZE)) == bytes(content)
        image.write(3 * BS + 20, b"xy")  # partial sector inside parent data: merged
        content[3 * BS + 20 : 3 * BS + 22] = b"xy"
        image.discard(0, 300)  # must read zeros, not the parent
        content[0:300] = bytes(300)
        image.write_zeroes(9 * BS, 2 * BS)  # whole block over parent data
        content[9 * BS : 11 * BS] = bytes(2 * BS)
        assert bytes(image.read(0, SIZE)) == bytes(content)
        info = image.info()
        assert info.disk_type == "differencing"
        assert info.parent is not None and info.parent.path == str(parent)
        assert info.parent_chain == (str(parent),)
    assert digest(parent) == before
    with open_image(str(child), read_only=True) as image:
        assert bytes(image.read(0, SIZE)) == bytes(content)
    assert check_image(str(child)).clean


def test_locators_written_as_windows_does(tmp_path: Path) -> None:
    parent = tmp_path / "base.vhd"
    make_parent(parent)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(parent))
    raw = child.read_bytes()
    header = locators(child)
    assert header.parent_name == "base.vhd"
    codes = [loc.platform_code for loc in header.parent_locators if loc.used]
    assert codes == [c.PLATFORM_W2RU, c.PLATFORM_W2KU]
    rel, absolute = (loc for loc in header.parent_locators if loc.used)
    text = raw[rel.platform_data_offset : rel.platform_data_offset + rel.platform_data_length]
    assert text.decode("utf-16-le") == ".\\base.vhd"
    text = raw[absolute.platform_data_offset : absolute.platform_data_offset + absolute.platform_data_length]
    assert text.decode("utf-16-le") == str(parent)
    footer_parent = open_image(str(parent), read_only=True)
    try:
        assert header.parent_unique_id == footer_parent.footer.unique_id
        assert header.parent_timestamp == int(os.stat(parent).st_mtime) - c.VHD_EPOCH_OFFSET
    finally:
        footer_parent.close()


def _drop_locators(child: Path, keep: set[bytes], name: str | None = None) -> None:
    header = locators(child)
    locs = tuple(loc if loc.platform_code in keep else ParentLocator() for loc in header.parent_locators)
    changes: dict[str, object] = {"parent_locators": locs}
    if name is not None:
        changes["parent_unicode_name"] = name.encode("utf-16-be").ljust(512, b"\0")
    rewrite_header(child, header.replace(**changes))


@pytest.mark.parametrize("keep,name", [
    ({c.PLATFORM_W2RU}, ""),
    ({c.PLATFORM_W2KU}, ""),
    (set(), "base.vhd"),
    (set(), "C:\\Images\\base.vhd"),  # a Windows path: found by its file name next to the child
])
def test_parent_found_by_each_locator(tmp_path: Path, keep: set[bytes], name: str) -> None:
    parent = tmp_path / "base.vhd"
    content = make_parent(parent)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(parent))
    _drop_locators(child, keep, name)
    with open_image(str(child), read_only=True) as image:
        assert os.path.samefile(image.parent.path, parent)  # type: ignore[union-attr]
        assert bytes(image.read(0, SIZE)) == content


def test_parent_missing(tmp_path: Path) -> None:
    parent = tmp_path / "base.vhd"
    make_parent(parent)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(parent))
    parent.rename(tmp_path / "elsewhere.vhd")
    with pytest.raises(ParentError, match="parent image not found"):
        open_image(str(child), read_only=True)
    assert [p.code for p in check_image(str(child)).problems] == ["parent-missing"]


def test_parent_outside_child_directory_needs_permission(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    parent = tmp_path / "base.vhd"
    content = make_parent(parent)
    child = tmp_path / "sub" / "child.vhd"
    create_differencing(str(child), str(parent))
    with pytest.raises(ParentError, match="outside the child's directory.*allow_unsafe_parent=True"):
        open_image(str(child), read_only=True)
    with open_image(str(child), read_only=True, allow_unsafe_parent=True) as image:
        assert bytes(image.read(0, SIZE)) == content


def test_symlink_leaving_child_directory_is_unsafe(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    real = tmp_path / "b" / "base.vhd"
    make_parent(real)
    link = tmp_path / "a" / "base.vhd"
    link.symlink_to(real)
    child = tmp_path / "a" / "child.vhd"
    create_differencing(str(child), str(link))
    with pytest.raises(ParentError, match="allow_unsafe_parent"):
        open_image(str(child), read_only=True)


def test_parent_unique_id_mismatch(tmp_path: Path) -> None:
    parent = tmp_path / "base.vhd"
    make_parent(parent)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(parent))
    rewrite_header(child, locators(child).replace(parent_unique_id=b"\x99" * 16))
    with pytest.raises(ParentError, match="different image"):
        open_image(str(child), read_only=True)
    # Even the unsafe escape hatch does not accept the wrong parent.
    with pytest.raises(ParentError, match="different image"):
        open_image(str(child), read_only=True, allow_unsafe_parent=True)
    assert [p.code for p in check_image(str(child)).problems] == ["parent-mismatch"]


def test_parent_timestamp_mismatch_is_reported_not_refused(tmp_path: Path) -> None:
    parent = tmp_path / "base.vhd"
    content = make_parent(parent)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(parent))
    st = os.stat(parent)
    os.utime(parent, (st.st_atime, st.st_mtime + 3600))
    with open_image(str(child), read_only=True) as image:
        assert bytes(image.read(0, SIZE)) == content
        assert image.parent_link is not None and not image.parent_link.timestamp_matches
    with pytest.raises(ParentError, match="strict_parent_timestamp"):
        open_image(str(child), read_only=True, strict_parent_timestamp=True)


def test_parent_is_locked_shared(tmp_path: Path) -> None:
    parent = tmp_path / "base.vhd"
    make_parent(parent)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(parent))
    with open_image(str(child)):
        with pytest.raises(ImageLocked):
            open_image(str(parent))
        with open_image(str(parent), read_only=True):
            pass
    with open_image(str(parent)):
        pass


def test_three_level_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    content = bytearray(make_parent(base))
    mid = tmp_path / "mid.vhd"
    create_differencing(str(mid), str(base))
    with open_image(str(mid)) as image:
        image.write(5 * BS, b"mid" * 100)
        content[5 * BS : 5 * BS + 300] = b"mid" * 100
    top = tmp_path / "top.vhd"
    create_differencing(str(top), str(mid))
    with open_image(str(top)) as image:
        image.write(5 * BS + 10, b"TOP")
        content[5 * BS + 10 : 5 * BS + 13] = b"TOP"
        assert bytes(image.read(0, SIZE)) == bytes(content)
        assert image.info().parent_chain == (str(mid), str(base))


def test_parent_name_field_is_utf16_big_endian(tmp_path: Path) -> None:
    parent = tmp_path / "bäse.vhd"
    make_parent(parent)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(parent))
    raw = child.read_bytes()
    assert raw[512 + 64 : 512 + 64 + 16] == "bäse.vhd".encode("utf-16-be")
    assert struct.unpack_from(">I", raw, 512 + 40 + 16)[0] == locators(child).parent_timestamp

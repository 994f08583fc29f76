"""A parent is identified by its unique id; its timestamp is reported, refused only when strict."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests.vhd.test_diff import SIZE, locators, make_parent, rewrite_header
from vhdblkd.errors import ParentError, ParentTimestampMismatch
from vhdblkd.vhd.check import chain_links, check_image
from vhdblkd.vhd.create import create_differencing
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.merge import merge


def windows10_child(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A parent with data and a child whose parent timestamp is 0, as Windows 10 writes."""
    parent = tmp_path / "base.vhd"
    content = make_parent(parent)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(parent))
    rewrite_header(child, locators(child).replace(parent_timestamp=0))
    return parent, child, content


def test_timestamp_zero_opens_and_is_reported(tmp_path: Path) -> None:
    parent, child, content = windows10_child(tmp_path)
    for read_only in (True, False):
        with open_image(str(child), read_only=read_only) as image:
            assert bytes(image.read(0, SIZE)) == content
            link = image.parent_link
            assert link is not None and link.id_matches and not link.timestamp_matches
            assert link.expected_timestamp == 0 and "no parent timestamp (0" in link.timestamp_note()
    report = check_image(str(child))
    assert report.clean and report.problems == []
    assert [n.code for n in report.notes] == ["parent-timestamp"]
    assert "Windows 10" in report.notes[0].message and "set-parent" in report.notes[0].message


def test_strict_option_refuses_a_timestamp_mismatch_naming_itself(tmp_path: Path) -> None:
    _, child, _ = windows10_child(tmp_path)
    with pytest.raises(ParentTimestampMismatch, match="strict_parent_timestamp") as info:
        open_image(str(child), read_only=True, strict_parent_timestamp=True)
    assert "--strict-parent-timestamp" in str(info.value) and "allow" not in str(info.value)
    report = check_image(str(child), strict_parent_timestamp=True)
    assert not report.clean and [p.code for p in report.problems] == ["parent-timestamp"]
    assert "strict_parent_timestamp" in report.problems[0].message


def test_copied_chain_with_new_mtimes_opens(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    base = src / "base.vhd"
    content = bytearray(make_parent(base))
    mid = src / "mid.vhd"
    create_differencing(str(mid), str(base))
    with open_image(str(mid)) as image:
        image.write(4096, b"mid!" * 256)
        content[4096 : 4096 + 1024] = b"mid!" * 256
    top = src / "top.vhd"
    create_differencing(str(top), str(mid))
    # A copy without -p: every file gets a new mtime; the relative locators still lead home.
    dst = tmp_path / "copy"
    dst.mkdir()
    for name in ("base.vhd", "mid.vhd", "top.vhd"):
        shutil.copyfile(src / name, dst / name)
        os.utime(dst / name, (1_800_000_000, 1_800_000_000))
    with open_image(str(dst / "top.vhd"), read_only=True) as image:
        assert bytes(image.read(0, SIZE)) == bytes(content)
        links = chain_links(image)
        assert [ln.path for ln in links] == [str(dst / "mid.vhd"), str(dst / "base.vhd")]
        assert all(ln.id_matches and not ln.timestamp_matches for ln in links)
    report = check_image(str(dst / "top.vhd"))
    assert report.clean and [n.code for n in report.notes] == ["parent-timestamp"] * 2
    with pytest.raises(ParentError, match="strict_parent_timestamp"):
        open_image(str(dst / "top.vhd"), read_only=True, strict_parent_timestamp=True)
    with pytest.raises(ParentError, match="strict_parent_timestamp"):
        open_image(str(dst / "mid.vhd"), read_only=True, strict_parent_timestamp=True)


def test_a_different_parent_is_refused_naming_both_ids_and_set_parent(tmp_path: Path) -> None:
    parent, child, _ = windows10_child(tmp_path)
    wrong = uuid.UUID(bytes=b"\x99" * 16)
    rewrite_header(child, locators(child).replace(parent_unique_id=wrong.bytes))
    with open_image(str(parent), read_only=True) as p:
        actual = uuid.UUID(bytes=p.footer.unique_id)
    for kwargs in ({}, {"allow_unsafe_parent": True}, {"strict_parent_timestamp": True}):
        with pytest.raises(ParentError) as info:
            open_image(str(child), read_only=True, **kwargs)  # type: ignore[arg-type]  # keyword flags
        text = str(info.value)
        assert str(wrong) in text and str(actual) in text and "set-parent" in text
        assert not isinstance(info.value, ParentTimestampMismatch)
    report = check_image(str(child))
    assert [p.code for p in report.problems] == ["parent-mismatch"] and report.notes == []
    assert str(wrong) in report.problems[0].message and "set-parent" in report.problems[0].message
    with pytest.raises(ParentError, match="set-parent"):
        merge(str(child))


def test_matching_timestamp_gives_no_note(tmp_path: Path) -> None:
    parent = tmp_path / "base.vhd"
    make_parent(parent)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(parent))
    with open_image(str(child), read_only=True, strict_parent_timestamp=True) as image:
        assert image.parent_link is not None and image.parent_link.timestamp_matches
    report = check_image(str(child), strict_parent_timestamp=True)
    assert report.clean and report.notes == []

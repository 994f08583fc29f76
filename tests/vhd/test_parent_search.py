"""The parent search tries every candidate: a wrong image at one locator does not hide the parent at the next."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests.reliability.test_parent_paths import rewrite_locators
from tests.vhd.test_diff import BS, SIZE, digest, make_parent
from vhdblkd.cli.main import main
from vhdblkd.errors import ParentError, ParentSearchFailed, ParentTimestampMismatch
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.compact import compact
from vhdblkd.vhd.create import create_differencing
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.merge import merge


def unique_id(path: Path) -> uuid.UUID:
    with open_image(str(path), read_only=True) as image:
        return uuid.UUID(bytes=image.footer.unique_id)


def chain_with_stale_copy(tmp_path: Path) -> tuple[Path, Path, Path, bytes]:
    """(child, its parent, a stale image at the child's first locator, the parent's data), in tmp_path/images."""
    tmp_path = tmp_path / "images"
    tmp_path.mkdir()
    parent = tmp_path / "base.vhd"
    content = make_parent(parent)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(parent))
    # An older image of the same name, written separately: another unique id and other data.
    stale = tmp_path / "stale.vhd"
    make_parent(stale)
    with open_image(str(stale)) as image:
        image.write(0, b"stale!" * 100)
    rewrite_locators(child, {c.PLATFORM_W2RU: ".\\stale.vhd", c.PLATFORM_W2KU: str(parent)}, name="gone.vhd")
    return child, parent, stale, content


@pytest.mark.parametrize("read_only", [True, False])
def test_a_stale_image_at_the_first_locator_is_passed_over(tmp_path: Path, read_only: bool) -> None:
    child, parent, stale, content = chain_with_stale_copy(tmp_path)
    before = digest(stale)
    with open_image(str(child), read_only=read_only) as image:
        assert bytes(image.read(0, SIZE)) == content
        assert image.parent is not None and image.parent.path == str(parent)
        assert image.parent_link is not None and image.parent_link.found_by == "W2ku locator"
    assert digest(stale) == before  # the wrong image was only read, never opened read-write
    assert check_image(str(child)).clean


def test_merge_goes_into_the_parent_not_the_stale_image(tmp_path: Path) -> None:
    child, parent, stale, _ = chain_with_stale_copy(tmp_path)
    with open_image(str(child)) as image:
        image.write(8192, b"child" * 10)
    before = digest(stale)
    result = merge(str(child))
    assert result.parent == str(parent)
    assert digest(stale) == before
    with open_image(str(parent), read_only=True) as image:
        assert bytes(image.read(8192, 50)) == b"child" * 10


def test_no_candidate_matches_lists_each_and_why(tmp_path: Path) -> None:
    child, parent, stale, _ = chain_with_stale_copy(tmp_path)
    junk = child.parent / "junk.vhd"
    junk.write_bytes(b"not a vhd" * 100)
    (tmp_path / "out").mkdir()
    outside = tmp_path / "out" / "base.vhd"
    shutil.copyfile(parent, outside)
    parent.unlink()
    expected = unique_id(outside)
    rewrite_locators(child, {c.PLATFORM_W2RU: ".\\stale.vhd", c.PLATFORM_W2KU: str(outside)}, name="junk.vhd")
    with pytest.raises(ParentSearchFailed) as info:
        open_image(str(child), read_only=True)
    text = str(info.value)
    assert [(what, os.path.basename(path), reason) for what, path, reason, _ in info.value.refused] == [
        ("W2ru locator", "stale.vhd", "wrong-id"),
        ("W2ku locator", "base.vhd", "unsafe"),
        ("parent name", "junk.vhd", "unreadable"),
    ]
    assert str(unique_id(stale)) in text and str(expected) in text and "different image" in text
    assert "outside the child's directory" in text and "--allow-unsafe-parent" in text
    assert "no valid VHD footer" in text
    assert f"vhdblkctl set-parent {child} PARENT" in text
    assert [p.code for p in check_image(str(child)).problems] == ["parent-mismatch"]
    # The unsafe switch lets the search reach the copy outside, whose id is the right one.
    with open_image(str(child), read_only=True, allow_unsafe_parent=True) as image:
        assert image.parent is not None and image.parent.path == str(outside)


def test_every_candidate_missing_says_put_it_back(tmp_path: Path) -> None:
    child, parent, stale, _ = chain_with_stale_copy(tmp_path)
    parent.unlink()
    stale.unlink()
    with pytest.raises(ParentSearchFailed, match="parent image not found") as info:
        open_image(str(child), read_only=True)
    assert {reason for _, _, reason, _ in info.value.refused} == {"not-found"}
    assert "put the parent back" in str(info.value) and "set-parent" in str(info.value)
    assert [p.code for p in check_image(str(child)).problems] == ["parent-missing"]


def test_strict_timestamp_passes_over_a_touched_copy(tmp_path: Path) -> None:
    parent = tmp_path / "base.vhd"
    content = make_parent(parent)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(parent))
    touched = tmp_path / "touched.vhd"
    shutil.copyfile(parent, touched)  # the same id, a new mtime
    os.utime(touched, (1_800_000_000, 1_800_000_000))
    rewrite_locators(child, {c.PLATFORM_W2RU: ".\\touched.vhd", c.PLATFORM_W2KU: str(parent)})
    with open_image(str(child), read_only=True, strict_parent_timestamp=True) as image:
        assert image.parent is not None and image.parent.path == str(parent)
        assert bytes(image.read(0, SIZE)) == content
    with open_image(str(child), read_only=True) as image:  # not strict: the first with the right id
        assert image.parent is not None and image.parent.path == str(touched)
    parent.unlink()
    with pytest.raises(ParentTimestampMismatch, match="strict_parent_timestamp") as info:
        open_image(str(child), read_only=True, strict_parent_timestamp=True)
    assert [reason for _, _, reason, _ in info.value.refused] == ["timestamp", "not-found"]
    assert isinstance(info.value, ParentError)


def touched_chain(tmp_path: Path) -> tuple[Path, Path]:
    """(child, parent) where the parent's mtime no longer matches the child's record; the id does."""
    parent = tmp_path / "base.vhd"
    make_parent(parent)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(parent))
    with open_image(str(child)) as image:
        image.write(0, bytes(BS))  # a zero block over the parent's data: compact must keep it
        image.write(5 * BS, b"kid" * 100)
    os.utime(parent, (1_800_000_000, 1_800_000_000))
    return child, parent


def test_merge_and_compact_take_the_strict_timestamp_switch(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    child, parent = touched_chain(tmp_path)
    before = (digest(child), digest(parent))
    with pytest.raises(ParentTimestampMismatch, match="strict_parent_timestamp"):
        merge(str(child), strict_parent_timestamp=True)
    with pytest.raises(ParentTimestampMismatch, match="strict_parent_timestamp"):
        compact(str(child), strict_parent_timestamp=True)
    assert (digest(child), digest(parent)) == before  # refused before anything was written
    for command in ("merge", "compact"):
        assert main([command, "--strict-parent-timestamp", str(child)]) != 0
        err = capsys.readouterr().err
        assert "strict_parent_timestamp" in err and "Traceback" not in err
    assert (digest(child), digest(parent)) == before
    # Without the switch the unique id decides, as for every other command.
    compact(str(child))
    assert merge(str(child)).parent == str(parent)
    with open_image(str(parent), read_only=True) as image:
        assert bytes(image.read(5 * BS, 300)) == b"kid" * 100
        assert bytes(image.read(0, BS)) == bytes(BS)

"""set_parent: repoint a child at its moved or copied parent, crash-safely; refuse a wrong one."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.reliability.crashsim import crash_states as sim_states
from tests.vhd.test_compact import crash_states, fill, read_all
from tests.vhd.test_diff import locators
from tests.vhd.test_interop_vhdi import vhdiinfo
from vhdblkd.errors import ImageLocked, ParentError, UnsupportedImage
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_differencing, create_dynamic
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.lock import ImageLock
from vhdblkd.vhd.memfile import MemoryDisk, MemoryFileFactory
from vhdblkd.vhd.set_parent import set_parent
from vhdblkd.vhd.structs import Footer

K = 1024
BS = 64 * K
SIZE = 16 * BS
PARENT_WRITES = [(0, b"\x01" * BS), (3 * BS, b"\x03" * 5000), (9 * BS + 512, b"\x09" * 4096)]
CHILD_WRITES = [(512, b"child" * 200), (BS, b"\x22" * BS), (3 * BS + 100, b"\x33" * 3000),
                (6 * BS, b"\x66" * BS), (15 * BS, b"\xee" * 512)]


def make_chain(folder: Path, parent_name: str = "base.vhd") -> tuple[Path, Path, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    parent, child = folder / parent_name, folder / "child.vhd"
    create_dynamic(str(parent), SIZE, block_size=BS, exact_size=True)
    model = bytearray(SIZE)
    fill(str(parent), model, PARENT_WRITES)
    create_differencing(str(child), str(parent))
    fill(str(child), model, CHILD_WRITES)
    return parent, child, bytes(model)


def locator_texts(child: Path) -> dict[bytes, str]:
    raw = child.read_bytes()
    return {loc.platform_code: raw[loc.platform_data_offset : loc.platform_data_offset + loc.platform_data_length]
            .decode("utf-16-le") for loc in locators(child).parent_locators if loc.used}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_moved_parent_is_found_again(tmp_path: Path) -> None:
    parent, child, model = make_chain(tmp_path / "a")
    (tmp_path / "b").mkdir()
    moved = tmp_path / "b" / "base-v1.vhd"
    parent.rename(moved)
    with pytest.raises(ParentError, match="not found"):
        open_image(str(child), read_only=True)
    r = set_parent(str(child), str(moved))
    assert r.previous_parent is None and r.parent == str(moved) and not r.unique_id_updated
    assert r.outside_child_directory and r.relative_locator == "..\\b\\base-v1.vhd"
    assert locator_texts(child) == {c.PLATFORM_W2RU: "..\\b\\base-v1.vhd", c.PLATFORM_W2KU: str(moved)}
    assert locators(child).parent_name == "base-v1.vhd"
    # The new place is outside the child's folder: that still needs the path switch, and only it.
    with pytest.raises(ParentError, match="allow_unsafe_parent"):
        open_image(str(child), read_only=True)
    with open_image(str(child), read_only=True, allow_unsafe_parent=True) as image:
        assert bytes(image.read(0, SIZE)) == model
        assert image.parent_link is not None and image.parent_link.timestamp_matches
    report = check_image(str(child), allow_unsafe_parent=True)
    assert report.clean and report.notes == []


def test_moving_the_whole_chain_and_renaming_the_parent(tmp_path: Path) -> None:
    parent, child, model = make_chain(tmp_path / "old")
    new = tmp_path / "new"
    new.mkdir()
    shutil.copyfile(child, new / "child.vhd")
    shutil.copyfile(parent, new / "golden.vhd")  # a copy: new mtime, same id
    shutil.rmtree(tmp_path / "old")
    r = set_parent(str(new / "child.vhd"), str(new / "golden.vhd"))
    assert r.relative_locator == ".\\golden.vhd" and not r.outside_child_directory
    assert r.previous_parent is None
    with open_image(str(new / "child.vhd"), read_only=True) as image:
        assert bytes(image.read(0, SIZE)) == model
        assert image.parent_link is not None and image.parent_link.timestamp_matches
        assert image.parent_link.found_by == "W2ru locator"
    report = check_image(str(new / "child.vhd"))
    assert report.clean and report.notes == []


def test_a_wrong_parent_is_refused_unless_the_mismatch_is_ignored(tmp_path: Path) -> None:
    parent, child, model = make_chain(tmp_path)
    other = tmp_path / "other.vhd"
    create_dynamic(str(other), SIZE, block_size=BS, exact_size=True)
    with open_image(str(other), read_only=True) as image:
        other_id = uuid.UUID(bytes=image.footer.unique_id)
    expected = uuid.UUID(bytes=locators(child).parent_unique_id)
    before = digest(child)
    with pytest.raises(ParentError) as info:
        set_parent(str(child), str(other))
    assert str(other_id) in str(info.value) and str(expected) in str(info.value)
    assert "--ignore-id-mismatch" in str(info.value)
    assert digest(child) == before
    # Same data under a new id (e.g. a parent converted by another tool): accepted when told so.
    raw = bytearray(parent.read_bytes())
    footer = Footer.unpack(raw, len(raw) - 512).replace(unique_id=other_id.bytes)
    raw[:512] = footer.pack()
    raw[-512:] = footer.pack()
    other.write_bytes(bytes(raw))
    with pytest.raises(ParentError, match="ignore-id-mismatch"):
        set_parent(str(child), str(other))
    r = set_parent(str(child), str(other), ignore_id_mismatch=True)
    assert r.unique_id_updated and r.parent_unique_id == str(other_id) and r.previous_parent_unique_id == str(expected)
    assert uuid.UUID(bytes=locators(child).parent_unique_id) == other_id
    with open_image(str(child), read_only=True) as image:
        assert bytes(image.read(0, SIZE)) == model
        assert image.parent is not None and image.parent.path == str(other)
    assert check_image(str(child)).clean


def test_refusals(tmp_path: Path) -> None:
    parent, child, _ = make_chain(tmp_path)
    with pytest.raises(UnsupportedImage, match="differencing"):
        set_parent(str(parent), str(child))
    with pytest.raises(ParentError, match="does not exist"):
        set_parent(str(child), str(tmp_path / "nope.vhd"))
    with pytest.raises(ParentError, match="loop"):
        set_parent(str(child), str(child))
    grandchild = tmp_path / "gc.vhd"
    create_differencing(str(grandchild), str(child))
    before = digest(child)
    with pytest.raises(ParentError, match="loop"):
        set_parent(str(child), str(grandchild), ignore_id_mismatch=True)
    # Attached (read-only or read-write) or open elsewhere: the lock refuses, naming the holder.
    for exclusive in (False, True):
        holder = ImageLock(str(child), exclusive=exclusive)
        try:
            with pytest.raises(ImageLocked, match="in use by"):
                set_parent(str(child), str(parent))
        finally:
            holder.release()
    # A parent open read-write elsewhere is changing: it cannot be recorded as the parent.
    holder = ImageLock(str(parent), exclusive=True)
    try:
        with pytest.raises(ImageLocked):
            set_parent(str(child), str(parent))
    finally:
        holder.release()
    assert digest(child) == before


def test_repeated_set_parent_reuses_the_locator_space(tmp_path: Path) -> None:
    parent, child, model = make_chain(tmp_path)
    copy = tmp_path / "copy-of-the-base-image-with-a-longer-name.vhd"
    shutil.copyfile(parent, copy)
    sizes = []
    moved = []
    for target in (copy, parent, copy, parent, copy):
        r = set_parent(str(child), str(target))
        moved.append(r.blocks_moved)
        sizes.append(child.stat().st_size)
        report = check_image(str(child))
        assert report.clean and report.notes == [], report.problems
        with open_image(str(child), read_only=True) as image:
            assert image.parent is not None and image.parent.path == str(target)
            assert bytes(image.read(0, SIZE)) == model
    # At most the one block in the locators' way moves, and the file does not grow each time:
    # the two places the locators alternate between are reused.
    assert moved[0] == 1 and max(moved) == 1
    assert sizes[0] == sizes[2] == sizes[4] and sizes[1] == sizes[3]


def test_every_crash_point_opens_through_the_old_or_the_new_parent() -> None:
    disks: dict[str, MemoryDisk] = {}
    factory = MemoryFileFactory(disks)
    old, new, child = "/mem/base.vhd", "/mem/moved/base.vhd", "/mem/child.vhd"
    create_dynamic(old, SIZE, block_size=BS, exact_size=True, file_factory=factory)
    model = bytearray(SIZE)
    fill(old, model, PARENT_WRITES, lock=False, file_factory=factory)
    create_differencing(child, old, lock=False, file_factory=factory)
    fill(child, model, CHILD_WRITES, lock=False, file_factory=factory)
    disks[new] = MemoryDisk(bytes(disks[old].data))
    cdisk = MemoryDisk(bytes(disks[child].data))
    disks[child] = cdisk
    r = set_parent(child, new, lock=False, file_factory=factory)
    assert r.blocks_moved >= 1  # the first block was in the new locators' way
    states = [cdisk.replay(ops) for ops in crash_states(cdisk.ops)]
    states += [s.data for s in sim_states(cdisk.initial, cdisk.ops, random.Random(7), subsets=2, pagecache=2)]
    assert len(states) > 20
    seen = set()
    for i, state in enumerate(states):
        trial = {old: disks[old], new: disks[new], child: MemoryDisk(state)}
        tf = MemoryFileFactory(trial)
        with open_image(child, read_only=True, lock=False, file_factory=tf) as image:
            assert image.parent is not None and image.parent.path in (old, new), i
            seen.add(image.parent.path)
            assert bytes(image.read(0, SIZE)) == model, i
        with open_image(child, lock=False, file_factory=tf) as image:  # recovery
            assert bytes(image.read(0, SIZE)) == model, i
        assert check_image(child, lock=False, file_factory=tf).clean, i
        if i % 5 == 0:  # running it again finishes the job
            set_parent(child, new, lock=False, file_factory=tf)
            with open_image(child, read_only=True, lock=False, file_factory=tf) as image:
                assert image.parent is not None and image.parent.path == new
                assert bytes(image.read(0, SIZE)) == model
    assert seen == {old, new}


@pytest.mark.peers
def test_peers_open_the_repointed_child(tmp_path: Path) -> None:
    parent, child, model = make_chain(tmp_path / "a")
    moved = tmp_path / "a" / "renamed-base.vhd"
    parent.rename(moved)
    set_parent(str(child), str(moved))
    info = subprocess.run(["qemu-img", "info", "-f", "vpc", str(child)], capture_output=True, text=True,
                          check=True)
    assert f"({SIZE} bytes)" in info.stdout
    fields = vhdiinfo(child)
    assert fields["Disk type"] == "Differential"
    assert fields["Parent filename"] == "renamed-base.vhd"
    with open_image(str(moved), read_only=True) as image:
        assert uuid.UUID(fields["Parent identifier"]) == uuid.UUID(bytes=image.footer.unique_id)
    assert read_all(str(child)) == model

"""set_parent: repoint a child at its moved or copied parent, crash-safely; refuse a wrong one."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.reliability.crashsim import SECTOR, pagecache_state
from tests.reliability.crashsim import crash_states as sim_states
from tests.vhd.test_compact import crash_states, fill, read_all
from tests.vhd.test_diff import locators
from tests.vhd.test_interop_vhdi import vhdiinfo
from vhdblkd.errors import CorruptImage, ImageLocked, ParentError, UnsupportedImage
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_differencing, create_dynamic
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.lock import ImageLock
from vhdblkd.vhd.memfile import MemoryDisk, MemoryFileFactory, Op, apply
from vhdblkd.vhd.set_parent import set_parent
from vhdblkd.vhd.structs import DynamicHeader, Footer

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
    # the places the locators (and the header's shadow) take turns in are reused.
    assert moved[0] == 1 and max(moved) == 1
    assert max(sizes) == sizes[0] and len(set(sizes)) <= 2, sizes


OLD, NEW, CHILD = "/mem/base.vhd", "/mem/moved/base.vhd", "/mem/child.vhd"


def repointed_in_memory() -> tuple[dict[str, MemoryDisk], MemoryDisk, bytes]:
    """(disks, the child's disk with the log of its set_parent from OLD to NEW, the chain's data)."""
    disks: dict[str, MemoryDisk] = {}
    factory = MemoryFileFactory(disks)
    create_dynamic(OLD, SIZE, block_size=BS, exact_size=True, file_factory=factory)
    model = bytearray(SIZE)
    fill(OLD, model, PARENT_WRITES, lock=False, file_factory=factory)
    create_differencing(CHILD, OLD, lock=False, file_factory=factory)
    fill(CHILD, model, CHILD_WRITES, lock=False, file_factory=factory)
    disks[NEW] = MemoryDisk(bytes(disks[OLD].data))
    cdisk = MemoryDisk(bytes(disks[CHILD].data))
    disks[CHILD] = cdisk
    r = set_parent(CHILD, NEW, lock=False, file_factory=factory)
    assert r.blocks_moved >= 1  # the first block was in the new locators' way
    return disks, cdisk, bytes(model)


def torn_states(initial: bytes, ops: list[Op], rng: random.Random, per_point: int) -> list[bytes]:
    """After every write, states where each sector written since the last sync is old or new on its own.

    crashsim's torn model needs two writes in an epoch; a single write (the header's) tears too.
    """
    states: list[bytes] = []
    durable = bytearray(initial)
    epoch: list[Op] = []
    for op in ops:
        if op.kind == "sync":
            for e in epoch:
                apply(durable, e)
            epoch = []
            continue
        epoch.append(op)
        states += [pagecache_state(bytes(durable), epoch, rng, SECTOR) for _ in range(per_point)]
    return states


def header_is_whole(state: bytes) -> bool:
    try:
        DynamicHeader.unpack(state, 512)
    except CorruptImage:
        return False
    return True


def test_every_crash_point_opens_through_the_old_or_the_new_parent() -> None:
    disks, cdisk, model = repointed_in_memory()
    old, new, child = OLD, NEW, CHILD
    states = [cdisk.replay(ops) for ops in crash_states(cdisk.ops)]
    states += [s.data for s in sim_states(cdisk.initial, cdisk.ops, random.Random(7), subsets=2, pagecache=2)]
    states += torn_states(cdisk.initial, cdisk.ops, random.Random(7), 8)
    assert len(states) > 20
    # A device that writes sectors one by one tore the header between its two sectors in some states.
    assert sum(not header_is_whole(state) for state in states) >= 2
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


def test_a_torn_header_is_repaired_from_its_shadow_and_only_from_it() -> None:
    disks, cdisk, model = repointed_in_memory()
    header_writes = [k for k, op in enumerate(cdisk.ops) if op.kind == "write" and op.offset == 512
                     and len(op.data) == DynamicHeader.SIZE]
    assert len(header_writes) == 1
    k = header_writes[0]
    before, after = cdisk.replay(cdisk.ops[:k]), cdisk.replay(cdisk.ops[: k + 1])  # the shadow is still there
    shadow_zeroing = cdisk.ops[k + 2]
    assert shadow_zeroing.kind == "write" and shadow_zeroing.data == bytes(DynamicHeader.SIZE)
    for first, second in ((after, before), (before, after)):
        torn = bytearray(after)
        torn[512:1024] = first[512:1024]
        torn[1024:1536] = second[1024:1536]
        assert not header_is_whole(bytes(torn))
        trial = {OLD: disks[OLD], NEW: disks[NEW], CHILD: MemoryDisk(bytes(torn))}
        tf = MemoryFileFactory(trial)
        report = check_image(CHILD, lock=False, file_factory=tf)
        assert [p.code for p in report.problems] == ["header-torn"]
        with open_image(CHILD, read_only=True, lock=False, file_factory=tf) as image:
            assert image.parent is not None and image.parent.path == NEW
            assert bytes(image.read(0, SIZE)) == model
        with open_image(CHILD, lock=False, file_factory=tf) as image:  # writes the header back
            assert bytes(image.read(0, SIZE)) == model
        assert header_is_whole(bytes(trial[CHILD].data)) and check_image(CHILD, lock=False, file_factory=tf).clean
        # Without the shadow the same tear is fatal: the shadow is what makes it safe.
        at = shadow_zeroing.offset
        torn[at : at + DynamicHeader.SIZE] = bytes(DynamicHeader.SIZE)
        trial[CHILD] = MemoryDisk(bytes(torn))
        with pytest.raises(CorruptImage, match="checksum"):
            open_image(CHILD, read_only=True, lock=False, file_factory=MemoryFileFactory(trial))


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

"""Conversion logic: raw and VHD in, raw and VHD out, zeros never written, DST all or nothing."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhdblkd.vhd import copy as cv
from vhdblkd.vhd.create import create_differencing, create_dynamic, create_fixed
from vhdblkd.vhd.image import open_image

MIB = 1 << 20
BLOCK = 2 * MIB


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sparse_raw(path: Path, size: int, pieces: dict[int, bytes]) -> bytes:
    """A sparse raw file with `pieces` at their offsets; returns its full content."""
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
            content[offset : offset + len(data)] = data
    return bytes(content)


def read_all(path: Path) -> bytes:
    with open_image(str(path), read_only=True) as image:
        return bytes(image.read(0, image.size))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


PIECES = {
    0: b"\x01" * 512,
    3 * BLOCK + 4096: b"\x5a" * 8192,
    5 * BLOCK - 512: b"\xa5" * 1024,  # straddles blocks 4 and 5
}


def test_default_target_follows_the_extension() -> None:
    assert cv.default_target(Path("a.vhd")) is cv.Target.DYNAMIC
    assert cv.default_target(Path("a.VHD")) is cv.Target.DYNAMIC
    assert cv.default_target(Path("a.img")) is cv.Target.RAW
    assert cv.default_target(Path("a")) is cv.Target.RAW


def test_raw_to_raw_stays_sparse(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    content = sparse_raw(src, 64 * MIB, PIECES)
    result = cv.convert(src, dst)
    assert result.target is cv.Target.RAW and result.source_format == "raw"
    assert dst.read_bytes() == content
    assert dst.stat().st_blocks * 512 < 8 * MIB
    assert result.written_length < 8 * MIB


def test_raw_to_dynamic_keeps_zero_blocks_unallocated(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.vhd"
    content = sparse_raw(src, 32 * MIB, PIECES)
    # Explicit zeros in the file (not a hole) must not allocate either.
    with open(src, "r+b") as f:
        f.seek(8 * BLOCK)
        f.write(bytes(BLOCK))
    cv.convert(src, dst)
    with open_image(str(dst), read_only=True) as image:
        assert image.disk_type == "dynamic"
        assert image.size == 32 * MIB
        assert image.allocated_blocks == 4  # blocks 0, 3, 4, 5
        assert bytes(image.read(0, image.size)) == content


@pytest.mark.parametrize("size", [10000, 3 * MIB + 512, 5 * MIB])
def test_raw_to_fixed_pads_to_a_sector(tmp_path: Path, size: int) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.vhd"
    content = sparse_raw(src, size, {0: b"\x07" * 100, size - 10: b"\x08" * 10})
    cv.convert(src, dst, target=cv.Target.FIXED)
    padded = -(-size // 512) * 512
    with open_image(str(dst), read_only=True) as image:
        assert image.disk_type == "fixed"
        assert image.size == padded
        assert bytes(image.read(0, padded)) == content + bytes(padded - size)


def test_dynamic_block_size_is_honoured(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.vhd"
    content = sparse_raw(src, 8 * MIB, {MIB: b"\x44" * 512})
    cv.convert(src, dst, target=cv.Target.DYNAMIC, block_size=512 * 1024)
    with open_image(str(dst), read_only=True) as image:
        assert image.block_size == 512 * 1024
        assert image.allocated_blocks == 1
        assert bytes(image.read(0, image.size)) == content


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_vhd_to_raw(tmp_path: Path, kind: str) -> None:
    src, dst = tmp_path / "src.vhd", tmp_path / "dst.raw"
    if kind == "fixed":
        create_fixed(str(src), 16 * MIB, exact_size=True)
    else:
        create_dynamic(str(src), 16 * MIB, exact_size=True)
    with open_image(str(src)) as image:
        image.write(BLOCK + 512, b"\x99" * 4096)
        image.write(16 * MIB - 512, b"\x98" * 512)
    expected = read_all(src)
    before = digest(src)
    result = cv.convert(src, dst)
    assert result.source_format == kind
    assert dst.read_bytes() == expected
    assert digest(src) == before


def test_differencing_chain_is_flattened(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    create_dynamic(str(base), 16 * MIB, exact_size=True)
    with open_image(str(base)) as image:
        image.write(0, b"\x01" * BLOCK)
        image.write(3 * BLOCK, b"\x03" * 4096)
    create_differencing(str(child), str(base))
    with open_image(str(child)) as image:
        image.write(512, b"\x02" * 512)
        image.write(5 * BLOCK, b"\x05" * 512)
    expected = bytearray(16 * MIB)
    expected[0:BLOCK] = b"\x01" * BLOCK
    expected[3 * BLOCK : 3 * BLOCK + 4096] = b"\x03" * 4096
    expected[512:1024] = b"\x02" * 512
    expected[5 * BLOCK : 5 * BLOCK + 512] = b"\x05" * 512
    hashes = (digest(base), digest(child))

    raw = tmp_path / "flat.raw"
    assert cv.convert(child, raw).source_format == "differencing"
    assert raw.read_bytes() == bytes(expected)

    flat = tmp_path / "flat.vhd"
    cv.convert(child, flat)
    with open_image(str(flat), read_only=True) as image:
        assert image.disk_type == "dynamic"
        assert image.parent is None
        assert image.allocated_blocks == 3  # blocks 0, 3, 5
        assert bytes(image.read(0, image.size)) == bytes(expected)
    assert (digest(base), digest(child)) == hashes


def test_vhd_to_fixed_vhd(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.vhd", tmp_path / "dst.vhd"
    create_dynamic(str(src), 6 * MIB, exact_size=True)
    with open_image(str(src)) as image:
        image.write(4096, b"\x42" * 4096)
    cv.convert(src, dst, target=cv.Target.FIXED)
    with open_image(str(dst), read_only=True) as image:
        assert image.disk_type == "fixed"
    assert read_all(dst) == read_all(src)


def test_refuses_an_existing_destination(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    sparse_raw(src, MIB, {0: b"x"})
    dst.write_bytes(b"precious")
    with pytest.raises(cv.ConvertError, match="already exists"):
        cv.convert(src, dst)
    assert dst.read_bytes() == b"precious"
    assert leftovers(tmp_path) == []


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(cv.SourceUnreadable, match="nope.img"):
        cv.convert(tmp_path / "nope.img", tmp_path / "dst.img")
    assert not (tmp_path / "dst.img").exists()


def test_missing_destination_folder(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    sparse_raw(src, MIB, {})
    with pytest.raises(cv.ConvertError, match="does not exist"):
        cv.convert(src, tmp_path / "no" / "dst.img")


@pytest.mark.parametrize("target", list(cv.Target))
def test_failure_leaves_nothing_behind(tmp_path: Path, target: cv.Target) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.out"
    sparse_raw(src, 8 * MIB, {0: b"\x01" * MIB, 6 * MIB: b"\x02" * MIB})

    class Boom(Exception):
        pass

    def progress(done: int, total: int) -> None:
        if done > 4 * MIB:
            raise Boom()

    with pytest.raises(Boom):
        cv.convert(src, dst, target=target, progress=progress)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_progress_reaches_the_total(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.vhd"
    sparse_raw(src, 16 * MIB, PIECES)
    seen: list[tuple[int, int]] = []
    cv.convert(src, dst, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 16 * MIB)
    assert seen[-1] == (16 * MIB, 16 * MIB)
    dones = [done for done, _ in seen]
    assert dones == sorted(dones)


def test_detects_vhd_by_footer(tmp_path: Path) -> None:
    vhd, raw = tmp_path / "a.vhd", tmp_path / "a.img"
    create_dynamic(str(vhd), 4 * MIB)
    # The footer copy at 0 alone counts: a dynamic VHD with a damaged end must
    # not be copied as if it were raw data.
    sparse_raw(raw, 4 * MIB, {0: b"conectix"})
    assert cv.looks_like_vhd(vhd)
    assert cv.looks_like_vhd(raw)
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    assert not cv.looks_like_vhd(empty)
    plain = tmp_path / "plain.img"
    sparse_raw(plain, MIB, {100: b"conectix"})
    assert not cv.looks_like_vhd(plain)


def test_raw_extents_skip_holes(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    sparse_raw(src, 64 * MIB, {32 * MIB: b"\x01" * 4096})
    source = cv.RawSource(src)
    try:
        extents = list(source.data_extents())
    finally:
        source.close()
    assert sum(length for _, length in extents) < 8 * MIB
    assert any(offset <= 32 * MIB < offset + length for offset, length in extents)


def test_aligned_extents_merge_and_clip() -> None:
    merged = list(cv._aligned_extents(iter([(10, 5), (100, 10), (5000, 1)]), 1024, 4500))
    assert merged == [(0, 1024), (4096, 404)]
    assert list(cv._aligned_extents(iter([]), 1024, 4096)) == []


@settings(max_examples=25)
@given(
    st.integers(min_value=1, max_value=4 * MIB),
    st.lists(st.tuples(st.integers(min_value=0, max_value=4 * MIB), st.binary(min_size=1, max_size=3000)), max_size=6),
    st.sampled_from([cv.Target.FIXED, cv.Target.DYNAMIC]),
)
def test_raw_vhd_raw_round_trip(size: int, pieces: list[tuple[int, bytes]], target: cv.Target) -> None:
    """raw -> VHD -> raw gives the same bytes, padded with zeros to a whole sector."""
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        content = bytearray(size)
        for offset, data in pieces:
            data = data[: max(0, size - offset)]
            content[offset : offset + len(data)] = data
        src = tmp / "src.img"
        src.write_bytes(content)
        cv.convert(src, tmp / "mid.vhd", target=target, block_size=512 * 1024)
        cv.convert(tmp / "mid.vhd", tmp / "back.img")
        padded = -(-size // 512) * 512
        assert (tmp / "back.img").read_bytes() == bytes(content) + bytes(padded - size)
        if target is cv.Target.DYNAMIC:
            with open_image(str(tmp / "mid.vhd"), read_only=True) as image:
                blocks = {i // (512 * 1024) for i in range(0, size, 512) if any(content[i : i + 512])}
                assert image.allocated_blocks == len(blocks)

"""Hypothesis fuzzing of the VHD parser through vhdfuzz.run (see its docstring for the contract).

Structured programs change one field at a time to boundary values and fix
the checksums, so most inputs pass the cookie and checksum checks and reach
the BAT, bitmap, locator and recovery code; raw programs are plain bytes.
Every file under regressions/vhd/ (inputs that once failed) is replayed.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import vhdfuzz
from tests.reliability.faultfile import FaultFactory

REGRESSIONS = Path(__file__).parent / "regressions" / "vhd"
# FUZZ_SCALE=N multiplies the example counts for a longer exploratory run.
SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
STRUCTURED_EXAMPLES = 2500 * SCALE
RAW_EXAMPLES = 500 * SCALE

values = st.one_of(st.sampled_from(vhdfuzz.INTERESTING), st.integers(0, (1 << 64) - 1),
                   st.integers(0, 1 << 20)).map(vhdfuzz.encode_value)
footer_op = st.tuples(st.integers(0, 2), st.integers(0, len(vhdfuzz.FOOTER_FIELDS) - 1), values).map(
    lambda t: bytes([0, t[0], t[1]]) + t[2])
header_op = st.tuples(st.integers(0, len(vhdfuzz.HEADER_FIELDS) - 1), values).map(lambda t: bytes([1, t[0]]) + t[1])
raw_op = st.tuples(st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)).map(
    lambda t: bytes([2]) + struct.pack(">IB", t[0], len(t[1]) - 1) + t[1])
cut_op = st.integers(1, 8192).map(lambda n: bytes([3]) + struct.pack(">H", n))
bat_op = st.tuples(st.integers(0, 300), values).map(lambda t: bytes([4]) + struct.pack(">H", t[0]) + t[1])
locator_op = st.tuples(st.integers(0, 7), st.integers(0, len(vhdfuzz.LOCATOR_FIELDS) - 1), values).map(
    lambda t: bytes([5, t[0], t[1]]) + t[2])
programs = st.tuples(
    st.integers(0, len(vhdfuzz.SEEDS) - 1),
    st.sampled_from([1, 3, 3, 0, 2]),
    st.lists(st.one_of(footer_op, header_op, raw_op, cut_op, bat_op, bat_op, locator_op), min_size=1, max_size=4),
).map(lambda t: bytes([t[0], t[1]]) + b"".join(t[2]))


@settings(max_examples=STRUCTURED_EXAMPLES)
@given(program=programs)
def test_structured_mutations(program: bytes) -> None:
    vhdfuzz.run(program)


@settings(max_examples=RAW_EXAMPLES)
@given(program=st.binary(min_size=2, max_size=64))
def test_raw_programs(program: bytes) -> None:
    vhdfuzz.run(program)


@pytest.mark.parametrize("index", range(len(vhdfuzz.SEEDS)), ids=[name for name, _ in vhdfuzz.SEEDS])
def test_every_seed_opens_and_survives_a_read_write_session(index: int) -> None:
    vhdfuzz.run(bytes([index, 3]))


# Regression inputs of bugs not fixed yet: name -> reason (the test is a strict xfail until then).
OPEN_BUGS: dict[str, str] = {}


def _regression(path: Path) -> object:
    reason = OPEN_BUGS.get(path.name)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(path, marks=marks, id=path.name)


@pytest.mark.parametrize("path", [_regression(p) for p in sorted(REGRESSIONS.glob("*.bin"))])
def test_regression_inputs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VHDFUZZ_SKIP_KNOWN", raising=False)  # regressions always run in full
    vhdfuzz.run(path.read_bytes())


@pytest.mark.parametrize("offset", [1 << 63, (1 << 64) - 512, 1 << 40])
def test_locator_offset_past_the_file_is_a_typed_error(tmp_path: Path, offset: int) -> None:
    from vhdblkd.errors import VhdblkError
    from vhdblkd.vhd.check import check_image
    from vhdblkd.vhd.image import open_image

    name, files = next(s for s in vhdfuzz.SEEDS if s[0] == "diff-child.vhd")
    for n, content in files.items():
        (tmp_path / n).write_bytes(content)
    buf = bytearray(files[name])
    for i in range(8):
        base = 512 + 576 + 24 * i
        if bytes(buf[base : base + 4]) in (b"W2ku", b"W2ru"):
            buf[base + 16 : base + 24] = struct.pack(">Q", offset)
    vhdfuzz.fix_checksums(buf)
    child = tmp_path / name
    child.write_bytes(bytes(buf))
    # The locators are unusable, so the parent is found by name (or not): either way a typed outcome.
    faults = FaultFactory()
    for call in (lambda: open_image(str(child), read_only=True, allow_unsafe_parent=True, file_factory=faults).close(),
                 lambda: check_image(str(child), allow_unsafe_parent=True, file_factory=faults)):
        try:
            call()
        except VhdblkError:
            pass


def test_bounds_checks_are_live() -> None:
    """The fault layer really catches a read past the end (else the fuzzer could miss stray reads)."""
    from tests.reliability.faultfile import FaultFactory
    from vhdblkd.vhd.memfile import MemoryDisk, MemoryFileFactory

    factory = FaultFactory(MemoryFileFactory({"/x": MemoryDisk(b"a" * 1024)}))
    f = factory("/x", False)
    assert f.pread(1000, 100) == b"a" * 24
    with pytest.raises(AssertionError):
        f.pread(4096, 1)
    with pytest.raises(AssertionError):
        f.pread(0, 1 << 30)

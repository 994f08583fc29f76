"""SIZE parsing and formatting: tables of good and bad inputs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhdblkd.cli.sizes import SizeError, format_size, format_size_exact, parse_size

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

GOOD = [
    ("1", 1),
    ("512", 512),
    ("3000000512", 3000000512),
    ("10G", 10 * GIB),
    ("512M", 512 * MIB),
    ("1T", TIB),
    ("1.5G", GIB + GIB // 2),
    ("1.5K", 1536),
    (".5M", MIB // 2),
    ("64k", 64 * KIB),
    ("2m", 2 * MIB),
    ("100MiB", 100 * MIB),
    ("2GiB", 2 * GIB),
    ("4096B", 4096),
    (" 8M ", 8 * MIB),
    ("8 M", 8 * MIB),
    ("0.25T", TIB // 4),
]

BAD = [
    "",
    " ",
    "G",
    "0",
    "0M",
    "-1",
    "-10G",
    "1.5",  # not a whole number of bytes
    "0.1K",  # 102.4 bytes
    "10GB",  # ambiguous: refused, not guessed
    "10MB",
    "10X",
    "10 GiBs",
    "1e9",
    "0x100",
    "1,000",
    "1.2.3M",
    "ten",
    "10P",
]


@pytest.mark.parametrize(("text", "expected"), GOOD)
def test_parse_good(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", BAD)
def test_parse_bad(text: str) -> None:
    with pytest.raises(SizeError) as info:
        parse_size(text)
    assert repr(text) in str(info.value)


def test_ambiguous_decimal_unit_says_what_to_write() -> None:
    with pytest.raises(SizeError, match="write G or GiB"):
        parse_size("10GB")


@pytest.mark.parametrize(
    ("length", "text"),
    [
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (100 * MIB, "100 MiB"),
        (104865792, "100.01 MiB"),
        (GIB + GIB // 2, "1.5 GiB"),
        (2 * TIB, "2 TiB"),
    ],
)
def test_format(length: int, text: str) -> None:
    assert format_size(length) == text


def test_format_exact() -> None:
    assert format_size_exact(104865792) == "104,865,792 bytes (100.01 MiB)"


@given(st.integers(min_value=1, max_value=1 << 50))
def test_plain_bytes_round_trip(length: int) -> None:
    assert parse_size(str(length)) == length


@given(st.integers(min_value=1, max_value=1 << 20), st.sampled_from(["K", "M", "G", "T"]))
def test_units_are_binary(count: int, unit: str) -> None:
    shift = {"K": 10, "M": 20, "G": 30, "T": 40}[unit]
    assert parse_size(f"{count}{unit}") == count << shift
    assert parse_size(f"{count}{unit.lower()}iB") == count << shift

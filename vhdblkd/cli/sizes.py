"""SIZE arguments: parse "10G", "1.5G", "512M", "3000000512" and print sizes for people.

Units are binary (K = 2**10, M = 2**20, G = 2**30, T = 2**40), as disk tools
mean them.  "KB"/"MB"/... are refused rather than guessed at, because they
usually mean powers of ten elsewhere; "KiB"/"MiB"/... are accepted.
"""

from __future__ import annotations

import re

UNIT_SHIFT = {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40}

_SIZE_RE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[A-Za-z]*)\s*$")


class SizeError(ValueError):
    """A SIZE argument could not be understood; the message says what is accepted."""


def parse_size(text: str) -> int:
    """Return the number of bytes `text` stands for; raise SizeError when it is not a size.

    The result must be a whole number of bytes greater than zero: "1.5K" is
    1536, "0.1K" (102.4 bytes) is refused.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise SizeError(f"invalid size {text!r}: use a number of bytes or a number with K, M, G or T (binary units), e.g. 10G, 512M, 1.5G")
    unit = match.group("unit").upper()
    if unit.endswith("IB") and len(unit) == 3:
        unit = unit[0]
    if unit not in UNIT_SHIFT:
        if len(unit) == 2 and unit[1] == "B" and unit[0] in UNIT_SHIFT:
            raise SizeError(
                f"invalid size {text!r}: {match.group('unit')} is ambiguous; write {unit[0]} or {unit[0]}iB (binary units, 2**{UNIT_SHIFT[unit[0]]})"
            )
        raise SizeError(f"invalid size {text!r}: unknown unit {match.group('unit')!r}; use K, M, G or T (binary units)")
    from fractions import Fraction  # with decimal, a tenth of `vhdblkctl --help`'s imports; only SIZE arguments need it

    value = Fraction(match.group("number")) * (1 << UNIT_SHIFT[unit])
    if value.denominator != 1:
        raise SizeError(f"invalid size {text!r}: it is not a whole number of bytes ({float(value)})")
    length = int(value)
    if length <= 0:
        raise SizeError(f"invalid size {text!r}: a size must be greater than zero")
    return length


def format_size(length: int) -> str:
    """Show a byte count with the largest binary unit that keeps it readable: "100 MiB", "1.5 GiB"."""
    if length < 1024:
        return f"{length} B"
    for name, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        unit = 1 << shift
        if length >= unit:
            if length % unit == 0:
                return f"{length // unit} {name}"
            # Two decimals at most, trailing zeros dropped: "1.5 GiB", "100.01 MiB".
            return f"{length / unit:.2f}".rstrip("0").rstrip(".") + f" {name}"
    raise AssertionError("unreachable: every length >= 1024 has a unit")


def format_size_exact(length: int) -> str:
    """Bytes with thousands separators plus the human form: "104,865,792 bytes (100.01 MiB)"."""
    return f"{length:,} bytes ({format_size(length)})"

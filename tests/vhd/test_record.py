"""Layout, Problem and the on-disk structs behave as the dataclasses they replace (record.py)."""

from __future__ import annotations

import dataclasses

import pytest

from vhdblkd.errors import CorruptImage
from vhdblkd.vhd.layout import Layout, Problem


def test_problem_is_a_frozen_dataclass_twin() -> None:
    twin = dataclasses.make_dataclass("Problem", ["code", "message", "offset"], frozen=True, slots=True)
    one = Problem("leak", "a block nobody references", 4096)
    assert repr(one) == repr(twin("leak", "a block nobody references", 4096))
    assert one == Problem("leak", "a block nobody references", 4096) != Problem("leak", "a block nobody references")
    assert hash(one) == hash(twin("leak", "a block nobody references", 4096))
    assert Problem("c", "m").offset is None
    assert one in [Problem("x", "y"), Problem("leak", "a block nobody references", 4096)]
    with pytest.raises(AttributeError):
        one.code = "other"  # type: ignore[misc]  # frozen


def test_layout_is_a_mutable_dataclass_twin() -> None:
    names = list(Layout.__slots__)
    twin_cls = dataclasses.make_dataclass("Layout", [(n, object, dataclasses.field(default=None)) for n in names],
                                          slots=True)
    lay, other = Layout("/x.vhd", 512), Layout("/x.vhd", 512)
    assert lay.problems == [] and lay.metadata == [] and lay.leaks == [] and lay.bad_locators == []
    assert lay.problems is not other.problems  # each its own list, as default_factory=list
    assert lay.footer is None and lay.footer_offset == 0 and lay.header_shadow is None and lay.fatal is None
    assert repr(lay) == repr(twin_cls(**{n: getattr(lay, n) for n in names}))
    assert lay == other
    with pytest.raises(TypeError):
        hash(lay)
    lay.fail("footer", CorruptImage("bad cookie"), 0)
    assert lay != other
    assert lay.problems == [Problem("footer", "bad cookie", 0)] and isinstance(lay.fatal, CorruptImage)
    with pytest.raises(AttributeError):
        lay.extra = 1  # type: ignore[attr-defined]  # slotted
    assert Layout("/y.vhd", 1, footer_offset=7, problems=[Problem("a", "b")]).problems == [Problem("a", "b")]


def test_footer_and_header_replace_and_compare_as_dataclasses() -> None:
    from vhdblkd.vhd.structs import DynamicHeader, Footer, ParentLocator

    footer = Footer(0x2, 0x10000, 512, 1, b"vhdb", 0x10000, b"Wi2k", 1 << 30, 1 << 30, 2081, 16, 63, 3, bytes(16))
    twin_cls = dataclasses.make_dataclass("Footer", list(Footer.__slots__), frozen=True, slots=True)
    assert repr(footer) == repr(twin_cls(*(getattr(footer, n) for n in Footer.__slots__)))
    assert hash(footer) == hash(twin_cls(*(getattr(footer, n) for n in Footer.__slots__)))
    moved = footer.replace(timestamp=2)
    assert moved.timestamp == 2 and footer.timestamp == 1 and moved != footer == footer.replace()
    with pytest.raises(TypeError):
        footer.replace(no_such_field=1)
    header = DynamicHeader(1536, 513, 2 << 20)
    assert header.parent_locators == (ParentLocator(),) * 8 and header.checksum == 0
    assert header.replace(max_table_entries=9) == DynamicHeader(1536, 9, 2 << 20)
    assert ParentLocator().replace(platform_data_offset=7).platform_data_offset == 7
    with pytest.raises(AttributeError):
        header.block_size = 1  # type: ignore[misc]  # frozen

"""Layout and Problem behave as the dataclasses they replace (record.py)."""

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

"""ImageInfo, ChainLevel and ParentInfo behave as the frozen dataclasses they replace."""

from __future__ import annotations

import dataclasses

import pytest

from vhdblkd.vhd.geometry import Geometry
from vhdblkd.vhd.info import ChainLevel, ImageInfo, ParentInfo

LEVEL = {"path": "/x/base.vhd", "disk_type": "dynamic", "unique_id": "77", "found_by": "W2ku locator",
         "id_matches": True, "timestamp_matches": False, "timestamp": "2026-01-01T00:00:00Z", "expected_timestamp": None}
INFO = {"path": "/x/child.vhd", "disk_type": "differencing", "virtual_size": 1 << 30, "geometry": Geometry(2081, 16, 63),
        "creator_app": "vhdb", "creator_version": "1.0", "creator_os": "Wi2k", "unique_id": "11", "timestamp": "t",
        "block_size": 2 << 20, "allocated_blocks": 3, "total_blocks": 513, "file_size": 4608,
        "footer_checksum_ok": True, "header_checksum_ok": True, "parent": ParentInfo("/x/base.vhd", "77"),
        "parent_chain": ("/x/base.vhd",), "parent_timestamp_matches": False, "chain": (ChainLevel(**LEVEL),)}


def _dataclass_twin(cls: type, values: dict[str, object]) -> object:
    """What the same class made by @dataclass(frozen=True, slots=True) would hold."""
    twin = dataclasses.make_dataclass(cls.__qualname__, list(values), frozen=True, slots=True)
    return twin(**values)


@pytest.mark.parametrize(("cls", "values"), [(ParentInfo, {"path": "/p", "unique_id": "9"}), (ChainLevel, LEVEL),
                                             (ImageInfo, INFO)])
def test_equality_hash_repr_and_frozen_as_a_dataclass(cls: type, values: dict[str, object]) -> None:
    one, two, twin = cls(**values), cls(**values), _dataclass_twin(cls, values)
    assert repr(one) == repr(twin)
    assert one == two and hash(one) == hash(two) == hash(twin)
    assert one != twin  # a different class is never equal, as between dataclasses
    first = next(iter(values))
    changed = cls(**{**values, first: "other"})
    assert one != changed
    with pytest.raises(AttributeError):
        setattr(one, first, "other")
    with pytest.raises(AttributeError):
        delattr(one, first)
    with pytest.raises(AttributeError):
        one.extra = 1  # type: ignore[attr-defined]  # slotted: no new attributes either
    assert [getattr(one, name) for name in values] == list(values.values())


def test_image_info_defaults() -> None:
    short = {k: v for k, v in INFO.items() if k not in ("parent_timestamp_matches", "chain")}
    info = ImageInfo(**short)  # type: ignore[arg-type]  # the values are of the right types
    assert info.parent_timestamp_matches is None and info.chain == ()

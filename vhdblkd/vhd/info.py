"""ImageInfo: what `info()` tells about an open image, typed and frozen.

`as_dict()` gives the JSON form `vhdblkctl info --json` prints; its keys and
their order are part of the command's interface.
"""

from __future__ import annotations

import dataclasses

from vhdblkd.vhd.geometry import Geometry


@dataclasses.dataclass(frozen=True, slots=True)
class ParentInfo:
    """The immediate parent of a differencing image, as opened."""

    path: str
    unique_id: str

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "unique_id": self.unique_id}


@dataclasses.dataclass(frozen=True, slots=True)
class ChainLevel:
    """One parent in a differencing chain, and how it compares with what its child records.

    id_matches is always true for a chain that opened (a wrong id is refused);
    timestamp_matches is false for a copied parent or a child that records 0.
    """

    path: str
    disk_type: str
    unique_id: str
    found_by: str  # "W2ru locator", "W2ku locator", "parent name", "parent file name"
    id_matches: bool
    timestamp_matches: bool
    timestamp: str  # the parent file's mtime, ISO 8601 UTC
    expected_timestamp: str | None  # what the child records; None when it records 0

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "type": self.disk_type,
            "unique_id": self.unique_id,
            "found_by": self.found_by,
            "id_matches": self.id_matches,
            "timestamp_matches": self.timestamp_matches,
            "timestamp": self.timestamp,
            "expected_timestamp": self.expected_timestamp,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class ImageInfo:
    """What an open image is: its type, size, identity, allocation, checksums and parents."""

    path: str
    disk_type: str  # "fixed", "dynamic" or "differencing"
    virtual_size: int
    geometry: Geometry
    creator_app: str
    creator_version: str  # "major.minor"
    creator_os: str
    unique_id: str
    timestamp: str  # ISO 8601, UTC
    block_size: int | None  # None for a fixed image
    allocated_blocks: int
    total_blocks: int
    file_size: int
    footer_checksum_ok: bool
    header_checksum_ok: bool | None  # None when there is no dynamic header
    parent: ParentInfo | None
    parent_chain: tuple[str, ...]  # parent first, then its parent, ...
    # Whether the parent's mtime is what this image records (None: no parent).
    parent_timestamp_matches: bool | None = None
    chain: tuple[ChainLevel, ...] = ()  # the parents, nearest first

    def as_dict(self) -> dict[str, object]:
        g = self.geometry
        return {
            "path": self.path,
            "type": self.disk_type,
            "virtual_size": self.virtual_size,
            "geometry": {"cylinders": g.cylinders, "heads": g.heads, "sectors_per_track": g.sectors_per_track},
            "creator_app": self.creator_app,
            "creator_version": self.creator_version,
            "creator_os": self.creator_os,
            "unique_id": self.unique_id,
            "timestamp": self.timestamp,
            "block_size": self.block_size,
            "allocated_blocks": self.allocated_blocks,
            "total_blocks": self.total_blocks,
            "file_size": self.file_size,
            "footer_checksum_ok": self.footer_checksum_ok,
            "header_checksum_ok": self.header_checksum_ok,
            "parent": None if self.parent is None else self.parent.as_dict(),
            "parent_chain": list(self.parent_chain),
            "parent_timestamp_matches": self.parent_timestamp_matches,
            "chain": [level.as_dict() for level in self.chain],
        }

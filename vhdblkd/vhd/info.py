"""ImageInfo: what `info()` tells about an open image, typed and frozen.

`as_dict()` gives the JSON form `vhdblkctl info --json` prints; its keys and
their order are part of the command's interface.

The three are Frozen records (record.py), not dataclasses: making three
dataclasses at import was a sixteenth of `vhdblkctl info`, which builds one
of each at most.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vhdblkd.vhd.record import Frozen

if TYPE_CHECKING:
    from vhdblkd.vhd.geometry import Geometry


class ParentInfo(Frozen):
    """The immediate parent of a differencing image, as opened."""

    __slots__ = ("path", "unique_id")
    path: str
    unique_id: str

    def __init__(self, path: str, unique_id: str) -> None:
        self._init(path=path, unique_id=unique_id)

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "unique_id": self.unique_id}


class ChainLevel(Frozen):
    """One parent in a differencing chain, and how it compares with what its child records.

    id_matches is always true for a chain that opened (a wrong id is refused);
    timestamp_matches is false for a copied parent or a child that records 0.
    """

    __slots__ = ("path", "disk_type", "unique_id", "found_by", "id_matches", "timestamp_matches", "timestamp",
                 "expected_timestamp")
    path: str
    disk_type: str
    unique_id: str
    found_by: str  # "W2ru locator", "W2ku locator", "parent name", "parent file name"
    id_matches: bool
    timestamp_matches: bool
    timestamp: str  # the parent file's mtime, ISO 8601 UTC
    expected_timestamp: str | None  # what the child records; None when it records 0

    def __init__(self, path: str, disk_type: str, unique_id: str, found_by: str, id_matches: bool,
                 timestamp_matches: bool, timestamp: str, expected_timestamp: str | None) -> None:
        self._init(path=path, disk_type=disk_type, unique_id=unique_id, found_by=found_by, id_matches=id_matches,
                   timestamp_matches=timestamp_matches, timestamp=timestamp, expected_timestamp=expected_timestamp)

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


class ImageInfo(Frozen):
    """What an open image is: its type, size, identity, allocation, checksums and parents."""

    __slots__ = ("path", "disk_type", "virtual_size", "geometry", "creator_app", "creator_version", "creator_os",
                 "unique_id", "timestamp", "block_size", "allocated_blocks", "total_blocks", "file_size",
                 "footer_checksum_ok", "header_checksum_ok", "parent", "parent_chain", "parent_timestamp_matches",
                 "chain")
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
    parent_timestamp_matches: bool | None
    chain: tuple[ChainLevel, ...]  # the parents, nearest first

    def __init__(self, path: str, disk_type: str, virtual_size: int, geometry: Geometry, creator_app: str,
                 creator_version: str, creator_os: str, unique_id: str, timestamp: str, block_size: int | None,
                 allocated_blocks: int, total_blocks: int, file_size: int, footer_checksum_ok: bool,
                 header_checksum_ok: bool | None, parent: ParentInfo | None, parent_chain: tuple[str, ...],
                 parent_timestamp_matches: bool | None = None, chain: tuple[ChainLevel, ...] = ()) -> None:
        self._init(path=path, disk_type=disk_type, virtual_size=virtual_size, geometry=geometry,
                   creator_app=creator_app, creator_version=creator_version, creator_os=creator_os,
                   unique_id=unique_id, timestamp=timestamp, block_size=block_size,
                   allocated_blocks=allocated_blocks, total_blocks=total_blocks, file_size=file_size,
                   footer_checksum_ok=footer_checksum_ok, header_checksum_ok=header_checksum_ok, parent=parent,
                   parent_chain=parent_chain, parent_timestamp_matches=parent_timestamp_matches, chain=chain)

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

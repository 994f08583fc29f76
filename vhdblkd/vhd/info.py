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
class ImageInfo:
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
        }

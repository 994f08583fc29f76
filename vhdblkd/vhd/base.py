"""VhdImage: what every image kind shares (attributes, info(), lifetime)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING

from vhdblkd.backend import Buffer, Extent, FuaMode
from vhdblkd.errors import ReadOnlyImage
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.geometry import Geometry
from vhdblkd.vhd.info import ChainLevel, ImageInfo, ParentInfo
from vhdblkd.vhd.layout import Layout
from vhdblkd.vhd.lock import ImageLock
from vhdblkd.vhd.structs import DynamicHeader, Footer, uuid_text
from vhdblkd.vhd.timestamp import vhd_timestamp_to_iso

if TYPE_CHECKING:
    from vhdblkd.vhd.parent import ParentLink


def _fourcc(raw: bytes) -> str:
    return raw.decode("latin-1").rstrip("\0")


class VhdImage:
    """An open VHD image; satisfies vhdblkd.backend.Backend structurally."""

    disk_type: str = ""

    def __init__(self, path: str, file: ImageFile, layout: Layout, *, read_only: bool,
                 lock: ImageLock | None) -> None:
        assert layout.footer is not None
        self.path = path
        self._file = file
        self._layout = layout
        self.footer: Footer = layout.footer
        self.header: DynamicHeader | None = layout.header
        self.block_size: int | None = None
        self.parent: VhdImage | None = None
        # How a differencing image found its parent and how the parent compares (set by open_image).
        self.parent_link: ParentLink | None = None
        self._size = layout.virtual_size
        self._read_only = read_only
        self._lock = lock
        self._closed = False
        self._close_lock = threading.Lock()

    # --- Backend capabilities -------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def can_flush(self) -> bool:
        return True

    @property
    def can_fua(self) -> FuaMode:
        return FuaMode.NATIVE

    @property
    def can_discard(self) -> bool:
        return not self._read_only

    @property
    def can_multi_conn(self) -> bool:
        # One file, one page cache: an fdatasync covers every connection's writes.
        return True

    def file_mtime(self) -> int:
        """The image file's modification time, Unix seconds."""
        return self._file.mtime()

    @property
    def allocated_blocks(self) -> int:
        return 0

    @property
    def total_blocks(self) -> int:
        return 0

    def allocated_block_indexes(self) -> list[int]:
        """Indexes of the blocks this file's own BAT points at (parents not included).

        A fixed image has no blocks: all of its data is in the file.
        """
        return []

    def data_extents(self) -> Iterator[tuple[int, int]]:
        """(offset, length) ranges, ascending and merged, that may hold data, through the chain.

        Everything outside them reads as zeros.  A fixed layer anywhere in the chain, or
        layers of different block sizes, give the whole disk (correct rather than clever).
        """
        chain: list[VhdImage] = []
        layer: VhdImage | None = self
        while layer is not None:
            if layer.disk_type == "fixed" or layer.block_size != self.block_size:
                yield 0, self.size
                return
            chain.append(layer)
            layer = layer.parent
        bs = self.block_size
        assert bs is not None  # set for every dynamic and differencing image
        indexes: set[int] = set()
        for layer in chain:
            indexes.update(layer.allocated_block_indexes())
        start = length = 0
        for index in sorted(indexes):
            offset = index * bs
            if offset >= self.size:
                break
            n = min(bs, self.size - offset)
            if length and start + length == offset:
                length += n
                continue
            if length:
                yield start, length
            start, length = offset, n
        if length:
            yield start, length

    def allocation(self, offset: int, length: int) -> list[Extent]:
        """Allocation runs through the chain (backend.AllocationMap; see allocation.py)."""
        from vhdblkd.vhd.allocation import allocation  # it needs the image kinds, which import this module

        return allocation(self, offset, length)

    def _check_writable(self) -> None:
        if self._read_only:
            raise ReadOnlyImage(f"{self.path}: the image is open read-only")

    # --- description ----------------------------------------------------------

    def info(self) -> ImageInfo:
        f = self.footer
        parent = self.parent
        chain: list[str] = []
        levels: list[ChainLevel] = []
        child: VhdImage = self
        node = parent
        while node is not None:
            chain.append(node.path)
            link = child.parent_link
            if link is not None:
                levels.append(ChainLevel(
                    path=node.path, disk_type=node.disk_type, unique_id=uuid_text(node.footer.unique_id),
                    found_by=link.found_by, id_matches=link.id_matches, timestamp_matches=link.timestamp_matches,
                    timestamp=vhd_timestamp_to_iso(link.timestamp),
                    expected_timestamp=vhd_timestamp_to_iso(link.expected_timestamp) if link.expected_timestamp
                    else None))
            child, node = node, node.parent
        return ImageInfo(
            path=self.path,
            disk_type=self.disk_type,
            virtual_size=self.size,
            geometry=Geometry(f.cylinders, f.heads, f.sectors_per_track),
            creator_app=_fourcc(f.creator_application),
            creator_version=f"{f.creator_version >> 16}.{f.creator_version & 0xFFFF}",
            creator_os=_fourcc(f.creator_host_os),
            unique_id=uuid_text(f.unique_id),
            timestamp=vhd_timestamp_to_iso(f.timestamp),
            block_size=self.block_size,
            allocated_blocks=self.allocated_blocks,
            total_blocks=self.total_blocks,
            file_size=self._file.size(),
            footer_checksum_ok=self._layout.footer_checksum_ok,
            header_checksum_ok=self._layout.header_checksum_ok if self.header is not None else None,
            parent=None if parent is None else ParentInfo(
                path=parent.path, unique_id=uuid_text(parent.footer.unique_id)),
            parent_chain=tuple(chain),
            parent_timestamp_matches=None if self.parent_link is None else self.parent_link.timestamp_matches,
            chain=tuple(levels),
        )

    # --- I/O, provided by each kind ---------------------------------------------

    def read(self, offset: int, length: int) -> Buffer:
        raise NotImplementedError

    def read_into_zeroed(self, offset: int, dest: bytearray | memoryview) -> None:
        """Read len(dest) bytes at `offset` into `dest`, which holds zeros when called.

        How a child reads its parent: straight into the child's buffer, and a layer may
        skip what reads as zeros.
        """
        dest[:] = self.read(offset, len(dest))

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    # --- lifetime -------------------------------------------------------------

    def _release(self) -> None:
        """Drop kind-specific resources before the file closes."""

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            if not self._read_only:
                self.flush()
                self._on_close_writable()
        finally:
            self._release()
            self._file.close()
            if self._lock is not None:
                self._lock.release()
            if self.parent is not None:
                self.parent.close()

    def _on_close_writable(self) -> None:
        """Last chance to tidy the file while nothing else touches it."""

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> VhdImage:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ro" if self._read_only else "rw"
        return f"<{type(self).__name__} {self.path!r} {self.size} bytes {mode}>"

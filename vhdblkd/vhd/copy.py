"""The copy engine: VHD (any type, chains flattened) or raw in, raw or fixed/dynamic VHD out.

The source is opened read-only and never changed.  The destination is built
in a temporary file beside it and only linked into place once it is complete
and durable, so a crash or a Ctrl-C never leaves a half-written DST behind
and an existing file is never replaced.

Data is copied in pieces; pieces that read as all zeros are not written, so a
raw destination stays sparse and a dynamic VHD keeps those blocks
unallocated.  Regions the source itself knows to be unallocated (holes of a
sparse raw file, unallocated VHD blocks) are not even read.
"""

from __future__ import annotations

import enum
import errno
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

from vhdblkd.errors import VhdblkError
from vhdblkd.fsutil import fsync_directory, remove_quietly
from vhdblkd.vhd import constants as c
from vhdblkd.vhd import create as vhd_create
from vhdblkd.vhd import image as vhd_image
from vhdblkd.vhd.blockmap import round_up_sector
from vhdblkd.vhd.layout import looks_like_vhd

ProgressCallback = Callable[[int, int], None]

# Raw and fixed destinations: small enough to keep sparse files sparse,
# large enough that the per-piece overhead disappears.
COPY_PIECE_LENGTH = 1024 * 1024


class ConvertError(VhdblkError):
    """A conversion cannot be done as asked; the message names the file and the way out."""

    exit_code = 1


class SourceUnreadable(ConvertError):
    """The source cannot be opened or understood."""

    exit_code = 2


class Target(enum.Enum):
    RAW = "raw"
    FIXED = "fixed"
    DYNAMIC = "dynamic"


@dataclass(frozen=True)
class ConvertResult:
    source_format: str  # "raw" or the VHD disk type of the source
    target: Target
    virtual_size: int
    written_length: int  # bytes of non-zero data copied


class Source(Protocol):
    """What conversion needs from an input: its size, its data, and where data may be."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    def data_extents(self) -> Iterator[tuple[int, int]]:
        """(offset, length) ranges, ascending, outside which the source reads as zeros."""

    def close(self) -> None: ...


# --- sources ------------------------------------------------------------------


class RawSource:
    """A plain file or block device, read as it is."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")
        self._size = self._file.seek(0, os.SEEK_END)

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._file.fileno(), length, offset)
        if len(data) != length:
            raise ConvertError(f"{self._file.name}: short read at offset {offset}: the file shrank while being converted")
        return data

    def data_extents(self) -> Iterator[tuple[int, int]]:
        fd = self._file.fileno()
        offset = 0
        while offset < self._size:
            try:
                data_start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    return
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all may be data
                    yield offset, self._size - offset
                    return
                raise
            data_end = min(os.lseek(fd, data_start, os.SEEK_HOLE), self._size)
            if data_end <= data_start:
                return
            yield data_start, data_end - data_start
            offset = data_end

    def close(self) -> None:
        self._file.close()


class VhdSource:
    """A VHD of any type; a differencing image reads through its whole chain."""

    def __init__(self, path: Path, *, allow_unsafe_parent: bool = False, strict_parent_timestamp: bool = False) -> None:
        self.image = vhd_image.open_image(str(path), read_only=True, allow_unsafe_parent=allow_unsafe_parent,
                                          strict_parent_timestamp=strict_parent_timestamp)

    @property
    def size(self) -> int:
        return self.image.size

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        return self.image.read(offset, length)

    def data_extents(self) -> Iterator[tuple[int, int]]:
        return self.image.data_extents()

    def close(self) -> None:
        self.image.close()


def open_source(path: Path, *, allow_unsafe_parent: bool = False, strict_parent_timestamp: bool = False) -> Source:
    try:
        is_vhd = looks_like_vhd(path)
    except OSError as exc:
        raise SourceUnreadable(f"{path}: cannot read the source: {exc.strerror}; check the path and permissions") from exc
    if not is_vhd:
        try:
            return RawSource(path)
        except OSError as exc:
            raise SourceUnreadable(f"{path}: cannot open the source: {exc.strerror}") from exc
    try:
        return VhdSource(path, allow_unsafe_parent=allow_unsafe_parent, strict_parent_timestamp=strict_parent_timestamp)
    except VhdblkError as exc:
        raise SourceUnreadable(f"cannot open the source VHD: {exc}") from exc
    except OSError as exc:
        raise SourceUnreadable(f"{path}: cannot open the source VHD: {exc.strerror}") from exc


# --- destinations -------------------------------------------------------------


class Destination(Protocol):
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def finish(self) -> None:
        """Make everything durable and close."""

    def abandon(self) -> None:
        """Close without caring for the data (the file is about to be removed)."""


class RawDestination:
    def __init__(self, path: Path, size: int) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.ftruncate(self._fd, size)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written

    def finish(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)

    def abandon(self) -> None:
        os.close(self._fd)


class VhdDestination:
    def __init__(self, path: Path, size: int, target: Target, block_size: int) -> None:
        if target is Target.FIXED:
            vhd_create.create_fixed(str(path), size, exact_size=True)
        else:
            vhd_create.create_dynamic(str(path), size, block_size=block_size, exact_size=True)
        self._image = vhd_image.open_image(str(path))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._image.write(offset, data)

    def finish(self) -> None:
        self._image.flush()
        self._image.close()

    def abandon(self) -> None:
        self._image.close()


# --- the copy -----------------------------------------------------------------


def default_target(dst: Path) -> Target:
    """.vhd destinations become dynamic VHDs, anything else raw."""
    return Target.DYNAMIC if dst.suffix.lower() == ".vhd" else Target.RAW


def convert(
    src: Path,
    dst: Path,
    *,
    target: Target | None = None,
    block_size: int = c.DEFAULT_BLOCK_SIZE,
    progress: ProgressCallback | None = None,
    allow_unsafe_parent: bool = False,
    strict_parent_timestamp: bool = False,
) -> ConvertResult:
    """Copy `src` into a new file `dst` of format `target` (default from dst's extension)."""
    if target is None:
        target = default_target(dst)
    if os.path.lexists(dst):
        raise ConvertError(f"{dst}: already exists; remove it or choose another destination")
    if not dst.parent.is_dir():
        raise ConvertError(f"{dst}: the folder {dst.parent} does not exist; create it first")
    source = open_source(src, allow_unsafe_parent=allow_unsafe_parent, strict_parent_timestamp=strict_parent_timestamp)
    try:
        source_format = source.image.disk_type if isinstance(source, VhdSource) else "raw"
        size = source.size
        if target is not Target.RAW:
            # A VHD holds whole sectors; the pad reads as zeros.
            size = round_up_sector(size)
        with _TempFile(dst) as temp:
            destination: Destination
            try:
                if target is Target.RAW:
                    destination = RawDestination(temp.path, size)
                else:
                    destination = VhdDestination(temp.path, size, target, block_size)
            except OSError as exc:
                raise ConvertError(f"{dst}: cannot create the destination: {exc.strerror}; check the folder's free space and permissions") from exc
            piece_length = block_size if target is Target.DYNAMIC else COPY_PIECE_LENGTH
            try:
                written = _copy(source, destination, piece_length, progress)
                destination.finish()
            except BaseException:
                destination.abandon()
                raise
            temp.commit()
    finally:
        source.close()
    return ConvertResult(source_format=source_format, target=target, virtual_size=size, written_length=written)


def _copy(source: Source, destination: Destination, piece_length: int, progress: ProgressCallback | None) -> int:
    total = source.size
    zeros = bytes(piece_length)
    written = 0
    if progress is not None:
        progress(0, total)
    for extent_offset, extent_length in _aligned_extents(source.data_extents(), piece_length, total):
        end = extent_offset + extent_length
        offset = extent_offset
        while offset < end:
            length = min(piece_length, end - offset)
            data = bytes(source.read(offset, length))
            if data != zeros[:length]:
                destination.write(offset, data)
                written += length
            offset += length
            if progress is not None:
                progress(offset, total)
    if progress is not None:
        progress(total, total)
    return written


def _aligned_extents(extents: Iterator[tuple[int, int]], piece_length: int, total: int) -> Iterator[tuple[int, int]]:
    """Widen extents to whole pieces and merge neighbours, so every write covers whole pieces.

    For a dynamic destination a piece is one block: a block is then written
    once, whole, instead of in fragments that each update its bitmap.
    """
    current_start = current_end = -1
    for offset, length in extents:
        start = offset - offset % piece_length
        end = min(-(-(offset + length) // piece_length) * piece_length, total)
        if start <= current_end:
            current_end = max(current_end, end)
            continue
        if current_end > current_start:
            yield current_start, current_end - current_start
        current_start, current_end = start, end
    if current_end > current_start:
        yield current_start, current_end - current_start


class _TempFile:
    """A fresh name beside `dst`; removed on failure, linked to `dst` (never clobbering) on commit."""

    def __init__(self, dst: Path) -> None:
        self.dst = dst
        self.path = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.part")
        self._committed = False

    def __enter__(self) -> _TempFile:
        return self

    def commit(self) -> None:
        try:
            os.link(self.path, self.dst)
        except FileExistsError as exc:
            raise ConvertError(f"{self.dst}: appeared while converting; the result was discarded, remove it and retry") from exc
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # Filesystems without hard links: check, then rename (a tiny race we accept there).
            if os.path.lexists(self.dst):
                raise ConvertError(f"{self.dst}: appeared while converting; the result was discarded, remove it and retry") from exc
            os.rename(self.path, self.dst)
        self._committed = True
        remove_quietly(self.path)
        fsync_directory(self.dst.parent)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._committed:
            remove_quietly(self.path)

"""open_image: the entry point of the format layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vhdblkd.errors import ParentError, VhdError
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.base import VhdImage
from vhdblkd.vhd.differencing import DifferencingImage
from vhdblkd.vhd.dynamic import DynamicImage
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.fixed import FixedImage
from vhdblkd.vhd.layout import scan
from vhdblkd.vhd.lock import ImageLock
from vhdblkd.vhd.recovery import needs_repair, repair
from vhdblkd.vhd.structs import DynamicHeader

if TYPE_CHECKING:
    from vhdblkd.vhd.parent import ParentLink

__all__ = ["VhdImage", "FixedImage", "DynamicImage", "DifferencingImage", "open_image"]

FileFactory = Callable[[str, bool], ImageFile]
# A chain longer than this is almost certainly a loop of locators.
MAX_CHAIN_DEPTH = 64


def open_image(path: str, *, read_only: bool = False, allow_unsafe_parent: bool = False,
               strict_parent_timestamp: bool = False, lock: bool = True,
               file_factory: FileFactory = ImageFile) -> VhdImage:
    """Open a VHD image (any type); a read-write open repairs what recovery may repair.

    allow_unsafe_parent: follow parents outside the child's directory.
    strict_parent_timestamp: refuse a parent whose mtime differs from what its child records
    (by default the unique id alone decides; the mismatch is in each image's parent_link).
    """
    return _open(path, read_only=read_only, allow_unsafe_parent=allow_unsafe_parent,
                 strict_parent_timestamp=strict_parent_timestamp, lock=lock, file_factory=file_factory, depth=0)


def _open(path: str, *, read_only: bool, allow_unsafe_parent: bool, strict_parent_timestamp: bool, lock: bool,
          file_factory: FileFactory, depth: int) -> VhdImage:
    image_lock = ImageLock(path, exclusive=not read_only) if lock else None
    f: ImageFile | None = None
    try:
        f = file_factory(path, not read_only)
        lay = scan(f, path)
        if lay.fatal is not None:
            raise lay.fatal
        if not read_only and needs_repair(lay):
            lay = repair(f, lay)
            if lay.fatal is not None:
                raise lay.fatal
        assert lay.footer is not None
        image: VhdImage
        if lay.footer.disk_type == c.DISK_TYPE_FIXED:
            image = FixedImage(path, f, lay, read_only=read_only, lock=image_lock)
        elif lay.footer.disk_type == c.DISK_TYPE_DYNAMIC:
            image = DynamicImage(path, f, lay, read_only=read_only, lock=image_lock)
        else:
            assert lay.header is not None
            # Imported here: opening a fixed or dynamic image (all `info` of one needs) searches no parent.
            from vhdblkd.vhd import parent as parent_mod
            # The child's size need not match the parent's: a grown child reads zeros past the
            # parent's end, a smaller one simply never sees the parent's tail.
            parent, link = _open_parent(path, f, lay.header, allow_unsafe_parent=allow_unsafe_parent,
                                        strict_parent_timestamp=strict_parent_timestamp, lock=lock,
                                        file_factory=file_factory, depth=depth)
            try:
                parent_mod.vet(link, strict_timestamp=strict_parent_timestamp)
                image = DifferencingImage(path, f, lay, read_only=read_only, lock=image_lock, parent=parent)
                image.parent_link = link
            except BaseException:
                parent.close()
                raise
        return image
    except BaseException:
        if f is not None:
            f.close()
        if image_lock is not None:
            image_lock.release()
        raise


def _open_parent(child: str, f: ImageFile, header: DynamicHeader, *, allow_unsafe_parent: bool,
                 strict_parent_timestamp: bool, lock: bool, file_factory: FileFactory,
                 depth: int) -> tuple[VhdImage, ParentLink]:
    from vhdblkd.vhd import parent as parent_mod

    if depth >= MAX_CHAIN_DEPTH:
        raise ParentError(f"{child}: the parent chain is more than {MAX_CHAIN_DEPTH} images deep (a loop?)")
    found_by, parent_path = parent_mod.find(f, header, child, allow_unsafe=allow_unsafe_parent,
                                            strict_timestamp=strict_parent_timestamp, file_factory=file_factory)
    try:
        parent = _open(parent_path, read_only=True, allow_unsafe_parent=allow_unsafe_parent,
                       strict_parent_timestamp=strict_parent_timestamp, lock=lock,
                       file_factory=file_factory, depth=depth + 1)
    except ParentError:
        raise
    except VhdError as exc:
        raise ParentError(f"{child}: cannot open parent {parent_path}: {exc}") from exc
    return parent, parent_mod.link_to(child, header, found_by, parent)

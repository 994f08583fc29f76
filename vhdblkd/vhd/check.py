"""check_image: report (and optionally repair) what is wrong with an image.

Without repair the image is opened read-only and not one byte changes.
With repair it is opened read-write under an exclusive lock; the repairs
are those of a read-write open (recovery.py) plus recomputing a dynamic
header's checksum when the header is otherwise sound.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from vhdblkd.errors import ParentError, VhdError
from vhdblkd.vhd import constants as c
from vhdblkd.vhd import parent as parent_mod
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.layout import Layout, Problem, scan
from vhdblkd.vhd.lock import ImageLock
from vhdblkd.vhd.recovery import needs_repair
from vhdblkd.vhd.recovery import repair as repair_layout
from vhdblkd.vhd.structs import DynamicHeader

__all__ = ["CheckReport", "Problem", "check_image"]


@dataclasses.dataclass(frozen=True, slots=True)
class CheckReport:
    """problems: what was found; remaining: what is still wrong after repair (if any)."""

    problems: list[Problem]
    repaired: bool
    clean: bool
    remaining: list[Problem] = dataclasses.field(default_factory=list)


def check_image(path: str, *, repair: bool = False, allow_unsafe_parent: bool = False, lock: bool = True,
                file_factory: Callable[..., ImageFile] = ImageFile) -> CheckReport:
    image_lock = ImageLock(path, exclusive=repair) if lock else None
    try:
        f = file_factory(path, repair)
        try:
            lay = scan(f, path)
            problems = lay.problems + _parent_problems(f, lay, path, allow_unsafe_parent, file_factory)
            if not repair or not problems:
                return CheckReport(problems, False, not problems, list(problems))
            repaired = False
            if lay.fatal is not None and lay.problems[0].code == "header-checksum" and lay.header is not None:
                _rewrite_header(f, lay)
                repaired = True
                lay = scan(f, path)
            if lay.fatal is None and needs_repair(lay):
                lay = repair_layout(f, lay)
                repaired = True
            remaining = lay.problems + _parent_problems(f, lay, path, allow_unsafe_parent, file_factory)
            return CheckReport(problems, repaired, not remaining, remaining)
        finally:
            f.close()
    finally:
        if image_lock is not None:
            image_lock.release()


def _rewrite_header(f: ImageFile, lay: Layout) -> None:
    assert lay.footer is not None and lay.header is not None
    f.pwrite(lay.footer.data_offset, lay.header.pack())
    f.fdatasync()


def _parent_problems(f: ImageFile, lay: Layout, path: str, allow_unsafe: bool,
                     file_factory: Callable[..., ImageFile]) -> list[Problem]:
    if lay.fatal is not None or lay.footer is None or lay.header is None:
        return []
    if lay.footer.disk_type != c.DISK_TYPE_DIFFERENCING:
        return []
    header: DynamicHeader = lay.header
    exists = getattr(file_factory, "exists", os.path.isfile)
    try:
        parent_path = parent_mod.locate(f, header, path, allow_unsafe=allow_unsafe, exists=exists)
    except ParentError as exc:
        return [Problem("parent-missing", str(exc), None)]
    from vhdblkd.vhd.image import open_image, vet_parent  # image imports check's neighbours

    try:
        with open_image(parent_path, read_only=True, allow_unsafe_parent=allow_unsafe,
                        file_factory=file_factory, lock=False) as parent:
            vet_parent(path, header.parent_unique_id, header.parent_timestamp, parent, allow_unsafe)
    except ParentError as exc:
        return [Problem("parent-mismatch", str(exc), None)]
    except VhdError as exc:
        return [Problem("parent-corrupt", f"{path}: parent {parent_path}: {exc}", None)]
    return []

"""check_image: report (and optionally repair) what is wrong with an image.

Without repair the image is opened read-only and not one byte changes.
With repair it is opened read-write under an exclusive lock; the repairs
are those of a read-write open (recovery.py) plus recomputing a dynamic
header's checksum when the header is otherwise sound.

Notes are findings that damage nothing: a parent whose mtime differs from
the timestamp its child records (code parent-timestamp) is identified by its
unique id all the same.  With strict_parent_timestamp it is a problem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from vhdblkd.errors import ParentError, ParentTimestampMismatch, VhdError
from vhdblkd.vhd import constants as c
from vhdblkd.vhd import parent as parent_mod
from vhdblkd.vhd.base import VhdImage
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.layout import Layout, Problem, scan
from vhdblkd.vhd.lock import ImageLock
from vhdblkd.vhd.parent import ParentLink
from vhdblkd.vhd.recovery import needs_repair
from vhdblkd.vhd.recovery import repair as repair_layout
from vhdblkd.vhd.structs import DynamicHeader

__all__ = ["CheckReport", "Problem", "chain_links", "check_image"]


@dataclasses.dataclass(frozen=True, slots=True)
class CheckReport:
    """problems: what was found; remaining: what is still wrong after repair (if any).

    notes: findings that are not damage (they leave the image clean).
    """

    problems: list[Problem]
    repaired: bool
    clean: bool
    remaining: list[Problem] = dataclasses.field(default_factory=list)
    notes: list[Problem] = dataclasses.field(default_factory=list)


def check_image(path: str, *, repair: bool = False, allow_unsafe_parent: bool = False,
                strict_parent_timestamp: bool = False, lock: bool = True,
                file_factory: Callable[..., ImageFile] = ImageFile) -> CheckReport:
    image_lock = ImageLock(path, exclusive=repair) if lock else None
    parents = _ParentCheck(allow_unsafe_parent, strict_parent_timestamp, file_factory)
    try:
        f = file_factory(path, repair)
        try:
            lay = scan(f, path)
            found, notes = parents.run(f, lay, path)
            problems = lay.problems + found
            if not repair or not problems:
                return CheckReport(problems, False, not problems, list(problems), notes)
            repaired = False
            if lay.fatal is not None and lay.problems[0].code == "header-checksum" and lay.header is not None:
                _rewrite_header(f, lay)
                repaired = True
                lay = scan(f, path)
            if lay.fatal is None and needs_repair(lay):
                lay = repair_layout(f, lay)
                repaired = True
            found, notes = parents.run(f, lay, path)
            remaining = lay.problems + found
            return CheckReport(problems, repaired, not remaining, remaining, notes)
        finally:
            f.close()
    finally:
        if image_lock is not None:
            image_lock.release()


def _rewrite_header(f: ImageFile, lay: Layout) -> None:
    assert lay.footer is not None and lay.header is not None
    f.pwrite(lay.footer.data_offset, lay.header.pack())
    f.fdatasync()


@dataclasses.dataclass(frozen=True, slots=True)
class _ParentCheck:
    allow_unsafe: bool
    strict_timestamp: bool
    file_factory: Callable[..., ImageFile]

    def run(self, f: ImageFile, lay: Layout, path: str) -> tuple[list[Problem], list[Problem]]:
        """(problems, notes) about the parent chain of a differencing image."""
        if lay.fatal is not None or lay.footer is None or lay.header is None:
            return [], []
        if lay.footer.disk_type != c.DISK_TYPE_DIFFERENCING:
            return [], []
        header: DynamicHeader = lay.header
        try:
            found_by, parent_path = parent_mod.find(f, header, path, allow_unsafe=self.allow_unsafe,
                                                    strict_timestamp=self.strict_timestamp,
                                                    file_factory=self.file_factory)
        except ParentTimestampMismatch as exc:
            return [Problem("parent-timestamp", str(exc), None)], []
        except ParentError as exc:
            return [Problem(_search_code(exc), str(exc), None)], []
        from vhdblkd.vhd.image import open_image  # image imports check's neighbours

        try:
            # The parent's own chain is vetted as open_image does; its links give the notes below.
            with open_image(parent_path, read_only=True, allow_unsafe_parent=self.allow_unsafe,
                            strict_parent_timestamp=self.strict_timestamp, file_factory=self.file_factory,
                            lock=False) as parent:
                link = parent_mod.link_to(path, header, found_by, parent)
                parent_mod.vet(link, strict_timestamp=self.strict_timestamp)
                links = [link] + chain_links(parent)
        except ParentTimestampMismatch as exc:
            return [Problem("parent-timestamp", str(exc), None)], []
        except ParentError as exc:
            return [Problem("parent-mismatch", str(exc), None)], []
        except VhdError as exc:
            return [Problem("parent-corrupt", f"{path}: parent {parent_path}: {exc}", None)], []
        notes = [Problem("parent-timestamp", f"{ln.timestamp_note()}; the unique id matches, so the parent is "
                         f"used (`vhdblkctl set-parent {ln.child} {ln.path}` records its current timestamp)", None)
                 for ln in links if not ln.timestamp_matches]
        return [], notes


def _search_code(exc: ParentError) -> str:
    """The problem code of a failed parent search: a wrong image found beats a damaged one beats none."""
    reasons = {reason for _, _, reason, _ in exc.refused}
    if "wrong-id" in reasons:
        return "parent-mismatch"
    if "unreadable" in reasons:
        return "parent-corrupt"
    return "parent-missing"


def chain_links(image: VhdImage) -> list[ParentLink]:
    """The parent links of an open image's chain, nearest first."""
    links: list[ParentLink] = []
    node: VhdImage | None = image
    while node is not None:
        if node.parent_link is not None:
            links.append(node.parent_link)
        node = node.parent
    return links

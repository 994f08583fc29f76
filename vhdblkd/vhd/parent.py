"""Finding and vetting a differencing image's parent.

Candidates, in order: the W2ru locator (relative, UTF-16LE), the W2ku
locator (absolute, UTF-16LE), the header's parent name (UTF-16BE) taken
relative to the child's directory, and that name's last component in the
child's directory.  A candidate that resolves (after symlinks) outside the
child's directory is refused unless allow_unsafe_parent is set: a crafted
child must not make the daemon open arbitrary files.  That switch means
only this.

Every candidate is tried before the search gives up (find): one that is
missing, unsafe, unreadable or of another unique id is passed over, because
a stale copy where one locator points must not hide the parent at the next.
Candidates are vetted from their footer alone, so a wrong image is never
opened, nor repaired by a read-write open.  The error names each candidate
and why it was refused.

The parent's unique id is its identity: a parent whose id differs from the
one the child records is refused, always.  The parent timestamp is advisory:
Windows 10 writes 0 there and copying a chain gives the parent a new mtime
with the data unchanged (Xen's blktap compares it only in a strict mode that
is off by default).  A mismatch is reported (ParentLink.timestamp_matches);
only strict_parent_timestamp refuses it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import NamedTuple

from vhdblkd.errors import CorruptImage, ParentError, ParentSearchFailed, ParentTimestampMismatch, VhdError
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.base import VhdImage
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.layout import MAX_LOCATOR_LENGTH
from vhdblkd.vhd.record import Frozen
from vhdblkd.vhd.structs import DynamicHeader, Footer, uuid_text
from vhdblkd.vhd.timestamp import vhd_mtime, vhd_timestamp_to_iso

FileFactory = Callable[[str, bool], ImageFile]
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def _locator_text(f: ImageFile, header: DynamicHeader, code: bytes) -> str | None:
    for loc in header.parent_locators:
        if loc.platform_code != code:
            continue
        length = loc.platform_data_length
        if length <= 0 or length > MAX_LOCATOR_LENGTH:
            continue
        if loc.platform_data_offset + length > f.size():
            # A locator pointing outside the file is damage, not a path: check() reports it,
            # and the next candidate (the other locator, the parent name) may still be good.
            continue
        raw = f.pread(loc.platform_data_offset, length)
        if len(raw) != length:
            continue
        text = raw.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        if text:
            return text
    return None


def _to_posix(text: str) -> str:
    return text.replace("\\", "/")


def candidates(f: ImageFile, header: DynamicHeader, child_path: str) -> list[tuple[str, str]]:
    """(description, path) pairs to try, in order."""
    child_dir = os.path.dirname(os.path.abspath(child_path))
    found: list[tuple[str, str]] = []
    rel = _locator_text(f, header, c.PLATFORM_W2RU)
    if rel is not None:
        found.append(("W2ru locator", os.path.join(child_dir, _to_posix(rel))))
    absolute = _locator_text(f, header, c.PLATFORM_W2KU)
    if absolute is not None and not _DRIVE.match(absolute):
        found.append(("W2ku locator", _to_posix(absolute)))
    name = header.parent_name
    if name:
        posix = _to_posix(name)
        if not _DRIVE.match(name):
            found.append(("parent name", os.path.join(child_dir, posix)))
        base = posix.rsplit("/", 1)[-1]
        if base:
            found.append(("parent file name", os.path.join(child_dir, base)))
    return found


def locator_texts(child_path: str, parent_path: str, *, relative: bool = True) -> list[tuple[bytes, str]]:
    """(platform code, text) of the locators pointing `child_path` at `parent_path`, as Windows writes them.

    W2ru: the path relative to the child's directory with backslashes, `.\\` first unless it
    starts with `..`; W2ku: the absolute path (a POSIX one here; readers on Windows fall back to
    the relative locator or the parent name).  Both are stored UTF-16LE.
    """
    parent_abs = os.path.abspath(parent_path)
    texts: list[tuple[bytes, str]] = []
    if relative:
        rel = os.path.relpath(parent_abs, os.path.dirname(os.path.abspath(child_path))).replace("/", "\\")
        texts.append((c.PLATFORM_W2RU, rel if rel.startswith("..") else ".\\" + rel))
    texts.append((c.PLATFORM_W2KU, parent_abs))
    return texts


def parent_name_field(parent_path: str) -> bytes:
    """The header's parent unicode name: the parent's file name, UTF-16BE, NUL padded."""
    name = os.path.basename(os.path.abspath(parent_path)).encode("utf-16-be")[: c.PARENT_NAME_SIZE]
    return name + bytes(c.PARENT_NAME_SIZE - len(name))


def is_within(path: str, directory: str) -> bool:
    real = os.path.realpath(path)
    root = os.path.realpath(directory)
    return real == root or real.startswith(root.rstrip("/") + "/")


def locate(f: ImageFile, header: DynamicHeader, child_path: str, *, allow_unsafe: bool,
           file_factory: FileFactory = ImageFile) -> str:
    """The parent's path, or ParentError saying what was tried and what to do."""
    return find(f, header, child_path, allow_unsafe=allow_unsafe, file_factory=file_factory)[1]


def find(f: ImageFile, header: DynamicHeader, child_path: str, *, allow_unsafe: bool,
         strict_timestamp: bool = False, file_factory: FileFactory = ImageFile) -> tuple[str, str]:
    """(what found it, the parent's path): the first candidate that is the child's parent.

    Every candidate is tried in order; one that is missing, outside the child's directory
    (unless allow_unsafe), unreadable, of another unique id or (with strict_timestamp) of
    another timestamp is passed over, so a stale copy where the first locator points does
    not hide the real parent at the next.  Only the footer of a candidate is read, so a
    wrong image is never opened (nor repaired by a read-write open).  When none is the
    parent: ParentSearchFailed naming every candidate and why it was refused, or
    ParentTimestampMismatch when the only ones with the right id were refused for their
    timestamp.
    """
    child_dir = os.path.dirname(os.path.abspath(child_path))
    exists = getattr(file_factory, "exists", os.path.isfile)
    refused: list[Refusal] = []
    seen: set[str] = set()
    for what, path in candidates(f, header, child_path):
        norm = os.path.normpath(path)
        if norm in seen:
            continue  # the locators and the name often name one file: try it, and list it, once
        seen.add(norm)
        reason = _refusal(norm, header, child_path, allow_unsafe, strict_timestamp, exists, file_factory)
        if reason is None:
            return what, norm
        refused.append(Refusal(what, norm, *reason))
    raise _search_failed(child_path, child_dir, header, refused)


class Refusal(NamedTuple):
    """One candidate the parent search passed over, and why."""

    found_by: str
    path: str
    reason: str  # "not-found", "unsafe", "unreadable", "wrong-id", "timestamp"
    detail: str

    def __str__(self) -> str:
        return f"{self.found_by} {self.path}: {self.detail}"


def _refusal(path: str, header: DynamicHeader, child_path: str, allow_unsafe: bool, strict_timestamp: bool,
             exists: Callable[[str], bool], file_factory: FileFactory) -> tuple[str, str] | None:
    """None if `path` is the child's parent, else (reason, words)."""
    child_dir = os.path.dirname(os.path.abspath(child_path))
    if not exists(path):
        return "not-found", "not found"
    if not allow_unsafe and not is_within(path, child_dir):
        # Checked before the file is read: a crafted child must not make us open it at all.
        return "unsafe", f"lies outside the child's directory {child_dir}"
    try:
        unique_id, mtime = identify(path, file_factory)
    except (OSError, VhdError) as exc:
        return "unreadable", f"unreadable ({exc})"
    if unique_id != header.parent_unique_id:
        return "wrong-id", (f"unique id {uuid_text(unique_id)}, but the child expects "
                            f"{uuid_text(header.parent_unique_id)}: a different image")
    link = ParentLink(child_path, path, "", header.parent_unique_id, unique_id, header.parent_timestamp, mtime)
    if strict_timestamp and not link.timestamp_matches:
        return "timestamp", link.timestamp_words()
    return None


def identify(path: str, file_factory: FileFactory = ImageFile) -> tuple[bytes, int]:
    """(unique id, VHD mtime) of the image at `path`, from its footer alone (CorruptImage if it has none).

    The trailing footer (512 bytes, or the old 511-byte form) first, then the copy a
    dynamic image keeps at offset 0, as layout.scan reads them.
    """
    f = file_factory(path, False)
    try:
        size = f.size()
        tail = c.SECTOR_SIZE - 1 if size % c.SECTOR_SIZE == c.SECTOR_SIZE - 1 else c.SECTOR_SIZE
        for offset, length in ((size - tail, tail), (0, c.SECTOR_SIZE)):
            if offset < 0:
                continue
            raw = f.pread(offset, length)
            if len(raw) != length:
                continue
            try:
                footer = Footer.unpack(raw + bytes(c.SECTOR_SIZE - length), 0)
            except CorruptImage:
                continue
            return footer.unique_id, vhd_mtime(f.mtime())
        raise CorruptImage(f"{path}: no valid VHD footer at its end or at offset 0; not a VHD image")
    finally:
        f.close()


def _search_failed(child: str, child_dir: str, header: DynamicHeader, refused: list[Refusal]) -> ParentError:
    """The error when no candidate is the parent: each one tried, why it was refused, what to do."""
    expected = uuid_text(header.parent_unique_id)
    tried = "; ".join(map(str, refused)) or "no locator or name present"
    reasons = {r.reason for r in refused}
    if reasons <= {"not-found"}:
        head = f"{child}: parent image not found"
    else:
        head = f"{child}: no candidate is the parent image (unique id {expected})"
    todo = [f"point the child at the image whose unique id is {expected}: vhdblkctl set-parent {child} PARENT"]
    if "unsafe" in reasons:
        todo.insert(0, f"if you trust a candidate outside {child_dir}, pass allow_unsafe_parent=True "
                       "(vhdblkctl: --allow-unsafe-parent, vhdtab: allow_unsafe_parent)")
    if "not-found" in reasons and len(reasons) == 1:
        todo.insert(0, "put the parent back")
    if "wrong-id" in reasons:
        todo.append("only if a candidate holds the very same data under a new id: "
                    f"vhdblkctl set-parent --ignore-id-mismatch {child} THAT-CANDIDATE")
    text = f"{head} (tried: {tried}); {', or '.join(todo)}"
    if "timestamp" in reasons:
        return ParentTimestampMismatch(
            f"{text}. A timestamp was refused because strict_parent_timestamp is set (vhdblkctl: "
            "--strict-parent-timestamp, vhdtab: strict_parent_timestamp); without that option a parent "
            f"whose unique id matches is accepted, or `vhdblkctl set-parent {child} PARENT` records the "
            "parent's current timestamp", refused)
    return ParentSearchFailed(text, refused)


class ParentLink(Frozen):
    """One child-to-parent step of a chain: where the parent was found and how it compares.

    Timestamps are VHD seconds; expected_timestamp is the child's parent_timestamp
    field (0: not recorded, as Windows 10 writes), timestamp the parent file's mtime.
    """

    __slots__ = ("child", "path", "found_by", "expected_unique_id", "unique_id", "expected_timestamp", "timestamp")
    child: str
    path: str
    found_by: str
    expected_unique_id: bytes
    unique_id: bytes
    expected_timestamp: int
    timestamp: int

    def __init__(self, child: str, path: str, found_by: str, expected_unique_id: bytes, unique_id: bytes,
                 expected_timestamp: int, timestamp: int) -> None:
        # A Frozen record, not a dataclass: making one at import was a tenth of `info` on a differencing image.
        self._init(child=child, path=path, found_by=found_by, expected_unique_id=expected_unique_id,
                   unique_id=unique_id, expected_timestamp=expected_timestamp, timestamp=timestamp)

    @property
    def id_matches(self) -> bool:
        return self.unique_id == self.expected_unique_id

    @property
    def timestamp_matches(self) -> bool:
        return self.timestamp == self.expected_timestamp

    def timestamp_note(self) -> str:
        """Why the timestamps differ, in words, naming the child and the parent."""
        return f"{self.child}: parent {self.path}: {self.timestamp_words()}"

    def timestamp_words(self) -> str:
        """Why the timestamps differ, in words."""
        now = vhd_timestamp_to_iso(self.timestamp)
        if self.expected_timestamp == 0:
            what = (f"the child records no parent timestamp (0, as Windows 10 writes); the parent's "
                    f"mtime is {now}")
        else:
            what = (f"the child records parent timestamp {vhd_timestamp_to_iso(self.expected_timestamp)}, "
                    f"the parent's mtime is {now} (the parent was copied or touched)")
        return what


def link_to(child: str, header: DynamicHeader, found_by: str, parent: VhdImage) -> ParentLink:
    """The link from `child` (whose dynamic header is `header`) to the opened `parent`."""
    return ParentLink(child, parent.path, found_by, header.parent_unique_id, parent.footer.unique_id,
                      header.parent_timestamp, vhd_mtime(parent.file_mtime()))


def vet(link: ParentLink, *, strict_timestamp: bool) -> None:
    """Refuse a parent that is not the child's (ParentError); with strict_timestamp, a changed one too."""
    if not link.id_matches:
        expected = uuid_text(link.expected_unique_id)
        raise ParentError(
            f"{link.child}: parent {link.path} (found through the {link.found_by}) has unique id "
            f"{uuid_text(link.unique_id)}, but the child expects {expected}: it is a different image "
            "(reading through it would show wrong data). Point the child at the image whose unique id is "
            f"{expected} with `vhdblkctl set-parent {link.child} PARENT`; only if {link.path} holds the "
            f"very same data under a new id: `vhdblkctl set-parent --ignore-id-mismatch {link.child} {link.path}`")
    if strict_timestamp and not link.timestamp_matches:
        raise ParentTimestampMismatch(
            f"{link.timestamp_note()}; refused because strict_parent_timestamp is set (vhdblkctl: "
            "--strict-parent-timestamp, vhdtab: strict_parent_timestamp). The unique id matches: without "
            f"that option the parent is accepted, or `vhdblkctl set-parent {link.child} {link.path}` records "
            "the parent's current timestamp")

"""Finding and vetting a differencing image's parent.

Candidates, in order: the W2ru locator (relative, UTF-16LE), the W2ku
locator (absolute, UTF-16LE), the header's parent name (UTF-16BE) taken
relative to the child's directory, and that name's last component in the
child's directory.  A candidate that resolves (after symlinks) outside the
child's directory is refused unless allow_unsafe_parent is set: a crafted
child must not make the daemon open arbitrary files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from vhdblkd.errors import ParentError
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.layout import MAX_LOCATOR_LENGTH
from vhdblkd.vhd.structs import DynamicHeader

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


def is_within(path: str, directory: str) -> bool:
    real = os.path.realpath(path)
    root = os.path.realpath(directory)
    return real == root or real.startswith(root.rstrip("/") + "/")


def locate(f: ImageFile, header: DynamicHeader, child_path: str, *, allow_unsafe: bool,
           exists: Callable[[str], bool] = os.path.isfile) -> str:
    """The parent's path, or ParentError saying what was tried and what to do."""
    child_dir = os.path.dirname(os.path.abspath(child_path))
    tried: list[str] = []
    unsafe: list[str] = []
    for what, path in candidates(f, header, child_path):
        norm = os.path.normpath(path)
        if not exists(norm):
            tried.append(f"{what} {norm}")
            continue
        if not allow_unsafe and not is_within(norm, child_dir):
            unsafe.append(f"{what} {norm}")
            continue
        return norm
    if unsafe:
        raise ParentError(
            f"{child_path}: the parent image ({'; '.join(unsafe)}) lies outside the child's directory "
            f"{child_dir}; pass allow_unsafe_parent=True (vhdblkctl: --allow-unsafe-parent) if you trust it")
    raise ParentError(
        f"{child_path}: parent image not found (tried: {'; '.join(tried) or 'no locator or name present'}); "
        "put the parent next to the child or fix the locators")

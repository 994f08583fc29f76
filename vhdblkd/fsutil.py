"""File-system chores every layer needs (stdlib only, so any layer may import it)."""

from __future__ import annotations

import os


def remove_quietly(path: str | os.PathLike[str]) -> None:
    """Unlink `path`; a file that is already gone is what we wanted."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Make the names in directory `path` durable (after a create, link or rename in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

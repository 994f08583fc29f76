"""The two parent switches every command that opens a differencing chain takes.

They are unrelated safety checks with one meaning each: --allow-unsafe-parent
is about where a parent lies, --strict-parent-timestamp about its mtime (the
unique id is what identifies a parent, always checked).
"""

from __future__ import annotations

import argparse

ALLOW_UNSAFE_PARENT_HELP = ("follow a differencing image's parent even where it lies outside the image's folder "
                            "(an absolute path, .. or a symlink); trust the image first")
STRICT_PARENT_TIMESTAMP_HELP = (
    "refuse a parent whose modification time differs from the timestamp its child records. By default "
    "the parent's unique id alone identifies it, and a differing timestamp (a copied chain, a child made "
    "by Windows 10, which records 0) is only reported")


def add_parent_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-unsafe-parent", action="store_true", help=ALLOW_UNSAFE_PARENT_HELP)
    p.add_argument("--strict-parent-timestamp", action="store_true", help=STRICT_PARENT_TIMESTAMP_HELP)

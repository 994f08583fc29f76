"""vhdblkctl set-parent: point a differencing image at its parent's new place.

Exit codes: 0 success; 1 refused or failed (wrong parent, image in use,
not a differencing image); 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys

from .image_cmds import guard
from .maint_cmds import quiet_recovery
from .parent_args import ALLOW_UNSAFE_PARENT_HELP

# vhd.set_parent.SetParentResult's fields, written out so the parser imports no engine (a test keeps them equal).
SET_PARENT_KEYS = ("child", "parent", "previous_parent", "parent_unique_id", "previous_parent_unique_id",
                   "unique_id_updated", "parent_timestamp", "relative_locator", "absolute_locator", "blocks_moved",
                   "outside_child_directory")


COMMANDS = ("set-parent",)  # what register() adds, in order


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "set-parent", help="point a differencing image at its moved, renamed or copied parent",
        description="Rewrite CHILD's parent locators (the relative and the absolute path) and parent name "
        "to point at NEWPARENT, and record NEWPARENT's current timestamp. NEWPARENT must have the unique id "
        "CHILD records (the id is what makes it CHILD's parent; a copy keeps it). Refused while CHILD is "
        "attached or open elsewhere, and while NEWPARENT is open read-write. Crash-safe: an interruption "
        "leaves CHILD opening through the old or the new parent. "
        f"--json keys: {', '.join(SET_PARENT_KEYS)}.")
    p.add_argument(
        "--ignore-id-mismatch", action="store_true",
        help="accept a NEWPARENT whose unique id differs and record its id in CHILD. Only safe when NEWPARENT "
        "holds exactly the data CHILD was made on (e.g. the same parent re-created by another tool); any other "
        "image makes CHILD show wrong data")
    p.add_argument("--allow-unsafe-parent", action="store_true",
                   help=f"for NEWPARENT's own parents: {ALLOW_UNSAFE_PARENT_HELP}")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("child", metavar="CHILD")
    p.add_argument("new_parent", metavar="NEWPARENT")
    p.set_defaults(func=cmd_set_parent)


def cmd_set_parent(args: argparse.Namespace) -> int:
    return guard(args.child, lambda: _set_parent(args))


def _set_parent(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from ..vhd import set_parent as vhd_set_parent

    with quiet_recovery(bool(getattr(args, "verbose", False))):
        r = vhd_set_parent.set_parent(args.child, args.new_parent, ignore_id_mismatch=args.ignore_id_mismatch,
                                      allow_unsafe_parent=args.allow_unsafe_parent)
    if args.json:
        json.dump(dataclasses.asdict(r), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{r.child}: parent is now {r.parent} (relative {r.relative_locator}; unique id {r.parent_unique_id}, "
          f"timestamp {r.parent_timestamp})")
    if r.unique_id_updated:
        print(f"{r.child}: the recorded parent unique id changed from {r.previous_parent_unique_id}")
    if r.outside_child_directory:
        print(f"{r.child}: the parent lies outside the child's folder: opening the child needs "
              "--allow-unsafe-parent (vhdtab: allow_unsafe_parent)")
    return 0

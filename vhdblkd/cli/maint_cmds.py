"""Image maintenance commands: compact, resize, snapshot, merge.

Each works on an image no one else has open read-write (the image's flock;
the refusal names the holder) and leaves a valid image if interrupted.

Exit codes: 0 success; 1 the operation failed or was refused (missing or
locked image, shrinking would lose data without --yes, wrong image type);
2 bad usage.
--json prints one object with the keys listed in each command's help.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .image_cmds import EXIT_OK, guard  # the image commands' one policy for error lines and exit codes
from .parent_args import STRICT_PARENT_TIMESTAMP_HELP
from .sizes import SizeError, format_size, parse_size

# The vhd engines are imported by the command that runs, not by the parser (see image_cmds).

COMPACT_KEYS = ("path", "type", "blocks_before", "blocks_freed", "blocks_after", "file_size_before",
                "file_size_after")
RESIZE_KEYS = ("path", "type", "old_size", "new_size", "blocks_moved", "data_discarded")
SNAPSHOT_KEYS = ("image", "snapshot", "read_only_parent")
MERGE_KEYS = ("child", "parent", "blocks_merged", "bytes_merged", "child_removed", "live_image")


COMMANDS = ("compact", "resize", "snapshot", "merge")  # what register() adds, in order


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add compact, resize, snapshot and merge to vhdblkctl's argparse tree."""
    p = subparsers.add_parser(
        "compact", help="give back zero blocks and shrink the file",
        description="Free the blocks of a dynamic or differencing image that read as zeros (for a child: "
        "whose parent reads zeros there too, or that hold no sector of the child) and move the last "
        "blocks into the holes, then truncate. Crash-safe: an interruption leaves a valid image with "
        f"the same data. --json keys: {', '.join(COMPACT_KEYS)}.")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--allow-unsafe-parent", action="store_true", help="follow a parent outside the image's folder")
    p.add_argument("--strict-parent-timestamp", action="store_true", help=STRICT_PARENT_TIMESTAMP_HELP)
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_compact)

    p = subparsers.add_parser(
        "resize", help="grow (or shrink) an image's virtual size",
        description="Change the virtual size of a fixed, dynamic or differencing image (rounded up to a "
        "whole disk geometry, as create does, unless the image stores an exact size). Shrinking needs --shrink, "
        "and --yes as well when the cut-off range holds data. A differencing image can only grow; "
        "past its parent's end it reads zeros, and merging it needs the parent grown first. "
        f"--json keys: {', '.join(RESIZE_KEYS)}.")
    p.add_argument("--size", required=True, type=_size_arg, help="new virtual size, e.g. 20G")
    p.add_argument("--shrink", action="store_true", help="allow making the disk smaller")
    p.add_argument("--yes", action="store_true", help="confirm losing the data past the new end")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_resize)

    p = subparsers.add_parser(
        "snapshot", help="start a differencing child of an image",
        description="Create NEW as an empty differencing image whose parent is IMAGE. From then on "
        "IMAGE must not change (write to NEW; changing IMAGE corrupts what NEW shows). "
        f"--json keys: {', '.join(SNAPSHOT_KEYS)}.")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("new", metavar="NEW")
    p.set_defaults(func=cmd_snapshot)

    p = subparsers.add_parser(
        "merge", help="fold a differencing child into its parent",
        description="Write every sector a differencing image holds into its parent; the parent is "
        "then the live image. The child is kept (it adds nothing to the parent any more) unless "
        "--remove. An interrupted merge leaves both valid: run it again to finish. "
        f"--json keys: {', '.join(MERGE_KEYS)}.")
    p.add_argument("--remove", action="store_true", help="delete the child after a successful merge")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--allow-unsafe-parent", action="store_true", help="follow a parent outside the image's folder")
    p.add_argument("--strict-parent-timestamp", action="store_true", help=STRICT_PARENT_TIMESTAMP_HELP)
    p.add_argument("child", metavar="CHILD")
    p.set_defaults(func=cmd_merge)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


@contextmanager
def quiet_recovery(verbose: bool) -> Iterator[None]:
    """Moving blocks is what compact and resize are for: no warning per block unless -v."""
    import logging

    logger = logging.getLogger("vhdblkd.vhd.recovery")
    old = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _print(args: argparse.Namespace, result: dict[str, object], text: Callable[[], str]) -> None:
    if args.json:
        import json

        json.dump(result, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    else:
        print(text())


def cmd_compact(args: argparse.Namespace) -> int:
    return guard(args.image, lambda: _compact(args))


def _compact(args: argparse.Namespace) -> int:
    from ..vhd import compact as vhd_compact
    from .progress import ProgressBar

    with quiet_recovery(bool(getattr(args, "verbose", False))), ProgressBar("compact") as bar:
        r = vhd_compact.compact(args.image, progress=bar, allow_unsafe_parent=args.allow_unsafe_parent,
                                strict_parent_timestamp=args.strict_parent_timestamp)
    result: dict[str, object] = {
        "path": r.path, "type": r.disk_type, "blocks_before": r.blocks_before, "blocks_freed": r.blocks_freed,
        "blocks_after": r.blocks_after, "file_size_before": r.file_size_before, "file_size_after": r.file_size_after}
    _print(args, result, lambda: (
        f"{r.path}: freed {r.blocks_freed} of {r.blocks_before} blocks; file "
        f"{format_size(r.file_size_before)} -> {format_size(r.file_size_after)}"))
    return EXIT_OK


def cmd_resize(args: argparse.Namespace) -> int:
    return guard(args.image, lambda: _resize(args))


def _resize(args: argparse.Namespace) -> int:
    from ..vhd import resize as vhd_resize
    from .progress import ProgressBar

    with quiet_recovery(bool(getattr(args, "verbose", False))), ProgressBar("resize") as bar:
        r = vhd_resize.resize(args.image, args.size, shrink=args.shrink, discard_data=args.yes, progress=bar)
    result: dict[str, object] = {
        "path": r.path, "type": r.disk_type, "old_size": r.old_size, "new_size": r.new_size,
        "blocks_moved": r.blocks_moved, "data_discarded": r.data_discarded}
    _print(args, result, lambda: (
        f"{r.path}: {format_size(r.old_size)} -> {format_size(r.new_size)} ({r.new_size} bytes)"
        + ("; data past the new end was discarded" if r.data_discarded else "")))
    return EXIT_OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    return guard(args.new, lambda: _snapshot(args))


def _snapshot(args: argparse.Namespace) -> int:
    from ..vhd import merge as vhd_merge

    vhd_merge.snapshot(args.image, args.new)
    result: dict[str, object] = {"image": args.image, "snapshot": args.new, "read_only_parent": True}
    _print(args, result, lambda: (
        f"{args.new}: new differencing image on {args.image}; write to {args.new} from now on. "
        f"{args.image} is now read-only by convention: changing it corrupts {args.new}."))
    return EXIT_OK


def cmd_merge(args: argparse.Namespace) -> int:
    return guard(args.child, lambda: _merge(args))


def _merge(args: argparse.Namespace) -> int:
    import os

    from ..vhd import merge as vhd_merge
    from .progress import ProgressBar

    with ProgressBar("merge") as bar:
        r = vhd_merge.merge(args.child, progress=bar, allow_unsafe_parent=args.allow_unsafe_parent,
                            strict_parent_timestamp=args.strict_parent_timestamp)
    if args.remove:
        os.unlink(args.child)
    result: dict[str, object] = {
        "child": r.child, "parent": r.parent, "blocks_merged": r.blocks_merged, "bytes_merged": r.bytes_merged,
        "child_removed": bool(args.remove), "live_image": r.parent}
    _print(args, result, lambda: (
        f"{r.child}: merged {format_size(r.bytes_merged)} in {r.blocks_merged} blocks into {r.parent}; "
        f"{r.parent} is the live image now" + (f" ({r.child} removed)" if args.remove else "")))
    return EXIT_OK

"""Image commands that work on files directly: create, info, check, convert.

Exit codes (the same for every command here):
  0  success (check: the image is clean)
  1  the operation failed (check: problems were found, or repaired with --repair)
  2  bad usage, or the image cannot be opened at all
Errors are one line on stderr that names the file and says what to do next.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from ..errors import DiskFull, ImageLocked, ParentError, VhdblkError
from ..vhd import constants as vhd_constants
from .parent_args import add_parent_args
from .sizes import SizeError, format_size, format_size_exact, parse_size

# typing costs a tenth of `vhdblkctl --help`; mypy treats any TYPE_CHECKING name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..vhd import check as vhd_check
    from ..vhd.info import ChainLevel, ImageInfo

# Building the parser (and --help) imports no engine: each command imports
# the vhd modules it uses when it runs. Finding (python -X importtime): the
# parser imported every engine, so `--help` ran 391M instructions (callgrind)
# against `python -c pass`'s 87M; now 144M.

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNUSABLE = 2  # bad usage, or the image cannot be opened

DISK_TYPES = tuple(vhd_constants.DISK_TYPE_NAMES.values())  # fixed, dynamic, differencing
CONVERT_TARGETS = ("raw", "fixed", "dynamic")  # vhd.copy.Target's values (a test keeps them equal)


class UsageError(VhdblkError):
    """The command line asks for something that cannot be done; exit code 2."""

    exit_code = EXIT_UNUSABLE


COMMANDS = ("create", "info", "check", "convert")  # what register() adds, in order


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add create, info, check and convert to vhdblkctl's argparse tree."""
    p = subparsers.add_parser(
        "create",
        help="create a new VHD image",
        description="Create a new VHD image. Refuses to overwrite an existing file.",
    )
    p.add_argument("--type", choices=DISK_TYPES, default=None, help="image type (default: dynamic; differencing when --parent is given)")
    p.add_argument("--size", type=_size_arg, help="virtual size: bytes or with K/M/G/T (binary), e.g. 10G, 1.5G, 512M; not for differencing")
    p.add_argument("--block-size", type=_size_arg, default=None, help="block size of a dynamic or differencing image (default 2M; differencing: the parent's)")
    p.add_argument("--exact-size", action="store_true", help="keep the size exactly as given instead of rounding up to a whole disk geometry")
    p.add_argument("--azure", action="store_true", help="fixed image that Azure accepts (size a whole number of MiB)")
    p.add_argument("--parent", help="parent image of a differencing image (stored as a relative path)")
    p.add_argument("--json", action="store_true", help="print the new image's info as JSON")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_create)

    p = subparsers.add_parser(
        "info",
        help="show an image's metadata",
        description="Show an image's metadata. Opens the image read-only and never changes a byte.",
    )
    p.add_argument("--json", action="store_true", help="print JSON with stable keys")
    p.add_argument("image", metavar="IMAGE")
    add_parent_args(p)
    p.set_defaults(func=cmd_info, lazy_logging=True)  # only the format layer's lazy loggers may speak

    p = subparsers.add_parser(
        "check",
        help="check an image's metadata for damage",
        description="Check an image for damage. Without --repair the image is not changed. "
        "Exit 0: clean; 1: problems found (or repaired); 2: the image cannot be opened.",
    )
    p.add_argument("--repair", action="store_true", help="fix what can be fixed safely")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("image", metavar="IMAGE")
    add_parent_args(p)
    p.set_defaults(func=cmd_check)

    p = subparsers.add_parser(
        "convert",
        help="convert between raw and VHD images",
        description="Copy SRC (a VHD of any type, differencing chains flattened, or a raw file) into a new file DST. "
        "All-zero data is not written: raw output stays sparse and dynamic VHD blocks stay unallocated. "
        "DST must not exist; it appears only when complete.",
    )
    p.add_argument("--to", choices=CONVERT_TARGETS, default=None, help="output format (default: dynamic for *.vhd, else raw)")
    p.add_argument("--block-size", type=_size_arg, default=None, help="block size of a dynamic output (default 2M)")
    p.add_argument("--progress", action="store_true", help="show a progress bar (only when stderr is a terminal)")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    add_parent_args(p)
    p.set_defaults(func=cmd_convert)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


# --- create -------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    return guard(args.image, lambda: _create(args))


def _create(args: argparse.Namespace) -> int:  # noqa: C901  one flat list of option checks, one per usage error
    from pathlib import Path

    from ..fsutil import remove_quietly
    from ..vhd import copy as vhd_copy
    from ..vhd import create as vhd_create
    from ..vhd import image as vhd_image
    from .progress import ProgressBar

    path = Path(args.image)
    size: int | None = args.size
    parent: str | None = args.parent
    disk_type: str = args.type or ("differencing" if parent else "dynamic")
    if disk_type == "differencing":
        if parent is None:
            raise UsageError(f"{path}: a differencing image needs --parent PARENT")
        if size is not None:
            raise UsageError(f"{path}: a differencing image takes its size from the parent; drop --size")
        if args.exact_size:
            raise UsageError(f"{path}: --exact-size does not apply to differencing images (the size is the parent's)")
    else:
        if parent is not None:
            raise UsageError(f"{path}: --parent needs --type differencing (or no --type)")
        if size is None:
            raise UsageError(f"{path}: give the virtual size with --size, e.g. --size 10G")
    if args.azure and disk_type != "fixed":
        raise UsageError(f"{path}: --azure applies to fixed images only; add --type fixed")
    if args.block_size is not None and disk_type == "fixed":
        raise UsageError(f"{path}: fixed images have no blocks; drop --block-size")
    if os.path.lexists(path):
        raise vhd_copy.ConvertError(f"{path}: already exists; remove it or choose another name (create never overwrites)")
    if not path.parent.is_dir():
        raise vhd_copy.ConvertError(f"{path}: the folder {path.parent} does not exist; create it first")

    try:
        if disk_type == "fixed":
            assert size is not None
            with ProgressBar("create") as bar:
                vhd_create.create_fixed(str(path), size, exact_size=args.exact_size, azure=args.azure, progress=bar if bar.enabled else None)
        elif disk_type == "dynamic":
            block_size = args.block_size if args.block_size is not None else vhd_constants.DEFAULT_BLOCK_SIZE
            assert size is not None
            vhd_create.create_dynamic(str(path), size, block_size=block_size, exact_size=args.exact_size)
        else:
            assert parent is not None
            vhd_create.create_differencing(str(path), parent, block_size=args.block_size)
    except FileExistsError:
        raise
    except BaseException:
        # The file did not exist before; a half-made image is worse than none.
        remove_quietly(path)
        raise
    if args.json:
        with vhd_image.open_image(str(path), read_only=True, lock=False, allow_unsafe_parent=True) as image:
            _print_json(image.info().as_dict())
    return EXIT_OK


# --- info ---------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    return guard(args.image, lambda: _info(args), open_failure=EXIT_UNUSABLE)


def _info(args: argparse.Namespace) -> int:
    from ..vhd import image as vhd_image

    # No lock: info only reads, and must work on an image that is attached.
    with vhd_image.open_image(args.image, read_only=True, lock=False, allow_unsafe_parent=args.allow_unsafe_parent,
                              strict_parent_timestamp=args.strict_parent_timestamp) as image:
        info = image.info()
    if args.json:
        _print_json(info.as_dict())
    else:
        for label, value in info_rows(info):
            print(f"{label + ':' if label else '':<18}{value}")
    return EXIT_OK


def info_rows(info: ImageInfo) -> list[tuple[str, str]]:
    """The human table for `vhdblkctl info`: (label, text) pairs."""
    from ..vhd.geometry import MAX_GEOMETRY

    rows = [("image", _text(info.path)), ("type", _text(info.disk_type))]
    rows.append(("virtual size", format_size_exact(info.virtual_size)))
    c, h, s = info.geometry
    chs_text = f"C/H/S {c}/{h}/{s}"
    if info.geometry == MAX_GEOMETRY:
        chs_text += " (the maximum: readers take the size from the footer's current size)"
    else:
        chs_text += f" = {info.geometry.total_sectors * vhd_constants.SECTOR_SIZE:,} bytes"
    rows.append(("geometry", chs_text))
    rows.append(("creator", f"{_text(info.creator_app)} {_text(info.creator_version)} on {_text(info.creator_os)}"))
    rows.append(("unique id", _text(info.unique_id)))
    rows.append(("timestamp", _text(info.timestamp)))
    if info.block_size is not None and info.block_size > 0:
        rows.append(("block size", format_size(info.block_size)))
        rows.append(("allocated blocks", f"{info.allocated_blocks} of {info.total_blocks}"))
    rows.append(("file size", format_size_exact(info.file_size)))
    if info.parent is not None:
        rows.append(("parent", f"{_text(info.parent.path)} (unique id {_text(info.parent.unique_id)})"))
    if info.chain:
        for n, level in enumerate(info.chain, start=1):
            rows.append(("parent chain" if n == 1 else "", f"{n}. {_level_text(level)}"))
    elif info.parent_chain:
        rows.append(("parent chain", " -> ".join(_text(path) for path in info.parent_chain)))
    if info.parent_timestamp_matches is False or any(not level.timestamp_matches for level in info.chain):
        rows.append(("note", "a parent timestamp differs from the parent's modification time (a copied "
                             "chain, or a child that records none); the unique ids match, so the chain is "
                             "used. `vhdblkctl set-parent CHILD PARENT` records the current timestamp"))
    rows.append(("checksums", _checksum_text(info)))
    return rows


def _level_text(level: ChainLevel) -> str:
    ids = "unique id matches" if level.id_matches else f"unique id {level.unique_id} DIFFERS"
    if level.timestamp_matches:
        stamp = "timestamp matches"
    else:
        recorded = level.expected_timestamp or "0 (none)"
        stamp = f"timestamp differs (child records {recorded}, file {level.timestamp})"
    return f"{level.disk_type} {level.path} (by {level.found_by}): {ids}, {stamp}"


def _text(value: str) -> str:
    return value if value else "-"


def _checksum_text(info: ImageInfo) -> str:
    parts = [f"footer {'ok' if info.footer_checksum_ok else 'BAD'}"]
    if info.header_checksum_ok is not None:
        parts.append(f"header {'ok' if info.header_checksum_ok else 'BAD'}")
    return ", ".join(parts)


def _print_json(value: object) -> None:
    import json

    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# --- check --------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    return guard(args.image, lambda: _check(args), open_failure=EXIT_UNUSABLE)


def _check(args: argparse.Namespace) -> int:
    from ..vhd import check as vhd_check

    report = vhd_check.check_image(args.image, repair=args.repair, allow_unsafe_parent=args.allow_unsafe_parent,
                                   strict_parent_timestamp=args.strict_parent_timestamp)
    remaining = list(report.remaining) if args.repair else list(report.problems)
    if args.json:
        _print_json(
            {
                "path": args.image,
                "clean": not report.problems,
                "repaired": report.repaired,
                "problems": [_problem_json(p) for p in report.problems],
                "remaining": [_problem_json(p) for p in remaining],
                "notes": [_problem_json(n) for n in report.notes],
            }
        )
    else:
        for note in report.notes:
            print(f"{args.image}: note: {note.code}: {note.message}")
        for problem in report.problems:
            where = "" if problem.offset is None else f" at offset {problem.offset}"
            print(f"{args.image}: {problem.code}{where}: {problem.message}")
        if not report.problems:
            print(f"{args.image}: clean")
        elif args.repair and not remaining:
            print(f"{args.image}: repaired {len(report.problems)} problem(s); the image is now clean")
        elif args.repair:
            print(f"{args.image}: {len(remaining)} problem(s) remain after repair; restore the image from a backup")
        else:
            print(f"{args.image}: {len(report.problems)} problem(s); run `vhdblkctl check --repair {args.image}` to fix what can be fixed")
    return EXIT_OK if not report.problems else EXIT_FAILED


def _problem_json(problem: vhd_check.Problem) -> dict[str, object]:
    return {"code": problem.code, "message": problem.message, "offset": problem.offset}


# --- convert ------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    # Errors may concern either file; both names are known to the guard.
    return guard(f"{args.src}\0{args.dst}", lambda: _convert(args))


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..vhd import copy as vhd_copy
    from .progress import ProgressBar

    src, dst = Path(args.src), Path(args.dst)
    target = vhd_copy.Target(args.to) if args.to else vhd_copy.default_target(dst)
    if args.block_size is not None and target is not vhd_copy.Target.DYNAMIC:
        raise UsageError(f"{dst}: --block-size applies to --to dynamic only")
    block_size = args.block_size if args.block_size is not None else vhd_constants.DEFAULT_BLOCK_SIZE
    with ProgressBar("convert", enabled=None if args.progress else False) as bar:
        vhd_copy.convert(
            src,
            dst,
            target=target,
            block_size=block_size,
            progress=bar if bar.enabled else None,
            allow_unsafe_parent=args.allow_unsafe_parent,
            strict_parent_timestamp=args.strict_parent_timestamp,
        )
    return EXIT_OK


# --- errors -------------------------------------------------------------------


def guard(path: str, action: Callable[[], int], *, open_failure: int = EXIT_FAILED) -> int:
    """Run a command; turn expected failures into one stderr line and an exit code.

    `path` is the file the command is about (for convert: "SRC\\0DST").
    """
    try:
        return action()
    except UsageError as exc:
        return _fail(str(exc), EXIT_UNUSABLE, path)
    except DiskFull as exc:
        return _fail(_with_hint(str(exc), "free some space on that file system and retry"), EXIT_FAILED, path)
    except (ImageLocked, ParentError) as exc:
        # Their messages already say whom to stop or where the parent must be.
        return _fail(str(exc), open_failure, path)
    except VhdblkError as exc:
        # vhd.copy's ConvertError (1) and SourceUnreadable (2) carry their exit codes.
        return _fail(str(exc), getattr(exc, "exit_code", open_failure), path)
    except FileNotFoundError as exc:
        return _fail(f"{exc.filename or _last(path)}: no such file; check the path", open_failure, path)
    except PermissionError as exc:
        return _fail(f"{exc.filename or _last(path)}: permission denied; run as a user who may access it", open_failure, path)
    except IsADirectoryError as exc:
        return _fail(f"{exc.filename or _last(path)}: is a directory; give an image file", open_failure, path)
    except OSError as exc:
        return _fail(f"{exc.filename or _last(path)}: {exc.strerror or exc}; check the disk and the path", EXIT_FAILED, path)


def _fail(message: str, code: int, path: str) -> int:
    # Format-layer messages name the file when they concern its content; a
    # few (sizes, block sizes) do not, and every error line must.
    names = path.split("\0")
    if not any(name in message for name in names):
        message = f"{names[-1]}: {message}"
    print(f"vhdblkctl: {message}", file=sys.stderr)
    return code


def _with_hint(message: str, hint: str) -> str:
    return message if ";" in message else f"{message}; {hint}"


def _last(path: str) -> str:
    return path.split("\0")[-1]

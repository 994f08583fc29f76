"""vhdblkctl entry point: one argparse tree, each command family in its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import VhdblkError

# Each module exposes register(subparsers); a command sets `func(args) -> int`.
# Image commands work on files directly; device commands talk to the daemon
# over its control socket only.
COMMAND_MODULES = (
    "vhdblkd.cli.image_cmds",
    "vhdblkd.cli.device_cmds",
    "vhdblkd.cli.maint_cmds",
    "vhdblkd.cli.parent_cmds",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vhdblkctl", description="Manage VHD images and their /dev/nbdN attachments.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="vhdblkctl: %(message)s")
    try:
        rc: int = args.func(args)
    except VhdblkError as exc:
        print(f"vhdblkctl: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        print("vhdblkctl: interrupted", file=sys.stderr)
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())

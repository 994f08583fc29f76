"""vhdblkctl entry point: one argparse tree, each command family in its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import VhdblkError
from . import device_cmds, image_cmds, maint_cmds, parent_cmds

# Each module has register(subparsers); a command sets `func(args) -> int`.
# Image commands work on files directly; device commands talk to the daemon
# over its control socket only.
COMMAND_MODULES = (image_cmds, device_cmds, maint_cmds, parent_cmds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vhdblkctl", description="Manage VHD images and their /dev/nbdN attachments.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
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

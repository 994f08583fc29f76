"""vhdblkctl entry point: one argparse tree, each command family in its own module."""

from __future__ import annotations

import argparse
import sys

from ..errors import VhdblkError
from . import device_cmds, image_cmds, maint_cmds, parent_cmds

# Each module has COMMANDS and register(subparsers); a command sets
# `func(args) -> int`. Image commands work on files directly; device commands
# talk to the daemon over its control socket only.
#
# Startup is most of what `info` or `list` costs, so registering imports no
# engine and no socket code (a command imports what it uses when it runs),
# and main() registers only the family of the command it runs: argparse's
# gettext look-ups made building all 13 subparsers a sixth of `info`.
# tests/cli/test_imports.py keeps both so.
COMMAND_MODULES = (image_cmds, device_cmds, maint_cmds, parent_cmds)
TOP_FLAGS = ("-v", "--verbose")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The vhdblkctl parser; with `command`, only that command's family is registered."""
    parser = argparse.ArgumentParser(prog="vhdblkctl", description="Manage VHD images and their /dev/nbdN attachments.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        if command is None or command in module.COMMANDS:
            module.register(sub)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The command `argv` runs, if known without parsing; None when the whole tree is needed (help, typos)."""
    for arg in argv:
        if arg in TOP_FLAGS:
            continue
        if arg.startswith("-"):
            return None
        return arg if any(arg in module.COMMANDS for module in COMMAND_MODULES) else None
    return None


def _setup_logging(verbose: bool = False) -> None:
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="vhdblkctl: %(message)s")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(command_of(argv)).parse_args(argv)
    if args.verbose or not getattr(args, "in_daemon", False):
        # After parsing, and not for device commands (the daemon does their work):
        # importing logging is a fifth of `vhdblkctl list`.  A command whose only
        # loggers are the format layer's lazy ones (info) sets it up at their first message.
        if getattr(args, "lazy_logging", False) and not args.verbose:
            from vhdblkd.vhd import lazylog

            lazylog.before_first = _setup_logging
        else:
            _setup_logging(args.verbose)
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

"""vhdblkd entry point: `run` (the service, the default) and `export` (one image over a socket)."""

from __future__ import annotations

import argparse
import sys

from ..errors import VhdblkError
from . import export, service


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vhdblkd", description="Serve VHD images as /dev/nbdN block devices.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    service.register(sub)
    export.register(sub)
    return parser


def normalise_argv(argv: list[str]) -> list[str]:
    """`vhdblkd [-v] --config X` means `vhdblkd [-v] run --config X`: no command is the service."""
    if any(a in ("run", "export", "-h", "--help") for a in argv):
        return argv
    n = 0
    while n < len(argv) and argv[n] in ("-v", "--verbose"):
        n += 1
    return [*argv[:n], "run", *argv[n:]]


def main(argv: list[str] | None = None) -> int:
    argv = normalise_argv(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except VhdblkError as exc:
        print(f"vhdblkd: {exc}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())

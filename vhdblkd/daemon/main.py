"""vhdblkd entry point: `run` (the service, the default) and `export` (one image over a socket)."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import VhdblkError

COMMAND_MODULES = (
    "vhdblkd.daemon.service",
    "vhdblkd.daemon.export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vhdblkd", description="Serve VHD images as /dev/nbdN block devices.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # `vhdblkd` with no command (or only options) is the service.
    if not any(a in ("run", "export", "-h", "--help") for a in argv):
        argv = [*argv, "run"]
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except VhdblkError as exc:
        print(f"vhdblkd: {exc}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""Shared set-up of the atheris entry points (atheris is optional: CI never imports this).

libFuzzer writes new inputs into the first corpus directory it is given, so
the committed seeds are copied into a scratch directory that is passed
first; crash inputs land in the current directory (copy the ones worth
keeping into tests/fuzz/regressions/).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(name: str, seeds: Callable[[], dict[str, bytes]], target: Callable[[bytes], None]) -> None:
    import atheris  # type: ignore[import-untyped]  # optional, installed by hand into a scratch venv

    scratch = Path(tempfile.mkdtemp(prefix=f"{name}-corpus-"))
    for seed_name, data in seeds().items():
        (scratch / seed_name).write_bytes(data)
    argv = [sys.argv[0], str(scratch)] + [a for a in sys.argv[1:]]
    print(f"{name}: seeds in {scratch}", file=sys.stderr)
    atheris.Setup(argv, target)
    atheris.Fuzz()


def setup_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("PYTHONHASHSEED", "0")

"""atheris entry point for the NBD fuzz targets (tests/fuzz/nbdfuzz.py: codec, handshake, live connection).

    /tmp/fuzzvenv/bin/python tests/fuzz/atheris_nbd.py -runs=100000 [-max_total_time=300]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import atheris  # type: ignore[import-untyped]  # noqa: E402 - optional; needs the path set above

with atheris.instrument_imports(include=["vhdblkd"]):
    from tests.fuzz import nbdfuzz  # noqa: E402

from tests.fuzz.atheris_common import main  # noqa: E402

if __name__ == "__main__":
    main("atheris_nbd", nbdfuzz.seed_programs, nbdfuzz.run)

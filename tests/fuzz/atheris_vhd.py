"""atheris entry point for the VHD parser fuzz target (tests/fuzz/vhdfuzz.py).

    python -m venv /tmp/fuzzvenv && /tmp/fuzzvenv/bin/pip install atheris
    /tmp/fuzzvenv/bin/python tests/fuzz/atheris_vhd.py -runs=100000 [-max_total_time=300]

vhdblkd is imported from this checkout, instrumented for coverage.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import atheris  # type: ignore[import-untyped]  # noqa: E402 - optional; needs the path set above

with atheris.instrument_imports(include=["vhdblkd"]):
    from tests.fuzz import vhdfuzz  # noqa: E402

from tests.fuzz.atheris_common import main  # noqa: E402


def seeds() -> dict[str, bytes]:
    # One program per seed image and phase: no mutation, read-only and read-write.
    return {f"seed{i}-{flags}": bytes([i, flags]) for i in range(len(vhdfuzz.SEEDS)) for flags in (1, 3)}


if __name__ == "__main__":
    main("atheris_vhd", seeds, vhdfuzz.run)

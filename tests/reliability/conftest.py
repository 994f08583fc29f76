"""Counts for the reliability report: crash points replayed, printed at the end of the run."""

from __future__ import annotations

import pytest

CRASH_POINTS = pytest.StashKey[dict[str, int]]()


@pytest.fixture
def crash_tally(request: pytest.FixtureRequest) -> dict[str, int]:
    """Per-workload counts of distinct crash states replayed (summed in the terminal summary)."""
    return request.config.stash.setdefault(CRASH_POINTS, {})


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    tally = config.stash.get(CRASH_POINTS, {})
    if tally:
        detail = ", ".join(f"{name} {n}" for name, n in sorted(tally.items()))
        terminalreporter.write_line(f"crash replay: {sum(tally.values())} distinct crash points replayed ({detail})")

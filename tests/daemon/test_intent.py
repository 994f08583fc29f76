"""Telling a restart from a stop from a shutdown, from what systemd reports (no systemd needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhdblkd.daemon.intent import Intent, decide, own_unit, parse_jobs, probe

# `systemctl list-jobs --no-legend` as systemd 252 prints it, in the three situations.
RESTART = "4711 vhdblkd.service restart running\n"
STOP = "4712 vhdblkd.service stop running\n"
POWEROFF = (
    "  1 poweroff.target               start waiting\n"
    "  2 systemd-poweroff.service      start waiting\n"
    "  9 shutdown.target               start waiting\n"
    " 12 vhdblkd.service               stop  running\n"
    " 13 umount.target                 start waiting\n"
)


@pytest.mark.parametrize(
    ("unit", "jobs", "state", "expected"),
    [
        ("vhdblkd.service", RESTART, "running", Intent.RESTART),
        ("vhdblkd.service", "5 vhdblkd.service try-restart running\n", "degraded", Intent.RESTART),
        ("vhdblkd.service", STOP, "running", Intent.STOP),
        ("vhdblkd.service", "", "running", Intent.STOP),  # systemctl kill, or kill -TERM by hand
        ("vhdblkd.service", POWEROFF, "stopping", Intent.SHUTDOWN),
        ("vhdblkd.service", POWEROFF, None, Intent.SHUTDOWN),  # is-system-running gave nothing
        ("vhdblkd.service", RESTART, "stopping", Intent.SHUTDOWN),  # shutdown wins over a queued restart
        ("vhdblkd.service", "7 reboot.target start waiting\n" + STOP, "running", Intent.SHUTDOWN),
        ("other.service", RESTART, "running", Intent.STOP),  # another unit's restart is not ours
        (None, RESTART, "running", Intent.STOP),  # our unit unknown
        ("vhdblkd.service", None, "running", Intent.STOP),  # list-jobs failed
    ],
)
def test_decide(unit: str | None, jobs: str | None, state: str | None, expected: Intent) -> None:
    intent, why = decide(unit, None if jobs is None else parse_jobs(jobs), state)
    assert intent is expected, why
    assert why


def test_parse_jobs_skips_headers_and_blank_lines() -> None:
    text = "JOB UNIT TYPE STATE\n\n" + RESTART + "No jobs running.\n"
    assert parse_jobs(text) == {"vhdblkd.service": "restart"}


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("0::/system.slice/vhdblkd.service\n", "vhdblkd.service"),
        ("0::/system.slice/vhdblkd@data.service\n", "vhdblkd@data.service"),
        ("12:pids:/system.slice/vhdblkd.service\n1:name=systemd:/system.slice/vhdblkd.service\n", "vhdblkd.service"),
        ("0::/user.slice/user-0.slice/session-3.scope\n", None),
    ],
)
def test_own_unit(cgroup: str, unit: str | None) -> None:
    assert own_unit(cgroup) == unit


def test_probe_asks_systemctl_only_under_systemd(tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("0::/system.slice/vhdblkd.service\n")
    asked: list[list[str]] = []

    def run(args: list[str]) -> str | None:
        asked.append(args)
        return {"is-system-running": "running\n", "list-jobs": RESTART}[args[0]]

    assert probe({}, run=run, cgroup=cgroup)[0] is Intent.STOP and asked == []
    assert probe({"INVOCATION_ID": "abc"}, run=run, cgroup=cgroup)[0] is Intent.RESTART
    assert [a[0] for a in asked] == ["is-system-running", "list-jobs"]
    assert probe({"INVOCATION_ID": "abc"}, run=lambda args: None, cgroup=cgroup)[0] is Intent.STOP

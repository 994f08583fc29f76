"""Why the daemon is being stopped: a restart, a stop, or the system going down.

SIGTERM looks the same in all three cases, so the daemon asks the service
manager.  While `systemctl restart` (and a package upgrade, which runs it)
stops the old process, the unit's job is of type "restart"; systemd turns it
into a start job only once the old process is gone.  A plain stop shows a
"stop" job.  At shutdown the manager's state is "stopping" (shutdown.target
has a start job queued), whatever the unit's own job.  All of this is so
in systemd 252 (Debian 12) and later: `systemctl list-jobs` and
`systemctl is-system-running` report it over the manager's private socket,
which answers root even when D-Bus is already gone at shutdown.

The decision itself (`decide`) is pure and tested without systemd; `probe`
runs the two commands.  When anything is unclear the answer is STOP, which
never leaves a device without a server for longer than a stop would.
"""

from __future__ import annotations

import enum
import logging
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

SYSTEMCTL = "systemctl"
PROBE_SECONDS = 10.0
SHUTDOWN_TARGETS = frozenset(
    {"shutdown.target", "poweroff.target", "reboot.target", "halt.target", "kexec.target", "final.target"}
)
RESTART_JOBS = frozenset({"restart", "try-restart"})  # try-restart runs as restart on an active unit


class Intent(enum.Enum):
    RESTART = "restart"  # hand every device to the next daemon
    STOP = "stop"  # detach free devices, keep the ones in use waiting for the next daemon
    SHUTDOWN = "shutdown"  # flush and detach everything (the mounts went first)


def parse_jobs(text: str) -> dict[str, str]:
    """`systemctl list-jobs --no-legend` lines (JOB UNIT TYPE STATE) -> unit: job type."""
    jobs: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0].isdigit():
            jobs[fields[1]] = fields[2]
    return jobs


def own_unit(cgroup: str) -> str | None:
    """The unit this process runs in, from /proc/self/cgroup (`0::/system.slice/vhdblkd.service`)."""
    for line in cgroup.splitlines():
        path = line.rpartition(":")[2]
        for part in reversed(path.split("/")):
            if part.endswith(".service"):
                return part
    return None


def decide(unit: str | None, jobs: Mapping[str, str] | None, system_state: str | None) -> tuple[Intent, str]:
    """The intent and a reason to log, from what the service manager said (None: it said nothing)."""
    if system_state == "stopping":
        return Intent.SHUTDOWN, "the system is shutting down"
    for target in sorted(SHUTDOWN_TARGETS & set(jobs or {})):
        if (jobs or {})[target] == "start":
            return Intent.SHUTDOWN, f"{target} is being started"
    if unit is None or jobs is None:
        return Intent.STOP, "not run by systemd (or it could not be asked): stopping"
    job = jobs.get(unit)
    if job in RESTART_JOBS:
        return Intent.RESTART, f"{unit} has a {job} job"
    return Intent.STOP, f"{unit} has a {job} job" if job else f"{unit} has no job: stopping"


Runner = Callable[[list[str]], str | None]


def run_systemctl(args: list[str]) -> str | None:
    """stdout of `systemctl ARGS`, or None if it could not run (is-system-running exits non-zero when stopping)."""
    try:
        done = subprocess.run(
            [SYSTEMCTL, *args], capture_output=True, text=True, timeout=PROBE_SECONDS, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot ask systemd why vhdblkd stops (%s %s): %s", SYSTEMCTL, " ".join(args), exc)
        return None
    return done.stdout


def probe(
    environ: Mapping[str, str],
    *,
    run: Runner = run_systemctl,
    cgroup: Path = Path("/proc/self/cgroup"),
) -> tuple[Intent, str]:
    if not environ.get("INVOCATION_ID"):  # set by systemd for every service it runs
        return decide(None, None, None)
    try:
        unit = own_unit(cgroup.read_text())
    except OSError:
        unit = None
    state = run(["is-system-running"])
    listed = run(["list-jobs", "--no-legend", "--no-pager"])
    return decide(unit, None if listed is None else parse_jobs(listed), None if state is None else state.strip())


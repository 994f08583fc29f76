"""What negotiating structured replies costs, told apart from the noise and split by side.

The main table's structured-over-simple ratios compare cells measured up to
half a minute apart, and on a small shared machine the speed of the whole
machine wanders more than the 5 % in question.  This section measures in
pairs instead: the same workload against the same server with structured
replies and with them refused, back to back, in alternating order, many
times over.  Drift slower than a pair cancels in each pair's ratio, and the
median of the pair ratios gets a distribution-free confidence interval.

nbdkit against `nbdkit --no-sr` runs in the same rounds as the control: the
client (libnbd) pays for structured replies too (it reads a chunk's 20-byte
header and its 8-byte offset in separate recvs: four per READ reply against
two), and that share is no server's.  So the server's share is our ratio over
the control's, pair round by pair round.  Beside the ratios, the CPU time per
request of each side: the server's from /proc (every thread of it), the
client's as fio reports it for its job.

Used by nbdbench.py (section "sr"), which hands in how to start a server and
run fio, and renders the table; nothing here starts a process itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fiojob import Job

JOBS = (
    Job("seqread-1m-qd8", "seq read 1M QD8", "read", "1M", 8),
    Job("randread-4k-qd1", "rand read 4k QD1", "randread", "4k", 1),
    Job("randread-4k-qd16", "rand read 4k QD16", "randread", "4k", 16),
)
# (structured, simple) server pairs; each pair's two runs are adjacent in every round.
PAIRS = (("vhdblkd", "vhdblkd-simple"), ("nbdkit", "nbdkit-simple"))
SERVERS = tuple(s for pair in PAIRS for s in pair)
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
SHARE_TARGET = 0.95  # the export rows may lose at most 5 % with structured replies

Interval = tuple[float, float, float]  # median, low, high
# A target's row in nbdbench's table: label, measured, met, range, whether the range spans the target.
TargetLine = tuple[str, float | None, bool | None, tuple[float, float] | None, bool]
Serve = Callable[[str], contextlib.AbstractContextManager[tuple[Path, int]]]
RunFio = Callable[[Job, Path], dict[str, Any]]  # one time-based job over a socket -> fio's JSON for it


def cpu_seconds(pid: int) -> float:
    """User + system time of a process and all its threads, the ended ones included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def client_cpu_seconds(job: dict[str, Any]) -> float:
    """The CPU time fio's job used, from its JSON (usr_cpu and sys_cpu are percent of job_runtime, in ms)."""
    return (float(job["usr_cpu"]) + float(job["sys_cpu"])) / 100 * float(job["job_runtime"]) / 1000


def round_order(n: int) -> list[str]:
    """Round n's servers: each pair adjacent, and every other round reversed, so neither
    side of a pair always runs first."""
    return list(SERVERS if n % 2 == 0 else SERVERS[::-1])


def median_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """(median, low, high): the order statistics that bound the median with `confidence`
    whatever the distribution (a binomial argument; the full range for very few values)."""
    v = sorted(values)
    n = len(v)
    tail = (1 - confidence) / 2
    k, below = 0, 0.0  # the largest k with P(Binomial(n, 1/2) < k) <= tail
    while k < n // 2:
        below_next = below + math.comb(n, k) / 2**n
        if below_next > tail:
            break
        below, k = below_next, k + 1
    lo, hi = (v[k - 1], v[n - k]) if k else (v[0], v[-1])
    return statistics.median(v), lo, hi


def measure(serve: Serve, run_fio: RunFio, rounds: int, runtime_s: float,
            log: Callable[[str], None]) -> dict[str, object]:
    """Every job, `rounds` rounds of all four servers; the per-run numbers, for results.json."""
    jobs: dict[str, object] = {}
    out: dict[str, object] = {"rounds": rounds, "runtime_s": runtime_s, "jobs": jobs}
    with contextlib.ExitStack() as stack:
        socks = {s: stack.enter_context(serve(s)) for s in SERVERS}
        for job in JOBS:
            runs: dict[str, list[dict[str, float]]] = {s: [] for s in SERVERS}
            log(f"sr: {job.label}, {rounds} rounds of {len(SERVERS)} x {runtime_s} s")
            for n in range(rounds):
                for s in round_order(n):
                    sock, pid = socks[s]
                    before = cpu_seconds(pid)
                    result = run_fio(job, sock)
                    runs[s].append({"iops": float(result["read"]["iops"]), "ios": int(result["read"]["total_ios"]),
                                    "server_cpu": cpu_seconds(pid) - before,
                                    "client_cpu": client_cpu_seconds(result)})
            jobs[job.key] = {"label": job.label, "runs": runs}
    return out


@dataclasses.dataclass(frozen=True)
class Summary:
    label: str
    ratio: dict[str, Interval]  # structured server -> its SR/simple pair ratios
    server_share: Interval  # ours over the control's, round by round
    cpu_us: dict[str, dict[str, float]]  # server -> {"server", "client"} -> CPU us per request


def summary(data: dict[str, Any]) -> list[Summary]:
    """Per job: each pair's median ratio with its interval, the server's share, CPU per request."""
    rows = []
    (ours, _), (theirs, _) = PAIRS
    for job in data.get("jobs", {}).values():
        runs = job["runs"]
        ratios = {sr: [a["iops"] / b["iops"] for a, b in zip(runs[sr], runs[simple], strict=True)]
                  for sr, simple in PAIRS}
        share = [a / b for a, b in zip(ratios[ours], ratios[theirs], strict=True)]
        cpu = {s: {side: 1e6 * sum(r[f"{side}_cpu"] for r in rs) / max(sum(r["ios"] for r in rs), 1)
                   for side in ("server", "client")} for s, rs in runs.items()}
        rows.append(Summary(job["label"], {s: median_ci(r) for s, r in ratios.items()}, median_ci(share), cpu))
    return rows


def _ci(m: Interval) -> str:
    return f"{m[0]:.3f}x ({m[1]:.3f}-{m[2]:.3f})"


def table(data: object) -> tuple[str, list[str], list[list[str]]] | None:
    """(caption, head, body) of the paired-runs table, for nbdbench's grid; None when not measured."""
    if not isinstance(data, dict) or not data.get("jobs"):
        return None
    (ours, ours_simple), (theirs, _) = PAIRS
    head = ["workload", "vhdblkd SR/simple", "nbdkit SR/simple (control)", "server's share",
            "vhdblkd server CPU us/req SR, simple", "client CPU us/req SR, simple (vhdblkd)"]
    body = []
    for r in summary(data):
        cpu = r.cpu_us
        body.append([r.label, _ci(r.ratio[ours]), _ci(r.ratio[theirs]), _ci(r.server_share),
                     f"{cpu[ours]['server']:.1f}, {cpu[ours_simple]['server']:.1f}",
                     f"{cpu[ours]['client']:.1f}, {cpu[ours_simple]['client']:.1f}"])
    caption = (f"Structured replies, paired runs ({data['rounds']} rounds of back-to-back {data['runtime_s']} s "
               "runs, order alternating): median of the pair ratios of IOPS, in brackets its 95 % interval; "
               "the server's share is vhdblkd's ratio over the control's, round by round:")
    return caption, head, body


def target_lines(data: object) -> list[TargetLine]:
    """nbdbench's target rows: the server's share of structured replies >= 0.95x, per job
    (noisy when the interval spans 0.95)."""
    if not isinstance(data, dict) or not data.get("jobs"):
        return []
    out: list[TargetLine] = []
    for r in summary(data):
        m, lo, hi = r.server_share
        out.append((f"fixed {r.label}: server's share of structured replies >= 0.95x (paired)",
                    m, m >= SHARE_TARGET, (lo, hi), lo <= SHARE_TARGET <= hi))
    return out

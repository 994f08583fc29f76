#!/usr/bin/env python3
"""ublk against NBD on Debian's 6.12 kernel: fio on /dev/ublkbN and /dev/nbdN, both served by vhdblkd.

One QEMU guest (tests/kernel/qemu.py) runs one vhdblkd daemon that attaches
a fixed VHD twice: over ublk (one queue, the default) and over NBD (one
connection, the default).  The two attachments are byte-identical copies of
one fixed image, kept in the guest's tmpfs (an image is attached once at a
time; a copy lets both stay attached, so the two servers can take turns job
by job without an attach in between).  Every round runs each job on both
devices back to back, the order swapped every round, so load from the rest
of the machine hits both alike.  The guest's CPU is emulated (TCG where
/dev/kvm is PVM), so only the ratio of the medians means anything.

    python bench/ublkbench.py [--runs N] [--runtime S] [--size-mib M] [--out FILE]

or `bash bench/run --sections ublk` (opt-in, like `kernel`).  Besides the
IOPS, the daemon's counters show how many requests the ublk queue took per
io_uring_enter (its batch size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fiojob import Job  # beside this file, shared with nbdbench

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TargetJob(Job):
    """An nbdbench fio job with the ratio ublk must reach on it."""

    target: float  # ublk / nbd at least this


JOBS = (
    TargetJob("randread-4k", "random read 4k QD16", "randread", "4k", 16, 1.2),
    TargetJob("randwrite-4k", "random write 4k QD16", "randwrite", "4k", 16, 1.2),
    TargetJob("seqread-1m", "sequential read 1M QD8", "read", "1M", 8, 1.0),
)
DEVICES = ("ublk", "nbd")

GUEST_SCRIPT = r"""
set -euo pipefail
T={share}
W=/run/ublkbench
mkdir -p $W /run/lock
cp "$T/fixed.vhd" $W/ublk.vhd
cp "$T/fixed.vhd" $W/nbd.vhd
: >$W/vhdtab
export VHDBLKD_CONTROL=$W/control.sock
vhdblkd run --config $W/vhdtab --control $VHDBLKD_CONTROL --state-dir $W >"$T/daemon.log" 2>&1 &
DPID=$!
for i in $(seq 300); do vhdblkctl status >/dev/null 2>&1 && break; sleep 0.2; done
declare -A DEV
DEV[ublk]=$(vhdblkctl attach --transport ublk $W/ublk.vhd)
DEV[nbd]=$(vhdblkctl attach $W/nbd.vhd)
for d in ublk nbd; do for i in $(seq 100); do [ -b "${{DEV[$d]}}" ] && break; sleep 0.1; done; done
echo "devices: ${{DEV[ublk]}} ${{DEV[nbd]}}"
for d in ublk nbd; do echo "$d $(cat /sys/block/${{DEV[$d]#/dev/}}/queue/max_sectors_kb)"; done >"$T/max_sectors_kb"
job() {{  # KEY RW BS QD DEVICE ROUND
    fio --name="$1" --filename="${{DEV[$5]}}" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=libaio \
        --direct=1 --runtime={runtime} --ramp_time={ramp} --time_based --norandommap --randrepeat=0 \
        --output-format=json --output="$T/u-$5-$6-$1.json" >/dev/null
}}
for round in $(seq {runs}); do
    if [ $((round % 2)) = 1 ]; then order="ublk nbd"; else order="nbd ublk"; fi
{jobs}
    echo "round $round done"
done
vhdblkctl list --json >"$T/list.json"
vhdblkctl detach "${{DEV[ublk]}}"
vhdblkctl detach "${{DEV[nbd]}}"
kill -TERM $DPID
wait $DPID
"""


def _fixed_image(path: Path, size: int) -> None:
    """A fixed VHD full of random data (made by qemu-img, the reference writer)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        chunk = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(chunk)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on",
                    str(raw), str(path)], check=True, capture_output=True)
    raw.unlink()


def _iops(path: Path) -> float:
    job = json.loads(path.read_text())["jobs"][0]
    return float(job["read"]["iops"] + job["write"]["iops"])


def measure(runs: int, runtime_s: int, size: int, *, ramp_s: int = 2, log: bool = True) -> dict[str, object]:
    """Boot the guest, run every job `runs` times on both devices, return rows and the ublk counters."""
    sys.path.insert(0, str(REPO))
    from tests.kernel.qemu import accel, run_in_guest  # the project's QEMU harness

    share = Path(tempfile.mkdtemp(prefix="ublkbench-"))
    try:
        _fixed_image(share / "fixed.vhd", size)
        jobs = "\n".join(f"    for d in $order; do job {j.key} {j.rw} {j.bs} {j.qd} $d $round; done" for j in JOBS)
        script = GUEST_SCRIPT.format(share=share, runs=runs, runtime=runtime_s, ramp=ramp_s, jobs=jobs)
        started = time.monotonic()
        per_job = runtime_s + ramp_s + 4  # fio's own start-up in the emulated guest
        guest = run_in_guest(script, shares=[share], modules=("ublk_drv", "nbd"),
                             timeout=300 + runs * len(JOBS) * len(DEVICES) * per_job * 2)
        if guest.returncode != 0:
            raise RuntimeError(f"the ublk bench guest failed ({guest.returncode}):\n{guest.stdout[-3000:]}\n"
                               f"{guest.stderr[-3000:]}\n{(share / 'daemon.log').read_text()[-3000:]}")
        rows = []
        for j in JOBS:
            runs_by = {d: [_iops(share / f"u-{d}-{n}-{j.key}.json") for n in range(1, runs + 1)] for d in DEVICES}
            med = {d: statistics.median(v) for d, v in runs_by.items()}
            ratio = med["ublk"] / med["nbd"] if med["nbd"] else None
            # Each round's two runs were back to back: their ratio is the least touched by drift.
            paired = statistics.median(u / n for u, n in zip(runs_by["ublk"], runs_by["nbd"], strict=True) if n)
            rows.append({"key": j.key, "label": j.label, "runs": runs_by, "median": med, "ratio": ratio,
                         "paired_ratio": paired,
                         "target": j.target, "met": ratio is not None and ratio >= j.target})
            if log:
                print(f"ublk: {j.label}: ublk {med['ublk']:.0f} nbd {med['nbd']:.0f} IOPS, "
                      f"ratio {ratio or 0:.2f} (target {j.target:.1f})", file=sys.stderr, flush=True)
        listed = json.loads((share / "list.json").read_text())
        counters = {a["transport"]: a.get("stats", {}) for a in listed}
        max_kib = dict(line.split() for line in (share / "max_sectors_kb").read_text().splitlines())
        return {"rows": rows, "counters": counters, "max_request_kib": {k: int(v) for k, v in max_kib.items()},
                "runs": runs, "runtime_s": runtime_s, "size": size,
                "accel": " ".join(accel()), "elapsed_seconds": round(time.monotonic() - started, 1)}
    finally:
        shutil.rmtree(share, ignore_errors=True)


def render_lines(result: object, md: bool) -> list[str]:
    """The section's rows and ratio lines, for nbdbench's report or this script's own output."""
    if not isinstance(result, dict):
        return []
    b = "- " if md else "  "
    out = ["", f"ublk vs NBD on Debian's 6.12 kernel (one QEMU guest, {result['accel']}; vhdblkd serves a "
           f"{result['size'] // MiB} MiB fixed image over both; fio libaio direct; median of {result['runs']} "
           f"x {result['runtime_s']} s; ratios only):"]
    for r in result["rows"]:
        med = r["median"]
        ratio = r["ratio"]
        mark = "yes" if r["met"] else "NO"
        out.append(f"{b}{r['label']}: /dev/ublkbN {med['ublk']:.0f} vs /dev/nbdN {med['nbd']:.0f} IOPS (emulated): "
                   f"{ratio or 0:.2f}x, per round {r.get('paired_ratio') or 0:.2f}x (target >= {r['target']:.1f}x: {mark})")
    kib = result.get("max_request_kib", {})
    if kib:
        out.append(f"{b}largest request (max_sectors_kb): /dev/ublkbN {kib.get('ublk')} KiB, "
                   f"/dev/nbdN {kib.get('nbd')} KiB")
    ublk = result["counters"].get("ublk", {})
    if ublk.get("enters"):
        out.append(f"{b}ublk queue: {ublk['requests']} requests in {ublk['enters']} io_uring_enter calls "
                   f"({ublk['requests'] / ublk['enters']:.1f} per call)")
    return out


def section_ublk(runs: int, runtime_s: int, results: dict[str, object], *, quick: bool = False) -> None:
    """nbdbench's `ublk` section (opt-in): results["ublk"], rendered by `render_lines`."""
    print("ublk: booting Debian's 6.12 kernel under QEMU", file=sys.stderr, flush=True)
    results["ublk"] = measure(runs, runtime_s if not quick else 2, (256 if not quick else 64) * MiB,
                              ramp_s=2 if not quick else 0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--runtime", type=int, default=8, help="seconds per fio job (default %(default)s)")
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args(argv)
    result = measure(a.runs, a.runtime, a.size_mib * MiB)
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(render_lines(result, md=False)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

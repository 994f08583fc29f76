"""The benchmark script runs end to end at tiny sizes and reports every cell.

This checks the harness, not the speed: no timing is asserted (the numbers of
a --quick run mean nothing).  It uses the real peers qemu-nbd, nbdkit and fio.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "nbdbench.py"
sys.path.insert(0, str(REPO / "bench"))
from srcost import JOBS as SRCOST_JOBS  # noqa: E402 - bench/ is no package


@pytest.mark.peers
def test_quick_run_prints_table_and_writes_results(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--workdir", str(work), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "workload (IOPS, median (min-max))" in out
    for label in ("fixed rand read 4k QD16", "fresh dynamic rand write 4k QD16",
                  "half-alloc dynamic rand read 4k QD1", "2-level diff chain rand read 4k QD16"):
        assert label in out, out

    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["key"]: r for r in results["rows"]}
    # every server measured every workload it takes part in, with real I/O
    for key in ("fixed/seqread-1m-qd8", "fixed/randread-4k-qd1", "fixed/randread-4k-qd16",
                "fixed/randwrite-4k-qd16", "fixed/seqwrite-1m-qd8"):
        assert set(rows[key]["median"]) == {"vhdblkd", "vhdblkd-simple", "qemu-nbd", "nbdkit", "nbdkit-simple",
                                            "psync"}, key
    for key in ("alloc/randwrite-4k-qd16", "alloc/seqwrite-1m-qd8"):
        assert set(rows[key]["median"]) == {"vhdblkd", "qemu-nbd"}, key
    for key in ("dyn/randread-4k-qd1", "diff/randread-4k-qd16", "sparse/nbdcopy"):
        assert set(rows[key]["median"]) == {"vhdblkd", "vhdblkd-simple", "qemu-nbd"}, key
    assert all(v > 0 for r in rows.values() for v in r["median"].values())
    # every cell has its spread; with one run (--quick) it is the value itself
    assert all(r["min"][c] <= r["median"][c] <= r["max"][c] for r in rows.values() for c in r["runs"])
    # the sparse copy: block status lets vhdblkd and qemu-nbd send the allocated 8 MiB, while
    # vhdblkd-simple (no structured replies, no block status) sends all of the 1 GiB
    read = rows["sparse/read-mib"]["median"]
    assert read["allocated"] == 8
    assert 8 <= read["vhdblkd"] < 9 and 8 <= read["qemu-nbd"] < 9, read
    assert read["vhdblkd-simple"] >= 1024, read
    # the command line's startup against qemu-img's and an empty python
    assert set(rows["cli/info"]["median"]) == {"vhdblkctl", "qemu-img"}
    assert set(rows["cli/list"]["median"]) == {"vhdblkctl"} and set(rows["cli/pass"]["median"]) == {"python"}
    assert "vhdblkctl info: <= 2x python -c pass" in out
    # what structured replies cost, ours beside the control's (nbdkit --no-sr)
    assert "Structured replies over simple ones" in out
    # the paired structured-reply runs: every server of both pairs, every round, real requests
    sr = results["sr"]
    assert set(sr["jobs"]) == {j.key for j in SRCOST_JOBS}
    for job in sr["jobs"].values():
        assert set(job["runs"]) == {"vhdblkd", "vhdblkd-simple", "nbdkit", "nbdkit-simple"}
        assert all(len(r) == sr["rounds"] and all(x["ios"] > 0 and x["server_cpu"] >= 0 for x in r)
                   for r in job["runs"].values())
    assert "Structured replies, paired runs" in out
    assert "server's share of structured replies >= 0.95x (paired)" in out
    # every target got a measured ratio
    assert all(t["ratio"] is not None for t in results["targets"]), results["targets"]
    mem = results["memory"]
    assert all(mem[k]["VmRSS"] > 0 for k in ("idle_kib_small", "idle_kib_big", "after_write_kib"))
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| workload (IOPS, median (min-max)) |" in md
    assert "| nbdcopy of a 1 GiB dynamic VHD holding 8 MiB, to null: |" in md
    assert "| info IMAGE |" in md
    # the scratch directory given with --workdir is kept, but images are gone
    assert not list(work.glob("*.vhd")) and not list(work.glob("*.raw"))

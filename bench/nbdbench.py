#!/usr/bin/env python3
"""NBD throughput benchmark: `vhdblkd export` against qemu-nbd and nbdkit.

Every server runs on this machine, listens on a unix socket and is driven by
`fio --ioengine=nbd` (libnbd).  All servers are measured in the same run and
interleaved (run 1 of every server, then run 2, ...), so the ratios printed are
not skewed by drift of the machine between phases.  Each cell is the median
of --runs runs.  Usage: `bash bench/run [--quick] [--runs N] [--runtime S]`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import srcost  # noqa: E402 - the paired structured-reply section, beside this file
import ublkbench  # noqa: E402 - the opt-in ublk section, beside this file
from fiojob import Job  # noqa: E402 - beside this file

MiB = 1024 * 1024
GiB = 1024 * MiB
QUICK_OUT = Path(tempfile.gettempdir()) / "nbdbench-quick"
VHD_BLOCK = 2 * MiB  # qemu-img's and vhdblkd's default dynamic block size


# --------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True)
class Config:
    runs: int
    runtime_s: int
    ramp_s: int
    sr_rounds: int  # section sr: rounds of paired runs
    sr_runtime_s: int  # section sr: seconds per run
    fixed_size: int  # the fixed image, its raw twin, the read images
    alloc_size: int  # the fresh dynamic images the allocation workloads fill
    mem_size: int  # the large dynamic image whose RSS is measured
    mem_write: int  # bytes of random 4k writes before the second RSS sample
    workdir: Path
    own_workdir: bool  # made by us, so removed at the end
    outdir: Path
    vhdblkd: str
    compare: str | None  # another vhdblkd (say, an older tree), measured as server "compare"
    sections: frozenset[str]
    servers: frozenset[str]
    quick: bool
    argv: tuple[str, ...]  # as given, for the report


SECTIONS = ("fixed", "alloc", "read", "memory", "sparse", "cli", "sr", "kernel", "ublk")
# vhdblkd-simple: vhdblkd with structured replies refused, to show what negotiating them costs;
# nbdkit-simple (nbdkit --no-sr) is the control: what they cost a server that is not ours,
# which is the client's (libnbd's) share of that cost, paid on the same two CPUs.
SERVERS = ("vhdblkd", "vhdblkd-simple", "qemu-nbd", "nbdkit", "nbdkit-simple", "compare")


def parse_args(argv: Sequence[str]) -> Config:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, 1 run of 1 s each: a smoke test, not a measurement")
    p.add_argument("--runs", type=int, help="runs per cell; the median is reported (default 3)")
    p.add_argument("--runtime", type=int, help="seconds per fio job (default 5)")
    p.add_argument("--ramp", type=int, help="fio ramp_time seconds on steady-state jobs (default 1)")
    p.add_argument("--sr-rounds", type=int, help="section sr: rounds of back-to-back paired runs (default 16)")
    p.add_argument("--sr-runtime", type=int, help="section sr: seconds per paired run (default 2)")
    p.add_argument("--size-mib", type=int, help="fixed/read image size in MiB (default 1024)")
    p.add_argument("--alloc-size-mib", type=int,
                   help="size of each fresh dynamic image for the allocation workloads (default 8192)")
    p.add_argument("--mem-size-gib", type=int, help="dynamic image for the RSS check (default 100)")
    p.add_argument("--mem-write-mib", type=int, help="random 4k writes before the 2nd RSS sample (default 1024)")
    p.add_argument("--sections", default=",".join(SECTIONS[:7]),
                   help=f"comma list of {','.join(SECTIONS)} (kernel and ublk are opt-in; default: %(default)s)")
    p.add_argument("--servers", default=",".join(SERVERS[:-1]), help="comma list (default: %(default)s)")
    p.add_argument("--workdir", type=Path, help="scratch directory for images (default: a temp dir under /var/tmp)")
    p.add_argument("--out", type=Path,
                   help="where results.json and RESULTS.md go (default: bench/; with --quick, "
                        f"{QUICK_OUT}, so a smoke run never replaces the committed results)")
    p.add_argument("--vhdblkd", default=str(REPO / ".venv" / "bin" / "vhdblkd"), help="vhdblkd executable")
    p.add_argument("--compare", metavar="EXE",
                   help="a second vhdblkd executable (e.g. a wrapper running an older checkout), measured "
                        "beside the first in the same runs as server 'compare'; the report gets a "
                        "vhdblkd-vs-compare table")
    a = p.parse_args(argv)
    q = a.quick

    def pick(value: int | None, quick: int, full: int) -> int:
        return value if value is not None else (quick if q else full)

    sections = frozenset(s for s in a.sections.split(",") if s)
    servers = frozenset(s for s in a.servers.split(",") if s) | ({"compare"} if a.compare else set())
    for bad in (sections - set(SECTIONS)) | (servers - set(SERVERS)):
        p.error(f"unknown section or server: {bad}")
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="nbdbench-", dir="/var/tmp"))
    return Config(
        runs=pick(a.runs, 1, 3),
        runtime_s=pick(a.runtime, 1, 5),
        ramp_s=pick(a.ramp, 0, 1),
        sr_rounds=pick(a.sr_rounds, 2, 16),
        sr_runtime_s=pick(a.sr_runtime, 1, 2),
        fixed_size=pick(a.size_mib, 64, 1024) * MiB,
        alloc_size=pick(a.alloc_size_mib, 256, 8192) * MiB,
        mem_size=pick(a.mem_size_gib, 4, 100) * GiB,
        mem_write=pick(a.mem_write_mib, 16, 1024) * MiB,
        workdir=workdir,
        own_workdir=a.workdir is None,
        outdir=a.out or (QUICK_OUT if q else REPO / "bench"),
        vhdblkd=a.vhdblkd,
        compare=a.compare,
        sections=sections,
        servers=servers,
        quick=q,
        argv=tuple(argv),
    )


# --------------------------------------------------------------------------
# running things


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a helper command; its failure ends the benchmark with its output."""
    res = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout}{res.stderr}")
    return res


def wait_for_nbd(sock: Path, proc: subprocess.Popen[bytes], errlog: Path, timeout_s: float = 30.0) -> None:
    """Wait until the server answers with the NBD greeting on its socket."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = errlog.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {sock}:\n{tail}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(sock))
            if s.recv(8) == b"NBDMAGIC":
                return
        time.sleep(0.05)
    raise RuntimeError(f"no NBD greeting on {sock} within {timeout_s}s")


def server_argv(cfg: Config, kind: str, image: Path, sock: Path, read_only: bool = False) -> list[str]:
    if kind in ("vhdblkd", "vhdblkd-simple", "compare"):
        simple = ["--no-structured-replies"] if kind == "vhdblkd-simple" else []
        exe = cfg.compare if kind == "compare" and cfg.compare else cfg.vhdblkd
        return [exe, "export", *simple, *(["--read-only"] if read_only else []), "--unix", str(sock),
                str(image)]
    if kind == "qemu-nbd":
        # writeback: the host page cache absorbs writes, as it does for the
        # other servers; FLUSH still reaches the disk.  -t keeps serving
        # after a client disconnects.
        return ["qemu-nbd", "-f", "vpc", "--cache=writeback", "-t", *(["-r"] if read_only else []),
                "-k", str(sock), str(image)]
    if kind in ("nbdkit", "nbdkit-simple"):
        simple = ["--no-sr"] if kind == "nbdkit-simple" else []
        return ["nbdkit", "-f", *simple, *(["-r"] if read_only else []), "-U", str(sock), "file", f"file={image}"]
    raise ValueError(kind)


@contextlib.contextmanager
def serving(cfg: Config, kind: str, image: Path, read_only: bool = False) -> Iterator[tuple[Path, int]]:
    """Start one server on a fresh unix socket; yield (socket, pid); stop it."""
    sock = cfg.workdir / f"{kind}.sock"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    errlog = open(cfg.workdir / f"{kind}.log", "ab")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(server_argv(cfg, kind, image, sock, read_only),
                            stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog)
    try:
        wait_for_nbd(sock, proc, Path(errlog.name))
        yield sock, proc.pid
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} died during the run (exit {proc.returncode}); see {errlog.name}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        errlog.close()


def fio(cfg: Config, job: Job, target: dict[str, str], *, ramp: bool = True,
        io_size: int | None = None, extra: Sequence[str] = ()) -> float:
    """Run one fio job against `target` (uri=... or filename=...); return IOPS.

    Time-based (--runtime) unless `io_size` bytes are asked for."""
    j = fio_job(cfg, job, target, ramp=ramp, io_size=io_size, extra=extra)
    return float(j["read"]["iops"] + j["write"]["iops"])


def fio_job(cfg: Config, job: Job, target: dict[str, str], *, ramp: bool = True, io_size: int | None = None,
            runtime_s: int | None = None, extra: Sequence[str] = ()) -> dict[str, Any]:
    """`fio`, returning fio's whole JSON report of the job; `runtime_s` overrides --runtime."""
    out = cfg.workdir / "fio.json"
    args = ["fio", "--name=bench", f"--rw={job.rw}", f"--bs={job.bs}", f"--iodepth={job.qd}",
            "--randrepeat=0", "--norandommap", f"--output={out}", "--output-format=json", *extra]
    if io_size is None:
        args += [f"--runtime={cfg.runtime_s if runtime_s is None else runtime_s}", "--time_based"]
    else:
        args.append(f"--io_size={io_size}")
    if ramp and cfg.ramp_s:
        args.append(f"--ramp_time={cfg.ramp_s}")
    args += [f"--{k}={v}" for k, v in target.items()]
    run(args)
    data = json.loads(out.read_text())
    j: dict[str, Any] = data["jobs"][0]
    if j["error"]:
        raise RuntimeError(f"fio job {job.key} failed with error {j['error']}")
    return j


def nbd_target(sock: Path) -> dict[str, str]:
    return {"ioengine": "nbd", "uri": f"nbd+unix:///?socket={sock}"}


def fio_fill(sock: Path, size: int, bs: int, skip: int, offset: int = 0) -> None:
    """Write `bs` bytes every `bs + skip` bytes from `offset` to `size` through a server.

    io_size stops fio after one pass: by default it writes `size` bytes in
    all, wrapping around and filling the holes it was told to skip."""
    count = (size - offset - bs) // (bs + skip) + 1
    run(["fio", "--name=fill", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
         f"--rw=write:{skip}", f"--bs={bs}", f"--offset={offset}", f"--io_size={count * bs}",
         "--iodepth=8", "--output-format=terse"])


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process and all its descendants, in KiB.

    RssFile counts pages of mapped files (an mmap of the image), which the
    kernel can drop; RssAnon is the heap that must not grow with the image."""
    total = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except FileNotFoundError:
            continue
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in total:
                total[key] += int(value.split()[0])
        pids += [int(c) for c in children]
    return total


# --------------------------------------------------------------------------
# images


def qemu_img_create(path: Path, subformat: str, size: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    # force_size keeps the virtual size exact (creator "qem2") instead of
    # rounding it to a CHS geometry, so every image matches its raw twin.
    run(["qemu-img", "create", "-q", "-f", "vpc", "-o", f"subformat={subformat},force_size=on",
         str(path), str(size)])


def make_raw(path: Path, size: int) -> None:
    """A raw file filled with non-zero data, so reads are never of holes."""
    chunk = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for i in range(size // MiB):
            chunk[:8] = i.to_bytes(8, "little")
            f.write(chunk)


def make_fixed_pair(cfg: Config) -> tuple[Path, Path]:
    raw = cfg.workdir / "fixed.raw"
    vhd = cfg.workdir / "fixed.vhd"
    make_raw(raw, cfg.fixed_size)
    run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on",
         str(raw), str(vhd)])
    return raw, vhd


def make_half_dynamic(cfg: Config, path: Path) -> None:
    """A dynamic image with every other 2 MiB block allocated and filled."""
    qemu_img_create(path, "dynamic", cfg.fixed_size)
    with serving(cfg, "qemu-nbd", path) as (sock, _):
        fio_fill(sock, cfg.fixed_size, VHD_BLOCK, VHD_BLOCK)


def make_chain(cfg: Config) -> Path:
    """base <- mid <- top, together half allocated like make_half_dynamic.

    base holds blocks 0, 4, 8, ...; mid holds 1, 5, 9, ...; top overwrites the
    first 64 KiB of base's blocks (partial sector bitmaps), so a random read
    resolves in each of the three files.
    """
    from vhdblkd.vhd.create import create_differencing  # the bench runs in the project venv

    base, mid, top = (cfg.workdir / f"chain-{n}.vhd" for n in ("base", "mid", "top"))
    qemu_img_create(base, "dynamic", cfg.fixed_size)
    with serving(cfg, "qemu-nbd", base) as (sock, _):
        fio_fill(sock, cfg.fixed_size, VHD_BLOCK, 3 * VHD_BLOCK)
    # A child records its parent's mtime, so each child is made only once its
    # parent holds its final data.
    for child, parent, bs, skip, offset in ((mid, base, VHD_BLOCK, 3 * VHD_BLOCK, VHD_BLOCK),
                                            (top, mid, 64 * 1024, 4 * VHD_BLOCK - 64 * 1024, 0)):
        with contextlib.suppress(FileNotFoundError):
            child.unlink()
        create_differencing(str(child), str(parent))
        with serving(cfg, "vhdblkd", child) as (sock, _):
            fio_fill(sock, cfg.fixed_size, bs, skip, offset)
    return top


# --------------------------------------------------------------------------
# results


@dataclasses.dataclass
class Row:
    key: str
    label: str
    runs: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    note: str = ""
    unit: str = "IOPS"  # IOPS rows go in the main table; "s" and "MiB" rows in their own

    def median(self, server: str) -> float | None:
        v = self.runs.get(server)
        return statistics.median(v) if v else None

    def spread(self, server: str) -> tuple[float, float] | None:
        """(min, max) of the runs, or None for fewer than two runs."""
        v = self.runs.get(server)
        return (min(v), max(v)) if v and len(v) > 1 else None


@dataclasses.dataclass(frozen=True)
class Target:
    """`num` / `den` (medians of two cells) must be >= `ratio`, or <= it when `at_most`."""

    label: str
    num: tuple[str, str]  # (row key, column)
    den: tuple[str, str]
    ratio: float
    at_most: bool = False

    def met(self, value: float) -> bool:
        return value <= self.ratio if self.at_most else value >= self.ratio


def _runs(rows: dict[str, Row], cell: tuple[str, str]) -> list[float]:
    row = rows.get(cell[0])
    return row.runs.get(cell[1], []) if row is not None else []


def ratio(rows: dict[str, Row], num: tuple[str, str], den: tuple[str, str]) -> float | None:
    a = rows[num[0]].median(num[1]) if num[0] in rows else None
    b = rows[den[0]].median(den[1]) if den[0] in rows else None
    if a is None or b is None or b == 0:
        return None
    return a / b


def turns(servers: Sequence[str], n: int) -> list[str]:
    """The servers in run n's order: each run starts one further along, so no server
    always goes first after the sync (the first after it met a different page cache)."""
    k = n % len(servers) if servers else 0
    return [*servers[k:], *servers[:k]]


def ratio_spread(rows: dict[str, Row], num: tuple[str, str], den: tuple[str, str]) -> tuple[float, float] | None:
    """(min, max) of the per-run ratios, or None for fewer than two runs.

    The servers take turns run by run, so run n of one cell is paired with
    run n of the other (the same moment of the machine); cells with unequal
    run counts get the extremes, min/max and max/min."""
    a, b = _runs(rows, num), _runs(rows, den)
    if len(a) < 2 and len(b) < 2 or not a or not b or min(b) <= 0:
        return None
    per_run = [x / y for x, y in zip(a, b, strict=True)] if len(a) == len(b) else [min(a) / max(b), max(a) / min(b)]
    return min(per_run), max(per_run)


# --------------------------------------------------------------------------
# sections

FIXED_JOBS = (
    Job("seqread-1m-qd8", "seq read 1M QD8", "read", "1M", 8),
    Job("randread-4k-qd1", "rand read 4k QD1", "randread", "4k", 1),
    Job("randread-4k-qd16", "rand read 4k QD16", "randread", "4k", 16),
    Job("randwrite-4k-qd16", "rand write 4k QD16", "randwrite", "4k", 16),
    Job("seqwrite-1m-qd8", "seq write 1M QD8", "write", "1M", 8),
)
ALLOC_JOBS = (
    Job("randwrite-4k-qd16", "rand write 4k QD16", "randwrite", "4k", 16),
    Job("seqwrite-1m-qd8", "seq write 1M QD8", "write", "1M", 8),
)
READ_JOBS = (
    Job("randread-4k-qd1", "rand read 4k QD1", "randread", "4k", 1),
    Job("randread-4k-qd16", "rand read 4k QD16", "randread", "4k", 16),
)


def section_fixed(cfg: Config, rows: dict[str, Row], results: dict[str, object]) -> None:
    log(f"fixed: building a {cfg.fixed_size // MiB} MiB fixed VHD and its raw twin")
    raw, vhd = make_fixed_pair(cfg)
    servers = [s for s in SERVERS if s in cfg.servers]
    for job in FIXED_JOBS:
        rows[f"fixed/{job.key}"] = Row(f"fixed/{job.key}", f"fixed {job.label}")
    for n in range(cfg.runs):
        for kind in turns(servers, n):
            image = raw if kind.startswith("nbdkit") else vhd
            os.sync()
            with serving(cfg, kind, image) as (sock, pid):
                for job in FIXED_JOBS:
                    iops = fio(cfg, job, nbd_target(sock))
                    rows[f"fixed/{job.key}"].runs.setdefault(kind, []).append(iops)
                    log(f"fixed run {n + 1}/{cfg.runs} {kind:9} {job.label:20} {iops:10.0f} IOPS")
                if kind == "vhdblkd":
                    # the image's mapping shows up as file pages, not heap
                    results["fixed_rss_kib"] = rss_kib(pid)
    # the ceiling: the same access pattern straight on the raw file, once
    # (it only bounds the others; it takes no part in a ratio)
    os.sync()
    for job in FIXED_JOBS:
        iops = fio(cfg, job, {"ioengine": "psync", "filename": str(raw)})
        rows[f"fixed/{job.key}"].runs["psync"] = [iops]
    for f in (raw, vhd):
        f.unlink()


def section_alloc(cfg: Config, rows: dict[str, Row]) -> None:
    servers = [s for s in ("vhdblkd", "compare", "qemu-nbd") if s in cfg.servers]
    img = cfg.workdir / "alloc.vhd"
    for job in ALLOC_JOBS:
        rows[f"alloc/{job.key}"] = Row(f"alloc/{job.key}", f"fresh dynamic {job.label}",
                                       note=f"{cfg.alloc_size // MiB} MiB image, recreated per run")
    for n in range(cfg.runs):
        for job in ALLOC_JOBS:
            for kind in turns(servers, n):
                qemu_img_create(img, "dynamic", cfg.alloc_size)
                # start every run with no dirty pages left by the one before, whose
                # gigabytes would otherwise be written back during this one
                os.sync()
                with serving(cfg, kind, img) as (sock, _):
                    # no ramp: the first allocations are the point
                    iops = fio(cfg, job, nbd_target(sock), ramp=False)
                rows[f"alloc/{job.key}"].runs.setdefault(kind, []).append(iops)
                log(f"alloc run {n + 1}/{cfg.runs} {kind:9} {job.label:20} {iops:10.0f} IOPS")
    img.unlink()


def section_read(cfg: Config, rows: dict[str, Row]) -> None:
    servers = [s for s in ("vhdblkd", "vhdblkd-simple", "compare", "qemu-nbd") if s in cfg.servers]
    dyn = cfg.workdir / "half.vhd"
    log("read: building a half-allocated dynamic image and a 3-file differencing chain")
    make_half_dynamic(cfg, dyn)
    images = {"dyn": dyn}
    try:
        images["diff"] = make_chain(cfg)
    except (ImportError, RuntimeError) as exc:
        log(f"read: no differencing chain ({exc}); differencing rows skipped")
    for job in READ_JOBS:
        rows[f"dyn/{job.key}"] = Row(f"dyn/{job.key}", f"half-alloc dynamic {job.label}")
    for job in READ_JOBS:
        rows[f"diff/{job.key}"] = Row(
            f"diff/{job.key}", f"2-level diff chain {job.label}",
            note="qemu-nbd opens a differencing VHD as dynamic (parent reads as zeros)")
    for n in range(cfg.runs):
        for name, image in images.items():
            for kind in turns(servers, n):
                with serving(cfg, kind, image, read_only=True) as (sock, _):
                    for job in READ_JOBS:
                        iops = fio(cfg, job, nbd_target(sock))
                        rows[f"{name}/{job.key}"].runs.setdefault(kind, []).append(iops)
                        log(f"read run {n + 1}/{cfg.runs} {name:4} {kind:9} {job.label:20} {iops:10.0f} IOPS")
    for f in cfg.workdir.glob("*.vhd"):
        f.unlink()


def section_sr(cfg: Config, results: dict[str, object]) -> None:
    log(f"sr: a {cfg.fixed_size // MiB} MiB fixed VHD and its raw twin, served read-only")
    raw, vhd = make_fixed_pair(cfg)

    def serve(kind: str) -> contextlib.AbstractContextManager[tuple[Path, int]]:
        return serving(cfg, kind, raw if kind.startswith("nbdkit") else vhd, read_only=True)

    def run_fio(job: Job, sock: Path) -> dict[str, Any]:
        return fio_job(cfg, job, nbd_target(sock), ramp=False, runtime_s=cfg.sr_runtime_s)

    try:
        results["sr"] = srcost.measure(serve, run_fio, cfg.sr_rounds, cfg.sr_runtime_s, log)
    finally:
        raw.unlink()
        vhd.unlink()


def section_memory(cfg: Config, results: dict[str, object]) -> None:
    """RSS of `vhdblkd export`: idle on a small and a huge dynamic image, then
    after random 4k writes into the huge one.  Idle RSS must not depend on the
    image size."""
    if "vhdblkd" not in cfg.servers:
        return
    mem: dict[str, object] = {}
    small, big = cfg.workdir / "mem-small.vhd", cfg.workdir / "mem-big.vhd"
    qemu_img_create(small, "dynamic", cfg.fixed_size)
    qemu_img_create(big, "dynamic", cfg.mem_size)
    for name, image in (("small", small), ("big", big)):
        with serving(cfg, "vhdblkd", image) as (sock, pid):
            # one handshake and a few reads, so lazily built state is counted
            fio(cfg, Job("touch", "", "randread", "4k", 1), nbd_target(sock), ramp=False, io_size=64 * 1024)
            time.sleep(0.5)
            mem[f"idle_kib_{name}"] = rss_kib(pid)
            log(f"memory: idle on {image.name}: {mem[f'idle_kib_{name}']} KiB")
            if name == "big":
                # Spread over the whole image, these writes allocate nearly every
                # block; new blocks are sparse, so the disk holds about what was
                # written (reported below).
                start = time.monotonic()
                fio(cfg, Job("mw", "", "randwrite", "4k", 16), nbd_target(sock), ramp=False,
                    io_size=cfg.mem_write)
                mem["write_seconds"] = round(time.monotonic() - start, 1)
                time.sleep(0.5)
                mem["after_write_kib"] = rss_kib(pid)
                log(f"memory: after {cfg.mem_write // MiB} MiB of random 4k writes: {mem['after_write_kib']} KiB")
    mem["image_disk_bytes"] = big.stat().st_blocks * 512
    mem.update(small_image_bytes=cfg.fixed_size, big_image_bytes=cfg.mem_size, written_bytes=cfg.mem_write)
    results["memory"] = mem
    for f in (small, big):
        f.unlink()


# --------------------------------------------------------------------------
# report

TARGETS = (
    *(Target(f"fixed {j.label}: vhdblkd >= 1.0x nbdkit", (f"fixed/{j.key}", "vhdblkd"),
             (f"fixed/{j.key}", "nbdkit"), 1.0) for j in FIXED_JOBS),
    *(Target(f"fixed {j.label}: vhdblkd >= 2x qemu-nbd", (f"fixed/{j.key}", "vhdblkd"),
             (f"fixed/{j.key}", "qemu-nbd"), 2.0) for j in FIXED_JOBS),
    Target("fresh dynamic rand write 4k QD16: vhdblkd >= 5x qemu-nbd",
           ("alloc/randwrite-4k-qd16", "vhdblkd"), ("alloc/randwrite-4k-qd16", "qemu-nbd"), 5.0),
    *(Target(f"diff chain {j.label}: >= 0.8x vhdblkd's own dynamic", (f"diff/{j.key}", "vhdblkd"),
             (f"dyn/{j.key}", "vhdblkd"), 0.8) for j in READ_JOBS),
    *(Target(f"fixed {j.label}: structured replies >= 0.95x simple", (f"fixed/{j.key}", "vhdblkd"),
             (f"fixed/{j.key}", "vhdblkd-simple"), 0.95) for j in FIXED_JOBS),
    *(Target(f"{name} {j.label}: structured replies >= 0.95x simple", (f"{name}/{j.key}", "vhdblkd"),
             (f"{name}/{j.key}", "vhdblkd-simple"), 0.95) for name in ("dyn", "diff") for j in READ_JOBS),
    Target("nbdcopy of the sparse image: vhdblkd's time <= 1.0x qemu-nbd's", ("sparse/nbdcopy", "vhdblkd"),
           ("sparse/nbdcopy", "qemu-nbd"), 1.0, at_most=True),
    Target("nbdcopy of the sparse image: vhdblkd sends <= 1.1x the allocated data", ("sparse/read-mib", "vhdblkd"),
           ("sparse/read-mib", "allocated"), 1.1, at_most=True),
    *(Target(f"vhdblkctl {cmd}: <= 2x python -c pass", (f"cli/{key}", "vhdblkctl"), ("cli/pass", "python"), 2.0,
             at_most=True) for cmd, key in (("info", "info"), ("--help", "help"), ("list", "list"))),
)
COLUMNS = ("vhdblkd", "vhdblkd-simple", "qemu-nbd", "nbdkit", "nbdkit-simple", "psync")


def compare_lines(rows: dict[str, Row], md: bool) -> list[str]:
    """vhdblkd over the --compare executable, row by row, paired run by run."""
    body = []
    for row in rows.values():
        v = ratio(rows, (row.key, "vhdblkd"), (row.key, "compare"))
        if row.unit == "IOPS" and v is not None:
            body.append([row.label, fmt_iops(row.median("compare"), row.spread("compare")),
                         fmt_iops(row.median("vhdblkd"), row.spread("vhdblkd")),
                         fmt_ratio(v, ratio_spread(rows, (row.key, "vhdblkd"), (row.key, "compare")))])
    if not body:
        return []
    return ["", "vhdblkd against --compare, measured in the same runs (IOPS, median (min-max); the ratio's "
                "range is of the per-run ratios):", "",
            *grid(["workload", "compare", "vhdblkd", "vhdblkd/compare"], body, md)]


def structured_cost_lines(rows: dict[str, Row], md: bool) -> list[str]:
    """Structured over simple replies, for us and for nbdkit in the same run: where both
    lose alike, the loss is the client's."""
    body = []
    for row in rows.values():
        ours = ratio(rows, (row.key, "vhdblkd"), (row.key, "vhdblkd-simple"))
        if row.unit != "IOPS" or ours is None:
            continue
        theirs = ratio(rows, (row.key, "nbdkit"), (row.key, "nbdkit-simple"))
        body.append([row.label, fmt_ratio(ours, ratio_spread(rows, (row.key, "vhdblkd"), (row.key, "vhdblkd-simple"))),
                     fmt_ratio(theirs, ratio_spread(rows, (row.key, "nbdkit"), (row.key, "nbdkit-simple")))])
    if not body:
        return []
    return ["", "Structured replies over simple ones, IOPS ratio (min-max of the per-run ratios); nbdkit's "
                "column is the control (`nbdkit --no-sr`), the cost that falls on the client:", "",
            *grid(["workload", "vhdblkd", "nbdkit"], body, md)]


def short(v: float) -> str:
    """A number in three or four digits, for a spread: 132.0k, 1,555, 0.91."""
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.1f}k"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def fmt_iops(v: float | None, spread: tuple[float, float] | None = None) -> str:
    if v is None:
        return "-"
    text = f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
    return text if spread is None else f"{text} ({short(spread[0])}-{short(spread[1])})"


def fmt_ratio(v: float | None, spread: tuple[float, float] | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}x" if spread is None else f"{v:.2f}x ({spread[0]:.2f}-{spread[1]:.2f})"


def row_ratios(row: Row) -> dict[str, float | None]:
    ours = row.median("vhdblkd")
    out: dict[str, float | None] = {}
    for other in ("nbdkit", "qemu-nbd"):
        theirs = row.median(other)
        out[other] = None if ours is None or not theirs else ours / theirs
    return out


def row_ratio_spreads(row: Row) -> dict[str, tuple[float, float] | None]:
    single = {row.key: row}
    return {other: ratio_spread(single, (row.key, "vhdblkd"), (row.key, other)) for other in ("nbdkit", "qemu-nbd")}


def grid(head: list[str], body: list[list[str]], md: bool) -> list[str]:
    """A markdown table, or plain columns (first left-aligned, the rest right-aligned)."""
    if md:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        return lines + ["| " + " | ".join(b) + " |" for b in body]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=False)))

    return [fmt(head), fmt(["-" * w for w in widths]), *(fmt(b) for b in body)]


def table_lines(rows: dict[str, Row], md: bool) -> list[str]:
    head = ["workload (IOPS, median (min-max))", *COLUMNS, "vs nbdkit", "vs qemu-nbd"]
    body = []
    for row in rows.values():
        if row.unit != "IOPS":
            continue
        r, rs = row_ratios(row), row_ratio_spreads(row)
        body.append([row.label, *(fmt_iops(row.median(c), row.spread(c)) for c in COLUMNS),
                     fmt_ratio(r["nbdkit"], rs["nbdkit"]), fmt_ratio(r["qemu-nbd"], rs["qemu-nbd"])])
    return grid(head, body, md) if body else []


def target_lines(rows: dict[str, Row], results: dict[str, object]) -> list[srcost.TargetLine]:
    """(label, ratio, met, per-run range, whether that range spans the target: within noise)."""
    out: list[srcost.TargetLine] = []
    for t in TARGETS:
        v = ratio(rows, t.num, t.den)
        rs = ratio_spread(rows, t.num, t.den)
        noisy = rs is not None and rs[0] <= t.ratio <= rs[1]
        out.append((t.label, v, None if v is None else t.met(v), rs, noisy))
    return out + srcost.target_lines(results.get("sr"))


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for tool, flag in (("fio", "--version"), ("qemu-nbd", "--version"), ("nbdkit", "--version")):
        with contextlib.suppress(OSError, RuntimeError):
            versions[tool] = run([tool, flag]).stdout.splitlines()[0].strip()
    return {"nproc": str(os.cpu_count()), "kernel": platform.release(), "cpu": cpu,
            "python": platform.python_version(), **versions}


def render(cfg: Config, rows: dict[str, Row], results: dict[str, object], md: bool) -> str:
    m = results["machine"]
    assert isinstance(m, dict)
    out: list[str] = []
    settings = (f"{cfg.runs} run(s) per cell, median; {cfg.runtime_s} s per fio job"
                f"{f' (+{cfg.ramp_s} s ramp)' if cfg.ramp_s else ''}; fixed image {cfg.fixed_size // MiB} MiB"
                f"{'; QUICK MODE (smoke test, not a measurement)' if cfg.quick else ''}")
    mach = f"{m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, {m.get('fio', 'fio ?')}, {m.get('qemu-nbd', '')}, {m.get('nbdkit', '')}"
    if md:
        out += ["# vhdblkd benchmark results", "",
                f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
                f"`bash bench/run{' ' + ' '.join(cfg.argv) if cfg.argv else ''}`.", "",
                f"Machine: {mach}.", "", f"Settings: {settings}.", ""]
    else:
        out += [f"machine: {mach}", f"settings: {settings}", ""]
    iops = table_lines(rows, md)
    out += iops
    out += [] if not iops else ["",
            "Servers: `vhdblkd export --unix`; `qemu-nbd -f vpc --cache=writeback` on the same VHD; "
            "`nbdkit file` on the raw twin; psync = fio --ioengine=psync on the raw file (QD1, the ceiling). "
            "All over unix sockets, driven by fio --ioengine=nbd.",
            "qemu-nbd opens a differencing VHD as a dynamic one (its parent reads as zeros), so its "
            "chain row does less work than ours.",
            "Single runs of one cell can differ by a factor of two on a small shared machine "
            "(QD1 rows most); results.json keeps every run."]
    out += compare_lines(rows, md) + structured_cost_lines(rows, md) + sparse_lines(rows, md) + cli_lines(rows, md)
    out += ["", "Targets (ratio of the medians; in brackets the range of the per-run ratios; "
                "* the range spans the target, so the gap is within the noise):"]
    body = []
    for label, v, ok, rs, noisy in target_lines(rows, results):
        mark = "n/a" if ok is None else ("yes" if ok else "NO") + ("*" if noisy else "")
        body.append([label, fmt_ratio(v, rs), mark])
    out += grid(["target", "measured (min-max)", "met"], body, md)
    mem = results.get("memory")
    fixed_rss = results.get("fixed_rss_kib")
    if isinstance(mem, dict) or isinstance(fixed_rss, dict):
        mem = mem if isinstance(mem, dict) else {}
        out += ["", "Memory (RSS of `vhdblkd export`):" if md else "memory (RSS of vhdblkd export):"]
        b = "- " if md else "  "

        def mib(kib: dict[str, int]) -> str:
            return f"{kib['VmRSS'] / 1024:.1f} MiB (anon {kib['RssAnon'] / 1024:.1f}, file {kib['RssFile'] / 1024:.1f})"

        if mem:
            out.append(f"{b}idle, {mem['small_image_bytes'] / GiB:g} GiB dynamic image: {mib(mem['idle_kib_small'])}")
            out.append(f"{b}idle, {mem['big_image_bytes'] / GiB:g} GiB dynamic image: {mib(mem['idle_kib_big'])}")
            out.append(f"{b}after {mem['written_bytes'] // MiB} MiB of random 4k writes QD16 all over it "
                       f"({mem['write_seconds']} s; the file then holds {mem['image_disk_bytes'] / GiB:.1f} GiB "
                       f"on disk): {mib(mem['after_write_kib'])}")
        if isinstance(fixed_rss, dict):
            out.append(f"{b}{cfg.fixed_size / GiB:g} GiB fixed image after the fixed workloads: {mib(fixed_rss)} "
                       "(file = pages of the image's read-only mapping, reclaimable)")
    kern = results.get("kernel")
    if isinstance(kern, dict):
        out += ["", "Kernel path (user-mode Linux guest, ratios only):"]
        for k, v in kern.items():
            out.append(f"{'- ' if md else '  '}{k}: {v}")
    sr_table = srcost.table(results.get("sr"))
    if sr_table is not None:
        caption, head, body = sr_table
        out += ["", caption, "", *grid(head, body, md)]
    out += ublkbench.render_lines(results.get("ublk"), md)
    return "\n".join(out) + "\n"


SPARSE_SIZE = 10 * GiB
SPARSE_DATA = 100 * MiB


class CountingRelay:
    """A unix-socket relay that counts the bytes the server sends: what a client read from it.

    It stands between nbdcopy and a server for one copy apart from the timed
    ones (a Python relay slows the copy it counts). Every connection nbdcopy
    opens is relayed, in both directions."""

    def __init__(self, listen: Path, server: Path) -> None:
        self.listen, self.server = listen, server
        self.server_bytes = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def __enter__(self) -> CountingRelay:
        with contextlib.suppress(FileNotFoundError):
            self.listen.unlink()
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.bind(str(self.listen))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self._start(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join(timeout=30)
        self._sock.close()

    def _start(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(str(self.server))
            self._start(self._pump, upstream, client, True)
            self._start(self._pump, client, upstream, False)

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        buf = bytearray(MiB)
        view = memoryview(buf)
        total = 0
        with contextlib.suppress(OSError):
            while n := src.recv_into(buf):
                dst.sendall(view[:n])
                total += n
            dst.shutdown(socket.SHUT_WR)
        if count:
            with self._lock:
                self.server_bytes += total


def section_sparse(cfg: Config, rows: dict[str, Row]) -> None:
    """nbdcopy of a 10 GiB dynamic image holding 100 MiB, to null:.

    Block status lets a copy skip the unallocated rest; qemu-nbd -f vpc
    reports allocation for dynamic VHDs too, vhdblkd-simple (no structured
    replies, so no block status) must send every byte. Timed copies go
    straight to the server; one more copy per server goes through a counting
    relay, to count the bytes read from the server."""
    from vhdblkd.vhd.create import create_dynamic  # the bench runs in the project venv
    from vhdblkd.vhd.image import open_image

    size, data = (SPARSE_SIZE, SPARSE_DATA) if not cfg.quick else (GiB, 8 * MiB)
    img = cfg.workdir / "sparse.vhd"
    log(f"sparse: a {size // GiB} GiB dynamic image holding {data // MiB} MiB")
    create_dynamic(str(img), size)
    blocks = data // VHD_BLOCK
    stride = size // VHD_BLOCK // blocks
    chunk = os.urandom(VHD_BLOCK)
    with open_image(str(img)) as image:
        for b in range(blocks):
            image.write(b * stride * VHD_BLOCK, chunk)
    what = f"{size // GiB} GiB dynamic VHD holding {data // MiB} MiB"
    timed = rows["sparse/nbdcopy"] = Row("sparse/nbdcopy", f"nbdcopy of a {what}, to null: (s)", unit="s")
    read = rows["sparse/read-mib"] = Row("sparse/read-mib", "MiB read from the server", unit="MiB",
                                         runs={"allocated": [data / MiB]})
    servers = [s for s in ("vhdblkd", "vhdblkd-simple", "qemu-nbd") if s in cfg.servers]
    for n in range(cfg.runs):
        for kind in servers:
            with serving(cfg, kind, img, read_only=True) as (sock, _):
                started = time.monotonic()
                run(["nbdcopy", f"nbd+unix:///?socket={sock}", "null:"])
                seconds = time.monotonic() - started
                if n == 0:
                    with CountingRelay(cfg.workdir / "relay.sock", sock) as relay:
                        run(["nbdcopy", f"nbd+unix:///?socket={relay.listen}", "null:"])
                    read.runs[kind] = [relay.server_bytes / MiB]
            timed.runs.setdefault(kind, []).append(seconds)
            log(f"sparse run {n + 1}/{cfg.runs} {kind:14} {seconds:8.3f} s"
                + (f", {read.runs[kind][0]:.1f} MiB read" if n == 0 else ""))
    img.unlink()


def sparse_lines(rows: dict[str, Row], md: bool) -> list[str]:
    timed, read = rows.get("sparse/nbdcopy"), rows.get("sparse/read-mib")
    if timed is None or read is None:
        return []
    body = []
    for kind in timed.runs:
        t = timed.median(kind)
        mib = read.median(kind)
        vs = ratio(rows, ("sparse/nbdcopy", kind), ("sparse/nbdcopy", "qemu-nbd"))
        vs_rs = ratio_spread(rows, ("sparse/nbdcopy", kind), ("sparse/nbdcopy", "qemu-nbd"))
        body.append([kind, f"{t:.3f}" + ("" if (sp := timed.spread(kind)) is None else f" ({sp[0]:.3f}-{sp[1]:.3f})"),
                     "-" if mib is None else f"{mib:,.1f}", fmt_ratio(vs, vs_rs)])
    return ["", *grid([timed.label.removesuffix(" (s)"), "seconds (median (min-max))", "MiB read from the server",
                       "time vs qemu-nbd"], body, md)]


CLI_RUNS = 21  # runs of each command: a startup is short, so many runs are cheap
CLI_COMMANDS = (  # (row, label, column, argv template, expected exit code)
    ("cli/info", "info IMAGE", "vhdblkctl", ("{ctl}", "info", "{img}"), 0),
    ("cli/info", "info IMAGE", "qemu-img", ("qemu-img", "info", "{img}"), 0),
    ("cli/help", "--help", "vhdblkctl", ("{ctl}", "--help"), 0),
    ("cli/help", "--help", "qemu-img", ("qemu-img", "--help"), 0),
    ("cli/list", "list (no daemon: the 'not running' error)", "vhdblkctl", ("{ctl}", "list"), 1),
    ("cli/pass", "python -c pass (the same venv)", "python", ("{python}", "-c", "pass"), 0),
)


def section_cli(cfg: Config, rows: dict[str, Row]) -> None:
    """Wall time of vhdblkctl commands against qemu-img's and an empty Python start.

    Byte-compiled files are used as an installed package has them (a warm-up
    run writes any that are missing). `list` is measured without a daemon,
    which needs the nbd driver: it prints the clear 'not running' error."""
    bindir = Path(cfg.vhdblkd).parent
    # the interpreter vhdblkctl runs on: the venv's, or the system's for an installed package
    python = bindir / "python3" if (bindir / "python3").exists() else Path(sys.executable)
    img = cfg.workdir / "cli.vhd"
    qemu_img_create(img, "dynamic", cfg.fixed_size)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["VHDBLKD_CONTROL"] = str(cfg.workdir / "no-daemon.sock")
    cmds = [(key, label, col, [a.format(ctl=bindir / "vhdblkctl", python=python, img=img) for a in argv],
             rc) for key, label, col, argv, rc in CLI_COMMANDS]
    for key, label, _, _, _ in cmds:
        rows.setdefault(key, Row(key, label, unit="ms"))
    for _ in range(2):  # warm-up: byte-compile, fill the page cache
        for _key, _label, _col, argv, rc in cmds:
            res = subprocess.run(argv, capture_output=True, env=env, check=False)
            if res.returncode != rc:
                raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}, not {rc}:\n{res.stderr.decode()}")
    n_runs = 3 if cfg.quick else CLI_RUNS
    for _ in range(n_runs):
        for key, _label, col, argv, _rc in cmds:
            started = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False)
            rows[key].runs.setdefault(col, []).append((time.perf_counter() - started) * 1000)
    for key, _label, col, _argv, _rc in cmds:
        log(f"cli: {key:9} {col:9} {rows[key].median(col):7.1f} ms median of {n_runs}")
    img.unlink()


def cli_lines(rows: dict[str, Row], md: bool) -> list[str]:
    if "cli/pass" not in rows:
        return []

    def ms(key: str, col: str) -> str:
        row = rows[key]
        v = row.median(col)
        if v is None:
            return "-"
        sp = row.spread(col)
        return f"{v:.1f}" + ("" if sp is None else f" ({sp[0]:.1f}-{sp[1]:.1f})")

    body = []
    for key in ("cli/info", "cli/help", "cli/list"):
        if key not in rows:
            continue
        vs = [(("cli/pass", "python")), ((key, "qemu-img"))]
        body.append([rows[key].label, ms(key, "vhdblkctl"), ms(key, "qemu-img"),
                     *(fmt_ratio(ratio(rows, (key, "vhdblkctl"), d), ratio_spread(rows, (key, "vhdblkctl"), d))
                       for d in vs)])
    body.append([rows["cli/pass"].label, ms("cli/pass", "python"), "-", "1.00x", "-"])
    return ["", *grid(["command (wall ms, median (min-max))", "vhdblkctl", "qemu-img", "vs python -c pass",
                       "vs qemu-img"], body, md)]


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    for tool in ("fio", "qemu-img", "qemu-nbd", "nbdkit", "nbdcopy"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (bash .ci/setup installs it)", file=sys.stderr)
            return 2
    if "vhdblkd" in cfg.servers and not os.access(cfg.vhdblkd, os.X_OK):
        print(f"bench: {cfg.vhdblkd} not found; run bash .ci/setup or pass --vhdblkd", file=sys.stderr)
        return 2
    rows: dict[str, Row] = {}
    results: dict[str, object] = {"machine": machine()}
    steps: list[tuple[str, Callable[[], None]]] = [
        ("fixed", lambda: section_fixed(cfg, rows, results)),
        ("alloc", lambda: section_alloc(cfg, rows)),
        ("read", lambda: section_read(cfg, rows)),
        ("memory", lambda: section_memory(cfg, results)),
        ("sparse", lambda: section_sparse(cfg, rows)),
        ("cli", lambda: section_cli(cfg, rows)),
        ("sr", lambda: section_sr(cfg, results)),
        ("kernel", lambda: section_kernel(cfg, results)),
        ("ublk", lambda: ublkbench.section_ublk(cfg.runs, cfg.runtime_s, results, quick=cfg.quick)),
    ]
    started = time.monotonic()
    try:
        for name, step in steps:
            if name in cfg.sections:
                step()
    finally:
        if cfg.own_workdir:
            shutil.rmtree(cfg.workdir, ignore_errors=True)
    rows = {k: r for k, r in rows.items() if r.runs}
    results["settings"] = {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, frozenset) else v)
                           for k, v in dataclasses.asdict(cfg).items()}
    results["elapsed_seconds"] = round(time.monotonic() - started, 1)
    results["rows"] = [
        {"key": r.key, "label": r.label, "note": r.note, "unit": r.unit, "runs": r.runs,
         "median": {c: r.median(c) for c in r.runs},
         "min": {c: min(v) for c, v in r.runs.items()}, "max": {c: max(v) for c, v in r.runs.items()},
         "ratio_vs": row_ratios(r), "ratio_vs_spread": row_ratio_spreads(r)}
        for r in rows.values()
    ]
    results["targets"] = [{"target": label, "ratio": v, "met": ok, "ratio_spread": rs, "within_noise": noisy}
                          for label, v, ok, rs, noisy in target_lines(rows, results)]
    cfg.outdir.mkdir(parents=True, exist_ok=True)
    (cfg.outdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (cfg.outdir / "RESULTS.md").write_text(render(cfg, rows, results, md=True))
    print(render(cfg, rows, results, md=False), end="")
    log(f"done in {results['elapsed_seconds']} s; wrote {cfg.outdir / 'results.json'} and RESULTS.md")
    return 0


KERNEL_JOBS = FIXED_JOBS[:4]  # the writes at 1M add little inside UML but time
KERNEL_SCRIPT = r"""
set -euo pipefail
T={workdir}
mkdir -p /run/nbdbench /run/lock  # qemu-nbd -c keeps a lock socket in /var/lock
: >"$T/vhdtab"
export VHDBLKD_CONTROL=/run/nbdbench/control.sock
"{vhdblkd}" run --config "$T/vhdtab" --control "$VHDBLKD_CONTROL" --state-dir /run/nbdbench \
    >"$T/daemon.log" 2>&1 &
DPID=$!
for i in $(seq 150); do vhdblkctl status >/dev/null 2>&1 && break; sleep 0.2; done
wait_for_node() {{ for i in $(seq 100); do [ -b "$1" ] && return 0; sleep 0.1; done; return 1; }}
jobs() {{  # SERVER RUN DEVICE
{jobs}
}}
for run in $(seq {runs}); do
    DEV=$(vhdblkctl attach "$T/fixed.vhd")
    wait_for_node "$DEV"
    jobs vhdblkd "$run" "$DEV"
    vhdblkctl detach "$DEV"
    qemu-nbd -f vpc --cache=writeback --fork -c /dev/nbd15 "$T/fixed.vhd"
    wait_for_node /dev/nbd15
    jobs qemu-nbd "$run" /dev/nbd15
    qemu-nbd -d /dev/nbd15
done
kill -TERM $DPID
wait $DPID
"""


def section_kernel(cfg: Config, results: dict[str, object]) -> None:
    """`vhdblkctl attach` against `qemu-nbd -c` in one user-mode Linux guest.

    UML makes syscalls and page faults far slower than a real kernel does, so
    only the ratio of the two servers in the same guest means anything."""
    sys.path.insert(0, str(REPO))
    from tests.kernel.uml import run_in_guest  # the project's UML harness

    size = min(cfg.fixed_size, 256 * MiB)
    raw = cfg.workdir / "kraw.raw"
    make_raw(raw, size)
    run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on",
         str(raw), str(cfg.workdir / "fixed.vhd")])
    raw.unlink()
    lines = [f'    fio --name={j.key} --filename="$3" --rw={j.rw} --bs={j.bs} --iodepth={j.qd} '
             f"--ioengine=libaio --direct=1 --runtime={cfg.runtime_s} --time_based --norandommap "
             f'--randrepeat=0 --output-format=json --output="$T/k-$1-$2-{j.key}.json"'
             for j in KERNEL_JOBS]
    script = KERNEL_SCRIPT.format(workdir=cfg.workdir, vhdblkd=cfg.vhdblkd, runs=cfg.runs, jobs="\n".join(lines))
    log(f"kernel: booting user-mode Linux ({cfg.runs} run(s) of {len(KERNEL_JOBS)} jobs per server)")
    guest = run_in_guest(script, timeout=120 + cfg.runs * len(KERNEL_JOBS) * 2 * (cfg.runtime_s + 10))
    guest.check()
    kern: dict[str, object] = {}
    for j in KERNEL_JOBS:
        med = {}
        for kind in ("vhdblkd", "qemu-nbd"):
            vals = []
            for n in range(1, cfg.runs + 1):
                data = json.loads((cfg.workdir / f"k-{kind}-{n}-{j.key}.json").read_text())
                job = data["jobs"][0]
                vals.append(float(job["read"]["iops"] + job["write"]["iops"]))
            med[kind] = statistics.median(vals)
        kern[f"{j.label}: /dev/nbdN vhdblkd vs qemu-nbd -c"] = f"{med['vhdblkd'] / med['qemu-nbd']:.2f}x"
        log(f"kernel: {j.label}: ratio {med['vhdblkd'] / med['qemu-nbd']:.2f}")
    results["kernel"] = kern
    for f in cfg.workdir.glob("k-*.json"):
        f.unlink()
    (cfg.workdir / "fixed.vhd").unlink()


if __name__ == "__main__":
    sys.exit(main())

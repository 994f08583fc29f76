#!/usr/bin/env python3
"""Instructions per NBD request of `vhdblkd export`, counted by callgrind: a measure that noise cannot move.

Wall-clock IOPS on a shared machine swing by more than the few percent a
change to the request path costs.  This runs each given vhdblkd under
`valgrind --tool=callgrind`, drives it over a unix socket with fixed request
streams (seeded offsets, so every run sends the same bytes), and reports the
user-space instructions the server executed per request in each phase
(counters zeroed after a warm-up, dumped at the end of the phase).

    .venv/bin/python bench/reqcount.py --vhdblkd A [--vhdblkd B ...] [--requests N] [--structured]

--structured negotiates structured replies with OPT_GO, as fio's libnbd does
(READs then come back as chunks); without it the old EXPORT_NAME handshake.

Each --vhdblkd is an executable (e.g. a wrapper running another checkout).  A
wrapper that sets PYTHONPATH must run ``python -P``: without it the current
directory comes first on sys.path, and run from a checkout every wrapper
imports that checkout's vhdblkd instead of its own.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

MiB = 1024 * 1024
IMAGE_SIZE = 256 * MiB
REQUEST = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513
READ, WRITE, DISC = 0, 1, 2
PHASES = (
    # name, image, command, size, queue depth
    ("fixed read 4k QD1", "fixed", READ, 4096, 1),
    ("fixed read 4k QD16", "fixed", READ, 4096, 16),
    ("fixed write 4k QD16", "fixed", WRITE, 4096, 16),
    ("fixed write 256k QD8", "fixed", WRITE, 256 * 1024, 8),
    ("dynamic read 4k QD16", "dynamic", READ, 4096, 16),
    ("dynamic write 4k QD16", "dynamic", WRITE, 4096, 16),
)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise RuntimeError(f"server closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


OPTS_MAGIC = 0x49484156454F5054
OPT_GO, OPT_STRUCTURED_REPLY = 7, 8
REP_ACK, REP_INFO = 1, 3
SIMPLE_MAGIC, CHUNK_MAGIC = 0x67446698, 0x668E33EF
CHUNK_DONE = 1


def option(sock: socket.socket, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
    """Send one option; return its replies (type, data) up to the final one."""
    sock.sendall(struct.pack(">QII", OPTS_MAGIC, opt, len(data)) + data)
    replies = []
    while True:
        _magic, _opt, rep, length = struct.unpack(">QIII", recv_exact(sock, 20))
        body = recv_exact(sock, length) if length else b""
        if rep & 0x80000000:
            raise RuntimeError(f"option {opt} refused: reply {rep:#x} {body!r}")
        replies.append((rep, body))
        if rep == REP_ACK:  # every option's last reply (STRUCTURED_REPLY's only one)
            return replies


def connect(path: Path, structured: bool = False) -> tuple[socket.socket, int]:
    deadline = time.monotonic() + 1200  # python under valgrind starts slowly (minutes on a loaded machine)
    while True:
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(path))
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    hello = recv_exact(sock, 18)
    assert hello[:8] == b"NBDMAGIC", hello
    sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    if not structured:
        sock.sendall(struct.pack(">QII", OPTS_MAGIC, 1, 0))  # EXPORT_NAME ""
        size, _flags = struct.unpack(">QH", recv_exact(sock, 10))
        return sock, size
    option(sock, OPT_STRUCTURED_REPLY)
    for rep, body in option(sock, OPT_GO, struct.pack(">IH", 0, 0)):  # name "", no info requests
        if rep == REP_INFO and struct.unpack_from(">H", body)[0] == 0:  # NBD_INFO_EXPORT
            return sock, struct.unpack_from(">Q", body, 2)[0]
    raise RuntimeError("OPT_GO gave no NBD_INFO_EXPORT")


def reply(sock: socket.socket, command: int, length: int) -> None:
    """Receive one reply, simple or structured (chunks up to the one flagged DONE)."""
    while True:
        head = recv_exact(sock, 16)
        magic, error = struct.unpack_from(">II", head)
        if magic == SIMPLE_MAGIC:
            if error:
                raise RuntimeError(f"request failed with NBD error {error}; see the server's log")
            if command == READ:
                recv_exact(sock, length)
            return
        if magic != CHUNK_MAGIC:
            raise RuntimeError(f"bad reply magic {magic:#x}")
        flags, kind = struct.unpack_from(">HH", head, 4)
        body = recv_exact(sock, struct.unpack(">I", recv_exact(sock, 4))[0])
        if kind & 0x8000:
            raise RuntimeError(f"request failed: error chunk {body!r}")
        if flags & CHUNK_DONE:
            return


def stream(sock: socket.socket, size: int, command: int, length: int, qd: int, count: int, seed: int) -> None:
    rng = random.Random(seed)
    payload = bytes(range(256)) * (length // 256)
    cookie = 0
    for _ in range(count // qd):
        out = []
        for _ in range(qd):
            cookie += 1
            offset = rng.randrange(size // length) * length
            out.append(REQUEST.pack(REQUEST_MAGIC, 0, command, cookie, offset, length))
            if command == WRITE:
                out.append(payload)
        sock.sendall(b"".join(out))
        for _ in range(qd):
            reply(sock, command, length)


def totals(path: Path) -> int:
    text = path.read_text()
    m = re.search(r"^(?:totals|summary): (\d+)", text, re.M)
    if m is None:
        raise RuntimeError(f"no totals in {path}")
    return int(m.group(1))


def measure(
    exe: str, images: dict[str, Path], count: int, work: Path, structured: bool
) -> Iterator[tuple[str, float]]:
    for image_name in images:
        phases = [p for p in PHASES if p[1] == image_name]
        sock_path = work / "bench.sock"
        sock_path.unlink(missing_ok=True)
        out = work / "cg.out"
        for old in work.glob("cg.out*"):
            old.unlink()
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={out}",
             exe, "export", "--unix", str(sock_path), str(images[image_name])],
            stdout=subprocess.DEVNULL, stderr=open(work / f"server-{image_name}.log", "ab"))  # noqa: SIM115
        try:
            sock, size = connect(sock_path, structured)
            for n, (name, _, command, length, qd) in enumerate(phases):
                phase_count = max(qd, count * 4096 // length // qd * qd)
                stream(sock, size, command, length, qd, max(qd, phase_count // 10), seed=100 + n)  # warm-up
                subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
                stream(sock, size, command, length, qd, phase_count, seed=n)
                subprocess.run(["callgrind_control", "-d", name.replace(" ", "_"), str(proc.pid)],
                               check=True, capture_output=True)
                dumps = sorted(work.glob("cg.out.*"), key=lambda p: p.stat().st_mtime)
                yield name, totals(dumps[-1]) / phase_count
            sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, DISC, 0, 0, 0))
            sock.close()
        finally:
            proc.terminate()
            proc.wait(timeout=120)


def make_images(work: Path, vhdblkctl: str, kinds: list[str]) -> dict[str, Path]:
    images = {}
    for kind in kinds:
        images[kind] = work / f"{kind}.vhd"
        images[kind].unlink(missing_ok=True)
        subprocess.run([vhdblkctl, "create", "--type", kind, "--size", str(IMAGE_SIZE), str(images[kind])], check=True)
    return images


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/reqcount.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vhdblkd", action="append", required=True, help="vhdblkd executable (repeat to compare)")
    p.add_argument("--requests", type=int, default=2000, help="4k-equivalent requests per phase (default 2000)")
    p.add_argument("--images", default="fixed,dynamic", help="which phases to run, by image kind (default: %(default)s)")
    p.add_argument("--structured", action="store_true",
                   help="negotiate structured replies (with OPT_GO), as libnbd and fio do")
    p.add_argument("--workdir", help="keep images and server logs here instead of a temporary folder")
    p.add_argument("--vhdblkctl", default=str(Path(sys.executable).with_name("vhdblkctl")))
    a = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        p.error("valgrind is not installed")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="reqcount-", dir="/var/tmp") as tmp:
        work = Path(a.workdir or tmp)
        for exe in a.vhdblkd:
            images = make_images(work, a.vhdblkctl, a.images.split(","))  # fresh: the dynamic image starts empty for each
            results[exe] = dict(measure(exe, images, a.requests, work, a.structured))
            for image in images.values():
                image.unlink()
            print(f"measured {exe}", file=sys.stderr)
    exes = list(results)
    head = ["phase (instructions per request)", *(Path(e).name if i else e for i, e in enumerate(exes))]
    if len(exes) > 1:
        head += [f"{Path(e).name} vs first" for e in exes[1:]]
    print("| " + " | ".join(head) + " |")
    print("|---" + "|---:" * (len(head) - 1) + "|")
    for name, *_ in PHASES:
        if name not in results[exes[0]]:
            continue
        cells = [f"{results[e][name]:,.0f}" for e in exes]
        cells += [f"{results[e][name] / results[exes[0]][name] - 1:+.1%}" for e in exes[1:]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Real NBD clients (nbdinfo, qemu-io, nbdcopy, fio) against an in-process SocketServer."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vhdblkd.backend import Backend, MemoryBackend
from vhdblkd.nbd import constants as c
from vhdblkd.nbd.server import Export, SocketServer

from .rawfile import RawFileBackend

pytestmark = [pytest.mark.peers, pytest.mark.timeout(300)]

MiB = 1 << 20


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}): {proc.stderr}{proc.stdout}"
    return proc.stdout


@contextmanager
def served(backend: Backend, sock: Path, name: str = "disk") -> Iterator[tuple[str, Export]]:
    export = Export(backend, name)
    server = SocketServer(export, unix_path=str(sock))
    server.start()
    try:
        yield f"nbd+unix:///?socket={sock}", export
    finally:
        server.shutdown()
    assert not sock.exists()


@pytest.fixture(params=["memory", "raw"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend(16 * MiB)
        return
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(16 * MiB))
    raw = RawFileBackend(str(path))
    yield raw
    raw.close()


def test_nbdinfo_size_and_flags(backend: Backend, tmp_path: Path) -> None:
    with served(backend, tmp_path / "s.sock") as (uri, export):
        info = json.loads(run("nbdinfo", "--json", uri))
        (exp,) = info["exports"]
        assert exp["export-size"] == backend.size
        assert exp["export-name"] == "disk"
        assert exp["is_read_only"] is False
        assert exp["can_flush"] and exp["can_fua"] and exp["can_trim"] and exp["can_zero"] and exp["can_multi_conn"]
        assert exp["block_size_minimum"] == 1 and exp["block_size_maximum"] == c.NBD_MAX_PAYLOAD
        # the export answers to its own name as well as to the default ""
        named = json.loads(run("nbdinfo", "--json", f"nbd+unix:///disk?socket={tmp_path / 's.sock'}"))
        assert named["exports"][0]["export-size"] == backend.size
        assert export.flags & c.NBD_FLAG_SEND_FLUSH


def test_nbdinfo_read_only(tmp_path: Path) -> None:
    with served(MemoryBackend(MiB, read_only=True), tmp_path / "s.sock") as (uri, _):
        exp = json.loads(run("nbdinfo", "--json", uri))["exports"][0]
        assert exp["is_read_only"] is True and not exp["can_trim"] and not exp["can_zero"]
        proc = subprocess.run(["qemu-io", "-f", "raw", uri, "-c", "write -P 1 0 4k"], capture_output=True, text=True)
        assert "Operation not permitted" in proc.stdout + proc.stderr or proc.returncode != 0


def test_qemu_io_write_read_discard(backend: Backend, tmp_path: Path) -> None:
    with served(backend, tmp_path / "s.sock") as (uri, export):
        out = run(
            "qemu-io", "-f", "raw", "-d", "unmap", uri,
            "-c", "write -P 0xab 0 1M",
            "-c", "read -P 0xab 0 1M",
            "-c", "write -z 1M 64k",
            "-c", "read -P 0 1M 64k",
            "-c", "write -P 0xcd -f 2M 4k",
            "-c", "flush",
            "-c", "discard 4M 1M",
            "-c", "read -P 0xcd 2M 4k",
        )
        assert "Pattern verification failed" not in out
        assert export.stats.trims == 1 and export.stats.errors == 0
    assert bytes(backend.read(4 * MiB, MiB)) == bytes(MiB)
    assert bytes(backend.read(0, MiB)) == b"\xab" * MiB
    assert bytes(backend.read(2 * MiB, 4096)) == b"\xcd" * 4096


def test_nbdcopy_reads_everything(backend: Backend, tmp_path: Path) -> None:
    backend.write(5 * MiB + 17, b"marker" * 1000)
    with served(backend, tmp_path / "s.sock") as (uri, _):
        run("nbdcopy", uri, str(tmp_path / "copy.raw"))
    assert (tmp_path / "copy.raw").read_bytes() == bytes(backend.read(0, backend.size))


def test_nbdcopy_writes_with_multi_conn(tmp_path: Path) -> None:
    source = os.urandom(8 * MiB)
    (tmp_path / "src.raw").write_bytes(source)
    backend = MemoryBackend(8 * MiB)
    with served(backend, tmp_path / "s.sock") as (uri, export):
        run("nbdcopy", "--connections=4", str(tmp_path / "src.raw"), uri)
        assert export.stats.bytes_written >= len(source)
    assert bytes(backend.read(0, backend.size)) == source


def test_fio_randrw_verify(backend: Backend, tmp_path: Path) -> None:
    with served(backend, tmp_path / "s.sock") as (uri, export):
        out = run(
            "fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw", "--bs=4k", "--iodepth=16",
            f"--size={backend.size}", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
            "--output-format=json", "--verify_state_save=0",
        )
        result = json.loads(out[out.index("{"):])
        job = result["jobs"][0]
        assert job["error"] == 0
        assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0
        assert export.stats.errors == 0

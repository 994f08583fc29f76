"""`vhdblkd export` as a subprocess, driven by real NBD clients, on fixed, dynamic and differencing VHDs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vhdblkd.vhd.create import create_differencing, create_dynamic, create_fixed
from vhdblkd.vhd.image import open_image

pytestmark = [pytest.mark.peers, pytest.mark.timeout(300)]

MiB = 1 << 20
VHDBLKD = str(Path(sys.executable).with_name("vhdblkd"))
VHDBLKCTL = str(Path(sys.executable).with_name("vhdblkctl"))


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}): {proc.stderr}{proc.stdout}"
    return proc.stdout


class Exported:
    def __init__(self, proc: subprocess.Popen[str], uri: str) -> None:
        self.proc = proc
        self.uri = uri

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


@contextmanager
def exporting(image: Path, *extra: str, sock: Path | None = None) -> Iterator[Exported]:
    """Start `vhdblkd export` on a unix socket (or TCP when extra has --tcp) and wait until it serves."""
    argv = [VHDBLKD, "export", *extra]
    if sock is not None:
        argv += ["--unix", str(sock)]
    proc = subprocess.Popen([*argv, str(image)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    uri = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"vhdblkd export exited early ({proc.wait()})")
        found = re.search(r"serving .* on (.+)$", line.strip())
        if found:
            where = found.group(1)
            uri = f"nbd+unix:///?socket={where}" if where.startswith("/") else f"nbd://{where}/"
            break
    assert uri, "vhdblkd export never said it was serving"
    exported = Exported(proc, uri)
    try:
        yield exported
    finally:
        if proc.poll() is None:
            rc, err = exported.stop()
            assert rc == 0, err


def convert_raw(image: Path, out: Path) -> bytes:
    """The image's contents as qemu-img sees them; qemu's vpc driver has no differencing
    support, so a child is flattened by the format layer instead (after the export released it)."""
    if "differencing" not in image.name:
        run("qemu-img", "convert", "-f", "vpc", "-O", "raw", str(image), str(out))
        return out.read_bytes()
    child = open_image(str(image), read_only=True)
    try:
        return b"".join(bytes(child.read(off, min(MiB, child.size - off))) for off in range(0, child.size, MiB))
    finally:
        child.close()


@pytest.fixture(params=["fixed", "dynamic", "differencing"])
def image(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / f"{request.param}.vhd"
    if request.param == "fixed":
        create_fixed(str(path), 8 * MiB)
    elif request.param == "dynamic":
        create_dynamic(str(path), 8 * MiB)
    else:
        base = tmp_path / "base.vhd"
        create_dynamic(str(base), 8 * MiB)
        parent = open_image(str(base))
        parent.write(6 * MiB, b"\x5a" * MiB)
        parent.close()
        create_differencing(str(path), str(base))
    return path


def test_nbdinfo_reports_the_image(image: Path, tmp_path: Path) -> None:
    size = open_image(str(image), read_only=True, lock=False).size
    with exporting(image, sock=tmp_path / "s.sock") as exp:
        info = json.loads(run("nbdinfo", "--json", exp.uri))
        (entry,) = info["exports"]
        assert entry["export-name"] == image.name
        assert entry["export-size"] == size
        assert entry["can_flush"] and entry["can_fua"] and not entry["is_read_only"]
        by_name = json.loads(run("nbdinfo", "--json", f"nbd+unix:///{image.name}?socket={tmp_path / 's.sock'}"))
        assert by_name["exports"][0]["export-size"] == size


def test_written_pattern_survives_the_export(image: Path, tmp_path: Path) -> None:
    with exporting(image, sock=tmp_path / "s.sock") as exp:
        run("qemu-io", "-f", "raw", exp.uri, "-c", "write -P 0xab 0 1M")
        out = run("qemu-io", "-f", "raw", exp.uri, "-c", "read -P 0xab 0 1M")
        assert "verification failed" not in out
        rc, err = exp.stop()
        assert rc == 0, err
        assert "closed" in err
    raw = convert_raw(image, tmp_path / "out.raw")
    assert raw[:MiB] == b"\xab" * MiB
    assert raw[MiB : 2 * MiB] == bytes(MiB)
    if image.name == "differencing.vhd":
        assert raw[6 * MiB : 7 * MiB] == b"\x5a" * MiB  # read through to the parent


def test_nbdcopy_equals_qemu_img_convert(image: Path, tmp_path: Path) -> None:
    with exporting(image, sock=tmp_path / "s.sock") as exp:
        run("qemu-io", "-f", "raw", exp.uri, "-c", "write -P 0x11 1M 4k", "-c", "write -P 0x22 5M 512")
        run("nbdcopy", exp.uri, str(tmp_path / "copy.raw"))
    assert (tmp_path / "copy.raw").read_bytes() == convert_raw(image, tmp_path / "ref.raw")


def test_fio_verify_workload(image: Path, tmp_path: Path) -> None:
    with exporting(image, sock=tmp_path / "s.sock") as exp:
        out = run(
            "fio", "--name=verify", "--ioengine=nbd", f"--uri={exp.uri}", "--rw=randrw", "--bs=4k",
            "--iodepth=8", "--size=8M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
            "--output-format=json", "--verify_state_save=0",
        )
        job = json.loads(out[out.index("{"):])["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] > 0


def test_trim_frees_dynamic_blocks(tmp_path: Path) -> None:
    path = tmp_path / "dyn.vhd"
    create_dynamic(str(path), 16 * MiB)
    with exporting(path, sock=tmp_path / "s.sock") as exp:
        run("qemu-io", "-f", "raw", exp.uri, "-c", "write -P 0x77 0 8M")
    assert open_image(str(path), read_only=True, lock=False).allocated_blocks == 4  # 8 MiB in 2 MiB blocks
    used_before = os.stat(path).st_blocks * 512
    with exporting(path, sock=tmp_path / "s.sock") as exp:
        run("qemu-io", "-f", "raw", "-d", "unmap", exp.uri, "-c", "discard 0 4M")
    # Whole blocks trimmed: their BAT entries are freed and the file gives the space back.
    info = json.loads(run(VHDBLKCTL, "info", "--json", str(path)))
    assert info["allocated_blocks"] == 2
    assert used_before - os.stat(path).st_blocks * 512 >= 4 * MiB - 64 * 1024
    assert subprocess.run([VHDBLKCTL, "check", str(path)], capture_output=True).returncode == 0
    raw = convert_raw(path, tmp_path / "out.raw")
    assert raw[: 4 * MiB] == bytes(4 * MiB) and raw[4 * MiB : 8 * MiB] == b"\x77" * (4 * MiB)


def test_read_only_export(tmp_path: Path) -> None:
    path = tmp_path / "ro.vhd"
    create_dynamic(str(path), 4 * MiB)
    before = path.read_bytes()
    with exporting(path, "--read-only", sock=tmp_path / "s.sock") as exp:
        info = json.loads(run("nbdinfo", "--json", exp.uri))
        assert info["exports"][0]["is_read_only"] is True
        proc = subprocess.run(["qemu-io", "-f", "raw", exp.uri, "-c", "write -P 1 0 4k"], capture_output=True, text=True)
        assert "wrote" not in proc.stdout
    assert path.read_bytes() == before


def test_named_export_and_second_writer_refused(tmp_path: Path) -> None:
    path = tmp_path / "named.vhd"
    create_dynamic(str(path), 4 * MiB)
    with exporting(path, "--name", "data", sock=tmp_path / "s.sock") as exp:
        assert json.loads(run("nbdinfo", "--json", exp.uri))["exports"][0]["export-name"] == "data"
        proc = subprocess.run(
            [VHDBLKD, "export", "--unix", str(tmp_path / "t.sock"), str(path)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 1 and proc.stderr.startswith("vhdblkd: ")


def test_tcp_loopback(tmp_path: Path) -> None:
    path = tmp_path / "tcp.vhd"
    create_fixed(str(path), 2 * MiB)
    with exporting(path, "--tcp", "127.0.0.1:0") as exp:
        assert exp.uri.startswith("nbd://127.0.0.1:")
        run("qemu-io", "-f", "raw", exp.uri, "-c", "write -P 0x42 0 64k", "-c", "read -P 0x42 0 64k")


@pytest.mark.parametrize("address", ["0.0.0.0:10809", "[::]:10809"])
def test_tcp_remote_needs_allow_remote(tmp_path: Path, address: str) -> None:
    path = tmp_path / "remote.vhd"
    create_dynamic(str(path), MiB)
    proc = subprocess.run([VHDBLKD, "export", "--tcp", address, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "--allow-remote" in proc.stderr and "not a loopback address" in proc.stderr


def test_tcp_allow_remote_binds_any(tmp_path: Path) -> None:
    path = tmp_path / "any.vhd"
    create_dynamic(str(path), MiB)
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    with exporting(path, "--tcp", f"0.0.0.0:{port}", "--allow-remote") as exp:
        info = json.loads(run("nbdinfo", "--json", f"nbd://127.0.0.1:{port}/"))
        assert info["exports"][0]["export-size"] == open_image(str(path), read_only=True, lock=False).size
        assert exp.proc.poll() is None


def test_sigint_also_stops_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "int.vhd"
    create_dynamic(str(path), MiB)
    with exporting(path, sock=tmp_path / "s.sock") as exp:
        exp.proc.send_signal(signal.SIGINT)
        assert exp.proc.wait(timeout=60) == 0
    assert not (tmp_path / "s.sock").exists()
    os.stat(path)  # still there, and not locked any more:
    open_image(str(path)).close()

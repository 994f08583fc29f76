"""`vhdblkd export` with TLS and several exports, against nbdinfo, nbdcopy and qemu-img."""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import subprocess
from pathlib import Path

import pytest

from vhdblkd.nbd import constants as c
from vhdblkd.vhd.create import create_dynamic, create_fixed

from .client import recv_exact
from .test_export_cmd import VHDBLKD, MiB, exporting, run
from .tlscerts import make_pki, make_rogue_client

pytestmark = [pytest.mark.peers, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_args(pki: Path, *, ca: bool = True, mode: str | None = None) -> list[str]:
    argv = ["--tls-cert", str(pki / "server-cert.pem"), "--tls-key", str(pki / "server-key.pem")]
    if ca:
        argv += ["--tls-ca", str(pki / "ca-cert.pem")]
    if mode:
        argv += [f"--tls={mode}"]
    return argv


def tls_uri(sock: Path, certs: Path, name: str = "") -> str:
    return f"nbds+unix:///{name}?socket={sock}&tls-certificates={certs}"


def qemu_tls(certs: Path, sock: Path) -> list[str]:
    return [
        "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}",
        "--image-opts", f"driver=nbd,path={sock},tls-creds=tls0,tls-hostname=localhost",
    ]


def plain_options(sock_path: Path, *options: tuple[int, bytes]) -> list[int]:
    """Greet the server in plain text, send `options`, return the reply types (last reply of each)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock_path))
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", c.NBD_FLAG_C_FIXED_NEWSTYLE | c.NBD_FLAG_C_NO_ZEROES))
        kinds = []
        for opt, data in options:
            s.sendall(struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data)
            _, _, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
            recv_exact(s, length)
            kinds.append(kind)
        return kinds


def test_tls_clients_read_and_write(tmp_path: Path, pki: Path) -> None:
    image = tmp_path / "tls.vhd"
    create_dynamic(str(image), 16 * MiB)
    pattern = os.urandom(3 * MiB)
    (tmp_path / "in.raw").write_bytes(pattern + bytes(13 * MiB))
    sock = tmp_path / "s.sock"
    with exporting(image, *tls_args(pki), sock=sock):
        assert "with TLS" in run("nbdinfo", tls_uri(sock, pki))
        run("nbdcopy", str(tmp_path / "in.raw"), tls_uri(sock, pki))
        run("qemu-img", "convert", "-O", "raw", *qemu_tls(pki, sock), str(tmp_path / "out.raw"))
    out = (tmp_path / "out.raw").read_bytes()
    assert out[: 3 * MiB] == pattern and not any(out[3 * MiB : 16 * MiB])


@pytest.mark.parametrize("who", ["rogue", "no certificate"])
def test_client_without_a_valid_certificate_is_refused(tmp_path: Path, pki: Path, who: str) -> None:
    image = tmp_path / "ca.vhd"
    create_dynamic(str(image), MiB)
    certs = tmp_path / "client"
    if who == "rogue":
        make_rogue_client(certs)
    else:
        certs.mkdir()
    (certs / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
    sock = tmp_path / "s.sock"
    with exporting(image, *tls_args(pki), sock=sock):
        proc = subprocess.run(["nbdinfo", tls_uri(sock, certs)], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        # The Python client too: no certificate, no session.
        ctx = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            recv_exact(s, 18)
            s.sendall(struct.pack(">IQII", c.NBD_FLAG_C_FIXED_NEWSTYLE, c.IHAVEOPT, c.NBD_OPT_STARTTLS, 0))
            assert struct.unpack(">QIII", recv_exact(s, 20))[2] == c.NBD_REP_ACK
            try:
                with ctx.wrap_socket(s, server_hostname="localhost") as t:
                    # TLS 1.3 finishes the client side before the server checked; the refusal shows here.
                    t.sendall(struct.pack(">QII", c.IHAVEOPT, c.NBD_OPT_LIST, 0))
                    answer = t.recv(20)
            except (ssl.SSLError, ConnectionError):
                answer = b""
            assert answer == b""


def test_tls_required_refuses_plain_options(tmp_path: Path, pki: Path) -> None:
    image = tmp_path / "req.vhd"
    create_dynamic(str(image), MiB)
    sock = tmp_path / "s.sock"
    go = struct.pack(">I", 0) + struct.pack(">H", 0)
    with exporting(image, *tls_args(pki), sock=sock):
        kinds = plain_options(sock, (c.NBD_OPT_LIST, b""), (c.NBD_OPT_INFO, go), (c.NBD_OPT_GO, go),
                              (c.NBD_OPT_STRUCTURED_REPLY, b""))
        assert kinds == [c.NBD_REP_ERR_TLS_REQD] * 4
        proc = subprocess.run(["nbdinfo", f"nbd+unix:///?socket={sock}"], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        proc = subprocess.run(["qemu-img", "info", f"nbd+unix:///?socket={sock}"], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode != 0


def test_tls_on_lets_plain_and_tls_clients_in(tmp_path: Path, pki: Path) -> None:
    image = tmp_path / "on.vhd"
    create_fixed(str(image), MiB)
    sock = tmp_path / "s.sock"
    with exporting(image, *tls_args(pki, ca=False, mode="on"), sock=sock):
        assert plain_options(sock, (c.NBD_OPT_LIST, b"")) == [c.NBD_REP_SERVER]
        run("nbdinfo", f"nbd+unix:///?socket={sock}")
        server_only = tmp_path / "trust"
        server_only.mkdir()
        (server_only / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
        run("nbdinfo", tls_uri(sock, server_only))  # no CA on the server: no client certificate needed


def test_remote_tcp_with_tls_required_needs_no_allow_remote(tmp_path: Path, pki: Path) -> None:
    image = tmp_path / "net.vhd"
    create_dynamic(str(image), MiB)
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    with exporting(image, "--tcp", f"0.0.0.0:{port}", *tls_args(pki)):
        run("nbdinfo", f"nbds://127.0.0.1:{port}/?tls-certificates={pki}")
    proc = subprocess.run(
        [VHDBLKD, "export", "--tcp", f"0.0.0.0:{port}", *tls_args(pki, mode="on"), str(image)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1 and "--allow-remote" in proc.stderr


def test_several_exports_listed_and_served(tmp_path: Path) -> None:
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    create_dynamic(str(a), MiB)
    create_fixed(str(b), 2 * MiB)
    d = tmp_path / "more"
    d.mkdir()
    create_dynamic(str(d / "c.vhd"), 3 * MiB)
    (d / "notes.txt").write_text("not an image")
    sock = tmp_path / "s.sock"
    # exporting() appends its image last: the positionals stay together as argparse wants.
    with exporting(Path(f"second={b}"), "--dir", str(d), "--unix", str(sock), str(a)):
        listing = json.loads(run("nbdinfo", "--json", "--list", f"nbd+unix:///?socket={sock}"))
        sizes = {e["export-name"]: e["export-size"] for e in listing["exports"]}
        assert set(sizes) == {"second", "c.vhd", "a.vhd"}
        assert sizes["second"] >= 2 * MiB and sizes["c.vhd"] >= 3 * MiB  # sizes round up to CHS geometry
        run("qemu-io", "-f", "raw", f"nbd+unix:///second?socket={sock}", "-c", "write -P 0x33 0 64k")
        out = run("qemu-io", "-f", "raw", f"nbd+unix:///second?socket={sock}", "-c", "read -P 0x33 0 64k")
        assert "verification failed" not in out
        default = json.loads(run("nbdinfo", "--json", f"nbd+unix:///?socket={sock}"))
        assert default["exports"][0]["export-size"] == sizes["a.vhd"]


def test_duplicate_export_names_refused(tmp_path: Path) -> None:
    a = tmp_path / "a.vhd"
    create_dynamic(str(a), MiB)
    proc = subprocess.run([VHDBLKD, "export", "--unix", str(tmp_path / "s"), str(a), f"a.vhd={a}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "given twice" in proc.stderr

"""Test certificates made with openssl: a CA, a server certificate and a client certificate.

The directory is laid out as GnuTLS-based clients expect it (libnbd's
tls-certificates=, qemu's tls-creds-x509 dir=): ca-cert.pem, client-cert.pem,
client-key.pem, plus server-cert.pem and server-key.pem for vhdblkd.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*argv: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *argv], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"openssl {argv[0]} failed: {proc.stderr}"


def _issue(d: Path, who: str, subject: str, extensions: str, ca: str = "ca") -> None:
    _openssl("req", *_EC, "-keyout", f"{who}-key.pem", "-out", f"{who}.csr", "-subj", subject, cwd=d)
    (d / f"{who}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", f"{who}.csr", "-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem",
        "-CAcreateserial", "-days", "2", "-out", f"{who}-cert.pem", "-extfile", f"{who}.ext", cwd=d,
    )


def make_ca(d: Path, name: str = "ca") -> None:
    d.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", *_EC, "-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem", "-days", "2",
        "-subj", f"/CN=vhdblkd test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )


def make_pki(d: Path) -> Path:
    """CA, server (localhost, 127.0.0.1) and client certificates in `d`; returns `d`."""
    make_ca(d)
    _issue(
        d, "server", "/CN=localhost",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    _issue(
        d, "client", "/CN=vhdblkd test client",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )
    return d


def make_rogue_client(d: Path) -> Path:
    """A client directory trusting the real CA but holding a certificate from another CA."""
    d.mkdir(parents=True, exist_ok=True)
    make_ca(d, "rogue")
    _issue(
        d, "client", "/CN=rogue client",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
        ca="rogue",
    )
    return d

"""The export service from its packaged unit in a real systemd boot, served to nbd-client in the guest.

One boot (user-mode Linux) runs two instances of vhdblkd-export@.service:
`plain` on a unix socket and `tls` on 127.0.0.1 with TLS required and a
client CA.  The guest's kernel nbd driver, through nbd-client, reads what
the host wrote into the images and writes new data: over the unix socket,
and over TLS with -certfile/-keyfile/-cacertfile.  nbd-client without a
certificate is refused.  At poweroff the services flush; the host reads the
written data back from the VHD files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.nbd.tlscerts import make_pki

from .boot_setup import CHECK_PREAMBLE, PACKAGING, PUBLISH, MiB, pattern_vhd, read_vhd, results, venv_programs
from .uml import BootResult, boot_systemd, check_unit

pytestmark = pytest.mark.kernel

UNIT = PACKAGING / "systemd" / "vhdblkd-export@.service"

CHECK_SCRIPT = CHECK_PREAMBLE + r"""
pki=/srv/test/pki
# GnuTLS (nbd-client) picks AES-NI/AVX code on its own, ignoring OPENSSL_ia32cap; under UML's
# disabled XSTATE that corrupts records ("bad record mac"), so keep it on plain code as well.
export GNUTLS_CPUID_OVERRIDE=0x1
for i in plain tls; do
    kv "active_$i" "$(systemctl show -P ActiveState vhdblkd-export@$i.service)"
    kv "type_$i" "$(systemctl show -P Type vhdblkd-export@$i.service)"
done
modprobe nbd nbds_max=4
kv modprobe_rc "$?"
nbd-client -u /run/vhdblkd-export/plain.sock /dev/nbd0 -N disk >/srv/test/plain.out 2>&1
kv plain_rc "$?"
dd if=/dev/nbd0 of=/srv/test/plain.read bs=4096 skip=256 count=16 iflag=direct 2>/dev/null
dd if=/srv/test/new.bin of=/dev/nbd0 bs=4096 seek=1024 oflag=direct conv=fsync 2>/dev/null
kv plain_write_rc "$?"
nbd-client -d /dev/nbd0 >/dev/null 2>&1
nbd-client -N disk -certfile $pki/client-cert.pem -keyfile $pki/client-key.pem -cacertfile $pki/ca-cert.pem \
    -tlshostname localhost 127.0.0.1 10809 /dev/nbd1 >/srv/test/tls.out 2>&1
kv tls_rc "$?"
dd if=/dev/nbd1 of=/srv/test/tls.read bs=4096 skip=256 count=16 iflag=direct 2>/dev/null
dd if=/srv/test/new.bin of=/dev/nbd1 bs=4096 seek=2048 oflag=direct conv=fsync 2>/dev/null
kv tls_write_rc "$?"
nbd-client -d /dev/nbd1 >/dev/null 2>&1
# No client certificate: the server requires one.
timeout 60 nbd-client -N disk -cacertfile $pki/ca-cert.pem -tlshostname localhost 127.0.0.1 10809 /dev/nbd2 \
    >/srv/test/nocert.out 2>&1
kv nocert_rc "$?"
# Plain text to the TLS instance: refused before STARTTLS.
timeout 60 nbd-client -N disk 127.0.0.1 10809 /dev/nbd3 >/srv/test/notls.out 2>&1
kv notls_rc "$?"
journalctl -b --no-pager -u vhdblkd-export@tls.service >/srv/test/tls.journal 2>&1
kv guest_date "$(date +%s)"
kv failed "$(systemctl list-units --failed --no-legend --plain | awk '{print $1}' | tr '\n' ' ')"
kv verify "$(systemd-analyze verify vhdblkd-export@plain.service 2>&1 | tr '\n' ' ')"
""" + PUBLISH


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> tuple[BootResult, Path]:
    from .conftest import _require_uml

    _require_uml()
    srv = tmp_path_factory.mktemp("export-boot") / "srv"
    srv.mkdir()
    make_pki(srv / "pki")
    pattern = os.urandom(64 * 1024)
    (srv / "pattern.bin").write_bytes(pattern)
    (srv / "new.bin").write_bytes(os.urandom(64 * 1024))
    pattern_vhd(srv / "plain.vhd", MiB, pattern)
    pattern_vhd(srv / "tls.vhd", MiB, pattern)
    pki = "/srv/test/pki"
    files = {
        "/etc/systemd/system/vhdblkd-export@.service": UNIT.read_text(),
        "/etc/vhdblkd/export/plain.conf": (
            "VHDBLKD_EXPORT_ARGS=--unix /run/vhdblkd-export/plain.sock disk=/srv/test/plain.vhd\n"
        ),
        "/etc/vhdblkd/export/tls.conf": (
            f"VHDBLKD_EXPORT_ARGS=--tcp 127.0.0.1:10809 --tls-cert {pki}/server-cert.pem "
            f"--tls-key {pki}/server-key.pem --tls-ca {pki}/ca-cert.pem disk=/srv/test/tls.vhd\n"
        ),
        "/etc/systemd/system/vhdblkd-export-check.service": check_unit(
            "vhdblkd export checks", "/srv/test/check.sh",
            after=("multi-user.target", "vhdblkd-export@plain.service", "vhdblkd-export@tls.service"),
        ),
    }
    (srv / "check.sh").write_text(CHECK_SCRIPT)
    setup = venv_programs("vhdblkd")
    # Instances are enabled as multi-user.target.wants/vhdblkd-export@NAME.service links.
    setup += "".join(
        f'ln -sf /etc/systemd/system/vhdblkd-export@.service '
        f'"$NEWROOT/etc/systemd/system/multi-user.target.wants/vhdblkd-export@{name}.service"\n'
        for name in ("plain", "tls")
    )
    result = boot_systemd(
        setup, host_dir=srv, files=files, enable=["vhdblkd-export-check.service"], timeout=300,
    )
    return result, srv


def _results(booted: tuple[BootResult, Path]) -> dict[str, str]:
    return results(booted[0])


def test_instances_started_from_the_unit(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    assert (r["active_plain"], r["active_tls"]) == ("active", "active"), r
    assert (r["type_plain"], r["type_tls"]) == ("notify", "notify")
    assert r["failed"].strip() == "", r
    assert r["verify"].strip() == "", r["verify"]


def test_nbd_client_reads_and_writes_over_a_unix_socket(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    _, srv = booted
    assert r["modprobe_rc"] == "0" and r["plain_rc"] == "0", (booted[0].read("plain.out"), r)
    assert (srv / "plain.read").read_bytes() == (srv / "pattern.bin").read_bytes()
    assert r["plain_write_rc"] == "0"
    assert read_vhd(srv / "plain.vhd", 4 * MiB, 64 * 1024) == (srv / "new.bin").read_bytes()


def test_nbd_client_over_tls_with_a_client_certificate(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    _, srv = booted
    assert r["tls_rc"] == "0", (booted[0].read("tls.out"), booted[0].read("tls.journal"), r)
    assert (srv / "tls.read").read_bytes() == (srv / "pattern.bin").read_bytes()
    assert r["tls_write_rc"] == "0"
    assert read_vhd(srv / "tls.vhd", 8 * MiB, 64 * 1024) == (srv / "new.bin").read_bytes()


def test_clients_without_certificate_or_tls_are_refused(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    assert r["nocert_rc"] != "0", booted[0].read("nocert.out")
    assert r["notls_rc"] != "0", booted[0].read("notls.out")


def test_poweroff_stops_the_instances_cleanly(booted: tuple[BootResult, Path]) -> None:
    console = booted[0].console
    for name in ("plain", "tls"):
        assert f"vhdblkd-export@{name}.service: Deactivated successfully" in console, console[-6000:]
    assert "closed" in console

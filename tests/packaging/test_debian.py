"""packaging/debian/ agrees with the project: one version, the same dependencies, every packaged file installed."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from vhdblkd import __version__

REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "packaging" / "debian"


def _pyproject() -> dict[str, object]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]  # type: ignore[no-any-return]


def _control_field(stanza_key: str, field: str) -> str:
    """`field` of the stanza that starts with `stanza_key` ("Source: vhdblkd", "Package: vhdblkd")."""
    stanzas = (DEBIAN / "control").read_text().split("\n\n")
    stanza = next(s for s in stanzas if s.startswith(stanza_key + "\n"))
    m = re.search(rf"^{field}:((?:.*)(?:\n[ \t].*)*)", stanza, re.M)
    assert m, f"no {field} in the {stanza_key} stanza"
    return " ".join(m.group(1).split())


def test_one_version_everywhere() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    m = re.match(r"^vhdblkd \(([^)]+)\) ", first)
    assert m, first
    assert m.group(1) == _pyproject()["version"] == __version__, "bump debian/changelog with pyproject.toml"


def test_python_dependencies_are_debian_packages() -> None:
    depends = _control_field("Package: vhdblkd", "Depends")
    build_depends = _control_field("Source: vhdblkd", "Build-Depends")
    requires = _pyproject()["dependencies"]
    assert isinstance(requires, list)
    for req in requires:
        name = re.match(r"[A-Za-z0-9_.-]+", req)
        assert name
        deb = f"python3-{name.group(0).lower()}"
        assert re.search(rf"(^|, ){re.escape(deb)} \(>= [^)]+\)", depends), (deb, depends)
        # The man pages are made from the parsers, which import these.
        assert deb in build_depends, (deb, build_depends)
    # The command-line programs use no qemu tool: the package must not pull qemu in.
    assert "qemu" not in (DEBIAN / "control").read_text().split("Description:")[0]


def test_every_packaged_file_is_installed() -> None:
    install = (DEBIAN / "vhdblkd.install").read_text()
    patterns = [line.split()[0] for line in install.splitlines() if line.strip()]
    for folder in ("systemd", "udev", "modules-load.d", "modprobe.d"):
        for path in (REPO / "packaging" / folder).iterdir():
            rel = str(path.relative_to(REPO))
            assert any(Path(rel).match(p) for p in patterns), f"{rel} is not in debian/vhdblkd.install"
    # Everything in etc/ becomes a conffile in /etc/vhdblkd/ (the vhdtab among them).
    assert "etc/* etc/vhdblkd/" in install and (REPO / "etc" / "vhdtab").is_file()

"""Imports point down: vhd/ -> backend -> request -> nbd/, ublk/ -> daemon/ -> cli/ (STYLE.md rule 1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "vhdblkd"

# For each layer, the vhdblkd modules it must never import.  vhd/ may use
# backend.py's FuaMode and Buffer: backend.py is a leaf (stdlib only), so the
# arrow still points down.
FORBIDDEN = {
    "vhd": ("vhdblkd.request", "vhdblkd.nbd", "vhdblkd.ublk", "vhdblkd.daemon", "vhdblkd.cli"),
    "nbd": ("vhdblkd.vhd", "vhdblkd.daemon", "vhdblkd.cli"),
    "ublk": ("vhdblkd.vhd", "vhdblkd.nbd", "vhdblkd.daemon", "vhdblkd.cli"),
    "daemon": ("vhdblkd.cli",),
    "cli": ("vhdblkd.daemon", "vhdblkd.nbd", "vhdblkd.ublk"),
}
# Third-party modules each allowed in exactly one place.
ONLY_IN = {"pyroute2": "nbd/netlink.py", "sdnotify": "daemon/notify.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names.add(mod)
                if not node.module:
                    names.update(f"{mod}.{alias.name}" for alias in node.names)
            elif node.module:
                names.add(node.module)
    return names


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py"))


def test_request_layer_knows_no_transport_or_format() -> None:
    imported = _imports(PKG / "request.py")
    below = {"vhdblkd", "vhdblkd.backend", "vhdblkd.errors"}
    assert not any(m.startswith("vhdblkd.") and m not in below for m in imported), imported


def test_backend_is_a_leaf() -> None:
    imported = _imports(PKG / "backend.py")
    assert not any(m.startswith("vhdblkd.") and m != "vhdblkd.errors" for m in imported), imported


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path: Path) -> None:
    rel = path.relative_to(PKG)
    imported = _imports(path)
    layer = rel.parts[0] if len(rel.parts) > 1 else None
    for bad in FORBIDDEN.get(layer or "", ()):
        offending = sorted(m for m in imported if m == bad or m.startswith(bad + "."))
        assert not offending, f"{rel} imports {offending}, against the layer order"
    for lib, home in ONLY_IN.items():
        if any(m == lib or m.startswith(lib + ".") for m in imported):
            assert rel.as_posix() == home, f"{rel} imports {lib}; only {home} may"

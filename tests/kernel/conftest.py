"""Fixtures for tests that need a real kernel (user-mode Linux, or Debian's 6.12 under QEMU).

`guest` is `uml.run_in_guest` and `systemd_guest` is `uml.boot_systemd`, both
after checking that UML is installed; `debian_guest` is `qemu.run_in_guest`
(session-scoped, so module-scoped fixtures can boot one guest for several
tests) after checking QEMU and the 6.12 kernel.  A missing harness is a
failure, not a skip: CI installs both with .ci/setup, and a kernel test that
silently does not run proves nothing.  Tests using `debian_guest` get the
`debian_kernel` marker (`-m debian_kernel` selects them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from . import qemu, uml


def _require_uml() -> None:
    why = uml.uml_available()
    if why is not None:
        pytest.fail(f"kernel tests need user-mode Linux: {why}", pytrace=False)


@pytest.fixture
def guest() -> Callable[..., uml.GuestResult]:
    """run_in_guest(script, *, timeout=180, mem="1G", modules=("nbd",), env=None) -> GuestResult."""
    _require_uml()
    return uml.run_in_guest


@pytest.fixture
def systemd_guest() -> Callable[..., uml.BootResult]:
    """boot_systemd(setup_script, *, host_dir, files=..., enable=..., timeout=240) -> BootResult."""
    _require_uml()
    return uml.boot_systemd


@pytest.fixture(scope="session")
def debian_guest() -> Callable[..., qemu.DebianResult]:
    """qemu.run_in_guest(script, *, timeout=300, shares=(), modules=(), env=None) -> DebianResult."""
    why = qemu.debian_available()
    if why is not None:
        pytest.fail(f"these tests need the QEMU guest on Debian's 6.12 kernel: {why}", pytrace=False)
    return qemu.run_in_guest


def pytest_collection_modifyitems(items: list[Any]) -> None:
    # Everything under tests/kernel/ boots a kernel: mark it so `-m kernel` selects it.
    for item in items:
        if "tests/kernel/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.kernel)
        if "debian_guest" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.debian_kernel)

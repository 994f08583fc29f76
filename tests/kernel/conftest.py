"""Fixtures for tests that need the real nbd driver (they run inside user-mode Linux).

`guest` is `uml.run_in_guest` and `systemd_guest` is `uml.boot_systemd`, both
after checking that UML is installed.  A missing UML is a failure, not a
skip: CI installs it with .ci/setup, and a kernel test that silently does not
run proves nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from . import uml


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


def pytest_collection_modifyitems(items: list[Any]) -> None:
    # Everything under tests/kernel/ boots a kernel: mark it so `-m kernel` selects it.
    for item in items:
        if "tests/kernel/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.kernel)

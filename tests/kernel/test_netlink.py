"""The netlink client against the real nbd driver (user-mode Linux; one boot for all checks).

tests/kernel/guest_netlink.py runs inside the guest and reports one JSON line
per check; each test here asserts one of them, so a failure names the check
and shows the guest's traceback.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from .uml import GuestResult

CHECKS = ("filesystem", "busy_index", "multi_conn", "reconfigure_after_link_dead", "udev_rule")


@pytest.fixture(scope="module")
def netlink_reports() -> dict[str, dict[str, Any]]:
    from .conftest import _require_uml
    from .uml import run_in_guest

    _require_uml()
    result: GuestResult = run_in_guest("python tests/kernel/guest_netlink.py", timeout=300).check()
    reports: dict[str, dict[str, Any]] = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            reports[entry["check"]] = entry
    reports["_console"] = {"detail": result.console[-6000:]}
    return reports


@pytest.mark.kernel
@pytest.mark.parametrize("name", CHECKS)
def test_netlink_in_guest(netlink_reports: dict[str, dict[str, Any]], name: str) -> None:
    entry = netlink_reports.get(name)
    assert entry is not None, f"the guest never reported {name}\n{netlink_reports['_console']['detail']}"
    assert entry["ok"], f"{name} failed in the guest:\n{entry['detail']}"

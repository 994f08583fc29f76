"""The shape of one fio job, shared by nbdbench.py and ublkbench.py (each imports it from here,
so neither has to import the other: nbdbench runs ublkbench's section, and run as a script it
would otherwise be loaded a second time under its own name)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Job:
    """One fio job shape."""

    key: str
    label: str
    rw: str
    bs: str
    qd: int

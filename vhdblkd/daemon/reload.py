"""What a SIGHUP has to do: the difference between the live vhdtab attachments and the file.

Only attachments that came from the vhdtab take part; ones made at run time
with `vhdblkctl attach` (not --persist) are left alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .vhdtab import VhdtabEntry


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    attach: tuple[VhdtabEntry, ...]  # new names
    detach: tuple[str, ...]  # names gone from the file
    change: tuple[VhdtabEntry, ...]  # same name, different line: re-attach when not in use
    unchanged: tuple[str, ...]


def plan_reload(live: Mapping[str, VhdtabEntry], wanted: Sequence[VhdtabEntry]) -> ReloadPlan:
    """`live`: name -> entry of the attachments that came from the vhdtab; `wanted`: the file now."""
    wanted_names = {e.name for e in wanted}
    attach: list[VhdtabEntry] = []
    change: list[VhdtabEntry] = []
    unchanged: list[str] = []
    for entry in wanted:
        old = live.get(entry.name)
        if old is None:
            attach.append(entry)
        elif old == entry:
            unchanged.append(entry.name)
        else:
            change.append(entry)
    detach = [name for name in live if name not in wanted_names]
    return ReloadPlan(tuple(attach), tuple(sorted(detach)), tuple(change), tuple(unchanged))

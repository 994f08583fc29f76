"""`vhdblkd` with no command runs the service, options and all."""

from __future__ import annotations

import pytest

from vhdblkd.daemon.main import build_parser, normalise_argv


@pytest.mark.parametrize(
    ("argv", "config", "verbose"),
    [
        ([], None, False),
        (["--config", "/x/vhdtab"], "/x/vhdtab", False),
        (["-v", "--config", "/x/vhdtab"], "/x/vhdtab", True),
        (["run", "--config", "/y"], "/y", False),
        (["-v", "run"], None, True),
    ],
)
def test_no_command_means_run(argv: list[str], config: str | None, verbose: bool) -> None:
    ns = build_parser().parse_args(normalise_argv(argv))
    assert ns.command == "run"
    assert ns.config == config
    assert bool(ns.verbose) is verbose


def test_export_is_left_alone() -> None:
    assert normalise_argv(["export", "--unix", "/s", "i.vhd"]) == ["export", "--unix", "/s", "i.vhd"]

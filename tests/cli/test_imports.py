"""vhdblkctl imports only what a command needs, so its startup stays quick.

Each case runs main() in a fresh interpreter and lists sys.modules. A module
the interpreter loads by itself (site, an editable install's finder) is not
held against the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vhdblkd.cli import device_cmds, image_cmds, main, maint_cmds, parent_cmds
from vhdblkd.vhd import copy as vhd_copy
from vhdblkd.vhd import create as vhd_create
from vhdblkd.vhd import set_parent as vhd_set_parent

# The engines: none of them is needed before a command runs.
ENGINES = {f"vhdblkd.vhd.{m}" for m in ("check", "copy", "create", "compact", "merge", "resize", "set_parent",
                                        "image", "base", "dynamic", "differencing", "fixed", "parent")}
DAEMON_CLIENT = {"vhdblkd.cli.client", "socket", "json"}
# Standard modules a parser or the daemon's client has no use for.
HEAVY = {"logging", "typing", "dataclasses", "inspect", "fractions", "decimal", "ctypes", "uuid", "datetime"}

REPORT = """
found = sorted(sys.modules)
import json
print("\\nMODULES " + json.dumps(found))
"""
RUN = """
import sys
from vhdblkd.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
""" + REPORT


REPO = Path(__file__).resolve().parents[2]


def _modules(*argv: str | Path, code: str = RUN) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, "VHDBLKD_CONTROL": "/nonexistent/control.sock"})
    assert "MODULES " in proc.stdout, proc.stderr
    return set(json.loads(proc.stdout.rsplit("MODULES ", 1)[1]))


@pytest.fixture(scope="module")
def baseline() -> set[str]:
    return _modules(code="import sys" + REPORT)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("imports") / "d.vhd"
    vhd_create.create_dynamic(str(path), 64 << 20)
    return path


def _loaded(found: set[str], baseline: set[str], wanted: set[str]) -> set[str]:
    return (found - baseline) & wanted


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["list", "--help"], ["create", "--help"],
                                  ["convert", "--help"], ["set-parent", "--help"], ["no-such-command"]])
def test_help_imports_no_engine(baseline: set[str], argv: list[str]) -> None:
    found = _modules(*argv)
    assert not _loaded(found, baseline, ENGINES | DAEMON_CLIENT | HEAVY)
    assert not {m for m in found if m.startswith("vhdblkd.vhd.")} - {"vhdblkd.vhd.constants"}


def test_info_imports_only_what_opening_needs(baseline: set[str], image: Path) -> None:
    found = _modules("info", image)
    assert "vhdblkd.vhd.image" in found  # it did run
    # A dynamic image has no parent to search: vhdblkd.vhd.parent is not needed either.
    unneeded = ENGINES - {f"vhdblkd.vhd.{m}" for m in ("image", "base", "dynamic", "differencing", "fixed")}
    # uuid and datetime: info prints ids and timestamps without them (structs.uuid_text, time.gmtime);
    # dataclasses (and its inspect): the format layer's structures are records (vhd/record.py).
    # logging: the format layer's loggers are lazy (vhd/lazylog.py), set up at a first warning.
    assert not _loaded(found, baseline, unneeded | DAEMON_CLIENT | {"fractions", "ctypes", "uuid", "datetime",
                                                                    "dataclasses", "inspect", "logging"})


def test_info_of_a_differencing_image_imports_no_dataclasses(baseline: set[str], image: Path) -> None:
    child = image.with_name("child.vhd")
    vhd_create.create_differencing(str(child), str(image))
    found = _modules("info", child)
    assert "vhdblkd.vhd.parent" in found  # it did search the parent
    assert not _loaded(found, baseline, {"dataclasses", "inspect", "uuid", "datetime"})


def test_list_without_daemon_imports_no_engine_nor_logging(baseline: set[str]) -> None:
    found = _modules("list")
    assert "vhdblkd.cli.client" in found  # it did try the socket
    assert not _loaded(found, baseline, ENGINES | HEAVY)


# --- the written-out copies the parser uses instead of importing engines --------------------------


def test_convert_targets_are_the_engines() -> None:
    assert image_cmds.CONVERT_TARGETS == tuple(t.value for t in vhd_copy.Target)


def test_set_parent_keys_are_the_result_fields() -> None:
    assert parent_cmds.SET_PARENT_KEYS == tuple(f.name for f in dataclasses.fields(vhd_set_parent.SetParentResult))


@pytest.mark.parametrize("module", [image_cmds, device_cmds, maint_cmds, parent_cmds])
def test_commands_list_what_register_adds(module: object) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    module.register(sub)  # type: ignore[attr-defined]  # each command module has register()
    assert tuple(sub.choices) == module.COMMANDS  # type: ignore[attr-defined]  # and COMMANDS


def test_all_commands_are_in_the_full_parser() -> None:
    full = main.build_parser()
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    assert tuple(sub.choices) == tuple(c for m in main.COMMAND_MODULES for c in m.COMMANDS)


@pytest.mark.parametrize(("argv", "command"), [
    (["info", "x"], "info"), (["-v", "list"], "list"), (["--verbose", "set-parent", "a", "b"], "set-parent"),
    (["--help"], None), (["-h", "info"], None), (["bogus"], None), ([], None), (["--", "info"], None),
])
def test_command_of(argv: list[str], command: str | None) -> None:
    assert main.command_of(argv) == command


@pytest.mark.parametrize("command", [c for m in main.COMMAND_MODULES for c in m.COMMANDS])
def test_partial_parser_helps_as_the_full_one(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    texts = []
    for parser in (main.build_parser(), main.build_parser(command)):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    assert command in texts[0]

"""The generated bash completion, run by real bash with Debian's bash-completion loaded.

Device names come from `vhdblkctl list --json` of a running daemon (the
in-process service with the fake kernel of tests/daemon); the systemd-boot
package test checks the same against the real driver.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.fakes import ServiceRig, make_rig
from vhdblkd.cli.main import main as ctl_main

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")
sys.path.insert(0, str(REPO / "packaging"))

import completion  # noqa: E402  (packaging/ is not a package)
from manpages import parsers, subcommands  # noqa: E402


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    assert BASH_COMPLETION.exists(), "install Debian's bash-completion (bash .ci/setup)"
    out = tmp_path_factory.mktemp("completion")
    return {p.name: p for p in completion.write_all(out)}


def complete(scripts: dict[str, Path], line: str, cwd: Path, env: dict[str, str] | None = None) -> list[str]:
    """What <TAB> offers at the end of `line` (words split on spaces; a trailing space starts a new word)."""
    words = line.split(" ")
    prog = words[0]
    script = "\n".join(
        [
            f"source {BASH_COMPLETION}",
            f"source {scripts[prog]}",
            f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})",
            f"COMP_CWORD={len(words) - 1}",
            f"COMP_LINE={shlex.quote(line)}",
            "COMP_POINT=${#COMP_LINE}",
            f"_{prog}",
            'printf "%s\\n" "${COMPREPLY[@]}"',
        ]
    )
    full_env = {"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(cwd), "LANG": "C.UTF-8", **(env or {})}
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=60)
    assert done.returncode == 0, done.stderr
    return sorted(w for w in done.stdout.splitlines() if w)


def test_scripts_are_valid_bash(scripts: dict[str, Path]) -> None:
    for path in scripts.values():
        subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)


def test_commands_and_options(scripts: dict[str, Path], tmp_path: Path) -> None:
    commands = [name for name, _, _ in subcommands(parsers()["vhdblkctl"])]
    assert {"create", "attach", "detach", "list", "convert", "compact"} <= set(commands)
    assert complete(scripts, "vhdblkctl ", tmp_path) == sorted(commands)
    assert complete(scripts, "vhdblkctl co", tmp_path) == ["compact", "convert"]
    assert "--persist" in complete(scripts, "vhdblkctl attach --", tmp_path)
    assert complete(scripts, "vhdblkctl -v attach --re", tmp_path) == ["--read-only"]
    assert complete(scripts, "vhdblkctl create --type ", tmp_path) == ["differencing", "dynamic", "fixed"]
    assert complete(scripts, "vhdblkctl convert --to r", tmp_path) == ["raw"]
    assert complete(scripts, "vhdblkd ", tmp_path) == ["export", "run"]
    assert complete(scripts, "vhdblkd export --u", tmp_path) == ["--unix"]
    assert complete(scripts, "vhdblkd export --tls ", tmp_path) == ["off", "on", "require"]


def test_image_paths(scripts: dict[str, Path], tmp_path: Path) -> None:
    for name in ("a.vhd", "B.VHD", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    # Image arguments: *.vhd (either case) and directories to descend into.
    assert complete(scripts, "vhdblkctl info ", tmp_path) == ["B.VHD", "a.vhd", "sub"]
    assert complete(scripts, "vhdblkctl create --parent ", tmp_path) == ["B.VHD", "a.vhd", "sub"]
    assert complete(scripts, "vhdblkctl set-parent a.vhd ", tmp_path) == ["B.VHD", "a.vhd", "sub"]
    # convert reads and writes raw files too.
    assert complete(scripts, "vhdblkctl convert a.vhd ", tmp_path) == ["B.VHD", "a.vhd", "notes.txt", "sub"]
    # A value that is not a path completes to nothing, not to file names.
    assert complete(scripts, "vhdblkctl create --size ", tmp_path) == []


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[ServiceRig]:
    r = make_rig(tmp_path)
    r.service.start()
    yield r
    r.service.stop()


def test_detach_offers_attached_devices_and_names(scripts: dict[str, Path], rig: ServiceRig, tmp_path: Path) -> None:
    assert ctl_main(["attach", "--control", str(rig.control), "--name", "data", rig.image("data.vhd")]) == 0
    assert ctl_main(["attach", "--control", str(rig.control), "--device", "/dev/nbd5", rig.image("logs.vhd")]) == 0
    env = {"VHDBLKD_CONTROL": str(rig.control)}
    here = tmp_path / "empty"
    here.mkdir()
    assert complete(scripts, "vhdblkctl detach ", here, env) == ["/dev/nbd0", "/dev/nbd5", "data", "logs"]
    assert complete(scripts, "vhdblkctl detach --force d", here, env) == ["data"]
    # No daemon: nothing to offer, and no error on the terminal.
    assert complete(scripts, "vhdblkctl detach ", here, {"VHDBLKD_CONTROL": str(tmp_path / "none.sock")}) == []

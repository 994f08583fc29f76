"""vhdblkctl compact / resize / snapshot / merge: exit codes, JSON keys, refusal while in use."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vhdblkd.cli.main import main
from vhdblkd.cli.maint_cmds import COMPACT_KEYS, MERGE_KEYS, RESIZE_KEYS, SNAPSHOT_KEYS
from vhdblkd.vhd.create import create_differencing, create_dynamic
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.lock import ImageLock

K = 1024
BS = 64 * K
SIZE = 16 * BS


def make(tmp_path: Path) -> tuple[str, bytearray]:
    path = str(tmp_path / "d.vhd")
    create_dynamic(path, SIZE, block_size=BS, exact_size=True)
    model = bytearray(SIZE)
    with open_image(path) as image:
        for off, data in [(0, b"\x01" * BS), (2 * BS, bytes(BS)), (5 * BS, b"\x05" * 512)]:
            image.write(off, data)
            model[off : off + len(data)] = data
    return path, model


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, dict)
    return out


def read_all(path: str) -> bytes:
    with open_image(path, read_only=True) as image:
        return bytes(image.read(0, image.size))


def test_compact_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, model = make(tmp_path)
    out = run_json(["compact", "--json", path], capsys)
    assert tuple(out) == COMPACT_KEYS
    assert out["blocks_freed"] == 1 and out["type"] == "dynamic"
    assert out["file_size_after"] == os.path.getsize(path)
    assert read_all(path) == model


def test_compact_text_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = make(tmp_path)
    assert main(["compact", path]) == 0
    captured = capsys.readouterr()
    assert "freed 1 of 3 blocks" in captured.out and captured.err == ""  # no bar, no warnings off a TTY
    assert main(["compact", str(tmp_path / "missing.vhd")]) != 0


def test_resize_json_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, model = make(tmp_path)
    out = run_json(["resize", "--json", "--size", "4M", path], capsys)
    assert tuple(out) == RESIZE_KEYS
    assert out["old_size"] == SIZE and out["new_size"] == 4 * K * K
    assert main(["resize", "--size", "64K", path]) == 1
    assert "--shrink" in capsys.readouterr().err
    assert main(["resize", "--shrink", "--size", "64K", path]) == 1
    assert "--yes" in capsys.readouterr().err
    out = run_json(["resize", "--json", "--shrink", "--yes", "--size", "64K", path], capsys)
    assert out["data_discarded"] is True
    assert read_all(path) == model[:BS]
    with pytest.raises(SystemExit) as exc:
        main(["resize", "--size", "lots", path])
    assert exc.value.code == 2


def test_resize_grows_a_differencing_child_but_never_shrinks_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, model = make(tmp_path)
    child = str(tmp_path / "c.vhd")
    create_differencing(child, path)
    out = run_json(["resize", "--json", "--size", "4M", child], capsys)
    assert out["type"] == "differencing" and out["old_size"] == SIZE and out["new_size"] >= 4 * K * K
    assert read_all(child) == model + bytes(out["new_size"] - SIZE)  # zeros past the parent's end
    assert main(["resize", "--shrink", "--yes", "--size", "64K", child]) == 1
    assert "not shrink" in capsys.readouterr().err


def test_snapshot_and_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, model = make(tmp_path)
    child = str(tmp_path / "c.vhd")
    assert main(["snapshot", path, child]) == 0
    assert "read-only by convention" in capsys.readouterr().out
    with open_image(child) as image:
        image.write(3 * BS, b"\x07" * 1024)
        model[3 * BS : 3 * BS + 1024] = b"\x07" * 1024
    out = run_json(["merge", "--json", child], capsys)
    assert tuple(out) == MERGE_KEYS
    assert out["live_image"] == os.path.abspath(path) and out["child_removed"] is False
    assert out["bytes_merged"] == 1024
    assert read_all(path) == model and os.path.exists(child)
    out = run_json(["merge", "--json", "--remove", child], capsys)
    assert out["child_removed"] is True and not os.path.exists(child)
    out = run_json(["snapshot", "--json", path, child], capsys)
    assert tuple(out) == SNAPSHOT_KEYS


@pytest.mark.parametrize("command", ["compact", "resize", "merge", "snapshot"])
def test_refused_while_attached(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    path, model = make(tmp_path)
    child = str(tmp_path / "c.vhd")
    assert main(["snapshot", path, child]) == 0
    capsys.readouterr()
    target = child if command == "merge" else path
    argv = {"compact": ["compact", path], "resize": ["resize", "--size", "4M", path],
            "merge": ["merge", child], "snapshot": ["snapshot", path, str(tmp_path / "s.vhd")]}[command]
    holder = ImageLock(target, exclusive=True)
    try:
        assert main(argv) == 1
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert "in use by pid" in err and str(os.getpid()) in err
    assert read_all(path) == model

"""Chains from the real world through the CLI: a child made by Windows 10 (parent timestamp 0),
a chain copied with new mtimes, a wrong parent, and `vhdblkctl set-parent`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.cli.test_image_cmds import digest, run_main
from tests.nbd.test_export_cmd import VHDBLKD, exporting, run
from tests.vhd.test_diff import locators, rewrite_header
from vhdblkd.vhd.create import create_differencing, create_dynamic
from vhdblkd.vhd.image import open_image

K = 1024
SIZE = 1024 * K
BS = 64 * K
BASE_DATA = [(0, b"\x10" * 8192), (5 * BS + 1000, b"base" * 500)]
MID_DATA = [(4096, b"mid!" * 1024)]
TOP_DATA = [(5 * BS + 1500, b"TOP" * 100), (SIZE - 512, b"\xee" * 512)]


def _fill(path: Path, model: bytearray, writes: list[tuple[int, bytes]]) -> None:
    with open_image(str(path)) as image:
        for off, data in writes:
            image.write(off, data)
            model[off : off + len(data)] = data


def copied_chain(tmp_path: Path) -> tuple[Path, bytes]:
    """base <- mid <- top, copied into another folder the way cp, scp or unzip do (new mtimes);
    mid records parent timestamp 0, as a child made by Windows 10 does."""
    src = tmp_path / "made"
    src.mkdir()
    model = bytearray(SIZE)
    create_dynamic(str(src / "base.vhd"), SIZE, block_size=BS, exact_size=True)
    _fill(src / "base.vhd", model, BASE_DATA)
    create_differencing(str(src / "mid.vhd"), str(src / "base.vhd"))
    _fill(src / "mid.vhd", model, MID_DATA)
    rewrite_header(src / "mid.vhd", locators(src / "mid.vhd").replace(parent_timestamp=0))
    create_differencing(str(src / "top.vhd"), str(src / "mid.vhd"))
    _fill(src / "top.vhd", model, TOP_DATA)
    dst = tmp_path / "copied"
    dst.mkdir()
    for n, name in enumerate(("base.vhd", "mid.vhd", "top.vhd")):
        shutil.copyfile(src / name, dst / name)
        os.utime(dst / name, (1_900_000_000 + n, 1_900_000_000 + n))
    shutil.rmtree(src)
    return dst / "top.vhd", bytes(model)


def test_info_opens_the_copied_chain_and_shows_every_level(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    top, _ = copied_chain(tmp_path)
    before = {p.name: digest(p) for p in top.parent.iterdir()}
    rc, out, err = run_main(capsys, "info", "--json", top)
    assert rc == 0, err
    info = json.loads(out)
    assert info["parent_timestamp_matches"] is False
    assert [level["path"] for level in info["chain"]] == [str(top.parent / "mid.vhd"), str(top.parent / "base.vhd")]
    assert [level["type"] for level in info["chain"]] == ["differencing", "dynamic"]
    for level in info["chain"]:
        assert level["id_matches"] is True and level["timestamp_matches"] is False
        assert level["found_by"] == "W2ru locator"
        assert set(level) == {"path", "type", "unique_id", "found_by", "id_matches", "timestamp_matches",
                              "timestamp", "expected_timestamp"}
    assert info["chain"][1]["expected_timestamp"] is None  # mid records 0
    assert info["chain"][0]["expected_timestamp"] != info["chain"][0]["timestamp"]
    rc, out, err = run_main(capsys, "info", top)
    assert rc == 0, err
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("parent chain:"))
    assert "1. differencing" in lines[first] and "mid.vhd" in lines[first] and "timestamp differs" in lines[first]
    assert lines[first + 1].startswith(" " * 18 + "2. dynamic") and "0 (none)" in lines[first + 1]
    assert any(line.startswith("note:") and "set-parent" in line for line in lines)
    assert {p.name: digest(p) for p in top.parent.iterdir()} == before  # info changed nothing


def test_check_reports_notes_and_stays_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    top, _ = copied_chain(tmp_path)
    rc, out, err = run_main(capsys, "check", "--json", top)
    assert rc == 0, out + err
    report = json.loads(out)
    assert report["clean"] is True and report["problems"] == []
    assert [n["code"] for n in report["notes"]] == ["parent-timestamp", "parent-timestamp"]
    assert "Windows 10" in report["notes"][1]["message"]
    rc, out, err = run_main(capsys, "check", top)
    assert rc == 0 and "note: parent-timestamp" in out and out.rstrip().endswith("clean")


def test_convert_flattens_the_copied_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    top, model = copied_chain(tmp_path)
    rc, _, err = run_main(capsys, "convert", "--to", "raw", top, tmp_path / "flat.raw")
    assert rc == 0, err
    assert (tmp_path / "flat.raw").read_bytes() == model


def test_the_strict_option_refuses_naming_itself(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    top, _ = copied_chain(tmp_path)
    rc, out, err = run_main(capsys, "info", "--strict-parent-timestamp", top)
    assert rc == 2 and out == "" and "--strict-parent-timestamp" in err and err.count("\n") == 1
    assert "allow-unsafe-parent" not in err
    rc, out, err = run_main(capsys, "check", "--json", "--strict-parent-timestamp", top)
    assert rc == 1
    report = json.loads(out)
    assert [p["code"] for p in report["problems"]] == ["parent-timestamp"]
    rc, _, err = run_main(capsys, "convert", "--strict-parent-timestamp", top, tmp_path / "x.raw")
    assert rc != 0 and "--strict-parent-timestamp" in err and not (tmp_path / "x.raw").exists()


def test_a_wrong_parent_is_refused_by_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    top, _ = copied_chain(tmp_path)
    mid = top.parent / "mid.vhd"
    wrong = uuid.UUID(bytes=b"\x42" * 16)
    rewrite_header(top, locators(top).replace(parent_unique_id=wrong.bytes))
    with open_image(str(mid), read_only=True) as image:
        actual = str(uuid.UUID(bytes=image.footer.unique_id))
    for argv in (["info"], ["info", "--json"], ["convert", "--to", "raw"], ["compact"], ["merge"]):
        extra = [tmp_path / "out.raw"] if argv[0] == "convert" else []
        rc, out, err = run_main(capsys, *argv, top, *extra)
        assert rc in (1, 2) and out == "", argv
        assert str(wrong) in err and actual in err and "set-parent" in err, (argv, err)
    rc, out, err = run_main(capsys, "check", "--json", top)
    assert rc == 1
    (problem,) = json.loads(out)["problems"]
    assert problem["code"] == "parent-mismatch" and str(wrong) in problem["message"]
    assert "set-parent" in problem["message"]


def test_set_parent_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    top, model = copied_chain(tmp_path)
    mid = top.parent / "mid.vhd"
    moved = tmp_path / "elsewhere" / "middle.vhd"
    moved.parent.mkdir()
    mid.rename(moved)
    rc, _, err = run_main(capsys, "info", top)
    assert rc == 2 and "set-parent" in err
    # NEWPARENT must open, so a moved middle of a chain is repointed first (its relative
    # locator .\\base.vhd no longer leads to its parent), then the image on top of it.
    rc, out, err = run_main(capsys, "set-parent", "--json", top, moved)
    assert rc == 1 and "set-parent" in err and "middle.vhd" in err
    rc, out, err = run_main(capsys, "set-parent", moved, top.parent / "base.vhd")
    assert rc == 0 and "outside the child's folder" in out and "--allow-unsafe-parent" in out
    rc, out, err = run_main(capsys, "set-parent", "--json", top, moved)
    assert rc == 1 and "--allow-unsafe-parent" in err  # middle.vhd's parent is outside its folder now
    rc, out, err = run_main(capsys, "set-parent", "--json", "--allow-unsafe-parent", top, moved)
    assert rc == 0, err
    result = json.loads(out)
    assert result["parent"] == str(moved) and result["outside_child_directory"] is True
    assert result["relative_locator"] == "..\\elsewhere\\middle.vhd" and result["unique_id_updated"] is False
    assert result["previous_parent"] is None
    rc, out, err = run_main(capsys, "info", "--json", "--allow-unsafe-parent", top)
    assert rc == 0, err
    info = json.loads(out)
    assert [level["path"] for level in info["chain"]] == [str(moved), str(top.parent / "base.vhd")]
    assert all(level["timestamp_matches"] for level in info["chain"])
    rc, _, err = run_main(capsys, "convert", "--allow-unsafe-parent", "--to", "raw", top, tmp_path / "flat.raw")
    assert rc == 0, err
    assert (tmp_path / "flat.raw").read_bytes() == model
    # A wrong parent: refused with exit 1, nothing changed; accepted with --ignore-id-mismatch.
    other = tmp_path / "other.vhd"
    create_dynamic(str(other), SIZE, block_size=BS, exact_size=True)
    before = digest(top)
    rc, out, err = run_main(capsys, "set-parent", top, other)
    assert rc == 1 and out == "" and "--ignore-id-mismatch" in err and digest(top) == before
    rc, out, err = run_main(capsys, "set-parent", "--ignore-id-mismatch", top, other)
    assert rc == 0 and "recorded parent unique id changed" in out
    rc, out, err = run_main(capsys, "check", "--allow-unsafe-parent", top)
    assert rc == 0, out + err


def test_set_parent_help_warns_about_ignoring_the_id(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_main(capsys, "set-parent", "--help")
    out = capsys.readouterr().out
    assert "--ignore-id-mismatch" in out and "Only safe when NEWPARENT" in " ".join(out.split())


@pytest.mark.peers
def test_export_serves_the_copied_chain(tmp_path: Path) -> None:
    top, model = copied_chain(tmp_path)
    with exporting(top, "--read-only", sock=tmp_path / "s.sock") as exp:
        run("nbdcopy", exp.uri, str(tmp_path / "copy.raw"))
    assert (tmp_path / "copy.raw").read_bytes() == model
    proc = subprocess.run([VHDBLKD, "export", "--strict-parent-timestamp",
                           "--unix", str(tmp_path / "t.sock"), str(top)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--strict-parent-timestamp" in proc.stderr

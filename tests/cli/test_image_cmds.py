"""vhdblkctl create / info / check / convert: exit codes, JSON keys, never changing what only is read."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from vhdblkd.cli.image_cmds import info_rows
from vhdblkd.cli.main import main
from vhdblkd.vhd.geometry import Geometry
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.info import ImageInfo, ParentInfo

MIB = 1 << 20
VHDBLKCTL = Path(sys.executable).with_name("vhdblkctl")

INFO_KEYS = {
    "path",
    "type",
    "virtual_size",
    "geometry",
    "creator_app",
    "creator_version",
    "creator_os",
    "unique_id",
    "timestamp",
    "block_size",
    "allocated_blocks",
    "total_blocks",
    "file_size",
    "footer_checksum_ok",
    "header_checksum_ok",
    "parent",
    "parent_chain",
    "parent_timestamp_matches",
    "chain",
}
CHECK_KEYS = {"path", "clean", "repaired", "problems", "remaining", "notes"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_main(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def info_json(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, object]:
    rc, out, err = run_main(capsys, "info", "--json", path)
    assert rc == 0, err
    data: dict[str, object] = json.loads(out)
    return data


def break_trailing_footer(path: Path) -> None:
    """Flip a byte inside the last footer's reserved area: its checksum no longer matches."""
    with open(path, "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


# --- create -------------------------------------------------------------------


def test_create_dynamic_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.vhd"
    rc, out, err = run_main(capsys, "create", "--size", "100M", image)
    assert (rc, out, err) == (0, "", "")
    info = info_json(capsys, image)
    assert info["type"] == "dynamic"
    assert info["block_size"] == 2 * MIB
    # Without --exact-size the size is rounded up to a whole geometry, as qemu-img does.
    assert info["virtual_size"] == 104865792


def test_create_exact_fixed_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "f.vhd"
    rc, out, err = run_main(capsys, "create", "--type", "fixed", "--size", "1.5M", "--exact-size", "--json", image)
    assert rc == 0, err
    info = json.loads(out)
    assert set(info) == INFO_KEYS
    assert info["type"] == "fixed"
    assert info["virtual_size"] == 1536 * 1024
    assert image.stat().st_size == 1536 * 1024 + 512


def test_create_dynamic_block_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "d.vhd"
    rc, out, err = run_main(capsys, "create", "--size", "16M", "--block-size", "512K", "--exact-size", "--json", image)
    assert rc == 0, err
    info = json.loads(out)
    assert info["block_size"] == 512 * 1024
    assert info["total_blocks"] == 32
    assert info["allocated_blocks"] == 0


def test_create_differencing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    assert run_main(capsys, "create", "--size", "8M", "--exact-size", base)[0] == 0
    rc, out, err = run_main(capsys, "create", "--parent", base, "--json", child)
    assert rc == 0, err
    info = json.loads(out)
    assert info["type"] == "differencing"
    assert info["virtual_size"] == 8 * MIB
    assert isinstance(info["parent"], dict)
    assert set(info["parent"]) >= {"path", "unique_id"}
    assert info["parent"]["unique_id"] == info_json(capsys, base)["unique_id"]
    assert len(info["parent_chain"]) >= 1


def test_create_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "taken.vhd"
    image.write_bytes(b"do not touch")
    rc, out, err = run_main(capsys, "create", "--size", "1M", image)
    assert rc == 1
    assert str(image) in err and "already exists" in err
    assert err.count("\n") == 1
    assert image.read_bytes() == b"do not touch"


@pytest.mark.parametrize(
    "argv",
    [
        ["create", "--type", "differencing", "--size", "1M", "--parent", "PARENT"],  # size comes from the parent
        ["create", "--type", "differencing"],  # no parent
        ["create", "--type", "fixed", "--parent", "PARENT", "--size", "1M"],
        ["create"],  # no size
        ["create", "--type", "dynamic", "--size", "1M", "--azure"],
        ["create", "--type", "fixed", "--size", "1M", "--block-size", "1M"],
    ],
)
def test_create_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    parent = tmp_path / "parent.vhd"
    assert run_main(capsys, "create", "--size", "1M", parent)[0] == 0
    image = tmp_path / "new.vhd"
    rc, out, err = run_main(capsys, *[str(parent) if a == "PARENT" else a for a in argv], image)
    assert rc == 2
    assert err.startswith("vhdblkctl: ") and err.count("\n") == 1
    assert not image.exists()


@pytest.mark.parametrize("size", ["10GB", "0", "-1M", "1.5", "lots"])
def test_create_bad_size_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], size: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["create", f"--size={size}", str(tmp_path / "x.vhd")])
    assert exc.value.code == 2
    assert "invalid size" in capsys.readouterr().err
    assert not (tmp_path / "x.vhd").exists()


def test_create_in_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(capsys, "create", "--size", "1M", tmp_path / "no" / "x.vhd")
    assert rc == 1
    assert "does not exist" in err


# --- info ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_info_never_changes_a_byte(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    image = tmp_path / "i.vhd"
    assert run_main(capsys, "create", "--type", kind, "--size", "4M", image)[0] == 0
    with open_image(str(image)) as opened:
        opened.write(0, b"\x01" * 4096)
    before, mtime = digest(image), image.stat().st_mtime_ns
    info = info_json(capsys, image)
    assert set(info) == INFO_KEYS
    geometry = info["geometry"]
    assert isinstance(geometry, dict)
    assert set(geometry) == {"cylinders", "heads", "sectors_per_track"}
    assert info["file_size"] == image.stat().st_size
    assert info["footer_checksum_ok"] is True
    rc, out, err = run_main(capsys, "info", image)
    assert rc == 0, err
    assert "virtual size:" in out and kind in out
    assert digest(image) == before
    assert image.stat().st_mtime_ns == mtime


def test_info_rows_cover_the_interesting_fields() -> None:
    info = ImageInfo(
        path="/x/child.vhd",
        disk_type="differencing",
        virtual_size=104865792,
        geometry=Geometry(203, 16, 63),
        creator_app="vhdb",
        creator_version="1.0",
        creator_os="Wi2k",
        unique_id="4a1c…",
        timestamp="2026-11-25T06:30:00Z",
        block_size=2 * MIB,
        allocated_blocks=3,
        total_blocks=51,
        file_size=8 * MIB,
        footer_checksum_ok=True,
        header_checksum_ok=False,
        parent=ParentInfo(path="/x/base.vhd", unique_id="77…"),
        parent_chain=("/x/base.vhd", "/x/root.vhd"),
    )
    rows = dict(info_rows(info))
    assert rows["virtual size"] == "104,865,792 bytes (100.01 MiB)"
    assert rows["geometry"].startswith("C/H/S 203/16/63")
    assert rows["timestamp"] == "2026-11-25T06:30:00Z"
    assert rows["allocated blocks"] == "3 of 51"
    assert rows["parent chain"] == "/x/base.vhd -> /x/root.vhd"
    assert rows["checksums"] == "footer ok, header BAD"


@pytest.mark.parametrize("content", [None, b"", b"just some bytes" * 100])
def test_info_cannot_open(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None) -> None:
    image = tmp_path / "bad.vhd"
    if content is not None:
        image.write_bytes(content)
    rc, out, err = run_main(capsys, "info", image)
    assert rc == 2
    assert out == ""
    assert err.startswith("vhdblkctl: ") and "bad.vhd" in err and err.count("\n") == 1


# --- check --------------------------------------------------------------------


def test_check_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "c.vhd"
    assert run_main(capsys, "create", "--size", "8M", image)[0] == 0
    rc, out, err = run_main(capsys, "check", image)
    assert rc == 0, out + err
    assert "clean" in out
    rc, out, err = run_main(capsys, "check", "--json", image)
    assert rc == 0
    report = json.loads(out)
    assert set(report) == CHECK_KEYS
    assert report["clean"] is True and report["problems"] == []


def test_check_finds_and_repairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "c.vhd"
    assert run_main(capsys, "create", "--size", "8M", image)[0] == 0
    with open_image(str(image)) as opened:
        opened.write(MIB, b"\x07" * 4096)
    break_trailing_footer(image)
    broken = digest(image)

    rc, out, err = run_main(capsys, "check", "--json", image)
    assert rc == 1, err
    report = json.loads(out)
    assert report["clean"] is False and report["repaired"] is False
    assert report["problems"] and all(set(p) == {"code", "message", "offset"} for p in report["problems"])
    assert digest(image) == broken  # without --repair, not a byte changes

    rc, out, err = run_main(capsys, "check", image)
    assert rc == 1
    assert "--repair" in out

    rc, out, err = run_main(capsys, "check", "--repair", image)
    assert rc == 1, err
    assert "repaired" in out
    rc, out, err = run_main(capsys, "check", image)
    assert rc == 0, out + err
    with open_image(str(image), read_only=True) as opened:
        assert bytes(opened.read(MIB, 4096)) == b"\x07" * 4096


def test_check_cannot_open(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(capsys, "check", tmp_path / "missing.vhd")
    assert rc == 2
    assert "missing.vhd" in err and err.count("\n") == 1


# --- convert ------------------------------------------------------------------


def test_convert_raw_to_dynamic_keeps_zero_blocks_unallocated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, vhd, back = tmp_path / "disk.img", tmp_path / "disk.vhd", tmp_path / "back.img"
    with open(raw, "wb") as f:
        f.truncate(20 * MIB)
        f.seek(6 * MIB + 100)
        f.write(b"hello")
        f.seek(18 * MIB)
        f.write(bytes(MIB))  # written zeros: still not allocated
    before = digest(raw)
    rc, out, err = run_main(capsys, "convert", raw, vhd)
    assert (rc, out, err) == (0, "", "")
    info = info_json(capsys, vhd)
    assert info["type"] == "dynamic"
    assert info["virtual_size"] == 20 * MIB
    assert info["allocated_blocks"] == 1
    assert digest(raw) == before
    assert run_main(capsys, "convert", vhd, back)[0] == 0
    assert back.read_bytes() == raw.read_bytes()


def test_convert_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "disk.img"
    raw.write_bytes(bytes(4096))
    rc, out, err = run_main(capsys, "convert", tmp_path / "missing.img", tmp_path / "out.img")
    assert rc == 2 and "missing.img" in err
    rc, out, err = run_main(capsys, "convert", "--to", "raw", "--block-size", "1M", raw, tmp_path / "o.img")
    assert rc == 2 and "--block-size" in err
    rc, out, err = run_main(capsys, "convert", raw, raw)
    assert rc == 1 and "already exists" in err
    assert raw.read_bytes() == bytes(4096)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img"]


# --- the installed command, once, as a real process ---------------------------


def test_real_process(tmp_path: Path) -> None:
    def ctl(*argv: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VHDBLKCTL), *map(str, argv)], capture_output=True, text=True, timeout=120)

    image, raw = tmp_path / "p.vhd", tmp_path / "p.img"
    assert ctl("create", "--size", "8M", "--exact-size", image).returncode == 0
    result = ctl("create", "--size", "8M", image)
    assert result.returncode == 1 and result.stdout == "" and "already exists" in result.stderr

    before = digest(image)
    result = ctl("info", "--json", image)
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == INFO_KEYS
    result = ctl("check", "--json", image)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["clean"] is True
    assert digest(image) == before

    # --progress with a pipe for stderr: no bar, stderr stays empty.
    result = ctl("convert", "--progress", image, raw)
    assert (result.returncode, result.stderr) == (0, "")
    assert raw.stat().st_size == 8 * MIB
    assert ctl("check", tmp_path / "nothing.vhd").returncode == 2

    break_trailing_footer(image)
    broken = digest(image)
    result = ctl("check", image)
    assert result.returncode == 1
    assert str(image) in result.stdout
    assert digest(image) == broken


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """With stderr on a terminal, fixed create and convert --progress draw a bar; stdout stays empty."""
    def ctl_on_tty(*argv: str | Path) -> tuple[int, str, str]:
        controller, terminal = pty.openpty()
        try:
            result = subprocess.run(
                [str(VHDBLKCTL), *map(str, argv)], stdout=subprocess.PIPE, stderr=terminal, timeout=120
            )
        finally:
            os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(controller)
        return result.returncode, result.stdout.decode(), b"".join(chunks).decode()

    image, raw = tmp_path / "t.vhd", tmp_path / "t.img"
    rc, out, err = ctl_on_tty("create", "--type", "fixed", "--size", "64M", image)
    assert (rc, out) == (0, "")
    assert "create [" in err and "100%" in err
    rc, out, err = ctl_on_tty("convert", "--progress", image, raw)
    assert (rc, out) == (0, "")
    assert "convert [" in err and "100%" in err
    rc, out, err = ctl_on_tty("convert", image, tmp_path / "quiet.img")
    assert (rc, out, err) == (0, "", "")

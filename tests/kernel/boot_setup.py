"""What the systemd-boot tests (test_boot, test_deb, test_export_boot) set up alike.

Images are made on the host before the boot and read back on the host
after it; the guest's check script starts with `CHECK_PREAMBLE` (`kv KEY
VALUE` appends a line to the result) and ends with `PUBLISH`, which the host
reads with `results()`.  `venv_programs()` is the setup line that makes
/usr/bin/vhdblkd (the units' ExecStart) the checkout's venv inside the
guest's overlay; `packaged_files()` installs the unit, udev rule and module
configuration as an administrator would from packaging/.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from vhdblkd.vhd.create import create_dynamic
from vhdblkd.vhd.image import open_image

from .uml import REPO_ROOT, BootResult

PACKAGING = REPO_ROOT / "packaging"
VENV_BIN = REPO_ROOT / ".venv" / "bin"
MiB = 1 << 20

CHECK_PREAMBLE = r"""#!/bin/bash
# Runs in the booted guest; the result file is key=value lines.
out=/srv/test/result.tmp
: >"$out"
kv() { printf '%s=%s\n' "$1" "$2" >>"$out"; }
"""
# The result appears whole or not at all: the host tells a guest that stopped half way.
PUBLISH = 'mv "$out" /srv/test/result\n'


def vhdblkctl(*args: str) -> None:
    subprocess.run([str(VENV_BIN / "vhdblkctl"), *args], check=True, timeout=120, capture_output=True)


def ext4_vhd(srv: Path, name: str, files: Mapping[str, str], size: int = 64 * MiB) -> Path:
    """srv/NAME.vhd: a dynamic VHD holding an ext4 with `files` (made with mke2fs -d, then converted)."""
    content = srv / f"{name}.content"
    content.mkdir()
    for inner, text in files.items():
        (content / inner).write_text(text)
    raw = srv / f"{name}.raw"
    with raw.open("wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(raw)], check=True, timeout=60)
    image = srv / f"{name}.vhd"
    vhdblkctl("convert", str(raw), str(image))
    raw.unlink()
    shutil.rmtree(content)
    return image


def pattern_vhd(path: Path, offset: int, data: bytes, size: int = 64 * MiB) -> None:
    """A dynamic VHD of `size` bytes holding `data` at `offset` and nothing else."""
    create_dynamic(str(path), size)
    with open_image(str(path)) as image:
        image.write(offset, data)


def vhd_size(path: Path) -> int:
    """The virtual size (a create rounds it to the CHS geometry)."""
    with open_image(str(path), read_only=True) as image:
        return image.size


def read_vhd(path: Path, offset: int, length: int) -> bytes:
    with open_image(str(path), read_only=True) as image:
        return bytes(image.read(offset, length))


def file_in_image(image: Path, inner: str, tmp: Path) -> str:
    """The content of `inner` in the ext4 inside `image` (converted to raw, read with debugfs)."""
    raw = tmp / f"{image.stem}.readback.raw"
    raw.unlink(missing_ok=True)
    vhdblkctl("convert", "--to", "raw", str(image), str(raw))
    done = subprocess.run(["debugfs", "-R", f"cat {inner}", str(raw)], capture_output=True, text=True, timeout=60)
    return done.stdout


def results(boot: BootResult) -> dict[str, str]:
    """The guest's key=value result; fails with the setup output and the console when there is none."""
    text = boot.result
    if text is None:
        setup = boot.read("setup.out") if (boot.host_dir / "setup.out").exists() else ""
        raise AssertionError(
            f"the guest never wrote its results\n--- setup ---\n{setup[-3000:]}\n--- console ---\n{boot.console[-8000:]}"
        )
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def venv_programs(*programs: str) -> str:
    """Setup-script lines that point /usr/bin/PROGRAM in the guest's overlay at the checkout's venv."""
    return "".join(f'ln -sf {VENV_BIN / program} "$NEWROOT/usr/bin/{program}"\n' for program in programs)


def packaged_files() -> dict[str, str]:
    """The daemon's unit, udev rule and module configuration, where an install by hand puts them."""
    return {
        "/etc/systemd/system/vhdblkd.service": (PACKAGING / "systemd/vhdblkd.service").read_text(),
        "/etc/modules-load.d/vhdblkd.conf": (PACKAGING / "modules-load.d/vhdblkd.conf").read_text(),
        "/etc/modprobe.d/vhdblkd.conf": (PACKAGING / "modprobe.d/vhdblkd.conf").read_text(),
        "/etc/udev/rules.d/61-vhdblkd.rules": (PACKAGING / "udev/61-vhdblkd.rules").read_text(),
    }

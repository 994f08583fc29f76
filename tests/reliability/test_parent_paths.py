"""Parent-path attacks on differencing images, and `vhdblkd export` on non-loopback addresses.

A crafted child must not make vhdblkd open files outside the child's
directory: an absolute locator, a `..` escape and a symlink pointing out are
refused with a ParentError naming allow_unsafe_parent, and accepted with it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vhdblkd.daemon import export as export_cmd
from vhdblkd.errors import ConfigError, ParentError
from vhdblkd.vhd import constants as c
from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_differencing, create_dynamic
from vhdblkd.vhd.fileio import ImageFile
from vhdblkd.vhd.image import open_image
from vhdblkd.vhd.layout import scan

SIZE = 1024 * 1024
BS = 64 * 1024
MARK = b"parent data!"


def make_parent(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    create_dynamic(str(path), SIZE, block_size=BS, exact_size=True)
    with open_image(str(path)) as image:
        image.write(4096, MARK)
    # The child records the parent's mtime; keep it stable across the test.
    os.utime(path, (1_700_000_000, 1_700_000_000))


def rewrite_locators(child: Path, texts: dict[bytes, str | None], name: str | None = None) -> None:
    """Point the child's W2ru/W2ku locators (and optionally its parent name) at other paths."""
    f = ImageFile(str(child), True)
    try:
        lay = scan(f, str(child))
        assert lay.header is not None
        header = lay.header
        locators = []
        for loc in header.parent_locators:
            if loc.platform_code in texts:
                text = texts[loc.platform_code]
                if text is None:
                    locators.append(type(loc)())
                    continue
                data = text.encode("utf-16-le")
                assert len(data) <= loc.platform_data_space * c.SECTOR_SIZE, "locator space too small"
                f.pwrite(loc.platform_data_offset, data + bytes(loc.platform_data_space * c.SECTOR_SIZE - len(data)))
                locators.append(type(loc)(loc.platform_code, loc.platform_data_space, len(data),
                                          loc.platform_data_offset))
            else:
                locators.append(loc)
        new = header.replace(parent_locators=tuple(locators))
        if name is not None:
            encoded = name.encode("utf-16-be")
            new = new.replace(parent_unicode_name=encoded + bytes(c.PARENT_NAME_SIZE - len(encoded)))
        f.pwrite(lay.footer.data_offset if lay.footer else c.FOOTER_SIZE, new.pack())
        f.fdatasync()
    finally:
        f.close()


def assert_refused_then_accepted(child: Path) -> None:
    with pytest.raises(ParentError) as info:
        open_image(str(child), read_only=True)
    assert "allow_unsafe_parent" in str(info.value) or "allow-unsafe-parent" in str(info.value)
    assert "outside" in str(info.value)
    report = check_image(str(child))
    assert not report.clean and any(p.code.startswith("parent") for p in report.problems)
    with open_image(str(child), read_only=True, allow_unsafe_parent=True) as image:
        assert bytes(image.read(4096, len(MARK))) == MARK
    assert check_image(str(child), allow_unsafe_parent=True).clean


def test_parent_in_another_directory_is_refused_without_the_option(tmp_path: Path) -> None:
    parent = tmp_path / "elsewhere" / "parent.vhd"
    make_parent(parent)
    child = tmp_path / "images" / "child.vhd"
    child.parent.mkdir()
    create_differencing(str(child), str(parent))  # writes ..\elsewhere\parent.vhd and the absolute path
    assert_refused_then_accepted(child)


def test_absolute_locator_only_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "elsewhere" / "parent.vhd"
    make_parent(parent)
    child = tmp_path / "images" / "child.vhd"
    child.parent.mkdir()
    create_differencing(str(child), str(parent))
    rewrite_locators(child, {c.PLATFORM_W2RU: ".\\nonexistent.vhd"}, name="nonexistent.vhd")
    assert_refused_then_accepted(child)


def test_dotdot_relative_locator_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "parent.vhd"
    make_parent(parent)
    child = tmp_path / "images" / "child.vhd"
    child.parent.mkdir()
    create_differencing(str(child), str(parent))
    # Only the relative locator remains, and it climbs out of the child's directory.
    rewrite_locators(child, {c.PLATFORM_W2RU: "..\\parent.vhd", c.PLATFORM_W2KU: "/nonexistent/p.vhd"}, name="nonexistent.vhd")
    assert_refused_then_accepted(child)


def test_dotdot_that_comes_back_into_the_directory_is_fine(tmp_path: Path) -> None:
    child = tmp_path / "images" / "child.vhd"
    parent = tmp_path / "images" / "parent.vhd"
    make_parent(parent)
    create_differencing(str(child), str(parent))
    rewrite_locators(child, {c.PLATFORM_W2RU: "..\\images\\parent.vhd", c.PLATFORM_W2KU: "/nonexistent/p.vhd"})
    with open_image(str(child), read_only=True) as image:
        assert bytes(image.read(4096, len(MARK))) == MARK


def test_symlink_in_the_child_directory_pointing_outside_is_refused(tmp_path: Path) -> None:
    real_parent = tmp_path / "secret" / "parent.vhd"
    make_parent(real_parent)
    images = tmp_path / "images"
    images.mkdir()
    link = images / "parent.vhd"
    link.symlink_to(real_parent)
    child = images / "child.vhd"
    create_differencing(str(child), str(link))  # locators name images/parent.vhd, inside the directory
    assert_refused_then_accepted(child)


def test_symlinked_directory_component_is_refused(tmp_path: Path) -> None:
    real_parent = tmp_path / "secret" / "parent.vhd"
    make_parent(real_parent)
    images = tmp_path / "images"
    images.mkdir()
    (images / "sub").symlink_to(tmp_path / "secret")
    child = images / "child.vhd"
    create_differencing(str(child), str(images / "sub" / "parent.vhd"))
    assert_refused_then_accepted(child)


def test_parent_name_with_absolute_path_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "elsewhere" / "parent.vhd"
    make_parent(parent)
    child = tmp_path / "images" / "child.vhd"
    child.parent.mkdir()
    create_differencing(str(child), str(parent))
    rewrite_locators(child, {c.PLATFORM_W2RU: ".\\no.vhd", c.PLATFORM_W2KU: "/no/p.vhd"}, name=str(parent))
    with pytest.raises(ParentError):
        open_image(str(child), read_only=True)


def test_locator_naming_a_device_or_proc_file_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "images" / "parent.vhd"
    make_parent(parent)
    child = tmp_path / "images" / "child.vhd"
    create_differencing(str(child), str(parent))
    parent.unlink()
    rewrite_locators(child, {c.PLATFORM_W2RU: "..\\..\\..\\..\\..\\..\\..\\..\\proc\\self\\environ",
                             c.PLATFORM_W2KU: "/etc/passwd"}, name="x")
    with pytest.raises(ParentError) as info:
        open_image(str(child), read_only=True)
    assert "outside" in str(info.value)


# --- vhdblkd export ---------------------------------------------------------------


@pytest.mark.parametrize("address", ["0.0.0.0:10809", "[::]:10809", "192.0.2.1:10809"])
def test_export_on_a_non_loopback_address_needs_allow_remote(tmp_path: Path, address: str) -> None:
    image = tmp_path / "disk.vhd"
    create_dynamic(str(image), SIZE, block_size=BS)
    proc = subprocess.run([sys.executable, "-m", "vhdblkd.daemon.main", "export", "--tcp", address, str(image)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--allow-remote" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_export_with_allow_remote_gets_past_the_address_check(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With --allow-remote the address is accepted (the server itself is stubbed: no socket is bound)."""
    image = tmp_path / "disk.vhd"
    create_dynamic(str(image), SIZE, block_size=BS)
    seen: list[object] = []

    class Stub:
        def __init__(self, export: object, *, unix_path: str | None = None,
                     tcp: tuple[str, int] | None = None) -> None:
            seen.append(tcp)
            raise ConfigError("stub server: not binding in tests")

    monkeypatch.setattr(export_cmd, "SocketServer", Stub)
    args = argparse.Namespace(tcp="0.0.0.0:10809", unix=None, allow_remote=True, read_only=True, name=None,
                              images=[str(image)], dir=None, description=None, tls=None, tls_cert=None,
                              tls_key=None, tls_ca=None, verbose=False)
    with pytest.raises(ConfigError, match="stub server"):
        export_cmd.run(args)
    assert seen == [("0.0.0.0", 10809)]
    args.allow_remote = False
    with pytest.raises(ConfigError, match="--allow-remote"):
        export_cmd.run(args)
    assert len(seen) == 1

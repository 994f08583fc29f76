"""vhdtab parsing: good lines, every option, bad lines reported with their line numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhdblkd.daemon.vhdtab import (
    VhdtabEntry,
    append_entry,
    config_path,
    load_vhdtab,
    name_for_image,
    parse_line,
    parse_vhdtab,
)
from vhdblkd.errors import ConfigError

GOOD = [
    ("data /srv/data.vhd", VhdtabEntry("data", "/srv/data.vhd")),
    ("  data\t/srv/data.vhd  ", VhdtabEntry("data", "/srv/data.vhd")),
    ("d /a.vhd ro", VhdtabEntry("d", "/a.vhd", read_only=True)),
    ("d /a.vhd rw", VhdtabEntry("d", "/a.vhd", read_only=False)),
    ("d /a.vhd device=nbd3", VhdtabEntry("d", "/a.vhd", device_index=3)),
    ("d /a.vhd device=/dev/nbd12", VhdtabEntry("d", "/a.vhd", device_index=12)),
    ("d /a.vhd connections=4", VhdtabEntry("d", "/a.vhd", connections=4)),
    ("d /a.vhd timeout=0", VhdtabEntry("d", "/a.vhd", timeout_seconds=0)),
    ("d /a.vhd dead_conn_timeout=120", VhdtabEntry("d", "/a.vhd", dead_conn_timeout_seconds=120)),
    ("d /a.vhd block_size=4096", VhdtabEntry("d", "/a.vhd", block_size=4096)),
    ("d /a.vhd allow_unsafe_parent", VhdtabEntry("d", "/a.vhd", allow_unsafe_parent=True)),
    ("d /a.vhd strict_parent_timestamp", VhdtabEntry("d", "/a.vhd", strict_parent_timestamp=True)),
    ("d /a.vhd allow_unsafe_parent,strict_parent_timestamp",
     VhdtabEntry("d", "/a.vhd", allow_unsafe_parent=True, strict_parent_timestamp=True)),
    (r"d /srv/My\040Disk\011x\134y.vhd", VhdtabEntry("d", "/srv/My Disk\tx\\y.vhd")),
    (
        "web-1.x /var/lib/web.vhd ro,device=nbd1,connections=2,timeout=5,dead_conn_timeout=9,block_size=512,allow_unsafe_parent",
        VhdtabEntry("web-1.x", "/var/lib/web.vhd", True, 1, 2, 5, 9, 512, True),
    ),
]


@pytest.mark.parametrize(("line", "entry"), GOOD, ids=[g[0] for g in GOOD])
def test_good_lines(line: str, entry: VhdtabEntry) -> None:
    assert parse_line(line) == entry
    # format_line round-trips
    assert parse_line(entry.format_line()) == entry


@pytest.mark.parametrize("line", ["", "   ", "# comment", "   # data /x.vhd"])
def test_blank_and_comment_lines(line: str) -> None:
    assert parse_line(line) is None


BAD = [
    ("data", "expected `NAME IMAGE"),
    ("data /a.vhd ro extra", "found 4 fields"),
    ("-bad /a.vhd", "name '-bad' is invalid"),
    ("a/b /a.vhd", "name 'a/b' is invalid"),
    ("d /a.vhd rox", "unknown option 'rox'"),
    ("d /a.vhd ro=1", "option ro takes no value"),
    ("d /a.vhd device=sda", "not an nbd device"),
    ("d /a.vhd device=", "option 'device' needs a value"),
    ("d /a.vhd connections=x", "expected a whole number"),
    ("d /a.vhd connections=0", "connections=0: expected 1..16"),
    ("d /a.vhd connections=99", "connections=99"),
    ("d /a.vhd block_size=1024", "block_size=1024: expected 512 or 4096"),
    ("d /a.vhd timeout=-1", "must be >= 0"),
    ("d /a.vhd ro,,rw", "empty option"),
    ("d images/a.vhd", "must be absolute"),
]


@pytest.mark.parametrize(("line", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_lines(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_line(line)


def test_bad_lines_are_skipped_with_line_numbers() -> None:
    text = "\n".join(
        [
            "# vhdtab",
            "a /a.vhd",
            "b /b.vhd bogus",
            "",
            "c /c.vhd ro",
            "a /other.vhd",
            "d /a.vhd",
            "e /e.vhd device=nbd2",
            "f /f.vhd device=/dev/nbd2",
        ]
    )
    table = parse_vhdtab(text, "/etc/vhdblkd/vhdtab")
    assert [e.name for e in table.entries] == ["a", "c", "e"]
    messages = [str(e) for e in table.errors]
    assert messages[0] == "/etc/vhdblkd/vhdtab:3: unknown option 'bogus'"
    assert messages[1] == "/etc/vhdblkd/vhdtab:6: name 'a' already used on line 2"
    assert messages[2] == "/etc/vhdblkd/vhdtab:7: image '/a.vhd' already attached by line 2"
    assert messages[3] == "/etc/vhdblkd/vhdtab:9: device nbd2 already used on line 8"
    assert table.bad_names == {"b", "a", "d", "f"}


def test_missing_file_is_empty(tmp_path: Path) -> None:
    table = load_vhdtab(tmp_path / "none")
    assert table.entries == () and table.errors == ()


def test_shipped_example_parses_without_errors() -> None:
    example = Path(__file__).resolve().parents[2] / "etc" / "vhdtab"
    table = load_vhdtab(example)
    assert table.errors == ()


def test_config_path_precedence() -> None:
    assert config_path("/x", {"VHDBLKD_CONFIG": "/y"}) == Path("/x")
    assert config_path(None, {"VHDBLKD_CONFIG": "/y"}) == Path("/y")
    assert config_path(None, {}) == Path("/etc/vhdblkd/vhdtab")


def test_append_entry_keeps_the_file_and_refuses_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "vhdtab"
    append_entry(path, VhdtabEntry("a", "/a.vhd"))
    path.write_text(path.read_text() + "# keep me")  # no trailing newline
    append_entry(path, VhdtabEntry("b", "/b.vhd", read_only=True))
    assert path.read_text() == "a /a.vhd\n# keep me\nb /b.vhd ro\n"
    with pytest.raises(ConfigError, match="already has an entry named 'a'"):
        append_entry(path, VhdtabEntry("a", "/c.vhd"))
    with pytest.raises(ConfigError, match="already has an entry for /b.vhd"):
        append_entry(path, VhdtabEntry("c", "/b.vhd"))
    assert [p.name for p in path.parent.iterdir()] == ["vhdtab"]  # no temporary left behind


@pytest.mark.parametrize(
    ("image", "taken", "name"),
    [
        ("/srv/data.vhd", set(), "data"),
        ("/srv/data.VHD", set(), "data"),
        ("/srv/data.vhd", {"data"}, "data-2"),
        ("/srv/data.vhd", {"data", "data-2"}, "data-3"),
        ("/srv/my disk!.vhd", set(), "my_disk_"),
        ("/srv/.hidden.vhd", set(), "hidden"),
        ("/srv/.vhd", set(), "disk"),
        ("/srv/image.raw", set(), "image.raw"),
    ],
)
def test_name_for_image(image: str, taken: set[str], name: str) -> None:
    assert name_for_image(image, taken) == name
    VhdtabEntry(name, image)  # always valid


def test_one_image_twice_through_a_symlink_is_a_bad_line(tmp_path: Path) -> None:
    from vhdblkd.daemon.vhdtab import append_entry, parse_vhdtab

    real = tmp_path / "real.vhd"
    real.write_bytes(b"")
    link = tmp_path / "link.vhd"
    link.symlink_to(real)
    table = parse_vhdtab(f"a {real}\nb {link}\nc {tmp_path}/sub/../real.vhd\n", "t")
    assert [e.name for e in table.entries] == ["a"]
    assert [str(e) for e in table.errors] == [
        f"t:2: image '{link}' already attached by line 1",
        f"t:3: image '{tmp_path}/sub/../real.vhd' already attached by line 1",
    ]
    path = tmp_path / "vhdtab"
    path.write_text(f"a {real}\n")
    with pytest.raises(ConfigError, match=f"already has an entry for {link} \\('a'\\)"):
        append_entry(path, VhdtabEntry("b", str(link)))

"""The vhdtab: fstab-like lines `NAME IMAGE [OPTIONS]` naming the images to attach.

Parsing never stops at a bad line: each one becomes a ConfigError naming the
file and the line number, and the good lines still attach.  Appending (for
`vhdblkctl attach --persist`) rewrites the file through a temporary file and a
rename, so a crash never leaves half a line behind.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..fsutil import fsync_directory

DEFAULT_CONFIG = Path("/etc/vhdblkd/vhdtab")
CONFIG_ENV = "VHDBLKD_CONFIG"

DEFAULT_CONNECTIONS = 1
DEFAULT_TIMEOUT_SECONDS = 30
# Long enough for a daemon restart to re-adopt the device with RECONFIGURE.
DEFAULT_DEAD_CONN_TIMEOUT_SECONDS = 60
DEFAULT_BLOCK_SIZE = 512
BLOCK_SIZES = (512, 4096)
MAX_CONNECTIONS = 16
TRANSPORTS = ("nbd", "ublk")  # nbd stays the default: Debian 12's stock kernel has no ublk

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_DEVICE_RE = re.compile(r"^(?:/dev/)?nbd(\d+)$")


@dataclass(frozen=True, slots=True)
class VhdtabEntry:
    """One attachment as configured; equal entries mean "unchanged" on reload."""

    name: str
    image: str
    read_only: bool = False
    device_index: int | None = None
    connections: int = DEFAULT_CONNECTIONS
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS
    dead_conn_timeout_seconds: int = DEFAULT_DEAD_CONN_TIMEOUT_SECONDS
    block_size: int = DEFAULT_BLOCK_SIZE
    allow_unsafe_parent: bool = False
    strict_parent_timestamp: bool = False
    transport: str = "nbd"  # for ublk, `connections` is the number of queues

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport={self.transport}: expected {' or '.join(TRANSPORTS)}")
        if self.transport != "nbd" and self.device_index is not None:
            raise ConfigError("device=nbdN names an nbd device; it does not go with transport=ublk")
        if not self.image.startswith("/") or "\n" in self.image or "\0" in self.image:
            raise ConfigError(f"image path {self.image!r} must be absolute, with no newline or NUL")
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ConfigError(f"connections={self.connections}: expected 1..{MAX_CONNECTIONS}")
        if self.timeout_seconds < 0 or self.dead_conn_timeout_seconds < 0:
            raise ConfigError("timeout and dead_conn_timeout must be >= 0 seconds")
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"block_size={self.block_size}: expected 512 or 4096")
        if self.device_index is not None and self.device_index < 0:
            raise ConfigError(f"device index {self.device_index} must be >= 0")

    @property
    def options(self) -> dict[str, object]:
        """The options as a JSON-friendly dict (for the state file and `list`)."""
        return {
            "read_only": self.read_only,
            "device": None if self.device_index is None else f"/dev/nbd{self.device_index}",
            "connections": self.connections,
            "timeout": self.timeout_seconds,
            "dead_conn_timeout": self.dead_conn_timeout_seconds,
            "block_size": self.block_size,
            "allow_unsafe_parent": self.allow_unsafe_parent,
            "strict_parent_timestamp": self.strict_parent_timestamp,
            "transport": self.transport,
        }

    def format_line(self) -> str:
        """The vhdtab line for this entry, listing only options that differ from the defaults."""
        opts: list[str] = []
        if self.read_only:
            opts.append("ro")
        if self.device_index is not None:
            opts.append(f"device=nbd{self.device_index}")
        if self.connections != DEFAULT_CONNECTIONS:
            opts.append(f"connections={self.connections}")
        if self.timeout_seconds != DEFAULT_TIMEOUT_SECONDS:
            opts.append(f"timeout={self.timeout_seconds}")
        if self.dead_conn_timeout_seconds != DEFAULT_DEAD_CONN_TIMEOUT_SECONDS:
            opts.append(f"dead_conn_timeout={self.dead_conn_timeout_seconds}")
        if self.block_size != DEFAULT_BLOCK_SIZE:
            opts.append(f"block_size={self.block_size}")
        if self.allow_unsafe_parent:
            opts.append("allow_unsafe_parent")
        if self.strict_parent_timestamp:
            opts.append("strict_parent_timestamp")
        if self.transport != "nbd":
            opts.append(f"transport={self.transport}")
        fields = [self.name, escape_field(self.image)]
        if opts:
            fields.append(",".join(opts))
        return " ".join(fields)


@dataclass(frozen=True, slots=True)
class Vhdtab:
    """The result of parsing: the good entries in file order and one error per bad line."""

    entries: tuple[VhdtabEntry, ...]
    errors: tuple[ConfigError, ...]
    # Names on bad lines: a typo must not detach a live attachment on reload.
    bad_names: frozenset[str] = frozenset()


def escape_field(text: str) -> str:
    """As fstab does: whitespace and backslash become octal escapes (a space is \\040)."""
    return "".join(f"\\{ord(c):03o}" if c.isspace() or c == "\\" else c for c in text)


def unescape_field(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"name {name!r} is invalid: use 1-64 letters, digits, '_', '.', '+' or '-', starting with a letter or digit"
        )


def parse_device(text: str) -> int:
    """`nbd3` or `/dev/nbd3` -> 3."""
    m = _DEVICE_RE.match(text)
    if not m:
        raise ConfigError(f"device {text!r} is not an nbd device: expected nbdN or /dev/nbdN")
    return int(m.group(1))


def _int_option(key: str, value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise ConfigError(f"option {key}={value!r}: expected a whole number") from None
    return number


def parse_options(text: str) -> dict[str, object]:
    """Comma-separated options -> keyword arguments for VhdtabEntry."""
    kwargs: dict[str, object] = {}
    for raw in text.split(","):
        opt = raw.strip()
        if not opt:
            raise ConfigError(f"empty option in {text!r}")
        key, sep, value = opt.partition("=")
        if key in ("ro", "allow_unsafe_parent", "strict_parent_timestamp", "rw"):
            if sep:
                raise ConfigError(f"option {key} takes no value")
            if key in ("allow_unsafe_parent", "strict_parent_timestamp"):
                kwargs[key] = True
            else:
                kwargs["read_only"] = key == "ro"
            continue
        if not sep or not value:
            raise ConfigError(f"option {key!r} needs a value ({key}=...)" if key in _VALUED else f"unknown option {key!r}")
        if key == "device":
            kwargs["device_index"] = parse_device(value)
        elif key == "transport":
            kwargs["transport"] = value
        elif key in _VALUED:
            kwargs[_VALUED[key]] = _int_option(key, value)
        else:
            raise ConfigError(f"unknown option {key!r}")
    return kwargs


_VALUED = {
    "connections": "connections",
    "timeout": "timeout_seconds",
    "dead_conn_timeout": "dead_conn_timeout_seconds",
    "block_size": "block_size",
    "device": "device_index",
}


def parse_line(line: str) -> VhdtabEntry | None:
    """One line -> an entry, or None for a blank or comment line; raises ConfigError."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    fields = stripped.split()
    if len(fields) < 2:
        raise ConfigError(f"expected `NAME IMAGE [OPTIONS]`, found {stripped!r}")
    if len(fields) > 3:
        raise ConfigError(f"expected `NAME IMAGE [OPTIONS]` (options comma-separated, no spaces), found {len(fields)} fields")
    kwargs = parse_options(fields[2]) if len(fields) == 3 else {}
    return VhdtabEntry(fields[0], unescape_field(fields[1]), **kwargs)  # type: ignore[arg-type]  # values typed by parse_options' table


def same_image(a: str, b: str) -> bool:
    """Whether two image paths name the same file (after symlinks and `..`)."""
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def clash(entry: VhdtabEntry, others: Iterable[VhdtabEntry]) -> tuple[str, VhdtabEntry] | None:
    """The first of `others` that `entry` cannot live beside, and what they share.

    "name", "image" (the same file through any path) or "device" (the same
    device=nbdN).  The one duplicate check for the vhdtab, `attach --persist`
    and the live attachments.
    """
    for other in others:
        if other.name == entry.name:
            return "name", other
        if same_image(other.image, entry.image):
            return "image", other
        if entry.device_index is not None and other.device_index == entry.device_index:
            return "device", other
    return None


def parse_vhdtab(text: str, source: str = "vhdtab") -> Vhdtab:
    entries: list[VhdtabEntry] = []
    errors: list[ConfigError] = []
    lines: dict[str, int] = {}  # name -> line number
    bad_names: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        try:
            entry = parse_line(line)
            if entry is None:
                continue
            found = clash(entry, entries)
            if found is not None:
                what, other = found
                at = lines[other.name]
                if what == "name":
                    raise ConfigError(f"name {entry.name!r} already used on line {at}")
                if what == "image":
                    raise ConfigError(f"image {entry.image!r} already attached by line {at}")
                raise ConfigError(f"device nbd{entry.device_index} already used on line {at}")
        except ConfigError as exc:
            errors.append(ConfigError(f"{source}:{lineno}: {exc}"))
            bad_names.add(line.split()[0])
            continue
        lines[entry.name] = lineno
        entries.append(entry)
    return Vhdtab(tuple(entries), tuple(errors), frozenset(bad_names))


def load_vhdtab(path: Path) -> Vhdtab:
    """A missing file is an empty table (the daemon may run with attachments made at run time)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Vhdtab((), ())
    except (OSError, UnicodeDecodeError) as exc:
        return Vhdtab((), (ConfigError(f"{path}: cannot read: {exc}"),))
    return parse_vhdtab(text, str(path))


def config_path(arg: str | None, environ: Mapping[str, str]) -> Path:
    """--config wins, then $VHDBLKD_CONFIG, then /etc/vhdblkd/vhdtab."""
    if arg:
        return Path(arg)
    env = environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write through a temporary file in the same directory, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(path.parent)


def check_appendable(path: Path, table: Vhdtab, entry: VhdtabEntry) -> None:
    """Refuse a line whose name, image or device the file already has."""
    found = clash(entry, table.entries)
    if found is None:
        return
    what, existing = found
    if what == "name":
        raise ConfigError(f"{path} already has an entry named {entry.name!r}")
    if what == "image":
        raise ConfigError(f"{path} already has an entry for {entry.image} ({existing.name!r})")
    raise ConfigError(f"{path} already has an entry for device nbd{entry.device_index} ({existing.name!r})")


def append_entry(path: Path, entry: VhdtabEntry) -> None:
    """Add `entry` as a new last line, refusing a name or image the file already has."""
    try:
        old = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        old, mode = "", 0o644
    check_appendable(path, parse_vhdtab(old, str(path)), entry)
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write(path, (old + entry.format_line() + "\n").encode("utf-8"), mode)


def unique_name(base: str, taken: Iterable[str]) -> str:
    """Sanitise `base` into a valid name and suffix -2, -3, ... until it is unused."""
    clean = re.sub(r"[^A-Za-z0-9_.+-]", "_", base)
    clean = clean.lstrip("_.+-")[:56] or "disk"
    used = set(taken)
    if clean not in used:
        return clean
    n = 2
    while f"{clean}-{n}" in used:
        n += 1
    return f"{clean}-{n}"


def name_for_image(image: str, taken: Iterable[str]) -> str:
    """The default attachment name: the image's basename without .vhd, made valid and unique."""
    base = os.path.basename(image.rstrip("/"))
    if base.lower().endswith(".vhd"):
        base = base[:-4]
    return unique_name(base, taken)


"""One entry point for both kernel harnesses: `run_in_guest(script, kernel=...)`.

* kernel="uml": Debian's user-mode Linux 6.1 (uml.py) -- fast, has nbd, no ublk.
  The whole host root is read-write in the guest.
* kernel="debian": Debian's own 6.12 under QEMU (qemu.py) -- has nbd and
  ublk_drv; slower (about 5 s to boot, Python ~10x slower than the host).
  The host root is read-only with a throwaway overlay: list in `shares` the
  host directories the script writes for the host to see.

Both return a `GuestResult` (`.check()` asserts exit 0) and raise `GuestError`
when the guest does not come back.  `$GUEST_WORKDIR` is a host directory
the script may write in either guest.  `modules` defaults to each harness's
own default (uml: nbd; debian: none, and `modprobe` works there).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from . import qemu, uml
from .uml import GuestError, GuestResult

__all__ = ["GuestError", "GuestResult", "Kernel", "run_in_guest", "unavailable"]

Kernel = Literal["uml", "debian"]


def unavailable(kernel: Kernel) -> str | None:
    """None when that guest can run here, else why not (to fail a test clearly)."""
    return uml.uml_available() if kernel == "uml" else qemu.debian_available()


def run_in_guest(
    script: str,
    *,
    kernel: Kernel = "uml",
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    modules: Iterable[str] | None = None,
    shares: Iterable[Path | str] = (),
    mem: str | None = None,
    keep: bool = False,
) -> GuestResult:
    """Run `script` (bash, as root, cwd = the repository, venv first on PATH) in a fresh guest."""
    if kernel == "uml":
        return uml.run_in_guest(
            script,
            timeout=timeout or 180,
            mem=mem or "1G",
            modules=("nbd",) if modules is None else modules,
            env=env,
            keep=keep,
        )
    if kernel == "debian":
        return qemu.run_in_guest(
            script,
            timeout=timeout or 300,
            mem=mem or "2G",
            modules=() if modules is None else modules,
            shares=shares,
            env=env,
            keep=keep,
        )
    raise ValueError(f"unknown kernel {kernel!r}: 'uml' or 'debian'")

"""The Debian package in a real systemd boot (user-mode Linux): install, boot, remove, purge.

Two guests boot at once (each on its own throwaway overlay of the host root,
so nothing is installed on the host):

* "installed": dist/vhdblkd_*.deb is installed with dpkg in the new root
  before systemd starts (as an installer's chroot does: the postinst enables
  the unit, nothing starts it), with a vhdtab line and the fstab line the
  README recommends.  Booting mounts the file system through
  /dev/disk/by-vhd/NAME; the programs are Debian's python3 with Debian's
  python3-pyroute2 and python3-sdnotify (no venv anywhere on their path);
  `man` renders the pages; the completion offers the attached device; a file
  written before `systemctl poweroff` is in the image afterwards.
* "lifecycle": the package is installed into the running system (the
  postinst starts the service, which attaches nothing: the vhdtab is the
  commented example); a vhdtab line and `systemctl reload` attach an image;
  data written to the device without any sync is in the image after
  `dpkg -r` (the service flushed it before letting the device go); `dpkg -P`
  leaves no file of the package behind, and the image is untouched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .uml import REPO_ROOT, BootResult, boot_systemd, check_unit

pytestmark = pytest.mark.kernel

VENV_BIN = REPO_ROOT / ".venv" / "bin"
MARKER = "made on the host before boot\n"
WRITTEN = "written while booted from the package, flushed at poweroff\n"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _version() -> str:
    first = (REPO_ROOT / "packaging/debian/changelog").read_text().splitlines()[0]
    m = re.match(r"^vhdblkd \(([^)]+)\)", first)
    assert m, first
    return m.group(1)


def _sources_newest_mtime() -> float:
    paths = [REPO_ROOT / "pyproject.toml"]
    for folder in ("vhdblkd", "packaging", "etc"):
        paths += [p for p in (REPO_ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return max(p.stat().st_mtime for p in paths)


def package() -> Path:
    """dist/vhdblkd_<version>_all.deb, built now if missing or older than the sources (.ci/run builds it first)."""
    deb = REPO_ROOT / "dist" / f"vhdblkd_{_version()}_all.deb"
    if not deb.exists() or deb.stat().st_mtime < _sources_newest_mtime():
        subprocess.run(["bash", str(REPO_ROOT / "packaging/build-deb"), "--no-lintian"], check=True, timeout=900)
    return deb


def recommended_fstab_options() -> str:
    """The options of the first by-vhd fstab line in README.md: the test mounts the way users are told to."""
    readme = (REPO_ROOT / "README.md").read_text()
    m = re.search(r"^\s+/dev/disk/by-vhd/\S+\s+/\S*\s+ext4\s+(\S+)\s+0\s+2\s*$", readme, re.M)
    assert m, "README.md has no fstab line for /dev/disk/by-vhd/NAME"
    return m.group(1)


def _vhdblkctl(*args: str) -> None:
    subprocess.run([str(VENV_BIN / "vhdblkctl"), *args], check=True, timeout=120, capture_output=True)


def _ext4_image(srv: Path) -> Path:
    content = srv / "content"
    content.mkdir()
    (content / "marker").write_text(MARKER)
    raw = srv / "data.raw"
    with raw.open("wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(raw)], check=True, timeout=60)
    image = srv / "data.vhd"
    _vhdblkctl("convert", str(raw), str(image))
    raw.unlink()
    shutil.rmtree(content)
    return image


def _raw_of(image: Path, tmp: Path) -> Path:
    raw = tmp / f"{image.stem}.readback.raw"
    raw.unlink(missing_ok=True)
    _vhdblkctl("convert", "--to", "raw", str(image), str(raw))
    return raw


# Both guests: the result file is key=value lines; `kv` appends one.
PREAMBLE = r"""#!/bin/bash
out=/srv/test/result.tmp
: >"$out"
kv() { printf '%s=%s\n' "$1" "$2" >>"$out"; }
names() {
    /usr/bin/vhdblkctl list --json >/run/list.json 2>&1 || { echo "list failed: $(cat /run/list.json)"; return; }
    python3 -c 'import json, sys; print(" ".join(a["name"] for a in json.load(sys.stdin)))' </run/list.json
}
"""

INSTALLED_CHECK = PREAMBLE + r"""
kv boot "$(systemd-analyze time 2>&1 | head -n 1)"
kv enabled "$(systemctl is-enabled vhdblkd.service)"
kv active "$(systemctl show -P ActiveState vhdblkd.service)"
kv unit_path "$(systemctl show -P FragmentPath vhdblkd.service)"
kv failed "$(systemctl list-units --failed --no-legend --plain | awk '{print $1}' | tr '\n' ' ')"
kv mount_source "$(findmnt -n -o SOURCE /mnt/vhd)"
kv link "$(readlink -f /dev/disk/by-vhd/data)"
kv marker "$(cat /mnt/vhd/marker 2>&1)"
kv names "$(names 2>&1)"
kv nbds_max "$(cat /sys/module/nbd/parameters/nbds_max 2>&1)"
pid=$(systemctl show -P MainPID vhdblkd.service)
kv daemon_cmdline "$(tr '\0' ' ' </proc/$pid/cmdline)"
kv shebang "$(head -n 1 /usr/bin/vhdblkd)"
kv pyroute2_version "$(dpkg-query -W -f='${Version}' python3-pyroute2)"
kv sdnotify_version "$(dpkg-query -W -f='${Version}' python3-sdnotify)"
kv pyroute2_file "$(/usr/bin/python3 -c 'import pyroute2; print(pyroute2.__file__)' 2>&1)"
kv vhdblkd_file "$(/usr/bin/python3 -c 'import vhdblkd; print(vhdblkd.__file__)' 2>&1)"
for page in 'vhdblkctl' '8 vhdblkd' '5 vhdtab'; do
    MANWIDTH=100 man $page >"/srv/test/man-${page##* }.txt" 2>&1
    kv "man_${page##* }" "$?"
done
bash -c '
source /usr/share/bash-completion/bash_completion
COMP_WORDS=(vhdblkctl detach ""); COMP_CWORD=2; COMP_LINE="vhdblkctl detach "; COMP_POINT=${#COMP_LINE}
_completion_loader vhdblkctl
_vhdblkctl
printf "%s\n" "${COMPREPLY[@]}"' >/srv/test/completion.txt 2>&1
kv completion_rc "$?"
printf 'written while booted from the package, flushed at poweroff\n' >/mnt/vhd/written
mv "$out" /srv/test/result
"""

# Files whose names say vhd, in the places a package puts files and a daemon
# leaves state: compared before the install and after the purge.
LISTING = (
    "/etc /lib/systemd /lib/udev /lib/modprobe.d /lib/modules-load.d /usr/bin /usr/lib/python3/dist-packages "
    "/usr/share/man/man5 /usr/share/man/man8 /usr/share/doc /usr/share/bash-completion /var/lib/dpkg/info "
    "/var/lib/systemd /run"
)

LIFECYCLE_CHECK = PREAMBLE + rf"""
listing() {{ find {LISTING} -xdev -name '*vhd*' 2>/dev/null | sort; }}
before=$(listing)
printf '%s\n' "$before" >/srv/test/before.txt
t=$SECONDS
dpkg -i "$DEB" >/srv/test/install.log 2>&1
kv install_rc "$?"
kv install_seconds "$((SECONDS - t))"
kv enabled "$(systemctl is-enabled vhdblkd.service)"
kv active "$(systemctl show -P ActiveState vhdblkd.service)"
kv names_after_install "$(names 2>&1)"
printf 'data /srv/test/data.vhd\n' >>/etc/vhdblkd/vhdtab
systemctl reload vhdblkd.service
kv reload_rc "$?"
for i in $(seq 150); do [ -e /dev/disk/by-vhd/data ] && break; sleep 0.2; done
dev=$(readlink -f /dev/disk/by-vhd/data)
kv device "$dev"
kv names_after_reload "$(names 2>&1)"
# Through the page cache, no sync: only the service's own flush can get it to the image.
cat /srv/test/pattern >"$dev"
kv write_rc "$?"
t=$SECONDS
dpkg -r vhdblkd >/srv/test/remove.log 2>&1
kv remove_rc "$?"
kv remove_seconds "$((SECONDS - t))"
kv active_after_remove "$(systemctl show -P ActiveState vhdblkd.service)"
kv load_after_remove "$(systemctl show -P LoadState vhdblkd.service)"
kv size_after_remove "$(cat /sys/block/${{dev#/dev/}}/size 2>&1)"
kv link_after_remove "$([ -e /dev/disk/by-vhd/data ] && echo present || echo gone)"
kv bin_after_remove "$([ -e /usr/bin/vhdblkd ] && echo present || echo gone)"
kv conffile_after_remove "$([ -f /etc/vhdblkd/vhdtab ] && echo kept || echo gone)"
t=$SECONDS
dpkg -P vhdblkd >/srv/test/purge.log 2>&1
kv purge_rc "$?"
kv purge_seconds "$((SECONDS - t))"
kv status_after_purge "$(dpkg-query -W -f='${{db:Status-Status}}' vhdblkd 2>/dev/null || echo not-installed)"
after=$(listing)
printf '%s\n' "$after" >/srv/test/after.txt
kv left_behind "$(comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after") | tr '\n' ' ')"
kv removed_too_much "$(comm -23 <(printf '%s\n' "$before") <(printf '%s\n' "$after") | tr '\n' ' ')"
kv image_kept "$([ -f /srv/test/data.vhd ] && echo yes || echo no)"
mv "$out" /srv/test/result
"""

# The guest's root is an overlay of the host's, which may be a container
# image: drop what such images add and a Debian system does not have (a
# policy-rc.d that forbids starting services, dpkg path-excludes that drop
# man pages).
AS_DEBIAN = 'rm -f "$NEWROOT/usr/sbin/policy-rc.d" "$NEWROOT/etc/dpkg/dpkg.cfg.d/excludes"\n'

# Before the pivot: a fresh /run (no /run/systemd/system, so the postinst
# enables the unit but starts nothing, as in an installer's chroot).
CHROOT_INSTALL = AS_DEBIAN + rf"""
mount -t proc proc "$NEWROOT/proc"
mount -t sysfs sys "$NEWROOT/sys"
mount --bind /dev "$NEWROOT/dev"
mount -t tmpfs tmpfs "$NEWROOT/run"
chroot "$NEWROOT" env PATH={SYSTEM_PATH} dpkg -i "$DEB" >"$NEWROOT$TESTDIR/install.log" 2>&1
echo $? >"$NEWROOT$TESTDIR/install.rc"
echo "$SECONDS" >"$NEWROOT$TESTDIR/install.seconds"
printf 'data /srv/test/data.vhd\n' >>"$NEWROOT/etc/vhdblkd/vhdtab"
umount "$NEWROOT/run" "$NEWROOT/dev" "$NEWROOT/sys" "$NEWROOT/proc"
"""


def _boot_installed(srv: Path, deb: Path) -> BootResult:
    _ext4_image(srv)
    (srv / "check.sh").write_text(INSTALLED_CHECK)
    files = {
        "/etc/fstab": f"/dev/disk/by-vhd/data /mnt/vhd ext4 {recommended_fstab_options()} 0 2\n",
        "/etc/systemd/system/vhdblkd-deb-check.service": check_unit(
            "vhdblkd package checks", "/srv/test/check.sh", after=("multi-user.target", "vhdblkd.service")
        ),
    }
    return boot_systemd(
        CHROOT_INSTALL,
        host_dir=srv,
        files=files,
        enable=["vhdblkd-deb-check.service"],
        env={"DEB": str(deb)},
        timeout=420,
    )


def _boot_lifecycle(srv: Path, deb: Path) -> BootResult:
    _vhdblkctl("create", "--size", "64M", str(srv / "data.vhd"))
    (srv / "pattern").write_bytes(os.urandom(1 << 20))
    # Booted systemd empties /tmp (tmpfiles' `D /tmp`), where a checkout may live: install from the shared dir.
    shutil.copy2(deb, srv / deb.name)
    (srv / "check.sh").write_text(LIFECYCLE_CHECK.replace('"$DEB"', f'"/srv/test/{deb.name}"'))
    files = {
        "/etc/systemd/system/vhdblkd-deb-check.service": check_unit("vhdblkd package lifecycle", "/srv/test/check.sh"),
    }
    return boot_systemd(
        AS_DEBIAN,
        host_dir=srv,
        files=files,
        enable=["vhdblkd-deb-check.service"],
        timeout=420,
    )


@pytest.fixture(scope="module")
def boots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BootResult]:
    from .conftest import _require_uml

    _require_uml()
    deb = package()
    root = tmp_path_factory.mktemp("deb")
    srv = {name: root / name / "srv" for name in ("installed", "lifecycle")}
    for path in srv.values():
        path.mkdir(parents=True)
    # Two guests at once: each is one mostly single-threaded UML process.
    with ThreadPoolExecutor(max_workers=2) as pool:
        installed = pool.submit(_boot_installed, srv["installed"], deb)
        lifecycle = pool.submit(_boot_lifecycle, srv["lifecycle"], deb)
        return {"installed": installed.result(), "lifecycle": lifecycle.result()}


def _results(boot: BootResult) -> dict[str, str]:
    text = boot.result
    assert text is not None, (
        f"the guest never wrote its results\n--- setup ---\n{boot.read('setup.out')[-3000:]}\n"
        f"--- console ---\n{boot.console[-8000:]}"
    )
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_installed_package_mounts_the_image_at_boot(boots: dict[str, BootResult]) -> None:
    boot = boots["installed"]
    assert boot.read("install.rc").strip() == "0", boot.read("install.log")
    r = _results(boot)
    assert r["enabled"] == "enabled", r
    assert r["active"] == "active", r
    assert r["unit_path"] == "/lib/systemd/system/vhdblkd.service", r
    assert r["failed"].strip() == "", r
    assert r["link"].startswith("/dev/nbd") and r["mount_source"] == r["link"], r
    assert r["marker"] == MARKER.strip(), r
    assert r["names"] == "data", r  # only what the vhdtab lists
    assert r["nbds_max"] == "32", r  # the packaged modprobe.d options


def test_daemon_runs_on_debians_python_and_pyroute2(boots: dict[str, BootResult]) -> None:
    r = _results(boots["installed"])
    assert r["daemon_cmdline"].split()[:3] == ["/usr/bin/python3", "/usr/bin/vhdblkd", "run"], r
    assert r["shebang"] == "#!/usr/bin/python3", r
    assert r["pyroute2_version"].startswith("0.7.2"), r  # bookworm's, the version the package depends on
    assert r["sdnotify_version"].startswith("0.3.1"), r
    assert r["pyroute2_file"].startswith("/usr/lib/python3/dist-packages/pyroute2/"), r
    assert r["vhdblkd_file"] == "/usr/lib/python3/dist-packages/vhdblkd/__init__.py", r


def test_man_pages_render(boots: dict[str, BootResult]) -> None:
    boot = boots["installed"]
    r = _results(boot)
    assert (r["man_vhdblkctl"], r["man_vhdblkd"], r["man_vhdtab"]) == ("0", "0", "0"), r
    ctl = boot.read("man-vhdblkctl.txt")
    assert "VHDBLKCTL(8)" in ctl and "vhdblkctl attach" in ctl and "EXIT STATUS" in ctl, ctl[:2000]
    assert "vhdblkd export" in boot.read("man-vhdblkd.txt")
    assert "dead_conn_timeout" in boot.read("man-vhdtab.txt")


def test_completion_offers_the_attached_device(boots: dict[str, BootResult]) -> None:
    boot = boots["installed"]
    r = _results(boot)
    offered = boot.read("completion.txt").split()
    assert r["completion_rc"] == "0", offered
    assert r["link"] in offered and "data" in offered, offered


def test_file_written_is_in_the_image_after_poweroff(boots: dict[str, BootResult], tmp_path: Path) -> None:
    boot = boots["installed"]
    _results(boot)
    unmounted = boot.console.find("mnt-vhd.mount: Deactivated successfully")
    stopped = boot.console.find("vhdblkd.service: Deactivated successfully")
    assert unmounted != -1 and stopped != -1 and unmounted < stopped, boot.console[-8000:]
    raw = _raw_of(boot.host_dir / "data.vhd", tmp_path)
    done = subprocess.run(["debugfs", "-R", "cat /written", str(raw)], capture_output=True, text=True, timeout=60)
    assert done.stdout == WRITTEN


def test_install_into_running_system_starts_the_service_with_nothing_attached(boots: dict[str, BootResult]) -> None:
    boot = boots["lifecycle"]
    r = _results(boot)
    assert r["install_rc"] == "0", boot.read("install.log")
    assert (r["enabled"], r["active"]) == ("enabled", "active"), r
    assert r["names_after_install"] == "", r
    assert r["reload_rc"] == "0" and r["names_after_reload"] == "data", r
    assert r["device"].startswith("/dev/nbd") and r["write_rc"] == "0", r


def test_remove_flushes_then_stops(boots: dict[str, BootResult], tmp_path: Path) -> None:
    boot = boots["lifecycle"]
    r = _results(boot)
    assert r["remove_rc"] == "0", boot.read("remove.log")
    assert r["active_after_remove"] == "inactive", r
    assert r["load_after_remove"] == "not-found", r
    assert r["size_after_remove"] == "0", r  # the device was let go
    assert r["link_after_remove"] == "gone", r
    assert r["bin_after_remove"] == "gone", r
    assert r["conffile_after_remove"] == "kept", r  # removal keeps configuration; purge does not
    raw = _raw_of(boot.host_dir / "data.vhd", tmp_path)
    pattern = (boot.host_dir / "pattern").read_bytes()
    with raw.open("rb") as f:
        assert f.read(len(pattern)) == pattern, "data written before `dpkg -r` is not in the image"


def test_purge_removes_the_package_files_and_keeps_images(boots: dict[str, BootResult]) -> None:
    boot = boots["lifecycle"]
    r = _results(boot)
    assert r["purge_rc"] == "0", boot.read("purge.log")
    assert r["status_after_purge"] == "not-installed", r
    assert r["left_behind"].strip() == "", r
    assert r["removed_too_much"].strip() == "", r
    assert r["image_kept"] == "yes", r
    assert "/etc/vhdblkd" not in boot.read("after.txt")

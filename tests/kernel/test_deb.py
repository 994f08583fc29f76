"""The Debian package in a real systemd boot (user-mode Linux): install, boot, export, upgrade, remove, purge.

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
  commented example).  An export instance from the packaged
  vhdblkd-export@.service serves an image to nbd-client and nbdinfo.  A
  vhdtab line and `systemctl reload` attach two images; one is mounted with
  a writer fsyncing into it while a second build of the package with a
  higher version is installed over the first: the daemon restarts on the new
  code, the device and the mount stay, the writer sees no error.  `dpkg -r`
  then refuses (the mount, the running export) and changes nothing; after an
  unmount and a stop of the export it removes the package, and data written
  to the other device without any sync is in its image (the service flushed
  it before letting the device go).  `dpkg -P` leaves no file of the package
  behind, and the images are untouched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .boot_setup import (
    CHECK_PREAMBLE,
    PUBLISH,
    MiB,
    ext4_vhd,
    file_in_image,
    pattern_vhd,
    results,
    vhd_size,
    vhdblkctl,
)
from .uml import REPO_ROOT, BootResult, boot_systemd, check_unit

pytestmark = pytest.mark.kernel

MARKER = "made on the host before boot\n"
WRITTEN = "written while booted from the package, flushed at poweroff\n"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# The second build installed over the first: the same files, a higher version.
UPGRADE_SUFFIX = "+upgrade1"
EXPORT_OFFSET = MiB


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


def upgrade_package(deb: Path, out: Path) -> Path:
    """`deb` rebuilt with a higher version (VERSION+upgrade1), as a next release would be."""
    tree = out / "upgrade-tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, timeout=120)
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    version = _version()
    assert f"\nVersion: {version}\n" in text, text
    control.write_text(text.replace(f"\nVersion: {version}\n", f"\nVersion: {version}{UPGRADE_SUFFIX}\n"))
    newer = out / f"vhdblkd_{version}{UPGRADE_SUFFIX}_all.deb"
    subprocess.run(["dpkg-deb", "-b", str(tree), str(newer)], check=True, timeout=300, capture_output=True)
    shutil.rmtree(tree)
    return newer


def recommended_fstab_options() -> str:
    """The options of the first by-vhd fstab line in README.md: the test mounts the way users are told to."""
    readme = (REPO_ROOT / "README.md").read_text()
    m = re.search(r"^\s+/dev/disk/by-vhd/\S+\s+/\S*\s+ext4\s+(\S+)\s+0\s+2\s*$", readme, re.M)
    assert m, "README.md has no fstab line for /dev/disk/by-vhd/NAME"
    return m.group(1)


# Both guests: `names` lists the daemon's attachments.
PREAMBLE = CHECK_PREAMBLE + r"""
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
""" + PUBLISH

# Files whose names say vhd, in the places a package puts files and a daemon
# leaves state: compared before the install and after the purge.
LISTING = (
    "/etc /lib/systemd /lib/udev /lib/modprobe.d /lib/modules-load.d /usr/bin /usr/lib/python3/dist-packages "
    "/usr/share/man/man5 /usr/share/man/man8 /usr/share/doc /usr/share/bash-completion /var/lib/dpkg/info "
    "/var/lib/systemd /run"
)

# $DEB and $UPGRADE name the two builds in /srv/test; @LISTING@ is LISTING.
LIFECYCLE_CHECK = PREAMBLE + r"""
listing() { find @LISTING@ -xdev -name '*vhd*' 2>/dev/null | sort; }
wait_link() { for i in $(seq 150); do [ -e "/dev/disk/by-vhd/$1" ] && return 0; sleep 0.2; done; return 1; }
mount_id() { awk '$5 == "/mnt/fs" {print $1}' /proc/self/mountinfo; }
written() { cat /run/writer.count 2>/dev/null || echo 0; }
writing() { local n; n=$(written); sleep 2; [ "$(written)" -gt "$n" ] && echo yes; }
before=$(listing)
printf '%s\n' "$before" >/srv/test/before.txt
t=$SECONDS
dpkg -i "$DEB" >/srv/test/install.log 2>&1
kv install_rc "$?"
kv install_seconds "$((SECONDS - t))"
kv enabled "$(systemctl is-enabled vhdblkd.service)"
kv active "$(systemctl show -P ActiveState vhdblkd.service)"
kv names_after_install "$(names 2>&1)"

# The export service, from the packaged unit and a configuration made from the packaged example.
kv example_conf "$(grep -c '^VHDBLKD_EXPORT_ARGS=' /etc/vhdblkd/export/example.conf)"
printf 'VHDBLKD_EXPORT_ARGS=--unix /run/vhdblkd-export/disk.sock disk=/srv/test/export.vhd\n' \
    >/etc/vhdblkd/export/disk.conf
systemctl enable --now vhdblkd-export@disk.service >/srv/test/export-start.log 2>&1
kv export_start_rc "$?"
kv export_active "$(systemctl show -P ActiveState vhdblkd-export@disk.service)"
kv export_unit_path "$(systemctl show -P FragmentPath vhdblkd-export@disk.service)"
kv export_cmdline "$(tr '\0' ' ' </proc/$(systemctl show -P MainPID vhdblkd-export@disk.service)/cmdline)"
modprobe nbd
kv nbds_max "$(cat /sys/module/nbd/parameters/nbds_max 2>&1)"
# The last device: the daemon takes the lowest free ones.
nbd-client -u /run/vhdblkd-export/disk.sock /dev/nbd31 -N disk >/srv/test/nbd-client.log 2>&1
kv nbd_client_rc "$?"
dd if=/dev/nbd31 of=/srv/test/export.read bs=64k count=1 skip=16 iflag=direct 2>/srv/test/export-dd.log
kv export_read_rc "$?"
nbd-client -d /dev/nbd31 >>/srv/test/nbd-client.log 2>&1
kv nbd_client_disconnect_rc "$?"
if command -v nbdinfo >/dev/null; then
    uri='nbd+unix:///disk?socket=/run/vhdblkd-export/disk.sock'
    kv nbdinfo_size "$(nbdinfo --size "$uri" 2>&1)"
    nbdinfo --map "$uri" >/srv/test/nbdinfo-map.txt 2>&1
    kv nbdinfo_map_rc "$?"
else
    kv nbdinfo_size absent
fi

printf 'data /srv/test/data.vhd\nfs /srv/test/fs.vhd\n' >>/etc/vhdblkd/vhdtab
systemctl reload vhdblkd.service
kv reload_rc "$?"
wait_link data && wait_link fs
dev=$(readlink -f /dev/disk/by-vhd/data)
fsdev=$(readlink -f /dev/disk/by-vhd/fs)
kv device "$dev"
kv fs_device "$fsdev"
kv names_after_reload "$(names 2>&1)"

# An upgrade under a mounted file system with a writer fsyncing every 100 ms.
mkdir -p /mnt/fs
mount "$fsdev" /mnt/fs
kv mount_rc "$?"
kv mount_id "$(mount_id)"
printf 'written before the upgrade\n' >/mnt/fs/before-upgrade
sync -f /mnt/fs/before-upgrade
(
    i=0
    while [ ! -e /run/writer.stop ]; do
        printf 'record %06d\n' "$i" >>/mnt/fs/log && sync -f /mnt/fs/log || { echo "error at record $i" >/srv/test/writer.err; exit 1; }
        i=$((i + 1)); echo "$i" >/run/writer.count
        sleep 0.1
    done
) &
writer=$!
sleep 2
kv written_before_upgrade "$(written)"
pid1=$(systemctl show -P MainPID vhdblkd.service)
t=$SECONDS
dpkg -i "$UPGRADE" >/srv/test/upgrade.log 2>&1
kv upgrade_rc "$?"
kv upgrade_seconds "$((SECONDS - t))"
kv version_after_upgrade "$(dpkg-query -W -f='${Version}' vhdblkd)"
pid2=$(systemctl show -P MainPID vhdblkd.service)
kv upgrade_new_pid "$( [ "$pid2" != 0 ] && [ "$pid2" != "$pid1" ] && echo yes)"
kv upgrade_active "$(systemctl show -P ActiveState vhdblkd.service)"
kv upgrade_fs_device "$(readlink -f /dev/disk/by-vhd/fs)"
kv upgrade_mount_id "$(mount_id)"
kv upgrade_names "$(names 2>&1)"
kv upgrade_export_active "$(systemctl show -P ActiveState vhdblkd-export@disk.service)"
kv writing_after_upgrade "$(writing)"
printf 'written after the upgrade\n' >/mnt/fs/after-upgrade
sync -f /mnt/fs/after-upgrade
kv after_upgrade_sync_rc "$?"

# A removal while the file system is mounted and the export runs: refused, nothing changes.
dpkg -r vhdblkd >/srv/test/remove-refused.log 2>&1
kv refused_rc "$?"
kv refused_status "$(dpkg-query -W -f='${db:Status-Status} ${Version}' vhdblkd 2>&1)"
kv refused_active "$(systemctl show -P ActiveState vhdblkd.service)"
kv refused_export_active "$(systemctl show -P ActiveState vhdblkd-export@disk.service)"
kv refused_mount_id "$(mount_id)"
kv writing_after_refusal "$(writing)"
touch /run/writer.stop
wait $writer
kv writer_rc "$?"
kv writer_records "$(written)"
umount /mnt/fs
kv umount_rc "$?"
systemctl disable --now vhdblkd-export@disk.service >/srv/test/export-stop.log 2>&1
kv export_stop_rc "$?"

# Through the page cache, no sync: only the service's own flush can get it to the image.
cat /srv/test/pattern >"$dev"
kv write_rc "$?"
t=$SECONDS
dpkg -r vhdblkd >/srv/test/remove.log 2>&1
kv remove_rc "$?"
kv remove_seconds "$((SECONDS - t))"
kv active_after_remove "$(systemctl show -P ActiveState vhdblkd.service)"
kv load_after_remove "$(systemctl show -P LoadState vhdblkd.service)"
kv size_after_remove "$(cat /sys/block/${dev#/dev/}/size 2>&1)"
kv fs_size_after_remove "$(cat /sys/block/${fsdev#/dev/}/size 2>&1)"
kv link_after_remove "$([ -e /dev/disk/by-vhd/data ] && echo present || echo gone)"
kv bin_after_remove "$([ -e /usr/bin/vhdblkd ] && echo present || echo gone)"
kv conffile_after_remove "$([ -f /etc/vhdblkd/vhdtab ] && echo kept || echo gone)"
kv export_conf_after_remove "$([ -f /etc/vhdblkd/export/disk.conf ] && echo kept || echo gone)"
t=$SECONDS
dpkg -P vhdblkd >/srv/test/purge.log 2>&1
kv purge_rc "$?"
kv purge_seconds "$((SECONDS - t))"
kv status_after_purge "$(dpkg-query -W -f='${db:Status-Status}' vhdblkd 2>/dev/null || echo not-installed)"
after=$(listing)
printf '%s\n' "$after" >/srv/test/after.txt
kv left_behind "$(comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after") | tr '\n' ' ')"
kv removed_too_much "$(comm -23 <(printf '%s\n' "$before") <(printf '%s\n' "$after") | tr '\n' ' ')"
kv image_kept "$([ -f /srv/test/data.vhd ] && [ -f /srv/test/fs.vhd ] && [ -f /srv/test/export.vhd ] && echo yes || echo no)"
""" + PUBLISH

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
    ext4_vhd(srv, "data", {"marker": MARKER})
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
    vhdblkctl("create", "--size", "64M", str(srv / "data.vhd"))
    ext4_vhd(srv, "fs", {"marker": MARKER})
    export_pattern = os.urandom(64 * 1024)
    pattern_vhd(srv / "export.vhd", EXPORT_OFFSET, export_pattern)
    (srv / "export.pattern").write_bytes(export_pattern)
    (srv / "pattern").write_bytes(os.urandom(1 << 20))
    # Booted systemd empties /tmp (tmpfiles' `D /tmp`), where a checkout may live: install from the shared dir.
    shutil.copy2(deb, srv / deb.name)
    newer = upgrade_package(deb, srv)
    script = LIFECYCLE_CHECK.replace("@LISTING@", LISTING)
    script = script.replace('"$DEB"', f'"/srv/test/{deb.name}"').replace('"$UPGRADE"', f'"/srv/test/{newer.name}"')
    (srv / "check.sh").write_text(script)
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


def test_package_installs_the_export_unit_and_its_example_as_a_conffile() -> None:
    deb = package()
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    assert "/lib/systemd/system/vhdblkd-export@.service" in paths, listing
    assert "/etc/vhdblkd/export/example.conf" in paths, listing
    conffiles = subprocess.run(
        ["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(conffiles) == ["/etc/vhdblkd/export/example.conf", "/etc/vhdblkd/vhdtab"]


def test_installed_package_mounts_the_image_at_boot(boots: dict[str, BootResult]) -> None:
    boot = boots["installed"]
    assert boot.read("install.rc").strip() == "0", boot.read("install.log")
    r = results(boot)
    assert r["enabled"] == "enabled", r
    assert r["active"] == "active", r
    assert r["unit_path"] == "/lib/systemd/system/vhdblkd.service", r
    assert r["failed"].strip() == "", r
    assert r["link"].startswith("/dev/nbd") and r["mount_source"] == r["link"], r
    assert r["marker"] == MARKER.strip(), r
    assert r["names"] == "data", r  # only what the vhdtab lists
    assert r["nbds_max"] == "32", r  # the packaged modprobe.d options


def test_daemon_runs_on_debians_python_and_pyroute2(boots: dict[str, BootResult]) -> None:
    r = results(boots["installed"])
    assert r["daemon_cmdline"].split()[:3] == ["/usr/bin/python3", "/usr/bin/vhdblkd", "run"], r
    assert r["shebang"] == "#!/usr/bin/python3", r
    assert r["pyroute2_version"].startswith("0.7.2"), r  # bookworm's, the version the package depends on
    assert r["sdnotify_version"].startswith("0.3.1"), r
    assert r["pyroute2_file"].startswith("/usr/lib/python3/dist-packages/pyroute2/"), r
    assert r["vhdblkd_file"] == "/usr/lib/python3/dist-packages/vhdblkd/__init__.py", r


def test_man_pages_render(boots: dict[str, BootResult]) -> None:
    boot = boots["installed"]
    r = results(boot)
    assert (r["man_vhdblkctl"], r["man_vhdblkd"], r["man_vhdtab"]) == ("0", "0", "0"), r
    ctl = boot.read("man-vhdblkctl.txt")
    assert "VHDBLKCTL(8)" in ctl and "vhdblkctl attach" in ctl and "EXIT STATUS" in ctl, ctl[:2000]
    daemon = " ".join(boot.read("man-vhdblkd.txt").split())
    assert "vhdblkd export" in daemon
    # How to run the export service, and what an upgrade and a removal do.
    assert "systemctl enable --now vhdblkd-export@images" in daemon, daemon
    assert "/etc/vhdblkd/export/example.conf" in daemon and "PACKAGE UPGRADE AND REMOVAL" in daemon, daemon
    assert "dead_conn_timeout" in boot.read("man-vhdtab.txt")


def test_completion_offers_the_attached_device(boots: dict[str, BootResult]) -> None:
    boot = boots["installed"]
    r = results(boot)
    offered = boot.read("completion.txt").split()
    assert r["completion_rc"] == "0", offered
    assert r["link"] in offered and "data" in offered, offered


def test_file_written_is_in_the_image_after_poweroff(boots: dict[str, BootResult], tmp_path: Path) -> None:
    boot = boots["installed"]
    results(boot)
    unmounted = boot.console.find("mnt-vhd.mount: Deactivated successfully")
    stopped = boot.console.find("vhdblkd.service: Deactivated successfully")
    assert unmounted != -1 and stopped != -1 and unmounted < stopped, boot.console[-8000:]
    assert file_in_image(boot.host_dir / "data.vhd", "/written", tmp_path) == WRITTEN


def test_install_into_running_system_starts_the_service_with_nothing_attached(boots: dict[str, BootResult]) -> None:
    boot = boots["lifecycle"]
    r = results(boot)
    assert r["install_rc"] == "0", boot.read("install.log")
    assert (r["enabled"], r["active"]) == ("enabled", "active"), r
    assert r["names_after_install"] == "", r
    assert r["reload_rc"] == "0" and r["names_after_reload"] == "data fs", r
    assert r["device"].startswith("/dev/nbd") and r["fs_device"].startswith("/dev/nbd"), r


def test_packaged_export_unit_serves_nbd_client(boots: dict[str, BootResult]) -> None:
    boot = boots["lifecycle"]
    r = results(boot)
    assert r["example_conf"] == "1", r  # the packaged example sets the one variable the unit reads
    assert r["export_start_rc"] == "0" and r["export_active"] == "active", (boot.read("export-start.log"), r)
    assert r["export_unit_path"] == "/lib/systemd/system/vhdblkd-export@.service", r
    assert r["export_cmdline"].split()[:3] == ["/usr/bin/python3", "/usr/bin/vhdblkd", "export"], r
    assert r["nbds_max"] == "32", r
    assert r["nbd_client_rc"] == "0" and r["export_read_rc"] == "0", (boot.read("nbd-client.log"), r)
    assert (boot.host_dir / "export.read").read_bytes() == (boot.host_dir / "export.pattern").read_bytes()
    assert r["nbd_client_disconnect_rc"] == "0", r
    if r["nbdinfo_size"] != "absent":
        assert r["nbdinfo_size"] == str(vhd_size(boot.host_dir / "export.vhd")), r
        assert r["nbdinfo_map_rc"] == "0", boot.read("nbdinfo-map.txt")
        # One 2 MiB block of the dynamic image is allocated: the map has data there and holes elsewhere.
        kinds = {line.split()[-1] for line in boot.read("nbdinfo-map.txt").splitlines() if line.strip()}
        assert "data" in kinds and "hole,zero" in kinds, boot.read("nbdinfo-map.txt")


def test_upgrade_keeps_the_mounted_device_and_restarts_the_daemon(
    boots: dict[str, BootResult], tmp_path: Path
) -> None:
    boot = boots["lifecycle"]
    r = results(boot)
    upgrade_log = boot.read("upgrade.log")
    assert r["upgrade_rc"] == "0", upgrade_log
    assert r["version_after_upgrade"] == _version() + UPGRADE_SUFFIX, r
    assert r["upgrade_new_pid"] == "yes" and r["upgrade_active"] == "active", r
    assert r["mount_rc"] == "0" and r["mount_id"] != "", r
    assert r["upgrade_fs_device"] == r["fs_device"] and r["upgrade_mount_id"] == r["mount_id"], r
    assert r["upgrade_names"] == "data fs", r
    assert int(r["written_before_upgrade"]) > 0 and r["writing_after_upgrade"] == "yes", r
    assert r["after_upgrade_sync_rc"] == "0", r
    assert r["writer_rc"] == "0", boot.read("writer.err")
    # The export instance is left running (a restart would drop its clients) and named.
    assert r["upgrade_export_active"] == "active", r
    assert "vhdblkd-export@disk.service" in upgrade_log and "when its clients can reconnect" in upgrade_log
    image = boot.host_dir / "fs.vhd"
    assert file_in_image(image, "/before-upgrade", tmp_path) == "written before the upgrade\n"
    assert file_in_image(image, "/after-upgrade", tmp_path) == "written after the upgrade\n"
    records = file_in_image(image, "/log", tmp_path).splitlines()
    assert records == [f"record {i:06d}" for i in range(len(records))] and len(records) >= int(r["writer_records"])


def test_remove_refuses_while_a_device_is_mounted_or_an_export_runs(boots: dict[str, BootResult]) -> None:
    boot = boots["lifecycle"]
    r = results(boot)
    refused = boot.read("remove-refused.log")
    assert r["refused_rc"] != "0", refused
    assert f"{r['fs_device']} (fs): mounted on /mnt/fs" in refused, refused
    assert "vhdblkd-export@disk.service is running" in refused, refused
    assert "vhdblkctl detach NAME" in refused, refused
    # Nothing changed: still installed and running, the file system carries on.
    assert r["refused_status"] == f"installed {_version()}{UPGRADE_SUFFIX}", r
    assert (r["refused_active"], r["refused_export_active"]) == ("active", "active"), r
    assert r["refused_mount_id"] == r["mount_id"] and r["writing_after_refusal"] == "yes", r
    assert f"{r['device']} (data)" not in refused  # not in use: a removal flushes and detaches it


def test_remove_flushes_then_stops(boots: dict[str, BootResult], tmp_path: Path) -> None:
    boot = boots["lifecycle"]
    r = results(boot)
    assert (r["umount_rc"], r["export_stop_rc"], r["write_rc"]) == ("0", "0", "0"), r
    assert r["remove_rc"] == "0", boot.read("remove.log")
    assert r["active_after_remove"] == "inactive", r
    assert r["load_after_remove"] == "not-found", r
    assert (r["size_after_remove"], r["fs_size_after_remove"]) == ("0", "0"), r  # the devices were let go
    assert r["link_after_remove"] == "gone", r
    assert r["bin_after_remove"] == "gone", r
    # Removal keeps configuration; purge does not.
    assert (r["conffile_after_remove"], r["export_conf_after_remove"]) == ("kept", "kept"), r
    raw = tmp_path / "data.raw"
    vhdblkctl("convert", "--to", "raw", str(boot.host_dir / "data.vhd"), str(raw))
    pattern = (boot.host_dir / "pattern").read_bytes()
    with raw.open("rb") as f:
        assert f.read(len(pattern)) == pattern, "data written before `dpkg -r` is not in the image"


def test_purge_removes_the_package_files_and_keeps_images(boots: dict[str, BootResult]) -> None:
    boot = boots["lifecycle"]
    r = results(boot)
    assert r["purge_rc"] == "0", boot.read("purge.log")
    assert r["status_after_purge"] == "not-installed", r
    assert r["left_behind"].strip() == "", r
    assert r["removed_too_much"].strip() == "", r
    assert r["image_kept"] == "yes", r
    assert "/etc/vhdblkd" not in boot.read("after.txt")

"""A real systemd boot (user-mode Linux) with the packaged unit, udev rule and module config.

One boot checks the packaging end to end:

* the recommended fstab line (x-systemd.after=vhdblkd.service) mounts
  /dev/disk/by-vhd/data during early boot, with no ordering cycle
  (vhdblkd.service has DefaultDependencies=no);
* systemd-modules-load loads nbd with the packaged options, the service
  reaches "active" through Type=notify, `systemctl reload` (SIGHUP) keeps it
  running, and udev names the device after the attachment;
* while a writer appends and fsyncs a record every 50 ms, `systemctl
  restart vhdblkd` three times, then `systemctl stop` and `start`: the
  writer sees no error, the file system is never unmounted, the device and
  its by-vhd link stay the same, one attachment, every fsynced record is in
  the image afterwards;
* a SIGKILL of the daemon (Restart=on-failure) keeps the mount too;
* at `systemctl poweroff` the mount goes first, then the daemon flushes and
  detaches: a file written at boot is in the VHD afterwards, read on the host.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .boot_setup import CHECK_PREAMBLE, PUBLISH, ext4_vhd, file_in_image, packaged_files, results, venv_programs
from .uml import BootResult, boot_systemd, check_unit

pytestmark = pytest.mark.kernel

MARKER = "made on the host before boot\n"
WRITTEN = "written while booted, flushed at poweroff\n"

# Appends a numbered record and fsyncs it every 50 ms; each record is noted in
# `acked` (on the host) only once its fsync returned, with how long the write
# and fsync took and the phase of the test (the content of argv[3]).  Stops
# on SIGTERM.
WRITER = r"""
import os, signal, sys, time
stop = False
def on_term(signum, frame):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
acked = open(sys.argv[2], "w")
i, worst = 0, 0.0
while not stop:
    started = time.monotonic()
    try:
        os.write(fd, ("record %06d %s\n" % (i, "x" * 80)).encode())
        os.fsync(fd)
    except OSError as exc:
        print("writer error at record", i, exc, flush=True)
        sys.exit(1)
    took = time.monotonic() - started
    worst = max(worst, took)
    try:
        with open(sys.argv[3]) as f:
            phase = (f.read().split() or ["-"])[0]
    except OSError:
        phase = "-"
    acked.write("%d %.3f %s\n" % (i, took, phase))
    acked.flush()
    i += 1
    time.sleep(0.05)
print("records", i, "slowest_fsync %.3f" % worst, flush=True)
"""

# Runs in the booted guest once multi-user.target is reached.
CHECK_SCRIPT = CHECK_PREAMBLE + r"""
acked() { wc -l </srv/test/acked 2>/dev/null || echo 0; }
wait_acked() {  # wait_acked N SECONDS: until N more records are fsynced
    local goal=$(( $(acked) + $1 ))
    for i in $(seq $(( $2 * 10 ))); do [ "$(acked)" -ge "$goal" ] && return 0; sleep 0.1; done
    return 1
}
mount_id() { awk '$5 == "/mnt/vhd" {print $1}' /proc/self/mountinfo | tr '\n' ' '; }
attachments() { vhdblkctl list --json | python3 -c 'import json,sys; print(" ".join(a["name"] + "=" + a["device"] for a in json.load(sys.stdin)))'; }
kv active "$(systemctl show -P ActiveState vhdblkd.service)"
kv type "$(systemctl show -P Type vhdblkd.service)"
kv status_text "$(systemctl show -P StatusText vhdblkd.service)"
kv nbds_max "$(cat /sys/module/nbd/parameters/nbds_max 2>&1)"
kv max_part "$(cat /sys/module/nbd/parameters/max_part 2>&1)"
kv link "$(readlink -f /dev/disk/by-vhd/data)"
kv mount_source "$(findmnt -n -o SOURCE /mnt/vhd)"
dev=$(readlink -f /dev/disk/by-vhd/data)
kv backend "$(cat /sys/block/${dev#/dev/}/backend 2>&1)"
kv marker "$(cat /mnt/vhd/marker 2>&1)"
kv fsck "$(systemctl show -P ActiveState,Result "$(systemd-escape -p --template=systemd-fsck@.service /dev/disk/by-vhd/data)" | tr '\n' ' ')"
kv mount_after "$(systemctl show -P After mnt-vhd.mount | tr ' ' '\n' | grep -x vhdblkd.service)"
kv mount_requires "$(systemctl show -P Requires,BindsTo,PartOf mnt-vhd.mount | tr ' ' '\n' | grep -x vhdblkd.service)"
kv failed "$(systemctl list-units --failed --no-legend --plain | awk '{print $1}' | tr '\n' ' ')"
printf 'written while booted, flushed at poweroff\n' >/mnt/vhd/written
systemctl reload vhdblkd.service
kv reload_rc "$?"
sleep 1
kv active_after_reload "$(systemctl show -P ActiveState vhdblkd.service)"
vhdblkctl list >/srv/test/list.out 2>&1
kv list_rc "$?"
kv verify "$(systemd-analyze verify vhdblkd.service /run/systemd/generator/mnt-vhd.mount 2>&1 | tr '\n' ' ')"

# Restarts under a writer: the devices are handed over, the mount carries on.
echo "GUEST-CHECK: restarts begin"
kv mount_id "$(mount_id)"
phase() { echo "$1" >/srv/test/phase.tmp && mv /srv/test/phase.tmp /srv/test/phase; }
phase boot
python3 /srv/test/writer.py /mnt/vhd/log.txt /srv/test/acked /srv/test/phase >/srv/test/writer.out 2>&1 &
WPID=$!
wait_acked 10 60
for n in 1 2 3; do
    pid1=$(systemctl show -P MainPID vhdblkd.service)
    phase restart$n
    systemctl restart vhdblkd.service
    kv restart${n}_rc "$?"
    pid2=$(systemctl show -P MainPID vhdblkd.service)
    kv restart${n}_new_pid "$( [ "$pid2" != 0 ] && [ "$pid2" != "$pid1" ] && echo yes)"
    kv restart${n}_active "$(systemctl show -P ActiveState vhdblkd.service)"
    kv restart${n}_link "$(readlink -f /dev/disk/by-vhd/data)"
    kv restart${n}_source "$(findmnt -n -o SOURCE /mnt/vhd)"
    kv restart${n}_attachments "$(attachments)"
    kv restart${n}_mount_id "$(mount_id)"
    kv restart${n}_own_mount_ns "$( [ "$(readlink /proc/$pid2/ns/mnt)" != "$(readlink /proc/1/ns/mnt)" ] && echo yes)"
    wait_acked 10 90
    kv restart${n}_writing "$?"
    phase after-restart$n
done
kv restart_fdstore_log "$(journalctl -b -u vhdblkd.service -o cat | grep -c 'kept for the next daemon')"
echo "GUEST-CHECK: restarts end"

# A stop with the device in use keeps it waiting; a start takes it back.
phase stop
systemctl stop vhdblkd.service
kv stop_rc "$?"
kv stopped_active "$(systemctl show -P ActiveState vhdblkd.service)"
kv stopped_backend "$(cat /sys/block/${dev#/dev/}/backend 2>&1)"
sleep 2
systemctl start vhdblkd.service
kv start_rc "$?"
kv start_link "$(readlink -f /dev/disk/by-vhd/data)"
kv start_source "$(findmnt -n -o SOURCE /mnt/vhd)"
kv start_attachments "$(attachments)"
kv start_mount_id "$(mount_id)"
wait_acked 10 120
kv start_writing "$?"
phase after-start
kill -TERM $WPID
wait $WPID
kv writer_rc "$?"
kv writer_out "$(cat /srv/test/writer.out)"
kv mount_unit_inactive_since "$(systemctl show -P InactiveEnterTimestampMonotonic mnt-vhd.mount)"

# A crash: Restart=on-failure brings the daemon back, the state file in the
# preserved RuntimeDirectory names the device, and the mounted file system
# carries on through RECONFIGURE.
pid1=$(systemctl show -P MainPID vhdblkd.service)
kill -KILL "$pid1"
for i in $(seq 100); do
    pid2=$(systemctl show -P MainPID vhdblkd.service)
    [ "$pid2" != 0 ] && [ "$pid2" != "$pid1" ] && [ "$(systemctl show -P ActiveState vhdblkd.service)" = active ] && break
    sleep 0.3
done
kv restarted "$( [ "$pid2" != 0 ] && [ "$pid2" != "$pid1" ] && echo yes)"
kv active_after_crash "$(systemctl show -P ActiveState vhdblkd.service)"
printf 'written after a daemon crash\n' >/mnt/vhd/after-crash
sync -f /mnt/vhd/after-crash
kv sync_rc "$?"
kv link_after_crash "$(readlink -f /dev/disk/by-vhd/data)"
kv attachments_after_crash "$(attachments)"
kv mount_id_end "$(mount_id)"
echo "GUEST-CHECK: done"
""" + PUBLISH


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> tuple[BootResult, Path]:
    from .conftest import _require_uml

    _require_uml()
    srv = tmp_path_factory.mktemp("boot") / "srv"
    srv.mkdir()
    image = ext4_vhd(srv, "data", {"marker": MARKER})
    (srv / "check.sh").write_text(CHECK_SCRIPT)
    (srv / "writer.py").write_text(WRITER)
    files = {
        "/etc/vhdblkd/vhdtab": "# NAME IMAGE [OPTIONS]\ndata /srv/test/data.vhd\n",
        "/etc/fstab": (
            "/dev/disk/by-vhd/data /mnt/vhd ext4 "
            "x-systemd.after=vhdblkd.service,x-systemd.device-timeout=90s 0 2\n"
        ),
        **packaged_files(),
        "/etc/systemd/system/vhdblkd-boot-check.service": check_unit(
            "vhdblkd boot checks", "/srv/test/check.sh", after=("multi-user.target", "vhdblkd.service")
        ).replace("TimeoutStartSec=5min", "TimeoutStartSec=12min"),
    }
    # The unit's ExecStart is /usr/bin/vhdblkd, as for a system-wide install;
    # in the guest's overlay that path leads to the project's venv.
    result = boot_systemd(
        venv_programs("vhdblkd", "vhdblkctl"),
        host_dir=srv,
        files=files,
        enable=["vhdblkd.service", "vhdblkd-boot-check.service"],
        timeout=900,
    )
    (srv / "console.log").write_text(result.console)  # kept with the test's files for a look afterwards
    return result, image


def _results(booted: tuple[BootResult, Path]) -> dict[str, str]:
    return results(booted[0])


def test_service_came_up_through_notify(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    assert r["type"] == "notify"
    assert r["active"] == "active", r
    assert r["failed"].strip() == "", r


def test_modules_load_options(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    assert (r["nbds_max"], r["max_part"]) == ("32", "31")


def test_fstab_mount_by_vhd_name_at_boot(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    assert r["link"].startswith("/dev/nbd"), r
    assert r["mount_source"] == r["link"], r
    assert r["backend"] == "vhdblkd:data", r
    assert r["marker"] == MARKER.strip()
    assert r["mount_after"] == "vhdblkd.service"
    assert sorted(r["fsck"].split()) == ["active", "success"], r["fsck"]  # fstab pass 2: checked before mounting
    assert "ordering cycle" not in booted[0].console.lower()


def test_reload_keeps_service(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    assert r["reload_rc"] == "0"
    assert r["active_after_reload"] == "active"
    assert r["list_rc"] == "0", booted[0].read("list.out")
    assert "data" in booted[0].read("list.out")


def test_mount_is_ordered_after_the_daemon_but_does_not_require_it(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    assert r["mount_after"] == "vhdblkd.service"
    assert r["mount_requires"] == "", "a restart of vhdblkd would restart the mount"


def test_restarts_keep_the_device_under_a_writer(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    for n in (1, 2, 3):
        assert r[f"restart{n}_rc"] == "0", r
        assert r[f"restart{n}_new_pid"] == "yes", r
        assert r[f"restart{n}_active"] == "active", r
        assert r[f"restart{n}_link"] == r["link"], r
        assert r[f"restart{n}_source"] == r["link"], r
        assert r[f"restart{n}_attachments"] == f"data={r['link']}", r
        assert r[f"restart{n}_mount_id"] == r["mount_id"], "the file system was mounted again"
        assert r[f"restart{n}_own_mount_ns"] == "", "a daemon with its own mount namespace pins the mounts"
        assert r[f"restart{n}_writing"] == "0", f"the writer stopped making progress after restart {n}"
    assert int(r["restart_fdstore_log"]) >= 3, r
    # The kernel never saw the server go: no dead connection, no reconnect.
    console = booted[0].console
    restarts = console[console.index("GUEST-CHECK: restarts begin") : console.index("GUEST-CHECK: restarts end")]
    # "Connection timed out": a request the kernel had to send again after its timeout.
    signs = ("Receive control failed", "Connection timed out", "Dead connection", "I/O error", "reconnecting")
    for sign in signs:
        assert sign not in restarts, sign
    assert "I/O error" not in console and "Aborting journal" not in console


def test_stop_then_start_keeps_the_device_in_use(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    assert (r["stop_rc"], r["stopped_active"]) == ("0", "inactive"), r
    assert r["stopped_backend"] == "vhdblkd:data", "a device in use must wait for the next daemon"
    assert r["start_rc"] == "0", r
    assert r["start_link"] == r["link"] and r["start_source"] == r["link"], r
    assert r["start_attachments"] == f"data={r['link']}", r
    assert r["start_mount_id"] == r["mount_id"], r
    assert r["start_writing"] == "0", r


def test_the_writer_saw_no_error_and_every_fsynced_record_is_in_the_image(
    booted: tuple[BootResult, Path], tmp_path: Path
) -> None:
    result, image = booted
    r = _results(booted)
    assert r["writer_rc"] == "0", r["writer_out"]
    assert r["mount_unit_inactive_since"] == "0", "the mount unit was stopped at some point"
    rows = [line.split() for line in result.read("acked").splitlines()]
    acked = [int(row[0]) for row in rows]
    assert len(acked) >= 50 and acked == list(range(len(acked)))
    lines = file_in_image(image, "/log.txt", tmp_path).splitlines()
    for i in acked:
        assert lines[i] == f"record {i:06d} {'x' * 80}", i
    slowest: dict[str, float] = {}
    for _, took, phase in rows:
        slowest[phase] = max(slowest.get(phase, 0.0), float(took))
    print("writer:", r["writer_out"], "slowest fsync by phase:", slowest)  # for the report


def test_unit_and_generated_mount_verify(booted: tuple[BootResult, Path]) -> None:
    assert _results(booted)["verify"].strip() == ""


def test_crash_restart_keeps_the_mount(booted: tuple[BootResult, Path]) -> None:
    r = _results(booted)
    assert r["restarted"] == "yes", r
    assert r["active_after_crash"] == "active", r
    assert r["sync_rc"] == "0", r
    assert r["link_after_crash"] == r["link"], r
    assert r["attachments_after_crash"] == f"data={r['link']}", r
    assert r["mount_id_end"] == r["mount_id"], r


def test_poweroff_unmounts_then_flushes(booted: tuple[BootResult, Path], tmp_path: Path) -> None:
    result, image = booted
    _results(booted)
    console = result.console
    checks_done = console.find("GUEST-CHECK: done")
    unmounted = console.find("mnt-vhd.mount: Deactivated successfully")
    stopped = console.rfind("vhdblkd.service: Deactivated successfully")
    assert checks_done != -1 and unmounted != -1 and stopped != -1, console[-8000:]
    assert checks_done < unmounted < stopped, "the daemon stopped before the mount was gone"
    assert console.count("mnt-vhd.mount: Deactivated successfully") == 1
    assert re.search(r"stopping \(shutdown: ", console), "the last stop was not seen as a shutdown"
    assert file_in_image(image, "/written", tmp_path) == WRITTEN
    assert file_in_image(image, "/after-crash", tmp_path) == "written after a daemon crash\n"

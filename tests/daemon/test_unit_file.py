"""The packaged systemd unit: what the restart handover and the shutdown order rely on."""

from __future__ import annotations

from pathlib import Path

from vhdblkd.daemon.vhdtab import MAX_CONNECTIONS

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "vhdblkd.service"

# Settings that give a service its own mount namespace (systemd.exec(5)).  A
# daemon started while file systems are mounted on its devices would hold a
# copy of those mounts: an unmount at shutdown would not release them, and
# their last writes would fail once the daemon disconnected.
MOUNT_NAMESPACE = (
    "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateNetwork", "PrivateIPC", "ProtectSystem",
    "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "ProtectHostname", "ReadOnlyPaths",
    "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths",
    "RootDirectory", "RootImage", "MountAPIVFS", "MountFlags", "DynamicUser",
)


def settings() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found[key] = value
    return found


def test_no_mount_namespace_of_its_own() -> None:
    assert sorted(set(settings()) & set(MOUNT_NAMESPACE)) == []


def test_what_a_restart_and_a_stop_rely_on() -> None:
    s = settings()
    assert int(s["FileDescriptorStoreMax"]) >= MAX_CONNECTIONS * 32  # every socket of 32 devices
    assert s["NotifyAccess"] == "main" and s["Type"] == "notify"
    assert s["RuntimeDirectoryPreserve"] == "yes"  # the state file outlives a stop
    assert s["KillMode"] == "mixed"
    assert s["DefaultDependencies"] == "no" and "shutdown.target" in s["Conflicts"]

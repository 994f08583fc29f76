"""The control device client: ublk's admin commands over /dev/ublk-control.

Each command is one IORING_OP_URING_CMD in a ring of 128-byte SQEs: the
opcode in `cmd_op`, a `struct ublksrv_ctrl_cmd` in the command area, and
for commands with a payload (ADD_DEV, SET_PARAMS, GET_DEV_INFO,
GET_FEATURES) `addr`/`len` pointing at a buffer the kernel reads or fills.
The kernel runs control commands in a worker thread, so a blocking one
(START_DEV waits until every queue has FETCHed all its tags) only blocks the
caller.

Opcodes (`opcode`, `knows_encoded`): 6.5+ answers GET_FEATURES, and its
UBLK_F_CMD_IOCTL_ENCODE bit picks the ioctl-encoded `UBLK_U_CMD_*` from the
start.  6.1-6.4 have no GET_FEATURES, so ADD_DEV goes out with the legacy
number, which they all take; 6.4 sets UBLK_F_CMD_IOCTL_ENCODE in the flags
ADD_DEV (and GET_DEV_INFO) hands back, and every later command of that
descriptor, and the queues' FETCH/COMMIT, is encoded.  A 6.4 built without
CONFIG_BLKDEV_UBLK_LEGACY_OPCODES refuses the legacy ADD_DEV with
EOPNOTSUPP: it is sent once more, encoded.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import threading
import time

from ..errors import UblkError, UblkUnavailable
from . import constants as c
from .structs import CtrlCmd, DevInfo, Params
from .uring import Ring, check_platform, prep

log = logging.getLogger(__name__)

CONTROL_PATH = "/dev/ublk-control"
_RECOVERY_RETRY_SECONDS = 0.1

# name -> (legacy number, ioctl-encoded number)
_OPCODES = {
    "GET_DEV_INFO": (c.UBLK_CMD_GET_DEV_INFO, c.UBLK_U_CMD_GET_DEV_INFO),
    "ADD_DEV": (c.UBLK_CMD_ADD_DEV, c.UBLK_U_CMD_ADD_DEV),
    "DEL_DEV": (c.UBLK_CMD_DEL_DEV, c.UBLK_U_CMD_DEL_DEV),
    "START_DEV": (c.UBLK_CMD_START_DEV, c.UBLK_U_CMD_START_DEV),
    "STOP_DEV": (c.UBLK_CMD_STOP_DEV, c.UBLK_U_CMD_STOP_DEV),
    "SET_PARAMS": (c.UBLK_CMD_SET_PARAMS, c.UBLK_U_CMD_SET_PARAMS),
    "GET_PARAMS": (c.UBLK_CMD_GET_PARAMS, c.UBLK_U_CMD_GET_PARAMS),
    "START_USER_RECOVERY": (c.UBLK_CMD_START_USER_RECOVERY, c.UBLK_U_CMD_START_USER_RECOVERY),
    "END_USER_RECOVERY": (c.UBLK_CMD_END_USER_RECOVERY, c.UBLK_U_CMD_END_USER_RECOVERY),
}


def opcode(name: str, encoded: bool) -> int:
    """The number of control command `name` (ADD_DEV, ...) in the form the kernel takes."""
    legacy, enc = _OPCODES[name]
    return enc if encoded else legacy


def knows_encoded(flags: int) -> bool:
    """True when GET_FEATURES or a device's flags say the kernel takes ioctl-encoded opcodes (6.4+)."""
    return bool(flags & c.UBLK_F_CMD_IOCTL_ENCODE)


def open_control(path: str = CONTROL_PATH) -> int:
    """Open the control device, or say how to get one."""
    check_platform()
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UblkUnavailable(
            f"this kernel ({platform.release()}) has no ublk driver loaded ({path} is missing): "
            "run `modprobe ublk_drv` (the kernel needs CONFIG_BLK_DEV_UBLK, Linux 6.1 or later), "
            "or attach with --transport nbd",
            errno.ENODEV,
        ) from None
    except PermissionError as exc:
        raise UblkUnavailable(f"cannot open {path}: {exc.strerror}; ublk devices need root", exc.errno) from None


class Control:
    """The admin commands of one /dev/ublk-control descriptor; thread-safe (one command at a time)."""

    def __init__(self, path: str = CONTROL_PATH) -> None:
        self.fd = open_control(path)
        try:
            self._ring = Ring(4, sqe128=True)
        except BaseException:
            os.close(self.fd)
            raise
        self._lock = threading.Lock()
        self._next = 1
        self.features = self._get_features()
        self.encoded = knows_encoded(self.features)

    def close(self) -> None:
        if self.fd >= 0:
            self._ring.close()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one command --------------------------------------------------------------

    def _command(self, cmd_op: int, header: CtrlCmd) -> int:
        with self._lock:
            user_data = self._next
            self._next += 1
            prep(self._ring.sq, c.IORING_OP_URING_CMD, self.fd, off=cmd_op, user_data=user_data, cmd=header.pack())
            self._ring.submit(wait=1)
            for done, res, _flags in self._ring.completions():
                if done == user_data:
                    return res
            raise UblkError(f"ublk control command {cmd_op:#x}: no completion")  # pragma: no cover - kernel bug

    def _run(self, name: str, dev_id: int, buf: ctypes.Array[ctypes.c_char] | None = None, data0: int = 0) -> int:
        header = CtrlCmd(
            dev_id=dev_id,
            len=len(buf) if buf is not None else 0,
            addr=ctypes.addressof(buf) if buf is not None else 0,
            data0=data0,
        )
        res = self._command(opcode(name, self.encoded), header)
        if res < 0:
            raise UblkError(f"ublk {name} (device {dev_id}) failed: {os.strerror(-res)}", -res)
        return res

    def _get_features(self) -> int:
        buf = ctypes.create_string_buffer(c.UBLK_FEATURES_LEN)
        header = CtrlCmd(dev_id=0xFFFFFFFF, len=len(buf), addr=ctypes.addressof(buf))
        res = self._command(c.UBLK_U_CMD_GET_FEATURES, header)
        if res < 0:
            # Before 6.5 there is no GET_FEATURES: ADD_DEV's returned flags tell instead.
            log.debug("ublk GET_FEATURES: %s (kernel before 6.5)", os.strerror(-res))
            return 0
        return int.from_bytes(buf.raw, "little")

    # --- the commands -------------------------------------------------------------

    def add_dev(self, info: DevInfo) -> DevInfo:
        """Create /dev/ublkcN; returns the device's info with its id and the flags the kernel kept."""
        buf = ctypes.create_string_buffer(info.pack(), DevInfo.SIZE)
        try:
            self._run("ADD_DEV", info.dev_id, buf)
        except UblkError as exc:
            if exc.errno != errno.EOPNOTSUPP or self.encoded:
                raise
            self.encoded = True  # 6.4 without legacy opcodes (and without GET_FEATURES)
            try:
                self._run("ADD_DEV", info.dev_id, buf)
            except UblkError as again:
                if again.errno != errno.EOPNOTSUPP:
                    raise
                raise UblkUnavailable(
                    f"the ublk driver of this kernel ({platform.release()}) refuses ADD_DEV in both the legacy "
                    "and the ioctl-encoded form; use --transport nbd",
                    again.errno,
                ) from None
        return self._learn(DevInfo.unpack(buf.raw))

    def _learn(self, info: DevInfo) -> DevInfo:
        if knows_encoded(info.flags):
            self.encoded = True  # 6.4: encoded opcodes without GET_FEATURES
        return info

    def get_dev_info(self, dev_id: int) -> DevInfo:
        buf = ctypes.create_string_buffer(DevInfo.SIZE)
        self._run("GET_DEV_INFO", dev_id, buf)
        return self._learn(DevInfo.unpack(buf.raw))

    def set_params(self, dev_id: int, params: Params) -> None:
        buf = ctypes.create_string_buffer(params.pack(), Params.SIZE)
        self._run("SET_PARAMS", dev_id, buf)

    def start_dev(self, dev_id: int, pid: int) -> None:
        """Create /dev/ublkbN; blocks until every queue has FETCHed all its tags."""
        self._run("START_DEV", dev_id, data0=pid)

    def stop_dev(self, dev_id: int) -> None:
        """Remove /dev/ublkbN; requests in flight still need serving until this returns."""
        self._run("STOP_DEV", dev_id)

    def del_dev(self, dev_id: int) -> None:
        """Forget the device; waits until its /dev/ublkcN is closed."""
        self._run("DEL_DEV", dev_id)

    def start_user_recovery(self, dev_id: int, timeout: float = 10.0) -> None:
        """Begin re-adopting a device whose server died; retried while the old server's files close."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._run("START_USER_RECOVERY", dev_id)
                return
            except UblkError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
            time.sleep(_RECOVERY_RETRY_SECONDS)

    def end_user_recovery(self, dev_id: int, pid: int) -> None:
        """Finish re-adopting; blocks until every queue has FETCHed all its tags."""
        self._run("END_USER_RECOVERY", dev_id, data0=pid)

"""One ublk device's life: ADD_DEV, SET_PARAMS, queues armed, START_DEV ... STOP_DEV, DEL_DEV.

Devices are created with UBLK_F_USER_RECOVERY and UBLK_F_USER_RECOVERY_REISSUE:
when the server dies the kernel keeps /dev/ublkbN and queues its I/O, and
requests that were in flight are issued again to the next server instead of
failing, so a writer above never sees an error.  `UblkDevice.recover`
re-adopts such a device (START_USER_RECOVERY, queues armed,
END_USER_RECOVERY).  `stop` is the clean end: STOP_DEV while the queues
still serve what is in flight, then the queues end, /dev/ublkcN is closed
and DEL_DEV forgets the device.  The caller flushes the image before and
after (the kernel sends no FLUSH of its own when a device goes away).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import platform
import time
from collections.abc import Callable

from ..errors import UblkError, UblkUnavailable
from . import constants as c
from .control import Control
from .queue import Handler, Queue
from .structs import U32_MAX, DevInfo, ParamBasic, ParamDiscard, Params

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 64
DEFAULT_MAX_IO_BYTES = 512 * 1024
_MAX_DISCARD_BYTES = 1 << 30
_NODE_WAIT_SECONDS = 5.0
_ARM_WAIT_SECONDS = 30.0
RECOVERY_FLAGS = c.UBLK_F_USER_RECOVERY | c.UBLK_F_USER_RECOVERY_REISSUE


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """What the kernel is told about the disk."""

    size: int
    logical_block_size: int = 512
    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    discard: bool = False  # dynamic and differencing images free blocks; fixed ones do not
    queues: int = 1
    depth: int = DEFAULT_DEPTH
    max_io_bytes: int = DEFAULT_MAX_IO_BYTES

    def __post_init__(self) -> None:
        if self.logical_block_size not in (512, 4096):
            raise ValueError(f"logical block size must be 512 or 4096, not {self.logical_block_size}")
        if not 1 <= self.queues <= c.UBLK_MAX_NR_QUEUES:
            raise ValueError(f"queue count must be 1..{c.UBLK_MAX_NR_QUEUES}, not {self.queues}")
        if not 1 <= self.depth <= c.UBLK_MAX_QUEUE_DEPTH:
            raise ValueError(f"queue depth must be 1..{c.UBLK_MAX_QUEUE_DEPTH}, not {self.depth}")
        if self.max_io_bytes % 4096 or not 4096 <= self.max_io_bytes <= 1 << c.UBLK_IO_BUF_BITS:
            raise ValueError(f"max request size must be a multiple of 4 KiB up to 32 MiB, not {self.max_io_bytes}")

    def params(self) -> Params:
        shift = self.logical_block_size.bit_length() - 1
        attrs = c.UBLK_ATTR_READ_ONLY if self.read_only else 0
        if self.can_flush:
            attrs |= c.UBLK_ATTR_VOLATILE_CACHE  # the kernel then sends FLUSH
            if self.can_fua:
                attrs |= c.UBLK_ATTR_FUA
        basic = ParamBasic(
            attrs=attrs,
            logical_bs_shift=shift,
            physical_bs_shift=max(shift, 12),
            io_opt_shift=max(shift, 12),
            io_min_shift=shift,
            max_sectors=self.max_io_bytes >> c.SECTOR_SHIFT,
            chunk_sectors=0,
            dev_sectors=self.size >> c.SECTOR_SHIFT,
        )
        if not self.discard or self.read_only:
            return Params(c.UBLK_PARAM_TYPE_BASIC, basic)
        discard = ParamDiscard(
            discard_alignment=0,
            discard_granularity=self.logical_block_size,
            max_discard_sectors=_MAX_DISCARD_BYTES >> c.SECTOR_SHIFT,
            max_write_zeroes_sectors=_MAX_DISCARD_BYTES >> c.SECTOR_SHIFT,
            max_discard_segments=1,  # the driver takes single-segment discards only
        )
        return Params(c.UBLK_PARAM_TYPE_BASIC | c.UBLK_PARAM_TYPE_DISCARD, basic, discard)


def _require(flags: int, wanted: int) -> None:
    missing = wanted & ~flags
    for bit, (name, since) in c.FEATURE_SINCE.items():
        if missing & bit:
            raise UblkUnavailable(
                f"this kernel's ublk driver ({platform.release()}) lacks {name}, which vhdblkd needs to keep "
                f"devices across a daemon restart (Linux {since} or later has it); use --transport nbd"
            )


def _open_char(dev_id: int) -> int:
    path = f"/dev/ublkc{dev_id}"
    deadline = time.monotonic() + _NODE_WAIT_SECONDS
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise UblkError(f"{path} did not appear (is devtmpfs or udev running?)", errno.ENOENT) from None
            time.sleep(0.02)


class UblkDevice:
    """A started /dev/ublkbN and the queue threads serving it."""

    def __init__(self, control: Control, info: DevInfo, handler: Handler, config: DeviceConfig) -> None:
        self.control = control
        self.info = info
        self.dev_id = info.dev_id
        self.handler = handler
        self.config = config
        self.char_fd = -1
        self.queues: list[Queue] = []

    @property
    def path(self) -> str:
        return f"/dev/ublkb{self.dev_id}"

    @classmethod
    def create(
        cls,
        handler: Handler,
        config: DeviceConfig,
        *,
        dev_id: int = U32_MAX,
        before_start: Callable[[int], None] | None = None,
    ) -> UblkDevice:
        """A new device, started: /dev/ublkbN exists and is served when this returns.

        `before_start(dev_id)` runs once the id is known, before /dev/ublkbN
        appears (e.g. to leave its name where a udev rule reads it).
        """
        control = Control()
        try:
            wanted = DevInfo(
                nr_hw_queues=config.queues,
                queue_depth=config.depth,
                max_io_buf_bytes=config.max_io_bytes,
                dev_id=dev_id,
                flags=RECOVERY_FLAGS,
            )
            if control.features:
                _require(control.features, RECOVERY_FLAGS)
            info = control.add_dev(wanted)
        except BaseException:
            control.close()
            raise
        dev = cls(control, info, handler, config)
        try:
            _require(info.flags, RECOVERY_FLAGS)
            control.set_params(info.dev_id, config.params())
            dev._arm()
            if before_start is not None:
                before_start(info.dev_id)
            control.start_dev(info.dev_id, os.getpid())
        except BaseException:
            dev._teardown()
            raise
        log.info("ublk device %s: %d queue(s) of depth %d, flags %#x", dev.path, info.nr_hw_queues,
                 info.queue_depth, info.flags)
        return dev

    @classmethod
    def recover(cls, dev_id: int, handler: Handler, config: DeviceConfig) -> UblkDevice:
        """Re-adopt a device whose previous server died (UBLK_F_USER_RECOVERY)."""
        control = Control()
        try:
            info = control.get_dev_info(dev_id)
            if not info.flags & c.UBLK_F_USER_RECOVERY:
                raise UblkError(f"/dev/ublkb{dev_id} was not created for recovery; it cannot be re-adopted")
            if info.state == c.UBLK_S_DEV_DEAD:
                raise UblkError(f"/dev/ublkb{dev_id} is not started (state DEAD); it cannot be re-adopted")
            control.start_user_recovery(dev_id)
        except BaseException:
            control.close()
            raise
        config = dataclasses.replace(config, queues=info.nr_hw_queues, depth=info.queue_depth,
                                     max_io_bytes=info.max_io_buf_bytes)
        dev = cls(control, info, handler, config)
        try:
            dev._arm()
            control.end_user_recovery(dev_id, os.getpid())
        except BaseException:
            dev._close_queues()
            control.close()
            raise
        log.info("ublk device %s re-adopted", dev.path)
        return dev

    def _arm(self) -> None:
        self.char_fd = _open_char(self.dev_id)
        encoded = self.control.encoded
        for q_id in range(self.info.nr_hw_queues):
            q = Queue(self.char_fd, q_id, self.info.queue_depth, self.info.max_io_buf_bytes, self.handler,
                      encoded=encoded)
            self.queues.append(q)
            q.start()
        for q in self.queues:
            q.wait_armed(_ARM_WAIT_SECONDS)

    def _close_queues(self, timeout: float | None = None) -> None:
        for q in self.queues:
            q.join(timeout)
        if self.char_fd >= 0 and not any(q.alive for q in self.queues):
            os.close(self.char_fd)
            self.char_fd = -1

    def _teardown(self) -> None:
        """Undo a half-made device: stop (cancels armed tags), queues end, forget it."""
        try:
            self.control.stop_dev(self.dev_id)
        except UblkError as exc:
            log.warning("ublk STOP_DEV of a half-made device %d: %s", self.dev_id, exc)
        self._close_queues()
        try:
            self.control.del_dev(self.dev_id)
        except UblkError as exc:
            log.warning("ublk DEL_DEV of a half-made device %d: %s", self.dev_id, exc)
        self.control.close()

    def stop(self) -> None:
        """Remove /dev/ublkbN and the device; requests in flight are served to the end first."""
        self.control.stop_dev(self.dev_id)
        self._close_queues()
        self.control.del_dev(self.dev_id)
        self.control.close()

    def release(self) -> None:
        """Stop serving but leave /dev/ublkbN in the kernel, its I/O held until `recover` (a restart)."""
        for q in self.queues:
            q.release()
        self._close_queues()
        self.control.close()

    @property
    def serving(self) -> bool:
        return bool(self.queues) and all(q.alive for q in self.queues)


def device_state(dev_id: int) -> DevInfo | None:
    """The kernel's view of /dev/ublkbN, or None when there is no such device."""
    with Control() as control:
        try:
            return control.get_dev_info(dev_id)
        except UblkError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise

"""What the kernel is told: ublk parameters per attachment kind, and the errors that say what to do."""

from __future__ import annotations

import errno

import pytest

from vhdblkd.errors import UblkUnavailable
from vhdblkd.ublk import constants as c
from vhdblkd.ublk.control import open_control
from vhdblkd.ublk.device import RECOVERY_FLAGS, DeviceConfig, _require
from vhdblkd.ublk.queue import desc_array_length, desc_array_offset
from vhdblkd.ublk.uring import _setup_error


def test_fixed_image_has_no_discard() -> None:
    p = DeviceConfig(size=1 << 30).params()
    assert p.types == c.UBLK_PARAM_TYPE_BASIC and p.discard is None
    assert p.basic.attrs == c.UBLK_ATTR_VOLATILE_CACHE | c.UBLK_ATTR_FUA
    assert (p.basic.logical_bs_shift, p.basic.physical_bs_shift) == (9, 12)
    assert p.basic.dev_sectors == (1 << 30) // 512
    assert p.basic.max_sectors == 512 * 1024 // 512


def test_dynamic_image_discards_at_its_block_size() -> None:
    p = DeviceConfig(size=1 << 30, logical_block_size=4096, discard=True).params()
    assert p.types == c.UBLK_PARAM_TYPE_BASIC | c.UBLK_PARAM_TYPE_DISCARD
    assert p.discard is not None
    assert p.discard.discard_granularity == 4096 and p.discard.max_discard_segments == 1
    assert p.discard.max_write_zeroes_sectors > 0
    assert p.basic.logical_bs_shift == 12 and p.basic.dev_sectors == (1 << 30) // 512


def test_read_only_attachment() -> None:
    p = DeviceConfig(size=1 << 20, read_only=True, discard=True).params()
    assert p.basic.attrs & c.UBLK_ATTR_READ_ONLY
    assert p.types == c.UBLK_PARAM_TYPE_BASIC  # nothing to discard on a read-only disk


def test_no_flush_means_no_volatile_cache() -> None:
    assert DeviceConfig(size=1 << 20, can_flush=False).params().basic.attrs == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"logical_block_size": 1024}, {"queues": 0}, {"depth": 5000}, {"max_io_bytes": 1000}, {"max_io_bytes": 64 << 20}],
)
def test_bad_config_is_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        DeviceConfig(size=1 << 20, **kwargs)


def test_descriptor_arrays_are_spaced_by_the_largest_depth() -> None:
    # ublk_drv's mmap handler divides the offset by the buffer size of UBLK_MAX_QUEUE_DEPTH tags.
    assert desc_array_offset(0) == 0
    assert desc_array_offset(1) == 4096 * 24
    assert desc_array_length(64) == 4096 and desc_array_length(200) == 8192


def test_missing_driver_says_what_to_do(tmp_path: object) -> None:
    with pytest.raises(UblkUnavailable) as info:
        open_control("/nonexistent/ublk-control")
    msg = str(info.value)
    assert "modprobe ublk_drv" in msg and "CONFIG_BLK_DEV_UBLK" in msg and "--transport nbd" in msg


def test_io_uring_errors_say_what_to_do() -> None:
    assert "kernel.io_uring_disabled" in str(_setup_error(errno.EPERM, 0))
    assert "CONFIG_IO_URING" in str(_setup_error(errno.ENOSYS, 0))
    assert "6.1" in str(_setup_error(errno.EINVAL, c.IORING_SETUP_SQE128))
    assert all(isinstance(_setup_error(e, c.IORING_SETUP_SQE128), UblkUnavailable)
               for e in (errno.EPERM, errno.ENOSYS, errno.EINVAL))


def test_old_kernel_without_recovery_is_named() -> None:
    _require(RECOVERY_FLAGS | c.UBLK_F_CMD_IOCTL_ENCODE, RECOVERY_FLAGS)
    with pytest.raises(UblkUnavailable, match=r"UBLK_F_USER_RECOVERY.*Linux 6\.1"):
        _require(c.UBLK_F_CMD_IOCTL_ENCODE, RECOVERY_FLAGS)

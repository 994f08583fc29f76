"""Which opcode form goes out on which kernel: legacy on 6.1-6.3, encoded once 6.4+ says so.

Only 6.12 can be booted here (tests/kernel/test_ublk.py serves it with the
encoded form), so the older generations are played by a table of what each
one's ublk_drv.c accepts: GET_FEATURES (6.5+), the UBLK_F_CMD_IOCTL_ENCODE
bit in ADD_DEV's flags (6.4+), and legacy numbers refused with EOPNOTSUPP
(6.4+ built without CONFIG_BLKDEV_UBLK_LEGACY_OPCODES).  `Control` runs
unchanged above the command call; the test asserts the numbers it sends.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno

import pytest

from vhdblkd.errors import UblkUnavailable
from vhdblkd.ublk import constants as c
from vhdblkd.ublk.control import Control, knows_encoded, opcode
from vhdblkd.ublk.queue import io_opcodes
from vhdblkd.ublk.structs import CtrlCmd, DevInfo

ENC = c.UBLK_F_CMD_IOCTL_ENCODE


@dataclasses.dataclass
class Generation:
    """What one kernel generation's control device answers."""

    features: int | None  # GET_FEATURES' answer; None: no such command (before 6.5)
    add_dev_flags: int  # the flags ADD_DEV hands back besides the asked-for ones
    legacy: bool = True  # takes the legacy numbers
    sent: list[int] = dataclasses.field(default_factory=list)

    def command(self, cmd_op: int, header: CtrlCmd) -> int:
        self.sent.append(cmd_op)
        encoded = cmd_op >> 8 & 0xFF == ord("u")
        if encoded and self.features is None and not self.add_dev_flags & ENC:
            return -errno.EINVAL  # 6.1-6.3 know no encoded numbers
        if not encoded and not self.legacy:
            return -errno.EOPNOTSUPP
        if cmd_op == c.UBLK_U_CMD_GET_FEATURES:
            if self.features is None:
                return -errno.EINVAL
            ctypes.memmove(header.addr, self.features.to_bytes(8, "little"), 8)
            return 0
        if cmd_op & 0xFF == c.UBLK_CMD_ADD_DEV:
            asked = DevInfo.unpack(ctypes.string_at(header.addr, DevInfo.SIZE))
            out = dataclasses.replace(asked, dev_id=0, flags=asked.flags | self.add_dev_flags)
            ctypes.memmove(header.addr, out.pack(), DevInfo.SIZE)
        return 0


def _control(gen: Generation) -> Control:
    control = Control.__new__(Control)  # no /dev/ublk-control: the generation answers instead
    control._command = gen.command  # type: ignore[method-assign]  # the table above stands in for the driver
    control.features = control._get_features()
    control.encoded = knows_encoded(control.features)
    return control


GENERATIONS = {
    "6.1-6.3": (Generation(None, 0), False),
    "6.4": (Generation(None, ENC), True),
    "6.4 without legacy opcodes": (Generation(None, ENC, legacy=False), True),
    "6.5+": (Generation(0x1FE, ENC), True),
    "6.12 without legacy opcodes": (Generation(0x1FE, ENC, legacy=False), True),
}


@pytest.mark.parametrize("name", GENERATIONS)
def test_opcodes_after_add_dev(name: str) -> None:
    gen, encoded_after = GENERATIONS[name]
    control = _control(gen)
    info = control.add_dev(DevInfo(nr_hw_queues=1, queue_depth=64, flags=c.UBLK_F_USER_RECOVERY))
    assert info.dev_id == 0
    assert control.encoded is encoded_after
    gen.sent.clear()
    control.start_dev(0, 1)
    assert gen.sent == [c.UBLK_U_CMD_START_DEV if encoded_after else c.UBLK_CMD_START_DEV]
    fetch, commit = io_opcodes(control.encoded)
    assert (fetch, commit) == ((c.UBLK_U_IO_FETCH_REQ, c.UBLK_U_IO_COMMIT_AND_FETCH_REQ) if encoded_after
                               else (0x20, 0x21))


def test_legacy_kernels_get_legacy_add_dev() -> None:
    gen = Generation(None, 0)
    _control(gen).add_dev(DevInfo(nr_hw_queues=1, queue_depth=64))
    assert gen.sent == [c.UBLK_U_CMD_GET_FEATURES, 0x04]


def test_6_4_without_legacy_opcodes_retries_add_dev_encoded() -> None:
    gen = Generation(None, ENC, legacy=False)
    _control(gen).add_dev(DevInfo(nr_hw_queues=1, queue_depth=64))
    assert gen.sent == [c.UBLK_U_CMD_GET_FEATURES, 0x04, c.UBLK_U_CMD_ADD_DEV]


def test_a_driver_that_takes_neither_form_says_what_to_do() -> None:
    control = _control(Generation(None, 0))
    control._command = lambda cmd_op, header: -errno.EOPNOTSUPP  # type: ignore[method-assign]  # refuses all
    with pytest.raises(UblkUnavailable, match="--transport nbd"):
        control.add_dev(DevInfo(nr_hw_queues=1, queue_depth=64))


def test_recovery_on_6_4_learns_the_encoded_form_from_get_dev_info() -> None:
    gen = Generation(None, ENC)
    control = _control(gen)

    def dev_info(cmd_op: int, header: CtrlCmd) -> int:
        gen.sent.append(cmd_op)
        ctypes.memmove(header.addr, DevInfo(1, 64, flags=ENC | c.UBLK_F_USER_RECOVERY).pack(), DevInfo.SIZE)
        return 0

    control._command = dev_info  # type: ignore[method-assign]  # GET_DEV_INFO's answer on 6.4
    control.get_dev_info(3)
    assert gen.sent[-1] == c.UBLK_CMD_GET_DEV_INFO and control.encoded


@pytest.mark.parametrize(("name", "legacy", "encoded"), [
    ("ADD_DEV", 0x04, 0xC0207504), ("DEL_DEV", 0x05, 0xC0207505), ("START_DEV", 0x06, 0xC0207506),
    ("STOP_DEV", 0x07, 0xC0207507), ("SET_PARAMS", 0x08, 0xC0207508), ("GET_DEV_INFO", 0x02, 0x80207502),
    ("START_USER_RECOVERY", 0x10, 0xC0207510), ("END_USER_RECOVERY", 0x11, 0xC0207511),
])
def test_opcode_table(name: str, legacy: int, encoded: int) -> None:
    assert (opcode(name, False), opcode(name, True)) == (legacy, encoded)

"""A ublk server in its own process, for the guest checks that kill or signal it.

    python tests/kernel/ublk_server.py create|DEV_ID IMAGE IDFILE

`create` makes a new device, a number re-adopts that device (user
recovery).  The device id goes to IDFILE once /dev/ublkbN is served.
SIGTERM: flush the image, remove the device, exit 0.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vhdblkd.ublk.device import DeviceConfig, UblkDevice  # noqa: E402
from vhdblkd.ublk.serve import BackendHandler  # noqa: E402
from vhdblkd.vhd.image import open_image  # noqa: E402


def main() -> None:
    mode, path, idfile = sys.argv[1:4]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    image = open_image(path)
    handler = BackendHandler(image)
    config = DeviceConfig(size=image.size, discard=image.disk_type != "fixed", queues=int(os.environ.get("UBLK_QUEUES", "2")))
    dev = UblkDevice.create(handler, config) if mode == "create" else UblkDevice.recover(int(mode), handler, config)
    Path(idfile).write_text(str(dev.dev_id))
    stop.wait()
    image.flush()
    dev.stop()
    image.close()


if __name__ == "__main__":
    main()

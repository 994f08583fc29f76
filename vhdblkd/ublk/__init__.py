"""The ublk transport: /dev/ublkbN served through io_uring (Linux 6.1+)."""

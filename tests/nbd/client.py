"""A minimal blocking NBD test client over a connected socket (simple replies only)."""

from __future__ import annotations

import socket
import struct

from vhdblkd.nbd import constants as c
from vhdblkd.nbd.codec import Request, decode_reply


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.next_cookie = 1
        self.read_lengths: dict[int, int] = {}

    def send(self, type_: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> int:
        cookie = self.next_cookie
        self.next_cookie += 1
        if type_ == c.NBD_CMD_WRITE:
            length = len(data)
        self.sock.sendall(Request(type_, flags, cookie, offset, length, data).pack())
        if type_ == c.NBD_CMD_READ:
            self.read_lengths[cookie] = length
        return cookie

    def reply(self) -> tuple[int, int, bytes]:
        """Next reply as (cookie, error, data)."""
        cookie, error = decode_reply(recv_exact(self.sock, 16))
        length = self.read_lengths.pop(cookie, 0)
        data = recv_exact(self.sock, length) if length and not error else b""
        return cookie, error, data

    def call(self, type_: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> tuple[int, bytes]:
        cookie = self.send(type_, offset, length, data, flags)
        got, error, payload = self.reply()
        assert got == cookie
        return error, payload

    def read(self, offset: int, length: int) -> bytes:
        error, data = self.call(c.NBD_CMD_READ, offset, length)
        assert error == 0
        return data

    def disconnect(self) -> None:
        self.send(c.NBD_CMD_DISC)

    def handshake_go(self, name: str = "") -> tuple[int, int]:
        """Fixed-newstyle handshake with NBD_OPT_GO; returns (size, transmission flags)."""
        assert recv_exact(self.sock, 18)[:16] == b"NBDMAGICIHAVEOPT"
        self.sock.sendall(struct.pack(">I", c.NBD_FLAG_C_FIXED_NEWSTYLE | c.NBD_FLAG_C_NO_ZEROES))
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", c.IHAVEOPT, c.NBD_OPT_GO, len(data)) + data)
        size = flags = -1
        while True:
            _, _, kind, length = struct.unpack(">QIII", recv_exact(self.sock, 20))
            payload = recv_exact(self.sock, length)
            if kind == c.NBD_REP_INFO and payload[:2] == b"\x00\x00":
                size, flags = struct.unpack(">QH", payload[2:])
            elif kind == c.NBD_REP_ACK:
                return size, flags
            elif kind != c.NBD_REP_INFO:
                raise AssertionError(f"GO failed with reply type {kind:#x}")

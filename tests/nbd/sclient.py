"""A blocking test client that negotiates structured replies and metadata contexts."""

from __future__ import annotations

import socket
import struct

from vhdblkd.nbd import constants as c
from vhdblkd.nbd.codec import Request
from vhdblkd.nbd.structured import decode_chunk_header

from .client import recv_exact


def option(sock: socket.socket, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
    """Send an option; return its replies (type, data) up to the final one."""
    sock.sendall(struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data)
    out = []
    while True:
        _, _, kind, length = struct.unpack(">QIII", recv_exact(sock, 20))
        out.append((kind, recv_exact(sock, length)))
        if kind not in (c.NBD_REP_SERVER, c.NBD_REP_INFO, c.NBD_REP_META_CONTEXT):
            return out


def meta_data(name: str, *queries: str) -> bytes:
    out = struct.pack(">I", len(name.encode())) + name.encode() + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in queries)


class StructuredClient:
    def __init__(self, sock: socket.socket, *, structured: bool = True, contexts: tuple[str, ...] = ()) -> None:
        self.sock = sock
        self.cookie = 0
        recv_exact(sock, 18)
        sock.sendall(struct.pack(">I", c.NBD_FLAG_C_FIXED_NEWSTYLE | c.NBD_FLAG_C_NO_ZEROES))
        self.structured = structured and option(sock, c.NBD_OPT_STRUCTURED_REPLY)[-1][0] == c.NBD_REP_ACK
        self.contexts: dict[int, str] = {}
        if contexts:
            for kind, data in option(sock, c.NBD_OPT_SET_META_CONTEXT, meta_data("", *contexts)):
                if kind == c.NBD_REP_META_CONTEXT:
                    self.contexts[struct.unpack_from(">I", data)[0]] = data[4:].decode()
        go = option(sock, c.NBD_OPT_GO, struct.pack(">IH", 0, 0))
        assert go[-1][0] == c.NBD_REP_ACK, go
        self.size = next(struct.unpack_from(">Q", d, 2)[0] for k, d in go if k == c.NBD_REP_INFO and d[:2] == b"\0\0")

    def send(self, type_: int, offset: int, length: int, flags: int = 0, data: bytes = b"") -> int:
        self.cookie += 1
        self.sock.sendall(Request(type_, flags, self.cookie, offset, length, data).pack())
        return self.cookie

    def chunks(self, cookie: int) -> list[tuple[int, int, bytes]]:
        """(flags, type, payload) of every chunk of one reply (structured mode)."""
        out = []
        while True:
            flags, type_, got, length = decode_chunk_header(recv_exact(self.sock, 20))
            assert got == cookie
            out.append((flags, type_, recv_exact(self.sock, length)))
            if flags & c.NBD_REPLY_FLAG_DONE:
                return out

    def read(self, offset: int, length: int, flags: int = 0) -> tuple[int, bytes, list[int]]:
        """(error, data, chunk types) of one READ, in either mode."""
        cookie = self.send(c.NBD_CMD_READ, offset, length, flags)
        if not self.structured:
            magic, error, got = struct.unpack(">IIQ", recv_exact(self.sock, 16))
            assert magic == c.NBD_SIMPLE_REPLY_MAGIC and got == cookie
            return error, (recv_exact(self.sock, length) if not error else b""), []
        buf = bytearray(length)
        seen = bytearray(length)  # every byte covered exactly once
        error = 0
        kinds = []
        for _, type_, payload in self.chunks(cookie):
            kinds.append(type_)
            if type_ == c.NBD_REPLY_TYPE_OFFSET_DATA:
                (at,) = struct.unpack_from(">Q", payload)
                data = payload[8:]
                assert data and offset <= at and at + len(data) <= offset + length
                buf[at - offset : at - offset + len(data)] = data
                seen[at - offset : at - offset + len(data)] = b"\1" * len(data)
            elif type_ == c.NBD_REPLY_TYPE_OFFSET_HOLE:
                at, n = struct.unpack(">QI", payload)
                assert n and offset <= at and at + n <= offset + length
                seen[at - offset : at - offset + n] = b"\1" * n
            elif type_ in (c.NBD_REPLY_TYPE_ERROR, c.NBD_REPLY_TYPE_ERROR_OFFSET):
                error = struct.unpack_from(">I", payload)[0]
            else:
                assert type_ == c.NBD_REPLY_TYPE_NONE, type_
        if not error:
            assert seen == b"\1" * length, "chunks did not cover the read exactly once"
        return error, bytes(buf) if not error else b"", kinds

    def write(self, offset: int, data: bytes) -> int:
        cookie = self.send(c.NBD_CMD_WRITE, offset, len(data), data=data)
        return self.simple_or_structured_error(cookie)

    def trim(self, offset: int, length: int) -> int:
        return self.simple_or_structured_error(self.send(c.NBD_CMD_TRIM, offset, length))

    def simple_or_structured_error(self, cookie: int) -> int:
        magic = struct.unpack(">I", recv_exact(self.sock, 4))[0]
        if magic == c.NBD_SIMPLE_REPLY_MAGIC:
            error, got = struct.unpack(">IQ", recv_exact(self.sock, 12))
            assert got == cookie
            return int(error)
        rest = recv_exact(self.sock, 16)
        flags, type_, got, length = decode_chunk_header(struct.pack(">I", magic) + rest)
        payload = recv_exact(self.sock, length)
        assert got == cookie and flags & c.NBD_REPLY_FLAG_DONE
        return int(struct.unpack_from(">I", payload)[0]) if type_ & 0x8000 else 0

    def block_status(self, offset: int, length: int, flags: int = 0) -> tuple[int, dict[str, list[tuple[int, int]]]]:
        cookie = self.send(c.NBD_CMD_BLOCK_STATUS, offset, length, flags)
        out: dict[str, list[tuple[int, int]]] = {}
        error = 0
        for _, type_, payload in self.chunks(cookie):
            if type_ & 0x8000:
                error = struct.unpack_from(">I", payload)[0]
                continue
            assert type_ == c.NBD_REPLY_TYPE_BLOCK_STATUS and (len(payload) - 4) % 8 == 0 and len(payload) > 4
            (cid,) = struct.unpack_from(">I", payload)
            out[self.contexts[cid]] = [struct.unpack_from(">II", payload, 4 + 8 * i) for i in range((len(payload) - 4) // 8)]
        return error, out

    def close(self) -> None:
        self.send(c.NBD_CMD_DISC, 0, 0)

"""Random pipelined request streams against the server, checked with a bytearray model."""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhdblkd.backend import MemoryBackend
from vhdblkd.nbd import constants as c
from vhdblkd.nbd.server import Export, serve_connection

from .client import Client

SIZE = 64 * 1024

pytestmark = pytest.mark.timeout(120)

offsets = st.integers(min_value=0, max_value=SIZE + 1024)
lengths = st.integers(min_value=0, max_value=4096)  # a full window stays within the socket buffers
ops = st.one_of(
    st.tuples(st.just(c.NBD_CMD_READ), offsets, lengths, st.just(0)),
    st.tuples(st.just(c.NBD_CMD_WRITE), offsets, lengths, st.sampled_from([0, c.NBD_CMD_FLAG_FUA])),
    st.tuples(st.just(c.NBD_CMD_TRIM), offsets, lengths, st.just(0)),
    st.tuples(st.just(c.NBD_CMD_WRITE_ZEROES), offsets, lengths, st.sampled_from([0, c.NBD_CMD_FLAG_NO_HOLE])),
    st.tuples(st.just(c.NBD_CMD_FLUSH), st.just(0), st.just(0), st.just(0)),
)


@settings(max_examples=60)
@given(st.lists(ops, max_size=30), st.integers(min_value=1, max_value=30))
def test_server_matches_model(requests: list[tuple[int, int, int, int]], window: int) -> None:
    model = bytearray(SIZE)
    backend = MemoryBackend(SIZE)
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=serve_connection, args=(theirs, Export(backend)), kwargs={"handshake": False})
    thread.start()
    client = Client(ours)
    expected: dict[int, tuple[int, bytes]] = {}
    got: dict[int, tuple[int, bytes]] = {}
    try:
        for n, (type_, offset, length, flags) in enumerate(requests):
            in_range = offset + length <= SIZE
            data = bytes([n % 251 + 1]) * length if type_ == c.NBD_CMD_WRITE else b""
            cookie = client.send(type_, offset, length, data, flags)
            if type_ == c.NBD_CMD_READ:
                # Reads in the window see every write sent before them: the server runs requests in order.
                expected[cookie] = (0, bytes(model[offset : offset + length])) if in_range else (c.NBD_EINVAL, b"")
            elif type_ == c.NBD_CMD_FLUSH:
                expected[cookie] = (0, b"")
            elif not in_range:
                expected[cookie] = (c.NBD_EINVAL, b"")  # out of range, for writes too: ENOSPC means a full host disk
            else:
                model[offset : offset + length] = data or bytes(length)
                expected[cookie] = (0, b"")
            while len(expected) - len(got) >= window:
                cookie, error, payload = client.reply()
                got[cookie] = (error, payload)
        while len(got) < len(expected):
            cookie, error, payload = client.reply()
            got[cookie] = (error, payload)
        assert got == expected
        client.disconnect()
    finally:
        thread.join(timeout=30)
        ours.close()
        theirs.close()
    assert bytes(backend.read(0, SIZE)) == bytes(model)

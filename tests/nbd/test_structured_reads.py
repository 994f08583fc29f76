"""Structured and simple READs agree with each other and with the in-memory model; block status too."""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import given, settings
from hypothesis import strategies as st

from vhdblkd.backend import Buffer
from vhdblkd.nbd import constants as c
from vhdblkd.nbd.server import Export, serve_connection

from .sclient import StructuredClient
from .sparsemem import SparseMemoryBackend

SIZE = 1 << 20
CONTEXTS = (c.META_BASE_ALLOCATION, c.META_QEMU_ALLOCATION_DEPTH)


@contextmanager
def connected(export: Export, **kwargs: object) -> Iterator[StructuredClient]:
    server_end, client_end = socket.socketpair()
    thread = threading.Thread(target=serve_connection, args=(server_end, export), kwargs={"handshake": True}, daemon=True)
    thread.start()
    try:
        client = StructuredClient(client_end, **kwargs)  # type: ignore[arg-type]
        yield client
        client.close()
    finally:
        thread.join(10)
        assert not thread.is_alive()
        server_end.close()
        client_end.close()


ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 200_000), st.integers(1, 255)),
        st.tuples(st.just("trim"), st.integers(0, SIZE - 1), st.integers(1, 300_000), st.just(0)),
    ),
    max_size=10,
)
ranges = st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(0, 300_000)), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(ops=ops, reads=ranges)
def test_structured_and_simple_reads_agree_with_the_model(ops: list[tuple[str, int, int, int]],
                                                          reads: list[tuple[int, int]]) -> None:
    backend = SparseMemoryBackend(SIZE)
    export = Export(backend, "disk")
    model = bytearray(SIZE)
    with connected(export, contexts=CONTEXTS) as sc, connected(export, structured=False) as pc:
        assert sc.structured and not pc.structured and set(sc.contexts.values()) == set(CONTEXTS)
        for kind, offset, length, value in ops:
            length = min(length, SIZE - offset)
            if kind == "write":
                assert sc.write(offset, bytes([value]) * length) == 0
                model[offset : offset + length] = bytes([value]) * length
            else:
                assert pc.trim(offset, length) == 0
                model[offset : offset + length] = bytes(length)
        for offset, length in reads:
            length = min(length, SIZE - offset)
            s_err, s_data, kinds = sc.read(offset, length)
            p_err, p_data, _ = pc.read(offset, length)
            assert s_err == p_err == 0
            assert s_data == p_data == model[offset : offset + length]
            if not length:
                continue
            err, status = sc.block_status(offset, length)
            assert err == 0
            pos = offset
            for n, flags in status[c.META_BASE_ALLOCATION]:
                if flags & c.NBD_STATE_ZERO:
                    assert not any(model[pos : pos + n])
                pos += n
            assert offset < pos <= offset + length
            err, one = sc.block_status(offset, length, c.NBD_CMD_FLAG_REQ_ONE)
            assert err == 0 and all(len(v) == 1 and v[0][0] <= length for v in one.values())


def test_errors_are_structured_for_reads_and_block_status() -> None:
    export = Export(SparseMemoryBackend(SIZE), "disk")
    with connected(export, contexts=CONTEXTS) as sc:
        err, _, kinds = sc.read(SIZE - 10, 20)
        assert err == c.NBD_EINVAL and kinds == [c.NBD_REPLY_TYPE_ERROR]
        err, _, kinds = sc.read(0, 10, c.NBD_CMD_FLAG_DF)
        assert err == c.NBD_EINVAL and kinds == [c.NBD_REPLY_TYPE_ERROR]
        assert sc.block_status(SIZE - 10, 20)[0] == c.NBD_EINVAL
        assert sc.block_status(0, 0)[0] == c.NBD_EINVAL
        assert sc.block_status(0, 10, c.NBD_CMD_FLAG_FUA)[0] == c.NBD_EINVAL
        err, _, kinds = sc.read(0, 0)
        assert err == 0 and kinds == [c.NBD_REPLY_TYPE_NONE]
        err, _, kinds = sc.read(0, 256 * 1024)
        assert err == 0 and kinds == [c.NBD_REPLY_TYPE_OFFSET_HOLE]  # nothing written: one hole
        err, status = sc.block_status(0, SIZE)
        assert status == {c.META_BASE_ALLOCATION: [(SIZE, 3)], c.META_QEMU_ALLOCATION_DEPTH: [(SIZE, 0)]}


class FailingReads(SparseMemoryBackend):
    """Reads of allocated data fail as a bad sector does."""

    fail = False

    def read(self, offset: int, length: int) -> Buffer:
        if self.fail:
            raise OSError(errno.EIO, "bad sector")
        return super().read(offset, length)


def test_a_failed_read_is_one_error_chunk_on_either_path() -> None:
    """Short READs (answered inline) and long ones (split into data and holes) fail with the same chunk."""
    backend = FailingReads(SIZE)
    with connected(Export(backend, "disk"), contexts=CONTEXTS) as sc:
        assert sc.write(0, b"x" * SIZE) == 0
        backend.fail = True
        for length in (4096, 256 * 1024):
            chunks = sc.chunks(sc.send(c.NBD_CMD_READ, 0, length))
            assert [(flags, type_) for flags, type_, _ in chunks] == [(c.NBD_REPLY_FLAG_DONE, c.NBD_REPLY_TYPE_ERROR)]
            text = f"READ {length}@0 failed".encode()
            assert chunks[0][2] == struct.pack(">IH", c.NBD_EIO, len(text)) + text
        backend.fail = False
        assert sc.read(0, 8)[:2] == (0, b"x" * 8)  # the connection stayed up


def test_block_status_without_contexts_is_refused() -> None:
    export = Export(SparseMemoryBackend(SIZE), "disk")
    with connected(export) as sc:
        cookie = sc.send(c.NBD_CMD_BLOCK_STATUS, 0, 4096)
        assert sc.simple_or_structured_error(cookie) == c.NBD_ENOTSUP

"""Differencing chains against a bytearray: writes at every level, then reads through the chain.

Each level (a dynamic or fixed base, then 1-3 differencing children) gets
random writes, zeroing and discards before its child is made, so blocks are
absent at some levels, partly present (bitmaps partly set, partial sectors
merged) at others, and whole at others; a child may have another block size
than its parent, or be grown past its parent's end.  The top is then read
back at random ranges and in 4k steps (the fast path a block-sized walk down
the chain takes), written further with a read after every step, reopened and
checked.
"""

from __future__ import annotations

import os
import random
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhdblkd.vhd.check import check_image
from vhdblkd.vhd.create import create_differencing, create_dynamic, create_fixed
from vhdblkd.vhd.image import FileFactory, open_image
from vhdblkd.vhd.memfile import MemoryFileFactory
from vhdblkd.vhd.resize import resize

BLOCK_SIZES = [512, 4096, 16384]
KINDS = ["write", "write", "write", "zero_trim", "zero_keep", "discard"]


def _range(data: st.DataObject, size: int, block_size: int) -> tuple[int, int]:
    align = data.draw(st.sampled_from([1, 512, 4096]), label="align")
    offset = data.draw(st.integers(0, (size - 1) // align), label="offset") * align
    most = min(size - offset, 3 * block_size + 1000)
    if align > 1 and data.draw(st.booleans(), label="whole sectors"):
        length = min(most, data.draw(st.integers(1, 8), label="sectors") * 512)
    else:
        length = data.draw(st.integers(1, most), label="length")
    return offset, length


def _apply(data: st.DataObject, image: object, model: bytearray, block_size: int, steps: int,
           check_reads: bool) -> None:
    from vhdblkd.vhd.base import VhdImage

    assert isinstance(image, VhdImage)
    for _ in range(steps):
        kind = data.draw(st.sampled_from(KINDS), label="op")
        offset, length = _range(data, len(model), block_size)
        if kind == "write":
            payload = random.Random(data.draw(st.integers(0, 2**16), label="seed")).randbytes(length)
            image.write(offset, payload)
            model[offset : offset + length] = payload
        elif kind == "discard":
            image.discard(offset, length)
            model[offset : offset + length] = bytes(length)
        else:
            image.write_zeroes(offset, length, may_trim=kind == "zero_trim")
            model[offset : offset + length] = bytes(length)
        if check_reads:
            offset, length = _range(data, len(model), block_size)
            assert bytes(image.read(offset, length)) == bytes(model[offset : offset + length])


def _check_chain(data: st.DataObject, directory: str, factory: FileFactory | None) -> None:
    kw: dict[str, object] = {} if factory is None else {"file_factory": factory, "lock": False}
    ff: dict[str, object] = {} if factory is None else {"file_factory": factory}
    block_size = data.draw(st.sampled_from(BLOCK_SIZES), label="block size")
    size = data.draw(st.integers(2, 8), label="blocks") * block_size + data.draw(st.integers(0, 7)) * 512
    levels = data.draw(st.integers(2, 4), label="levels")
    paths = [os.path.join(directory, f"level{i}.vhd") for i in range(levels)]
    if data.draw(st.booleans(), label="fixed base"):
        create_fixed(paths[0], size, exact_size=True, **ff)  # type: ignore[arg-type]  # kw built above
    else:
        create_dynamic(paths[0], size, block_size=block_size, exact_size=True, **ff)  # type: ignore[arg-type]
    model = bytearray(size)
    for level, path in enumerate(paths):
        if level:
            bs = data.draw(st.sampled_from([block_size, block_size, *BLOCK_SIZES]), label="child block size")
            create_differencing(path, paths[level - 1], block_size=bs, **kw)  # type: ignore[arg-type]
            if data.draw(st.integers(0, 4), label="grow") == 0:
                resize(path, len(model) + data.draw(st.integers(1, 3)) * bs, **kw)  # type: ignore[arg-type]
        with open_image(path, **kw) as image:  # type: ignore[arg-type]
            model.extend(bytes(image.size - len(model)))  # a grown child reads zeros past its parent
            _apply(data, image, model, block_size, data.draw(st.integers(0, 8), label="steps"), False)
    with open_image(paths[-1], **kw) as top:  # type: ignore[arg-type]
        assert top.size == len(model)
        for _ in range(data.draw(st.integers(1, 6), label="reads")):
            offset, length = _range(data, len(model), block_size)
            assert bytes(top.read(offset, length)) == bytes(model[offset : offset + length])
        for offset in range(0, len(model) - 4095, 4096):
            assert bytes(top.read(offset, 4096)) == bytes(model[offset : offset + 4096]), offset
        assert bytes(top.read(0, len(model))) == bytes(model)
        assert bytes(top.read(len(model), 0)) == b""
        _apply(data, top, model, block_size, data.draw(st.integers(1, 8), label="top steps"), True)
    for path in paths:
        report = check_image(path, **kw)  # type: ignore[arg-type]
        assert report.clean, (path, report.problems)
    with open_image(paths[-1], read_only=True, **kw) as top:  # type: ignore[arg-type]
        assert bytes(top.read(0, len(model))) == bytes(model)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_chain_reads_match_the_model(data: st.DataObject) -> None:
    _check_chain(data, "/mem", MemoryFileFactory({}))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_chain_on_real_files_matches_the_model(data: st.DataObject) -> None:
    """Real preadv, punched holes and locks, as the daemon has them."""
    with tempfile.TemporaryDirectory(prefix="vhdchain-") as directory:
        _check_chain(data, directory, None)

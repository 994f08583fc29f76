"""The format layer's lazy logger: logging loads at the first message, set up first, records name the caller."""

from __future__ import annotations

import logging

import pytest

from vhdblkd.vhd import lazylog


def test_first_message_runs_the_setup_once_and_reaches_logging(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(lazylog, "before_first", lambda: calls.append(1))
    log = lazylog.LazyLogger("vhdblkd.vhd.test_lazy")
    assert calls == []  # nothing happens before a message
    with caplog.at_level(logging.WARNING, logger="vhdblkd.vhd.test_lazy"):
        log.warning("%s: moved block %d", "d.vhd", 7)
        log.info("not at WARNING")
        log.error("second")
    assert calls == [1] and lazylog.before_first is None
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("vhdblkd.vhd.test_lazy", "WARNING", "d.vhd: moved block 7"),
        ("vhdblkd.vhd.test_lazy", "ERROR", "second"),
    ]
    # the record points at the line that logged, not at lazylog.py
    assert caplog.records[0].funcName == "test_first_message_runs_the_setup_once_and_reaches_logging"
    assert caplog.records[0].pathname == __file__

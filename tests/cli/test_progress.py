"""The progress bar draws on terminals only, and ends its line."""

from __future__ import annotations

import io

from vhdblkd.cli.progress import ProgressBar, render


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_silent_when_not_a_terminal() -> None:
    stream = io.StringIO()
    with ProgressBar("copy", stream) as bar:
        assert not bar.enabled
        for done in range(0, 101, 10):
            bar(done, 100)
    assert stream.getvalue() == ""


def test_draws_on_a_terminal_and_ends_the_line() -> None:
    stream = FakeTty()
    with ProgressBar("copy", stream) as bar:
        assert bar.enabled
        bar(0, 2048)
        bar(1024, 2048)
        bar(2048, 2048)
    out = stream.getvalue()
    assert out.count("\r") == 3
    assert " 50% 1 KiB / 2 KiB" in out
    assert "100% 2 KiB / 2 KiB" in out
    assert out.endswith("\n")


def test_redraws_only_when_the_shown_step_changes() -> None:
    stream = FakeTty()
    bar = ProgressBar("copy", stream)
    for done in range(0, 1_000_001, 10):
        bar(done, 1_000_000_000)
    assert stream.getvalue().count("\r") == 2  # 0.0% and 0.1%


def test_forced_off_on_a_terminal() -> None:
    stream = FakeTty()
    with ProgressBar("copy", stream, enabled=False) as bar:
        bar(5, 10)
    assert stream.getvalue() == ""


def test_render_shapes() -> None:
    assert render("x", 0, 0).startswith("x [" + "#" * 30 + "] 100%")
    assert render("x", 5, 10) == "x [" + "#" * 15 + "-" * 15 + "]  50% 5 B / 10 B"

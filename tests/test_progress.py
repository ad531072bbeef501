"""Progress: a bar only on a terminal; whole lines, never a carriage return, in a log."""

from __future__ import annotations

import io

from kvqueue.progress import LineProgress, progress_reporter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_come_at_most_once_per_interval_and_once_at_the_end() -> None:
    out, clock = io.StringIO(), Clock()
    lines = LineProgress(128, "cache_aware done", out, interval_s=5.0, clock=clock)
    lines.update(10)  # t = 0: too soon
    clock.now = 5.0
    lines.update(30)  # a line: 40 done
    lines.update(8)  # too soon again
    clock.now = 7.0
    lines.close()  # the last count, once
    lines.close()
    assert out.getvalue().splitlines() == [
        "cache_aware done: 40/128 (31%)",
        "cache_aware done: 48/128 (37%)",
    ]


def test_a_log_gets_lines_without_carriage_returns() -> None:
    out = io.StringIO()
    with progress_reporter(1_500, "simulating", stream=out) as advance:
        for _ in range(1_500):
            advance(1)
    text = out.getvalue()
    assert "\r" not in text
    assert text == "simulating: 1,500/1,500 (100%)\n"


def test_a_terminal_gets_a_bar_and_a_disabled_reporter_prints_nothing() -> None:
    terminal = Terminal()
    with progress_reporter(10, "sending", stream=terminal) as advance:
        advance(10)
    assert "\r" in terminal.getvalue() and "sending:" in terminal.getvalue()
    quiet = Terminal()
    with progress_reporter(10, "sending", enabled=False, stream=quiet) as advance:
        advance(10)
    assert quiet.getvalue() == ""

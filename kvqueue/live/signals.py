"""Signals while child processes run: SIGTERM as SystemExit, and no interruption while stopping."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def graceful_signals() -> Iterator[None]:
    """SIGTERM raises SystemExit (like Ctrl-C raises KeyboardInterrupt), so `finally` blocks
    that stop child processes run on either; the previous handler is restored on exit."""

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while stopping children, so a second Ctrl-C cannot orphan them.

    Bounded: `LocalCluster.stop` kills what has not exited within its timeout.
    """
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

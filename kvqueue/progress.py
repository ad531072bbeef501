"""Progress of a long step: a bar on a terminal, plain lines in a log.

A tqdm bar redraws itself with carriage returns, which fill a log file or a CI transcript with
one half-drawn line per update. So `progress_reporter` draws a bar only when the stream is a
terminal; anywhere else it prints a complete line (``"<label>: 40/128 (31%)"``) at most once every
`LINE_INTERVAL_S` seconds, and once at the end, so a redirected run still shows that it is
moving and never writes a carriage return.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from tqdm import tqdm

LINE_INTERVAL_S = 5.0

ProgressCallback = Callable[[int], None]


class LineProgress:
    """Counts completions and prints a whole line now and then; never a carriage return.

    Invariant: `done` never exceeds `total` in what is printed; the final line (on `close`)
    is printed once, and only if something was counted since the last line.
    """

    def __init__(
        self,
        total: int,
        label: str,
        stream: TextIO,
        interval_s: float = LINE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.label = label
        self.stream = stream
        self.interval_s = interval_s
        self.clock = clock
        self.done = 0
        self._printed = 0
        self._next_line = clock() + interval_s

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.clock() >= self._next_line:
            self._line()

    def close(self) -> None:
        if self.done != self._printed:
            self._line()

    def _line(self) -> None:
        done = min(self.done, self.total) if self.total else self.done
        share = f" ({100 * done // self.total}%)" if self.total else ""
        print(f"{self.label}: {done:,}/{self.total:,}{share}", file=self.stream, flush=True)
        self._printed = self.done
        self._next_line = self.clock() + self.interval_s


@contextlib.contextmanager
def progress_reporter(
    total: int, label: str, enabled: bool = True, stream: TextIO | None = None, unit: str = "req"
) -> Iterator[ProgressCallback]:
    """A callback ``update(n)`` that reports `n` more items done out of `total`.

    A tqdm bar on `stream` (default stderr) when it is a terminal, `LineProgress` lines
    otherwise, nothing at all when not `enabled`. The bar or last line is closed on exit.
    """
    out = stream if stream is not None else sys.stderr
    if not enabled:
        yield _ignore
        return
    if _is_terminal(out):
        bar = tqdm(total=total, desc=label, unit=unit, file=out, leave=False)
        try:
            yield bar.update
        finally:
            bar.close()
        return
    lines = LineProgress(total, label, out)
    try:
        yield lines.update
    finally:
        lines.close()


def _ignore(n: int) -> None:
    del n


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())

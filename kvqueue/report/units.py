"""How numbers read in tables: durations, counts, rates and shares, one rule each.

- a duration below 10 s is printed in milliseconds (``8.4``, ``185``, ``1,893``: no unit,
  the table says "ms"); from 10 s on in seconds with its unit (``12.3 s``, ``558.6 s``), so a
  queueing disaster reads as one;
- a count always has thousands separators (``12,031``);
- a rate in requests per second keeps two significant decimals below 10 (``0.25``, ``7.1``);
- None (nothing to measure) is ``-``.
"""

from __future__ import annotations

SECONDS_FROM_MS = 10_000.0


def format_ms(value: float | None) -> str:
    """A duration given in ms: ``12.3`` below 100 ms, ``1,893`` below 10 s, ``12.3 s`` after."""
    if value is None:
        return "-"
    if abs(value) >= SECONDS_FROM_MS:
        return f"{value / 1000:,.1f} s"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"


def format_duration(value: float | None) -> str:
    """`format_ms` with its unit: ``185 ms``, ``1,893 ms``, ``12.3 s``."""
    text = format_ms(value)
    return text if value is None or text.endswith(" s") else f"{text} ms"


def format_count(value: int | float | None) -> str:
    """A count with thousands separators."""
    return "-" if value is None else f"{value:,.0f}"


def format_rate(value: float | None) -> str:
    """Requests per second: ``0.25``, ``7.1``, ``42``, ``1,250``."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.2f}".rstrip("0").rstrip(".")


def format_share(value: float | None, decimals: int = 1) -> str:
    """A fraction as a percentage: 0.778 → ``77.8%``."""
    return "-" if value is None else f"{100.0 * value:.{decimals}f}%"

"""The trade-off cache-aware routing makes: prefix-cache hit rate against p99 TTFT.

One marker per (strategy, run): a comparison gives one point per strategy, a sweep a line per
strategy through its rates, each point labelled with its rate. Better is to the right (more
hits) and down (shorter tail). With an SLO, its TTFT objective is a dashed line. Points
without a hit rate or a p99 (no completed request) are listed in a note, never dropped
silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, PercentFormatter

from kvqueue.report.style import (
    STYLE,
    corner_note,
    finish_figure,
    ms_formatter,
    note,
    objective_line,
    spans_decades,
    strategy_colors,
)

Point = tuple[float | None, float | None, str]  # (hit rate 0–1, p99 TTFT ms, label)


def plot_tradeoff(
    points: Mapping[str, Sequence[Point]],
    path: str | Path,
    subtitle: str = "",
    slo_ttft_ms: float | None = None,
    title: str = "Hit rate against tail latency",
) -> Path:
    """Draw `points` (module docstring) and save the PNG at `path`."""
    colors = strategy_colors(list(points))
    missing = [
        name for name, pts in points.items() if any(h is None or p is None for h, p, _ in pts)
    ]
    drawn = [p for pts in points.values() for h, p, _ in pts if h is not None and p is not None]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for order, (name, pts) in enumerate(points.items()):
            good = [(100.0 * h, p, label) for h, p, label in pts if h is not None and p is not None]
            if not good:
                continue
            xs, ys = [g[0] for g in good], [g[1] for g in good]
            style = "-o" if len(good) > 1 else "o"
            # Later strategies get smaller markers, so equal points stay visible as rings.
            size = max(5.0, 13.0 - 2.5 * order)
            ax.plot(xs, ys, style, color=colors[name], label=name, markersize=size, linewidth=1.6)
            for x, y, label in good:
                if label:
                    ax.annotate(
                        label,
                        (x, y),
                        xytext=(4, 4),
                        textcoords="offset points",
                        fontsize=7,
                        color=colors[name],
                    )
        if slo_ttft_ms is not None:
            objective_line(ax, slo_ttft_ms, f"TTFT SLO ({ms_formatter(slo_ttft_ms, 0)})")
        if spans_decades(drawn):
            ax.set_yscale("log")
        elif drawn:
            ax.set_ylim(bottom=0, top=max([*drawn, slo_ttft_ms or 0.0]) * 1.12)
        ax.set_xlim(0, 100)
        ax.yaxis.set_major_formatter(FuncFormatter(ms_formatter))
        ax.xaxis.set_major_formatter(PercentFormatter(decimals=0))
        ax.set_xlabel("prefix-cache hit rate (% of prompt blocks) → better")
        ax.set_ylabel("p99 TTFT (simulated) ↓ better")
        ax.set_title(title)
        if missing:
            corner_note(ax, "no completed requests: " + ", ".join(missing))
        if drawn:
            ax.legend(loc="best", fontsize=9)
        else:
            note(ax, "no completed requests")
        return finish_figure(fig, path, subtitle)

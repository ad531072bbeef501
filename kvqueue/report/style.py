"""What every kvqueue figure shares: colours, matplotlib style, units on axes, saving.

Invariants: a strategy keeps the same colour in every figure of a report (its position in
the list of strategies); every figure is saved at `DPI` with a grey subtitle (workload,
size, preset) under everything drawn; the Agg backend is selected on import, so no display
is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
STRATEGY_COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442")
DPI = 130
STYLE = {
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "axes.titleweight": "bold",
    "axes.titlesize": 12,
    "axes.labelsize": 10,
    "legend.frameon": False,
    "font.size": 10,
}


def strategy_colors(strategies: Sequence[str]) -> dict[str, str]:
    """A fixed colour per strategy, by position (cycled past the palette's length)."""
    return {s: STRATEGY_COLORS[i % len(STRATEGY_COLORS)] for i, s in enumerate(strategies)}


def finish_figure(fig: Figure, path: str | Path, subtitle: str = "") -> Path:
    """Add the subtitle under the figure, save it as PNG at `path` and close it."""
    if subtitle:
        # Below everything drawn so far; `bbox_inches="tight"` grows the canvas to hold it.
        bottom = fig.get_tightbbox(fig.canvas.get_renderer()).y0 / fig.get_figheight()
        fig.text(0.99, bottom - 0.01, subtitle, ha="right", va="top", fontsize=8, color="0.45")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def note(ax: Axes, text: str) -> None:
    """A grey note in the middle of an axes (e.g. "no completed requests")."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def corner_note(ax: Axes, text: str) -> None:
    """A small grey note in the top-left corner (e.g. which strategies drew nothing)."""
    ax.text(0.01, 0.98, text, transform=ax.transAxes, va="top", fontsize=8, color="0.4")


def spans_decades(values: Sequence[float]) -> bool:
    """The positive `values` span more than a factor of 10: worth a log axis."""
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) > 10


def objective_line(ax: Axes, value: float, label: str) -> None:
    """A dashed horizontal line for an objective (an SLO, a target)."""
    ax.axhline(value, color="0.3", linestyle="--", linewidth=1.1, label=label)


def ms_formatter(value: float, _pos: int) -> str:
    """Axis ticks: ``50 ms``, ``1 s``, ``2.5 s``."""
    if value >= 1000:
        return f"{value / 1000:g} s"
    return f"{value:g} ms"


def ms_label(value: float) -> str:
    """A latency for a legend: ``8.4 ms``, ``185 ms``, ``1.77 s``, ``23.5 s``."""
    if value >= 10_000:
        return f"{value / 1000:.1f} s"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"

"""The evaluation's figure: p99 TTFT against hit rate, one panel per workload."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from kvqueue.report.evaluation.rows import WorkloadReport
from kvqueue.report.evaluation.suite import HIGHLIGHT


def plot_p99_vs_hit(reports: Sequence[WorkloadReport], path: Path, subtitle: str = "") -> None:
    """One panel per workload: a point per policy at (hit rate, p99 TTFT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = [row.policy for row in reports[0].rows] if reports else []
    markers = "osD^v<>PXh*"
    cmap = plt.get_cmap("tab10")
    style = {
        p: {"marker": markers[i % len(markers)], "color": cmap(i % 10)}
        for i, p in enumerate(policies)
    }
    if HIGHLIGHT in style:
        style[HIGHLIGHT] = {"marker": "*", "color": "black"}
    ncols = 3
    nrows = max(1, math.ceil(len(reports) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, report in zip(axes.flat, reports, strict=False):
        for row in report.rows:
            if row.hit_rate is None or row.ttft_p99_ms is None:
                continue
            ax.scatter(
                100 * row.hit_rate,
                row.ttft_p99_ms / 1000,
                s=110 if row.policy == HIGHLIGHT else 45,
                label=row.policy,
                zorder=3,
                **style[row.policy],
            )
        if report.ideal_hit_rate is not None:
            ax.axvline(100 * report.ideal_hit_rate, color="grey", ls="--", lw=0.8)
        hits = [100 * r.hit_rate for r in report.rows if r.hit_rate is not None]
        hits.append(100 * (report.ideal_hit_rate or 0.0))
        low, high = min(hits), max(hits)
        pad = max(2.0, 0.08 * (high - low), (10.0 - (high - low)) / 2)
        ax.set_xlim(max(-1.0, low - pad), min(101.0, high + pad))
        ax.set_title(report.title, fontsize=10)
        ax.set_xlabel("block hit rate (%)  · dashed: ideal")
        ax.set_ylabel("p99 TTFT (s)")
        ax.margins(y=0.12)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(reports) :]:
        ax.axis("off")
    handles = [
        plt.Line2D([], [], ls="", markersize=9 if p == HIGHLIGHT else 7, label=p, **style[p])
        for p in policies
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(policies), 9), frameon=False)
    title = "p99 TTFT against hit rate (lower right is better)"
    fig.suptitle(f"{title} — {subtitle}" if subtitle else title)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

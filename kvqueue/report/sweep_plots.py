"""The figures of a sweep, drawn from its result alone (cells carry their percentiles).

All on the first cluster size swept (`primary_workers`):

- `plot_vs_rate`: one metric against the offered rate, a line per strategy — goodput (with
  the line where every request meets the SLO), p99 TTFT (with the SLO), SLO attainment (with
  the target); overloaded cells are drawn hollow;
- the hit-rate / p99-TTFT trade-off through each strategy's rates (`plot_tradeoff`);
- `plot_quantile_cdf`: TTFT and TPOT CDFs of every strategy at the *reference rate*;
- `plot_kv_usage`: each strategy's KV usage over time at the reference rate (mean over its
  workers; blocks pinned by running requests, evictable cached ones counted free);
- `plot_worker_load`: completed requests per worker at the reference rate.

The reference rate (`reference_rate`) is the highest rate any strategy sustains within the
SLO — where the policies part ways — or the lowest rate tested when none does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter, PercentFormatter

from kvqueue.report.style import (
    STYLE,
    finish_figure,
    ms_formatter,
    note,
    objective_line,
    spans_decades,
    strategy_colors,
)
from kvqueue.report.tradeoff_plot import plot_tradeoff
from kvqueue.report.units import format_rate

GOODPUT_FILE = "goodput_vs_rate.png"
P99_FILE = "p99_ttft_vs_rate.png"
ATTAINMENT_FILE = "attainment_vs_rate.png"
TRADEOFF_FILE = "hit_rate_vs_p99_ttft.png"
TTFT_CDF_FILE = "ttft_cdf.png"
TPOT_CDF_FILE = "tpot_cdf.png"
KV_USAGE_FILE = "kv_usage_over_time.png"
WORKER_LOAD_FILE = "per_worker.png"


def primary_workers(result: Mapping[str, Any]) -> int:
    return int(result["meta"]["workers"][0])


def primary_cells(result: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The cells of the first cluster size, per strategy, by rate."""
    workers = primary_workers(result)
    cells: dict[str, list[dict[str, Any]]] = {s: [] for s in result["meta"]["strategies"]}
    for cell in result["cells"]:
        if cell["num_workers"] == workers:
            cells[cell["strategy"]].append(cell)
    for rows in cells.values():
        rows.sort(key=lambda c: c["rate_rps"])
    return cells


def reference_rate(result: Mapping[str, Any]) -> float:
    workers = primary_workers(result)
    sustained = [
        r["rate_rps"]
        for r in result["sustained"]
        if r["num_workers"] == workers and r["rate_rps"] is not None
    ]
    if sustained:
        return max(sustained)
    return min(c["rate_rps"] for rows in primary_cells(result).values() for c in rows)


def subtitle(result: Mapping[str, Any]) -> str:
    meta = result["meta"]
    return " · ".join(
        str(p)
        for p in (
            meta.get("workload"),
            f"{primary_workers(result)} × {meta['preset']}",
            f"{meta['engine']} engine, {meta['latency_profile']} latency",
        )
        if p
    )


def plot_vs_rate(
    result: Mapping[str, Any],
    metric: str,
    path: str | Path,
    title: str,
    ylabel: str,
) -> Path:
    """`metric` ("goodput_rps", "ttft_p99", "attainment") against the offered rate."""
    cells = primary_cells(result)
    colors = strategy_colors(list(cells))
    slo = result["meta"]["slo"]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        values_seen: list[float] = []
        for name, rows in cells.items():
            xs = [c["rate_rps"] for c in rows]
            ys = [_metric(c, metric) for c in rows]
            ax.plot(
                xs,
                [np.nan if y is None else y for y in ys],
                "-",
                color=colors[name],
                linewidth=1.8,
                label=name,
            )
            for c, y in zip(rows, ys, strict=True):
                if y is None:
                    continue
                values_seen.append(y)
                face = "white" if c["overloaded"] else colors[name]
                ax.plot(
                    c["rate_rps"],
                    y,
                    "o",
                    color=colors[name],
                    markerfacecolor=face,
                    markersize=6,
                    zorder=3,
                )
        rates = sorted({c["rate_rps"] for rows in cells.values() for c in rows})
        if metric == "goodput_rps" and rates:
            ax.plot(rates, rates, "--", color="0.5", linewidth=1, label="every request in SLO")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: format_rate(v)))
        elif metric == "ttft_p99":
            objective_line(ax, slo["ttft_ms"], f"TTFT SLO ({ms_formatter(slo['ttft_ms'], 0)})")
            if spans_decades(values_seen):
                ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(ms_formatter))
        elif metric == "attainment":
            objective_line(ax, slo["attainment"], f"target ({100 * slo['attainment']:g}%)")
            ax.set_ylim(0, 1.05)
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
        ax.plot([], [], "o", color="0.4", markerfacecolor="white", label="overloaded cell")
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if values_seen:
            ax.legend(loc="best", fontsize=9)
        else:
            note(ax, "no completed requests")
        return finish_figure(fig, path, subtitle(result))


def _metric(cell: Mapping[str, Any], metric: str) -> float | None:
    if metric == "ttft_p99":
        return cell["ttft_ms"]["p99"]
    return cell[metric]


def cells_at(result: Mapping[str, Any], rate: float) -> dict[str, dict[str, Any]]:
    """Each strategy's cell at `rate` on the first cluster size."""
    return {
        name: next(c for c in rows if c["rate_rps"] == rate)
        for name, rows in primary_cells(result).items()
        if any(c["rate_rps"] == rate for c in rows)
    }


# A line per strategy, drawn from its cell at the reference rate; False when it has nothing.
LineDrawer = Callable[[Axes, str, Mapping[str, Any], str], bool]


def plot_at_reference_rate(
    result: Mapping[str, Any],
    path: str | Path,
    title: str,
    draw: LineDrawer,
    empty: str,
    ylim: float,
    labels: tuple[str, str],
    finish_x: Callable[[Axes, list[Mapping[str, Any]]], None] | None = None,
) -> Path:
    """One line per strategy from its cell at the reference rate (`draw` says whether it drew
    one), the y axis in percent up to `ylim`, a legend — or the `empty` note when no strategy
    had anything to draw. `finish_x` sets up the x axis once every line is drawn."""
    rate = reference_rate(result)
    cells = cells_at(result, rate)
    colors = strategy_colors(list(result["meta"]["strategies"]))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        drawn = [draw(ax, name, cell, colors[name]) for name, cell in cells.items()]
        if finish_x is not None:
            finish_x(ax, list(cells.values()))
        ax.set_ylim(0, ylim)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        ax.set_title(f"{title} at {format_rate(rate)} req/s")
        if any(drawn):
            ax.legend(loc="best", fontsize=9)
        else:
            note(ax, empty)
        return finish_figure(fig, path, subtitle(result))


def plot_quantile_cdf(
    result: Mapping[str, Any], key: str, path: str | Path, title: str, xlabel: str
) -> Path:
    """CDF of `key` (``ttft_quantiles`` / ``tpot_quantiles``) per strategy at the reference rate."""

    def draw(ax: Axes, name: str, cell: Mapping[str, Any], color: str) -> bool:
        values = cell[key]
        if values:
            ax.plot(values, np.linspace(0, 1, len(values)), color=color, linewidth=2, label=name)
        return bool(values)

    def finish_x(ax: Axes, cells: list[Mapping[str, Any]]) -> None:
        if spans_decades([v for c in cells for v in c[key]]):
            ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(ms_formatter))

    labels = (f"{xlabel} (simulated)", "completed requests (cumulative %)")
    return plot_at_reference_rate(
        result, path, title, draw, "no completed requests", 1.02, labels, finish_x
    )


def plot_kv_usage(result: Mapping[str, Any], path: str | Path) -> Path:
    """Mean KV usage of each strategy's workers over time, at the reference rate."""

    def draw(ax: Axes, name: str, cell: Mapping[str, Any], color: str) -> bool:
        timeline = cell.get("kv_usage_timeline")
        if timeline:
            share = f"mean {100 * cell['kv_usage_mean']:.0f}% over time"
            ax.step(
                np.asarray(timeline["t_ms"]) / 1000.0,
                np.asarray(timeline["mean"]),
                where="post",
                color=color,
                linewidth=2,
                label=f"{name} ({share}, one GPU's peak {100 * cell['kv_usage_max']:.0f}%)",
            )
        return bool(timeline)

    labels = ("time since the first arrival (simulated s)", "KV blocks pinned by running requests")
    return plot_at_reference_rate(
        result, path, "KV-cache usage over time", draw, "no engine statistics in these cells",
        1.05, labels,
    )  # fmt: skip


def plot_worker_load(result: Mapping[str, Any], path: str | Path) -> Path:
    """Completed requests per worker at the reference rate, a group of bars per strategy."""
    rate = reference_rate(result)
    cells = cells_at(result, rate)
    strategies = list(cells)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(strategies) + 2), 4.5))
        workers = max((len(c["per_worker_requests"]) for c in cells.values()), default=0)
        cmap = plt.get_cmap("tab10" if workers <= 10 else "tab20")
        width = 0.8 / max(1, workers)
        for i, name in enumerate(strategies):
            counts = cells[name]["per_worker_requests"]
            for j, count in enumerate(counts):
                ax.bar(
                    i - 0.4 + width * (j + 0.5),
                    count,
                    width * 0.92,
                    color=cmap(j % cmap.N),
                    label=f"worker-{j}" if i == 0 else None,
                )
            if counts:
                mean = float(np.mean(counts))
                ax.hlines(mean, i - 0.42, i + 0.42, colors="0.2", linestyles=":", zorder=3)
        ax.set_xticks(range(len(strategies)), strategies)
        ax.set_ylabel("completed requests")
        ax.set_xlabel("routing strategy (dotted: mean per worker)")
        ax.set_title(f"Load per worker at {format_rate(rate)} req/s")
        ax.grid(axis="x", visible=False)
        if workers and workers <= 16:
            ax.legend(loc="upper right", fontsize=8, ncol=min(workers, 4))
        if not strategies:
            note(ax, "no cells at this rate")
        return finish_figure(fig, path, subtitle(result))


def write_sweep_plots(out_dir: str | Path, result: Mapping[str, Any]) -> list[Path]:
    """Every figure of the module into `out_dir`; returns the paths."""
    out = Path(out_dir)
    cells = primary_cells(result)
    points = {
        name: [(c["hit_rate"], c["ttft_ms"]["p99"], format_rate(c["rate_rps"])) for c in rows]
        for name, rows in cells.items()
    }
    slo = result["meta"]["slo"]
    return [
        plot_vs_rate(
            result,
            "goodput_rps",
            out / GOODPUT_FILE,
            "Goodput against offered rate",
            "goodput (requests/s within the SLO)",
        ),
        plot_vs_rate(
            result,
            "ttft_p99",
            out / P99_FILE,
            "p99 TTFT against offered rate",
            "p99 time to first token",
        ),
        plot_vs_rate(
            result,
            "attainment",
            out / ATTAINMENT_FILE,
            "SLO attainment against offered rate",
            "requests within the SLO",
        ),
        plot_tradeoff(
            points,
            out / TRADEOFF_FILE,
            subtitle(result),
            slo["ttft_ms"],
            "Hit rate against p99 TTFT, across rates",
        ),
        plot_quantile_cdf(
            result, "ttft_quantiles", out / TTFT_CDF_FILE, "Time to first token", "TTFT"
        ),
        plot_quantile_cdf(
            result, "tpot_quantiles", out / TPOT_CDF_FILE, "Time per output token", "TPOT"
        ),
        plot_kv_usage(result, out / KV_USAGE_FILE),
        plot_worker_load(result, out / WORKER_LOAD_FILE),
    ]


def sweep_plot_captions(result: Mapping[str, Any]) -> dict[str, str]:
    rate = format_rate(reference_rate(result))
    workers = primary_workers(result)
    return {
        GOODPUT_FILE: f"Goodput (requests/s meeting the SLO) on {workers} GPUs; hollow markers "
        "are overloaded cells.",
        P99_FILE: f"p99 TTFT on {workers} GPUs against the TTFT objective.",
        ATTAINMENT_FILE: "Share of requests meeting the SLO; the highest rate above the target "
        "line is what each policy sustains.",
        TRADEOFF_FILE: "What cache affinity buys and costs: hit rate against p99 TTFT, each "
        "point labelled with its offered rate (req/s).",
        TTFT_CDF_FILE: f"TTFT distribution at {rate} req/s (the reference rate).",
        TPOT_CDF_FILE: f"TPOT distribution at {rate} req/s: (end-to-end − TTFT) / (output "
        "tokens − 1).",
        KV_USAGE_FILE: f"KV-cache usage over time at {rate} req/s, mean over each strategy's "
        "GPUs (evictable cached blocks count as free).",
        WORKER_LOAD_FILE: f"Completed requests per worker at {rate} req/s.",
    }

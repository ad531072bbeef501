"""PNG plots of a strategy comparison, drawn from a run directory's dashboard and results.

One function per figure, each taking the data (never reading files) and a path to write:

- `plot_hit_rate`: block hit rate per strategy as bars, the ideal (an infinite cache shared by
  every worker) as a dashed reference line;
- `plot_latency_cdf`: the empirical CDF of one latency field (TTFT, TPOT, end-to-end) over
  completed requests, one line per strategy, log x axis when the values span more than a decade;
- `plot_tradeoff` (`kvqueue.report.tradeoff_plot`): hit rate against p99 TTFT, a point per
  strategy;
- `plot_per_worker`: completed requests and prompt tokens per worker, bars grouped by strategy;
- `plot_cache_over_time`: per worker, cache occupancy (``cache_used_blocks /
  cache_capacity_blocks`` after each request's allocation) and cumulative evictions over
  simulated time, one row per strategy;
- `plot_kv_usage`: per strategy, the engines' KV usage over time (blocks pinned by running
  requests, evictable cached ones counted free), per worker and averaged, from the
  dashboard's engine metrics (recorded by the simulator, rebuilt from a live run's results).

TPOT (time per output token) is drawn over the requests that have one
(`RequestResult.tpot_ms`).

Invariants: every figure has a title, axis labels with units and a legend; a strategy keeps
the same colour in every figure (its position in the dashboard); a strategy with no completed
request is drawn as an explicit "no completed requests" note, never silently left out, and
never raises. The Agg backend is selected on import, so no display is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.dashboard import load_run
from kvqueue.report.style import (
    STYLE,
    corner_note,
    finish_figure,
    ms_formatter,
    ms_label,
    note,
    spans_decades,
    strategy_colors,
)
from kvqueue.report.tradeoff_plot import plot_tradeoff

HIT_RATE_FILE = "hit_rate.png"
TRADEOFF_FILE = "hit_rate_vs_p99_ttft.png"
TTFT_CDF_FILE = "ttft_cdf.png"
E2E_CDF_FILE = "e2e_cdf.png"
PER_WORKER_FILE = "per_worker.png"
CACHE_FILE = "cache_over_time.png"
TPOT_CDF_FILE = "tpot_cdf.png"
KV_USAGE_FILE = "kv_usage_over_time.png"
PLOT_FILES = (
    HIT_RATE_FILE,
    TRADEOFF_FILE,
    TTFT_CDF_FILE,
    E2E_CDF_FILE,
    PER_WORKER_FILE,
    CACHE_FILE,
    TPOT_CDF_FILE,
    KV_USAGE_FILE,
)


def _subtitle(dashboard: Mapping[str, Any]) -> str:
    meta = dashboard.get("meta") or {}
    parts = [str(meta.get("workload", ""))]
    if meta.get("num_requests"):
        parts.append(f"{meta['num_requests']:,} requests")
    if meta.get("num_workers"):
        parts.append(f"{meta['num_workers']} workers")
    if meta.get("preset"):
        parts.append(str(meta["preset"]))
    if meta.get("mode"):
        parts.append(str(meta["mode"]))
    return " · ".join(p for p in parts if p)


def _finish(fig: Figure, path: str | Path, dashboard: Mapping[str, Any]) -> Path:
    return finish_figure(fig, path, _subtitle(dashboard))


def _completed(results: Sequence[RequestResult]) -> list[RequestResult]:
    return [r for r in results if r.status == RequestStatus.COMPLETED]


# -- hit rate ---------------------------------------------------------------------------------
def plot_hit_rate(dashboard: Mapping[str, Any], path: str | Path) -> Path:
    """Bars of block hit rate per strategy with the ideal as a dashed line; labels on bars."""
    strategies = list(dashboard["strategies"])
    colors = strategy_colors(strategies)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(strategies) + 2.5), 4.5))
        rates = [dashboard["strategies"][s].get("hit_rate") for s in strategies]
        x = np.arange(len(strategies))
        heights = [100.0 * r if r is not None else 0.0 for r in rates]
        bars = ax.bar(x, heights, width=0.6, color=[colors[s] for s in strategies], zorder=2)
        for bar, rate in zip(bars, rates, strict=True):
            label = "no completed\nrequests" if rate is None else f"{100.0 * rate:.1f}%"
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontweight="bold",
            )
        ideal = dashboard.get("ideal_hit_rate")
        if ideal is not None:
            ax.axhline(
                100.0 * ideal,
                color="0.25",
                linestyle="--",
                linewidth=1.2,
                zorder=3,
                label=f"ideal: one infinite shared cache ({100.0 * ideal:.1f}%)",
            )
            ax.legend(loc="upper right")
        top = max([*heights, 100.0 * ideal if ideal is not None else 0.0, 1.0])
        ax.set_ylim(0, min(100.0, top * 1.25) if top < 80 else 105)
        tick_labels = []
        for name in strategies:
            summary = dashboard["strategies"][name]
            blocks = summary.get("num_blocks")
            tick_labels.append(
                f"{name}\n{summary.get('hit_blocks', 0):,} / {blocks:,} blocks" if blocks else name
            )
        ax.set_xticks(x, tick_labels)
        ax.yaxis.set_major_formatter(PercentFormatter(decimals=0 if top >= 5 else 1))
        ax.set_ylabel("prefix-cache hit rate (% of prompt blocks)")
        ax.set_xlabel("routing strategy")
        ax.set_title("KV-cache hit rate by routing strategy")
        ax.grid(axis="x", visible=False)
        return _finish(fig, path, dashboard)


# -- latency CDFs -----------------------------------------------------------------------------
def plot_latency_cdf(
    dashboard: Mapping[str, Any],
    results_by_strategy: Mapping[str, Sequence[RequestResult]],
    field: str,
    path: str | Path,
    title: str,
    xlabel: str,
) -> Path:
    """Empirical CDF of `field` (a ``*_ms`` attribute) per strategy, p50/p99 marked.

    Log x axis when the positive values span more than a factor of 10; values <= 0 are drawn
    at the smallest positive value on a log axis (they cannot be placed otherwise). Requests
    whose value is None (a TPOT of a one-token answer) are left out.
    """
    strategies = list(results_by_strategy)
    colors = strategy_colors(strategies)
    series = {
        s: np.sort(
            np.asarray(
                [
                    value
                    for r in _completed(results_by_strategy[s])
                    if (value := getattr(r, field)) is not None
                ],
                dtype=float,
            )
        )
        for s in strategies
    }
    everything = np.concatenate([v for v in series.values() if v.size] or [np.zeros(0)])
    positive = everything[everything > 0]
    log_x = spans_decades(positive.tolist())
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        missing = []
        for name in strategies:
            values = series[name]
            if not values.size:
                missing.append(name)
                continue
            if log_x:
                values = np.maximum(values, positive.min())
            y = np.arange(1, values.size + 1) / values.size
            stats = (dashboard.get("strategies", {}).get(name) or {}).get(field) or {}
            p50, p99 = stats.get("p50"), stats.get("p99")
            label = name
            if p50 is not None and p99 is not None:
                label = f"{name}  (p50 {ms_label(p50)}, p99 {ms_label(p99)})"
            ax.step(
                np.concatenate([[values[0]], values]),
                np.concatenate([[0.0], y]),
                where="post",
                color=colors[name],
                linewidth=2,
                label=label,
            )
            for q, marker in ((p50, "o"), (p99, "D")):
                if q is not None:
                    ax.plot(
                        max(q, positive.min()) if log_x else q,
                        0.5 if marker == "o" else 0.99,
                        marker=marker,
                        color=colors[name],
                        markersize=5,
                        markeredgecolor="white",
                        zorder=4,
                    )
        for level in (0.5, 0.9, 0.99):
            ax.axhline(level, color="0.6", linewidth=0.8, linestyle=":", zorder=1)
            ax.annotate(
                f"p{round(level * 100)}",
                (1.0, level),
                xycoords=("axes fraction", "data"),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
                color="0.45",
            )
        if log_x:
            ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(ms_formatter))
        ax.set_ylim(0, 1.02)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
        ax.set_xlabel(f"{xlabel} (simulated time{', log scale' if log_x else ''})")
        ax.set_ylabel("completed requests (cumulative %)")
        ax.set_title(title)
        if missing:
            corner_note(ax, "no completed requests: " + ", ".join(missing))
        if not everything.size:
            note(ax, "no completed requests")
        else:
            ax.legend(loc="best", fontsize=9)
        return _finish(fig, path, dashboard)


# -- per worker -------------------------------------------------------------------------------
def _workers_of(dashboard: Mapping[str, Any]) -> list[str]:
    workers: dict[str, None] = {}
    for summary in dashboard["strategies"].values():
        for worker in summary.get("per_worker") or {}:
            workers.setdefault(worker)
    return list(workers)


def plot_per_worker(dashboard: Mapping[str, Any], path: str | Path) -> Path:
    """Two panels (completed requests, prompt tokens): one group per strategy, a bar per worker.

    A dotted line over each group marks that strategy's mean per worker, so imbalance shows
    as bars far from it.
    """
    strategies = list(dashboard["strategies"])
    workers = _workers_of(dashboard)
    cmap = plt.get_cmap("tab10" if len(workers) <= 10 else "tab20")
    worker_colors = {w: cmap(i % cmap.N) for i, w in enumerate(workers)}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            1, 2, figsize=(max(9.0, 2.4 * len(strategies) * 2 + 2), 4.6), sharex=True
        )
        width = 0.8 / max(1, len(workers))
        x = np.arange(len(strategies))
        panels = (
            ("requests", "completed requests", "requests per worker"),
            ("prompt_tokens", "prompt tokens", "prompt tokens per worker"),
        )
        for ax, (key, ylabel, title) in zip(axes, panels, strict=True):
            for j, worker in enumerate(workers):
                values = [
                    (dashboard["strategies"][s].get("per_worker") or {}).get(worker, {}).get(key, 0)
                    for s in strategies
                ]
                offsets = x - 0.4 + width * (j + 0.5)
                ax.bar(offsets, values, width * 0.92, color=worker_colors[worker], label=worker)
            for i, s in enumerate(strategies):
                rows = (dashboard["strategies"][s].get("per_worker") or {}).values()
                totals = [row.get(key, 0) for row in rows]
                if totals and any(totals):
                    mean = float(np.mean(totals))
                    ax.hlines(mean, i - 0.42, i + 0.42, colors="0.2", linestyles=":", zorder=3)
            ax.set_xticks(x, strategies)
            ax.set_xlabel("routing strategy")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.grid(axis="x", visible=False)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:,.0f}"))
            if not workers:
                note(ax, "no worker data")
        if workers:
            handles, labels = axes[0].get_legend_handles_labels()
            handles.append(plt.Line2D([], [], color="0.2", linestyle=":"))
            labels.append("mean per worker")
            fig.legend(
                handles,
                labels,
                loc="upper center",
                ncol=min(len(labels), 9),
                bbox_to_anchor=(0.5, 1.0),
                fontsize=9,
            )
        fig.suptitle("Load per worker", fontweight="bold", y=1.07)
        fig.tight_layout()
        return _finish(fig, path, dashboard)


# -- cache over time --------------------------------------------------------------------------
def _cache_series(
    results: Sequence[RequestResult],
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per worker: (start times in s, occupancy %, cumulative evictions), in start order."""
    by_worker: dict[str, list[RequestResult]] = {}
    for r in _completed(results):
        if r.worker:
            by_worker.setdefault(r.worker, []).append(r)
    series = {}
    for worker, rows in by_worker.items():
        rows.sort(key=lambda r: r.start_ms)
        t = np.asarray([r.start_ms for r in rows]) / 1000.0
        occupancy = np.asarray(
            [
                100.0 * r.cache_used_blocks / r.cache_capacity_blocks
                if r.cache_capacity_blocks
                else np.nan
                for r in rows
            ]
        )
        evictions = np.cumsum([r.evictions for r in rows])
        series[worker] = (t, occupancy, evictions)
    return series


def plot_cache_over_time(
    dashboard: Mapping[str, Any],
    results_by_strategy: Mapping[str, Sequence[RequestResult]],
    path: str | Path,
) -> Path:
    """One row per strategy: occupancy (%) and cumulative evictions per worker over time.

    Occupancy is sampled when each request starts (after its allocation), so the step line
    holds the last known value; time axes are shared so the rows compare directly.
    """
    strategies = list(results_by_strategy)
    workers = _workers_of(dashboard)
    series = {s: _cache_series(results_by_strategy[s]) for s in strategies}
    for s in strategies:
        for worker in series[s]:
            if worker not in workers:
                workers.append(worker)
    cmap = plt.get_cmap("tab10" if len(workers) <= 10 else "tab20")
    worker_colors = {w: cmap(i % cmap.N) for i, w in enumerate(workers)}
    rows = max(1, len(strategies))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            rows, 2, figsize=(11, 2.6 * rows + 0.8), sharex=True, squeeze=False
        )
        max_evictions = max(
            [float(ev[-1]) for s in series.values() for _, _, ev in s.values() if ev.size] or [0.0]
        )
        for i, name in enumerate(strategies):
            occ_ax, ev_ax = axes[i]
            data = series[name]
            for worker in workers:
                if worker not in data:
                    continue
                t, occupancy, evictions = data[worker]
                color = worker_colors[worker]
                occ_ax.step(t, occupancy, where="post", color=color, linewidth=1.6, label=worker)
                ev_ax.step(t, evictions, where="post", color=color, linewidth=1.6, label=worker)
            occ_ax.set_ylim(0, 105)
            occ_ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
            occ_ax.set_ylabel(f"{name}\n\ncache used (%)", fontsize=9)
            ev_ax.set_ylabel("evicted blocks (cumulative)", fontsize=9)
            ev_ax.set_ylim(0, max(1.0, max_evictions * 1.08))
            ev_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ev_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:,.0f}"))
            if not data:
                note(occ_ax, "no completed requests")
                note(ev_ax, "no completed requests")
            elif not any(ev.size and ev[-1] for _, _, ev in data.values()):
                note(ev_ax, "no evictions")
        axes[0][0].set_title("KV-cache occupancy per worker")
        axes[0][1].set_title("Cumulative evictions per worker")
        for ax in axes[-1]:
            ax.set_xlabel("time since run start (simulated s)")
        if workers:
            handles = [plt.Line2D([], [], color=worker_colors[w], linewidth=2) for w in workers]
            fig.legend(
                handles,
                workers,
                loc="upper center",
                ncol=min(len(workers), 8),
                bbox_to_anchor=(0.5, 1.0),
                fontsize=9,
            )
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.1 / (rows + 0.5)))
        fig.suptitle("KV cache over time", fontweight="bold", y=1.0 + 0.05 / (rows + 0.5))
        return _finish(fig, path, dashboard)


# -- KV usage over time -----------------------------------------------------------------------
def plot_kv_usage(dashboard: Mapping[str, Any], path: str | Path) -> Path:
    """One panel per strategy: KV usage (%) of each worker's engine over time, thin, and their
    mean, thick, from ``strategies.<name>.engine.kv_usage.timeline``."""
    strategies = list(dashboard["strategies"])
    colors = strategy_colors(strategies)
    cols = max(1, min(3, len(strategies)))
    rows = max(1, -(-len(strategies) // cols))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            rows, cols, figsize=(4.6 * cols, 3.4 * rows), sharey=True, squeeze=False
        )
        for ax, name in zip(axes.flat, strategies, strict=False):
            engine = dashboard["strategies"][name].get("engine") or {}
            timeline = (engine.get("kv_usage") or {}).get("timeline")
            ax.set_title(name, fontsize=10)
            ax.set_ylim(0, 105)
            ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
            ax.set_xlabel("time since run start (simulated s)")
            if not timeline:
                note(ax, "no engine statistics")
                continue
            t = np.asarray(timeline["t_ms"]) / 1000.0
            for values in timeline["per_worker"].values():
                ax.step(t, 100 * np.asarray(values), where="post", color="0.6", linewidth=0.7)
            ax.step(
                t,
                100 * np.asarray(timeline["mean"]),
                where="post",
                color=colors[name],
                linewidth=2,
                label=f"mean of workers ({100 * engine['kv_usage']['mean']:.0f}% time-weighted)",
            )
            ax.legend(loc="upper right", fontsize=8)
        for ax in list(axes.flat)[len(strategies) :]:
            ax.axis("off")
        for row in axes:
            row[0].set_ylabel("KV blocks pinned by running requests")
        fig.suptitle("KV-cache usage over time (evictable cached blocks count as free)")
        fig.tight_layout()
        return _finish(fig, path, dashboard)


# -- all of them ------------------------------------------------------------------------------
def write_plots(
    out_dir: str | Path,
    dashboard: Mapping[str, Any],
    results_by_strategy: Mapping[str, Sequence[RequestResult]],
) -> list[Path]:
    """Every figure of the module into `out_dir` (created if needed); returns the paths."""
    out = Path(out_dir)
    points = {
        name: [(s.get("hit_rate"), (s.get("ttft_ms") or {}).get("p99"), "")]
        for name, s in dashboard["strategies"].items()
    }
    return [
        plot_hit_rate(dashboard, out / HIT_RATE_FILE),
        plot_tradeoff(points, out / TRADEOFF_FILE, _subtitle(dashboard)),
        plot_latency_cdf(
            dashboard,
            results_by_strategy,
            "ttft_ms",
            out / TTFT_CDF_FILE,
            "Time to first token (TTFT)",
            "TTFT = queue wait + prefill",
        ),
        plot_latency_cdf(
            dashboard,
            results_by_strategy,
            "e2e_ms",
            out / E2E_CDF_FILE,
            "End-to-end latency",
            "end-to-end = TTFT + decode",
        ),
        plot_per_worker(dashboard, out / PER_WORKER_FILE),
        plot_cache_over_time(dashboard, results_by_strategy, out / CACHE_FILE),
        plot_latency_cdf(
            dashboard,
            results_by_strategy,
            "tpot_ms",
            out / TPOT_CDF_FILE,
            "Time per output token (TPOT)",
            "TPOT = (end-to-end − TTFT) / (output tokens − 1)",
        ),
        plot_kv_usage(dashboard, out / KV_USAGE_FILE),
    ]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Every figure for a run directory written by `kvqueue.report.dashboard.write_run`."""
    dashboard, results = load_run(run_dir)
    return write_plots(run_dir, dashboard, results)

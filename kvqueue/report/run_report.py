"""``report.html`` of a strategy comparison (demo, simulate, compare.py), conclusion first.

Sections, in order: the conclusion (which strategy hits most, which has the shortest tail,
and the overload line when queueing decides the latencies), the settings (the engine and
latency model among them), the tables (`kvqueue.report.dashboard.dashboard_table` and, where
the engines' work is known, `engine_table`), then every plot of the run embedded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvqueue.gpu.engines import engine_label, latency_label
from kvqueue.report.capacity import overload_line
from kvqueue.report.dashboard import dashboard_table, engine_table, load_verdicts
from kvqueue.report.html import (
    Section,
    esc,
    figure,
    page,
    paragraphs,
    settings_list,
    table_html,
    write_page,
)
from kvqueue.report.units import format_count, format_duration, format_share

CAPTIONS = {
    "hit_rate.png": "Prefix-cache hit rate per strategy; the dashed line is the ideal (one "
    "infinite cache shared by every worker).",
    "hit_rate_vs_p99_ttft.png": "The trade-off: hit rate against p99 time to first token.",
    "ttft_cdf.png": "Time to first token (queue wait + prefill), cumulative.",
    "tpot_cdf.png": "Time per output token, (end-to-end − TTFT) / (output tokens − 1), cumulative.",
    "e2e_cdf.png": "End-to-end latency, cumulative.",
    "per_worker.png": "Load per worker: completed requests and prompt tokens.",
    "cache_over_time.png": "KV-cache occupancy and cumulative evictions per worker over time.",
    "kv_usage_over_time.png": "KV-cache usage over time: blocks pinned by running requests "
    "(evictable cached blocks count as free), per worker and their mean.",
}


def _best(strategies: Mapping[str, Any], key: Any, highest: bool) -> str | None:
    scored = [(key(s), name) for name, s in strategies.items() if key(s) is not None]
    if not scored:
        return None
    pick = max if highest else min
    return pick(scored, key=lambda pair: pair[0])[1]


def run_conclusion(dashboard: Mapping[str, Any]) -> list[str]:
    """The conclusion's sentences (module docstring), most important first."""
    strategies = dashboard["strategies"]
    ideal = dashboard.get("ideal_hit_rate")

    def hit(s: Mapping[str, Any]) -> float | None:
        return s.get("hit_rate")

    def p99(s: Mapping[str, Any]) -> float | None:
        return (s.get("ttft_ms") or {}).get("p99")

    hits, tail = _best(strategies, hit, True), _best(strategies, p99, False)
    lines = []
    if hits is None or tail is None:
        lines.append("No strategy completed a request: see the table for what happened.")
    else:
        bound = f"; the ideal, one infinite cache shared by every worker, is {format_share(ideal)}"
        hit_text = f"{format_share(hit(strategies[hits]))}{bound if ideal is not None else ''}"
        if hits == tail:
            lines.append(
                f"{hits} has both the highest hit rate ({hit_text}) and the lowest p99 TTFT "
                f"({format_duration(p99(strategies[tail]))})."
            )
        else:
            lines.append(
                f"{hits} has the highest hit rate ({hit_text}); {tail} has the lowest p99 TTFT, "
                f"{format_duration(p99(strategies[tail]))} against "
                f"{format_duration(p99(strategies[hits]))} for {hits}."
            )
    verdicts = list(load_verdicts(dashboard).values())
    overload = overload_line(verdicts)
    loads = sorted(v.load for v in verdicts if v.load is not None)
    if overload:
        lines.append(overload[0].upper() + overload[1:] + ".")
    elif loads:
        span = f"{loads[0]:.2f}" if loads[0] == loads[-1] else f"{loads[0]:.2f}–{loads[-1]:.2f}"
        basis = " or ".join(sorted({v.basis for v in verdicts if v.load is not None}))
        lines.append(
            f"No run was overloaded (offered load {span} of the {basis} capacity): the "
            "latencies come from routing and caching, not from a backlog."
        )
    elif verdicts and all(v.burst for v in verdicts):
        first = min(verdicts, key=lambda v: v.concurrency)
        lines.append(
            f"No run was overloaded: all {format_count(first.num_requests)} requests arrive at "
            f"once, but {first.num_workers} GPUs running about {first.concurrency:.0f} requests "
            "each at once take them together: the latencies come from routing and caching, "
            "not from a backlog."
        )
    rejected = {n: s.get("rejected", 0) for n, s in strategies.items() if s.get("rejected")}
    if rejected:
        worst = max(rejected.values())
        lines.append(
            f"Up to {format_count(worst)} requests per strategy were rejected: they can never "
            "fit the preset (see the warning printed with the run)."
        )
    return lines


def _settings(meta: Mapping[str, Any]) -> list[tuple[str, object]]:
    rate = meta.get("rate_rps")
    return [
        ("mode", meta.get("mode")),
        ("workload", meta.get("workload")),
        ("requests", format_count(meta.get("num_requests"))),
        ("arrivals", f"{meta.get('arrivals')}{f' at {rate:g} req/s' if rate else ''}"),
        ("seed", meta.get("seed")),
        ("workers", meta.get("num_workers")),
        ("preset", meta.get("preset")),
        ("KV blocks per worker", format_count(meta.get("num_blocks"))),
        ("context", format_count(meta.get("max_context_tokens"))),
        ("engine", engine_label(meta)),
        ("latency model", latency_label(meta)),
        ("time scale", meta.get("time_scale")),
        ("decode model", meta.get("decode_model") or "request length / fallback"),
        ("Redis", meta.get("redis")),
        ("run ids", ", ".join(f"{k}: {v}" for k, v in (meta.get("run_ids") or {}).items()) or None),
    ]


def subtitle_of(meta: Mapping[str, Any]) -> str:
    parts = [
        meta.get("workload"),
        f"{meta.get('num_workers')} × {meta.get('preset')}",
        meta.get("mode"),
    ]
    return " · ".join(str(p) for p in parts if p)


def write_run_report(
    out_dir: str | Path, dashboard: Mapping[str, Any], plot_paths: Sequence[Path]
) -> Path:
    """Write ``report.html`` for a comparison dashboard and its plots; returns its path."""
    meta = dashboard.get("meta") or {}
    conclusion = run_conclusion(dashboard)
    sections = [
        Section("Conclusion", paragraphs(conclusion, "conclusion")),
        Section("Settings", settings_list(_settings(meta))),
        Section("Strategies", table_html(dashboard_table(dashboard))),
        *(
            [Section("Engines", table_html(engines))]
            if (engines := engine_table(dashboard)) is not None
            else []
        ),
        Section(
            "Plots",
            "".join(figure(p, CAPTIONS.get(Path(p).name, Path(p).stem)) for p in plot_paths)
            or f"<p>{esc('no plots')}</p>",
        ),
    ]
    title = f"kvqueue: {meta.get('workload', 'run')}"
    return write_page(out_dir, page(title, subtitle_of(meta), sections))

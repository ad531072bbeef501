"""``report.html`` of a sweep: the recommendation first, the model used, the tables, the plots."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvqueue.gpu.engines import engine_label, latency_label
from kvqueue.report.html import (
    Section,
    figure,
    page,
    paragraphs,
    settings_list,
    table_html,
    write_page,
)
from kvqueue.report.sweep_plots import sweep_plot_captions, write_sweep_plots
from kvqueue.report.sweep_tables import sweep_tables
from kvqueue.report.units import format_count, format_rate


def _settings(meta: Mapping[str, Any]) -> list[tuple[str, object]]:
    slo = meta["slo"]
    rates = "; ".join(
        f"{w} GPUs: {', '.join(format_rate(r) for r in rs)}"
        for w, rs in meta["rates_by_workers"].items()
    )
    return [
        ("model used", engine_label(meta)),
        ("latency model", latency_label(meta)),
        (
            "preset",
            f"{meta['preset']} ({format_count(meta['num_blocks'])} KV blocks, "
            f"{format_count(meta['max_context_tokens'])}-token context)",
        ),
        ("workload", meta.get("workload")),
        ("requests per cell", format_count(meta.get("num_requests"))),
        ("seed", meta.get("seed")),
        ("strategies", ", ".join(meta["strategies"])),
        ("offered rates (req/s)", rates),
        (
            "SLO",
            f"TTFT ≤ {slo['ttft_ms']:,.0f} ms, TPOT ≤ {slo['tpot_ms']:,.1f} ms, for ≥ "
            f"{100 * slo['attainment']:g}% of requests ({meta.get('slo_source')})",
        ),
        (
            "target rate",
            None
            if meta.get("target_rate_rps") is None
            else f"{format_rate(meta['target_rate_rps'])} req/s on "
            f"{', '.join(map(str, meta['target_workers']))} GPUs",
        ),
        (
            "ideal hit rate",
            None
            if meta.get("ideal_hit_rate") is None
            else f"{100 * meta['ideal_hit_rate']:.1f}% (one infinite cache shared by all)",
        ),
        ("cells ran", meta.get("execution")),
        ("wall time", None if meta.get("wall_s") is None else f"{meta['wall_s']:.1f} s"),
    ]


def write_sweep_report(out_dir: str | Path, result: Mapping[str, Any]) -> tuple[Path, list[Path]]:
    """Write the sweep's plots and ``report.html`` into `out_dir`; (report, plot paths)."""
    plots = write_sweep_plots(out_dir, result)
    captions = sweep_plot_captions(result)
    meta = result["meta"]
    sections = [
        Section("Conclusion", paragraphs(result["recommendation"], "conclusion")),
        Section("Settings", settings_list(_settings(meta))),
        *(Section(t.title, table_html(t)) for t in sweep_tables(result)),
        Section("Plots", "".join(figure(p, captions.get(p.name, p.stem)) for p in plots)),
    ]
    title = f"kvqueue sweep: {meta.get('workload', 'workload')}"
    subtitle = f"{meta['preset']} · {engine_label(meta)}"
    return write_page(out_dir, page(title, subtitle, sections)), plots

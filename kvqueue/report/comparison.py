"""A comparison of strategies as a dashboard: from simulated runs, or from a live comparison."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.oracle import DecodeLengthOracle
from kvqueue.gpu.presets import Preset, get_preset
from kvqueue.gpu.request import Request
from kvqueue.live.comparison import Comparison
from kvqueue.report.dashboard import build_dashboard, results_path, write_run
from kvqueue.sim.parallel import run_strategies
from kvqueue.sim.simulation import (
    DEFAULT_PENDING_TTL_MS,
    DEFAULT_RUN_ID,
    DEFAULT_STRATEGIES,
    worker_names,
)


def compare(
    requests: Sequence[Request],
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    num_workers: int = 4,
    preset: Preset | None = None,
    latency: LatencyModel | None = None,
    oracle: DecodeLengthOracle | None = None,
    run_id: str = DEFAULT_RUN_ID,
    pending_ttl_ms: float = DEFAULT_PENDING_TTL_MS,
    meta: dict | None = None,
    jobs: int = 1,
    engine: EngineConfig | None = None,
) -> dict:
    """Run every strategy (fresh state each) and return the dashboard dict (`build_dashboard`)."""
    preset = preset or get_preset()
    engine = engine or EngineConfig()
    runs = run_strategies(
        requests,
        strategies,
        num_workers,
        preset,
        latency,
        oracle,
        run_id,
        pending_ttl_ms,
        jobs=jobs,
        engine=engine,
    )
    info = {"preset": preset.name, "num_blocks": preset.num_blocks, "run_id": run_id}
    info.update(engine.describe(preset))
    info.update(meta or {})
    return build_dashboard(
        {name: run.results for name, run in runs.items()},
        list(requests),
        worker_names(num_workers),
        info,
        {name: run.engine_stats for name, run in runs.items()},
    )


@dataclass(frozen=True, slots=True)
class ComparisonOutput:
    dashboard: dict[str, Any]
    dashboard_path: Path
    results_paths: list[Path]
    plot_paths: list[Path]
    report_path: Path | None


def write_comparison(
    out_dir: str | Path,
    comparison: Comparison,
    requests: Sequence[Request],
    meta: Mapping[str, Any] | None = None,
    plots: bool = True,
) -> ComparisonOutput:
    """Dashboard (`build_dashboard`), results files (`write_run`), PNGs and ``report.html``
    under `out_dir` (no PNGs and no report without `plots`)."""
    info = dict(meta or {})
    info["run_ids"] = {run.strategy: run.run_id for run in comparison.runs}
    info["wall_s"] = {run.strategy: round(run.wall_s, 3) for run in comparison.runs}
    results = comparison.results_by_strategy
    dashboard = build_dashboard(results, requests, comparison.workers, info)
    dashboard_path = write_run(out_dir, dashboard, results)
    results_paths = [results_path(out_dir, name) for name in results]
    plot_paths: list[Path] = []
    report_path = None
    if plots:
        from kvqueue.report.plots import write_plots  # matplotlib: only imported when plotting
        from kvqueue.report.run_report import write_run_report

        plot_paths = write_plots(out_dir, dashboard, results)
        report_path = write_run_report(out_dir, dashboard, plot_paths)
    return ComparisonOutput(dashboard, dashboard_path, results_paths, plot_paths, report_path)

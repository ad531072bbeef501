"""A comparison of strategies as a dashboard: from simulated runs, or from a live comparison."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.oracle import DecodeLengthOracle
from kvqueue.gpu.presets import Preset, get_preset
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult
from kvqueue.live.comparison import Comparison
from kvqueue.report.capacity import Capacity, offered_rate_rps, saturate, settle_from_run
from kvqueue.report.dashboard import build_dashboard, nominal_rate_rps, results_path, write_run
from kvqueue.sim.parallel import run_strategies
from kvqueue.sim.simulation import (
    DEFAULT_PENDING_TTL_MS,
    DEFAULT_RUN_ID,
    DEFAULT_STRATEGIES,
    ProgressCallback,
    SimulationRun,
    worker_names,
)


@dataclass(frozen=True, slots=True)
class SimulatedComparison:
    dashboard: dict[str, Any]
    results: dict[str, list[RequestResult]]


def simulate_comparison(
    requests: Sequence[Request],
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    num_workers: int = 4,
    preset: Preset | None = None,
    latency: LatencyModel | None = None,
    oracle: DecodeLengthOracle | None = None,
    run_id: str = DEFAULT_RUN_ID,
    pending_ttl_ms: float = DEFAULT_PENDING_TTL_MS,
    meta: Mapping[str, Any] | None = None,
    jobs: int = 1,
    engine: EngineConfig | None = None,
    progress: ProgressCallback | None = None,
    status: Callable[[str], None] | None = None,
) -> SimulatedComparison:
    """Run every strategy (fresh state each, `run_strategies`) and build the dashboard.

    On a batching engine a strategy whose run offered less than its busy-time bound is not
    overloaded, and that bound is its capacity record (`settle_from_run`); any other
    strategy's capacity is measured by its saturating burst (`saturate`; a burst workload's
    own run is its first try); both are recorded under ``meta.capacity``, and `status` is
    told before a burst starts. On the sequential engine the dashboard estimates capacity
    from busy time, with no extra run.
    """
    preset = preset or get_preset()
    engine = engine or EngineConfig()
    options: dict[str, Any] = {
        "preset": preset,
        "latency": latency,
        "oracle": oracle,
        "run_id": run_id,
        "pending_ttl_ms": pending_ttl_ms,
        "jobs": jobs,
        "engine": engine,
    }
    runs = run_strategies(requests, strategies, num_workers, progress=progress, **options)
    info: dict[str, Any] = {"preset": preset.name, "num_blocks": preset.num_blocks}
    info.update({"run_id": run_id, **engine.describe(preset), **(meta or {})})
    capacity = None
    if engine.is_batched:
        capacity = _batched_capacity(requests, runs, num_workers, info, options, status)
        info["capacity"] = {name: c.to_dict() for name, c in capacity.items()}
    results = {name: run.results for name, run in runs.items()}
    dashboard = build_dashboard(
        results,
        list(requests),
        worker_names(num_workers),
        info,
        {name: run.engine_stats for name, run in runs.items()},
        capacity,
    )
    return SimulatedComparison(dashboard, results)


def _batched_capacity(
    requests: Sequence[Request],
    runs: Mapping[str, SimulationRun],
    num_workers: int,
    info: Mapping[str, Any],
    options: Mapping[str, Any],
    status: Callable[[str], None] | None,
) -> dict[str, Capacity]:
    """Each strategy's capacity record on a batching engine (`simulate_comparison`)."""
    arrivals = [r.arrival_ms for r in requests]
    offered = offered_rate_rps(arrivals, nominal_rate_rps(info))
    found: dict[str, Capacity] = {}
    for name, run in runs.items():
        bound = settle_from_run(run.results, num_workers, offered)
        if bound is not None:
            found[name] = bound
    unsettled = [name for name in runs if name not in found]
    if unsettled:
        if status is not None:
            status("measuring each strategy's capacity with a saturating burst")
        first = {name: runs[name] for name in unsettled} if not any(arrivals) else None
        found.update(
            saturate(
                requests,
                unsettled,
                num_workers,
                lambda burst, names: run_strategies(burst, names, num_workers, **options),
                first,
            )
        )
    return {name: found[name] for name in runs}


def compare(
    requests: Sequence[Request], strategies: Sequence[str] = DEFAULT_STRATEGIES, **options: Any
) -> dict[str, Any]:
    """`simulate_comparison`'s dashboard (same keyword `options`)."""
    return simulate_comparison(requests, strategies, **options).dashboard


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
    dashboard = build_dashboard(
        results, requests, comparison.workers, info, comparison.engine_stats_by_strategy
    )
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

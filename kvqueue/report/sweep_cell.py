"""One cell of a sweep: the workload at one rate, one policy, one cluster size, measured.

`measure_cell` is the whole computation; `run_cell_job` is the same thing as an RQ job (JSON
in, JSON out) for ``rq worker kvq-sim`` processes, which rebuild the requests from the spec.
The simulation is deterministic, so a cell gives the same numbers in any process.

Arrivals of a cell at rate R (`cell_requests`): a workload without arrival times of its own
(synthetic, or a prompts file without ``arrival``) gets Poisson arrivals at R seeded by the
workload's ``--seed`` — the same arrival pattern, scaled, at every rate and for every policy;
a workload with its own times (a trace) keeps their shape, stretched or compressed to a mean
rate of R. The saturating cell (R None) is the policy's saturating burst
(`kvqueue.report.capacity.saturate`): the workload at once, repeated until every GPU has
many batches queued; its throughput is the measured capacity, for either engine.

A cell's record (`cell_metrics`, every value JSON-ready): the cell, request counts, block hit
rate, TTFT / TPOT / end-to-end {mean, p50, p90, p99} in ms, throughput, goodput and SLO
attainment (`kvqueue.report.slo`), utilization (busy time / (workers × makespan): the share
of GPU time with a request in service, a utilization only for the sequential engine), what
the engines did (mean batch size, preemptions, KV usage mean and maximum, and the mean KV
usage over time on `KV_TIMELINE_POINTS` points, `kvqueue.report.engine_metrics`), completed
requests per worker, and the 0th…100th percentiles of TTFT and TPOT (for CDF plots). A
saturating cell adds its burst (``saturation``: copies, requests, depth).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kvqueue.gpu.engine_stats import EngineStats
from kvqueue.gpu.oracle import DecodeLengthOracle
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.capacity import busy_ms, offered_rate_rps, saturate
from kvqueue.report.engine_metrics import summarize_engines
from kvqueue.report.metrics import summarize
from kvqueue.report.slo import Slo, slo_summary
from kvqueue.report.sweep_spec import Cell, SweepSpec
from kvqueue.sim.simulation import SimulationRun, simulate_run, worker_names
from kvqueue.workloads.arrivals import retime

SWEEP_RUN_ID = "sweep"
QUANTILE_POINTS = tuple(range(101))
KV_TIMELINE_POINTS = 50


def cell_requests(requests: Sequence[Request], rate_rps: float, seed: int) -> list[Request]:
    """The workload's requests retimed for a cell at `rate_rps` (module docstring)."""
    natural = offered_rate_rps([r.arrival_ms for r in requests])
    if 0 < natural < math.inf:
        return retime(requests, "trace", arrival_scale=natural / rate_rps)
    return retime(requests, "poisson", rate_rps, seed)


def quantiles(values: Sequence[float]) -> list[float]:
    """The 0th, 1st, …, 100th percentiles of `values` (empty list when there are none)."""
    if not values:
        return []
    return [float(v) for v in np.percentile(np.asarray(values, dtype=float), QUANTILE_POINTS)]


def engine_part(engine_stats: Mapping[str, EngineStats] | None) -> dict[str, Any]:
    """What the engines did, in a cell's record (None each where nothing was recorded)."""
    engine = summarize_engines(engine_stats or {})
    if engine is None:
        return {
            "mean_batch_size": None,
            "preemptions": None,
            "kv_usage_mean": None,
            "kv_usage_max": None,
            "kv_usage_timeline": None,
        }
    timeline = engine["kv_usage"]["timeline"]
    picks = np.linspace(0, len(timeline["t_ms"]) - 1, KV_TIMELINE_POINTS).round().astype(int)
    return {
        "mean_batch_size": engine["mean_batch_size"],
        "preemptions": engine["preemptions"],
        "kv_usage_mean": engine["kv_usage"]["mean"],
        "kv_usage_max": engine["kv_usage"]["max"],
        "kv_usage_timeline": {
            "t_ms": [timeline["t_ms"][i] for i in picks],
            "mean": [timeline["mean"][i] for i in picks],
        },
    }


def cell_metrics(
    cell: Cell,
    results: Sequence[RequestResult],
    slo: Slo,
    engine_stats: Mapping[str, EngineStats] | None = None,
) -> dict[str, Any]:
    """The record of one cell from its results and engine statistics (module docstring)."""
    workers = worker_names(cell.num_workers)
    summary = summarize(results, workers)
    slo_part = slo_summary(results, slo)
    done = [r for r in results if r.status == RequestStatus.COMPLETED]
    total_busy = sum(busy_ms(results).values())
    makespan = summary["makespan_ms"]
    return {
        **cell.to_dict(),
        "num_requests": len(results),
        "completed": summary["completed"],
        "rejected": summary["rejected"],
        "failed": summary["failed"],
        "hit_rate": summary["hit_rate"],
        "ttft_ms": summary["ttft_ms"],
        "tpot_ms": summary["tpot_ms"],
        "e2e_ms": summary["e2e_ms"],
        "throughput_rps": summary["throughput_rps"],
        "goodput_rps": slo_part["goodput_rps"],
        "attainment": slo_part["attainment"],
        "num_meeting_slo": slo_part["num_meeting_slo"],
        "utilization": total_busy / (cell.num_workers * makespan) if makespan > 0 else None,
        **engine_part(engine_stats),
        "per_worker_requests": [row["requests"] for row in summary["per_worker"].values()],
        "ttft_quantiles": quantiles([r.ttft_ms for r in done]),
        "tpot_quantiles": quantiles([r.tpot_ms for r in done if r.tpot_ms is not None]),
    }


def simulate_with(
    spec: SweepSpec,
    requests: Sequence[Request],
    strategy: str,
    num_workers: int,
    oracle: DecodeLengthOracle | None = None,
) -> SimulationRun:
    """`simulate_run` with the spec's preset, latency, engine and pending TTL: the one place
    a sweep turns its settings into a simulator."""
    return simulate_run(
        requests,
        strategy,
        num_workers=num_workers,
        preset=spec.gpu_preset(),
        latency=spec.latency_model(),
        oracle=oracle or spec.oracle(),
        run_id=SWEEP_RUN_ID,
        pending_ttl_ms=spec.pending_ttl_ms,
        engine=spec.engine,
    )


def measure_cell(
    spec: SweepSpec,
    cell: Cell,
    requests: Sequence[Request],
    oracle: DecodeLengthOracle | None = None,
) -> dict[str, Any]:
    """Simulate `cell` on the workload `requests` (their own arrivals) and return its record."""
    if spec.slo is None:
        raise ValueError("a sweep cell needs the spec's SLO")
    if cell.rate_rps is None:
        (saturation,) = saturate(
            requests,
            [cell.strategy],
            cell.num_workers,
            lambda burst, names: {
                name: simulate_with(spec, burst, name, cell.num_workers, oracle) for name in names
            },
        ).values()
        run = saturation.run
        record = cell_metrics(cell, run.results, spec.slo, run.engine_stats)
        return {**record, "saturation": saturation.to_dict()}
    seed = int(spec.workload_args.get("seed") or 0)
    timed = cell_requests(requests, cell.rate_rps, seed)
    run = simulate_with(spec, timed, cell.strategy, cell.num_workers, oracle)
    return cell_metrics(cell, run.results, spec.slo, run.engine_stats)


def run_cell_job(spec: dict[str, Any], cell: dict[str, Any]) -> dict[str, Any]:
    """The RQ job of one cell: JSON spec and cell in, the cell's JSON record out."""
    sweep_spec = SweepSpec.from_dict(spec)
    return measure_cell(sweep_spec, Cell.from_dict(cell), sweep_spec.build_requests())

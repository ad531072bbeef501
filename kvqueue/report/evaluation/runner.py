"""Running the suite: every policy on every workload (fresh state each), in parallel processes."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.presets import get_preset
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestStatus
from kvqueue.report.evaluation.markdown import write_report
from kvqueue.report.evaluation.rows import EngineRun, PolicyRow, WorkloadReport
from kvqueue.report.evaluation.suite import (
    AZURE_FILE,
    AZURE_REQUESTS,
    DEFAULT_DATA_DIR,
    EVALUATED_ENGINES,
    INDEX_VARIANTS,
    MOONCAKE_FILE,
    MOONCAKE_REQUESTS,
    SuiteWorkload,
    cold_service_ms,
    default_suite,
    engine_title,
    target_rate,
    timed,
)
from kvqueue.report.metrics import ideal_hit_rate, summarize
from kvqueue.routing.policies import policy_names
from kvqueue.routing.policies.base import parse_strategy
from kvqueue.sim.simulation import Simulation, worker_names

# Filled by `evaluate` before it forks, so worker processes inherit the built requests.
_WORKLOADS: dict[str, tuple[SuiteWorkload, list[Request]]] = {}


def run_policy(
    workload: SuiteWorkload,
    requests: Sequence[Request],
    policy: str,
    latency: LatencyModel,
    engine: EngineConfig | None = None,
    index_mode: str | None = None,
) -> PolicyRow:
    """Simulate one policy (``name`` or ``name:index``) on one workload's timed requests
    (fresh state) and summarize it; `index_mode` applies unless the policy names its own."""
    clock = time.perf_counter()
    simulation = Simulation(
        policy,
        workload.num_workers,
        get_preset(workload.preset),
        latency,
        engine=engine,
        index_mode=index_mode,
    )
    matched: dict[str, int] = {}
    route = simulation.router.route

    def recording_route(request: Request):  # the match the router saw, for `lost_match`
        decision = route(request)
        matched[request.request_id] = decision.matched_blocks
        return decision

    simulation.router.route = recording_route  # type: ignore[method-assign]
    results = simulation.run(requests)
    summary = summarize(results, worker_names(workload.num_workers))
    done = [r for r in results if r.status == RequestStatus.COMPLETED]
    done_ids = {r.request_id for r in done}
    total_matched = sum(matched[r.request_id] for r in done)
    lost = sum(max(0, matched[r.request_id] - r.hit_blocks) for r in done)
    ttft, e2e, tpot = summary["ttft_ms"], summary["e2e_ms"], summary["tpot_ms"]
    return PolicyRow(
        policy=policy,
        hit_rate=summary["hit_rate"],
        ttft_mean_ms=ttft["mean"],
        ttft_p90_ms=ttft["p90"],
        ttft_p99_ms=ttft["p99"],
        e2e_mean_ms=e2e["mean"],
        tpot_mean_ms=tpot["mean"],
        tpot_p99_ms=tpot["p99"],
        imbalance=summary["imbalance"]["max_over_mean"],
        ideal_hit_rate=ideal_hit_rate(r for r in requests if r.request_id in done_ids),
        lost_match=lost / total_matched if total_matched else None,
        completed=summary["completed"],
        rejected=summary["rejected"],
        wall_s=time.perf_counter() - clock,
        index_mode=simulation.index_mode,
    )


def _task(
    args: tuple[str, str, LatencyModel, EngineConfig, str | None],
) -> tuple[str, PolicyRow]:
    key, policy, latency, engine, index_mode = args
    workload, requests = _WORKLOADS[key]
    return key, run_policy(workload, requests, policy, latency, engine, index_mode)


def evaluate(
    suite: Sequence[SuiteWorkload],
    policies: Sequence[str] | None = None,
    latency: LatencyModel | None = None,
    jobs: int = 1,
    log: Callable[[str], None] | None = None,
    engine: EngineConfig | None = None,
    index_mode: str | None = None,
) -> list[WorkloadReport]:
    """Run every policy on every workload under `engine` (the sequential engine with the seed's
    latency by default); one report per workload, in suite order.

    `policies` defaults to `default_policies(index_mode)`. Runs go to `jobs` processes (1: in
    this process), biggest workloads first.
    """
    latency = latency or LatencyModel()
    engine = engine or EngineConfig()
    policies = list(policies or default_policies(index_mode))
    for spec in policies:
        parse_strategy(spec)  # an unknown name or index mode raises, listing the valid ones
    say = log or (lambda _: None)
    shapes: dict[str, tuple[list[Request], float, float, float | None]] = {}
    _WORKLOADS.clear()
    for workload in suite:
        say(f"building {workload.key}")
        requests = workload.build()
        rate, capacity = target_rate(workload, requests, engine, latency)
        timed_requests, scale = timed(workload, requests, rate)
        shapes[workload.key] = (timed_requests, rate, capacity, scale)
        _WORKLOADS[workload.key] = (workload, timed_requests)
    size = {w.key: sum(r.num_blocks for r in shapes[w.key][0]) for w in suite}
    tasks = [(w.key, p, latency, engine, index_mode) for w in suite for p in policies]
    tasks.sort(key=lambda t: -size[t[0]])
    rows: dict[str, dict[str, PolicyRow]] = {w.key: {} for w in suite}
    started = time.perf_counter()
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            outcomes: Iterable[tuple[str, PolicyRow]] = pool.imap_unordered(_task, tasks)
            for done, (key, row) in enumerate(outcomes, start=1):
                rows[key][row.policy] = row
                say(_progress(done, len(tasks), key, row, started))
    else:
        for done, task in enumerate(tasks, start=1):
            key, row = _task(task)
            rows[key][row.policy] = row
            say(_progress(done, len(tasks), key, row, started))
    reports = []
    for w in suite:
        requests, rate, capacity, scale = shapes[w.key]
        preset = get_preset(w.preset)
        reports.append(
            WorkloadReport(
                key=w.key,
                title=w.title,
                source=w.source,
                preset=preset.name,
                num_blocks=preset.num_blocks,
                num_workers=w.num_workers,
                num_requests=len(requests),
                utilization=w.utilization,
                cold_service_ms=None
                if engine.is_batched
                else cold_service_ms(requests, latency, pricing=engine.sequential_pricing(preset)),
                capacity_rps=capacity,
                rate_rps=rate,
                arrival_scale=scale,
                ideal_hit_rate=_served_ideal(requests, [rows[w.key][p] for p in policies]),
                rows=tuple(rows[w.key][p] for p in policies),
            )
        )
    return reports


def default_policies(index_mode: str | None = None) -> list[str]:
    """Every registered policy on its upstream's index, plus `INDEX_VARIANTS`; with
    `index_mode`, every policy on that index only."""
    if index_mode is not None:
        return policy_names()
    return [*policy_names(), *INDEX_VARIANTS]


def _served_ideal(requests: Sequence[Request], rows: Sequence[PolicyRow]) -> float | None:
    """The ideal over the requests the runs served (every policy completes the same ones; a
    request the preset can never serve is rejected by all)."""
    ideals = {row.ideal_hit_rate for row in rows}
    return ideals.pop() if len(ideals) == 1 else ideal_hit_rate(requests)


def _progress(done: int, total: int, key: str, row: PolicyRow, started: float) -> str:
    return (
        f"[{done:>3}/{total}] {time.perf_counter() - started:6.1f} s  {key:<18} "
        f"{row.policy:<13} {row.wall_s:5.1f} s"
    )


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def run_suite(
    out: Path,
    data_dir: Path = DEFAULT_DATA_DIR,
    policies: Sequence[str] | None = None,
    workloads: Sequence[str] | None = None,
    jobs: int | None = None,
    size: float = 1.0,
    mooncake_requests: int = MOONCAKE_REQUESTS,
    azure_requests: int = AZURE_REQUESTS,
    quiet: bool = False,
    engines: Sequence[EngineConfig] = EVALUATED_ENGINES,
    index_mode: str | None = None,
) -> tuple[Path, list[Path]]:
    """Build the suite, run it under every engine, write the report; the one call behind both
    entry points. Returns the markdown and its figures (one per engine)."""
    suite = default_suite(data_dir, mooncake_requests, azure_requests, size)
    if workloads:
        known = {w.key for w in suite}
        missing = [k for k in workloads if k not in known]
        if missing:
            raise ValueError(f"unknown workloads {missing}; valid: {', '.join(sorted(known))}")
        suite = [w for w in suite if w.key in workloads]
    jobs = jobs or default_jobs()
    latency = LatencyModel()

    def log(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    skipped = [f for f in (MOONCAKE_FILE, AZURE_FILE) if not (data_dir / f).exists()]
    if skipped:
        log(f"traces not found in {data_dir}, left out: {', '.join(skipped)}")
    runs = []
    for engine in engines:
        log(f"-- {engine_title(engine)}")
        started = time.perf_counter()
        reports = evaluate(suite, policies, latency, jobs, log, engine, index_mode)
        runs.append(EngineRun(engine, reports, time.perf_counter() - started))
    return write_report(runs, out, latency, jobs)

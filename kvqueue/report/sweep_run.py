"""One `kvqueue sweep` from its flags to its files: spec, SLO, runner, sweep, report.

`execute_sweep` validates everything before any cell runs (strategies, engine, workload,
rates), warns about requests the preset can never serve, sizes the SLO where it
was not given, runs the cells locally or on RQ, and writes ``dashboard_results.json`` (the
sweep result), the plots and ``report.html`` to the output directory.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from kvqueue.config import Settings
from kvqueue.gpu.oracle import make_oracle
from kvqueue.live.connection import connect, redact
from kvqueue.report.dashboard import DASHBOARD_FILE
from kvqueue.report.sweep import (
    ProgressFactory,
    SweepPlan,
    default_slo,
    idle_latencies,
    run_sweep,
)
from kvqueue.report.sweep_distributed import DEFAULT_TIMEOUT_S, SIM_QUEUE, DistributedCells
from kvqueue.report.sweep_local import LocalCells
from kvqueue.report.sweep_report import write_sweep_report
from kvqueue.report.sweep_spec import SweepSpec
from kvqueue.report.sweep_tables import format_sweep
from kvqueue.sim.parallel import check_strategies
from kvqueue.workloads.fit_advice import unfit_warning
from kvqueue.workloads.recorded import build_from_workload_args, workload_args_meta
from kvqueue.workloads.traces import fits_report

__all__ = ["SweepOutput", "SweepRequest", "execute_sweep", "format_sweep"]

Status = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class SweepRequest:
    """A sweep as the command line asked for it (None: the default applies)."""

    args: argparse.Namespace  # the workload flags (`kvqueue.workloads.options`)
    settings: Settings
    strategies: tuple[str, ...]
    workers: tuple[int, ...]
    rates: tuple[float, ...] | None = None
    target_rate: float | None = None
    target_workers: tuple[int, ...] = ()
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    attainment: float = 0.9
    jobs: int | None = None
    distributed: bool = False
    queue: str = SIM_QUEUE
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class SweepOutput:
    result: dict[str, Any]
    dashboard_path: Path
    report_path: Path
    plot_paths: list[Path]


def _workload_args(args: argparse.Namespace) -> dict[str, Any]:
    """The workload flags with arrivals left to each cell."""
    values = workload_args_meta(args)
    values.update(rate=None, arrival_scale=1.0)
    return values


def execute_sweep(
    request: SweepRequest,
    out_dir: Path,
    status: Status,
    progress: ProgressFactory | None = None,
) -> SweepOutput:
    """Run the sweep the request describes and write its files (module docstring)."""
    clock = time.perf_counter()
    check_strategies(request.strategies)
    settings = request.settings
    plan = SweepPlan(
        request.strategies,
        request.workers,
        request.rates,
        request.target_rate,
        request.target_workers if request.target_rate is not None else (),
    )
    spec = SweepSpec(
        workload_args=_workload_args(request.args),
        hash_seed=settings.hash_seed,
        tokenizer=settings.tokenizer,
        preset=settings.gpu_preset().name,
        num_blocks=settings.num_blocks,
        max_context_tokens=settings.max_context_tokens,
        latency={
            "prefill_base_ms": settings.prefill_base_ms,
            "prefill_per_block_ms": settings.prefill_per_block_ms,
            "decode_per_token_ms": settings.decode_per_token_ms,
        },
        engine=settings.engine_config(),
        pending_ttl_ms=settings.pending_ttl_s * 1000.0,
        decode_model=settings.decode_model,
        slo=None,
    )
    requests, workload_meta = build_from_workload_args(
        spec.workload_args, spec.hash_seed, spec.tokenizer
    )
    if not requests:
        raise ValueError("the workload has no requests")
    preset = spec.gpu_preset()
    warning = unfit_warning(
        fits_report(requests, preset.max_context_tokens, preset.num_blocks), preset, requests
    )
    if warning:
        status(warning)
    oracle = make_oracle(spec.decode_model)
    given = request.slo_ttft_ms is not None and request.slo_tpot_ms is not None
    idle: tuple[list[float], list[float]] = ([], [])
    if not given:
        idle = idle_latencies(spec, requests, request.strategies[0], oracle)
    slo = default_slo(*idle, request.attainment, request.slo_ttft_ms, request.slo_tpot_ms)
    spec = spec.with_slo(slo)
    status(f"SLO: {slo.describe()}{'' if given else ' (sized to the workload where not given)'}")
    if request.distributed:
        status(f"cells go to RQ queue {request.queue!r} at {redact(settings.redis_url)}")
        runner: LocalCells | DistributedCells = DistributedCells(
            connect(settings.redis_url), spec, request.queue, request.timeout_s
        )
    else:
        # A loaded torch model is not safe to fork; a decode model means one process.
        jobs = request.jobs or (1 if spec.decode_model else 2 * (os.cpu_count() or 1))
        runner = LocalCells(spec, requests, jobs, oracle)
    meta = {
        **workload_meta,
        "mode": "simulated sweep",
        "slo_source": "given" if given else "sized to the workload (kvqueue.report.sweep)",
    }
    result = run_sweep(spec, requests, plan, runner, meta, progress)
    result["meta"]["wall_s"] = round(time.perf_counter() - clock, 3)
    out_dir.mkdir(parents=True, exist_ok=True)
    dashboard_path = out_dir / DASHBOARD_FILE
    dashboard_path.write_bytes(
        orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    )
    report_path, plot_paths = write_sweep_report(out_dir, result)
    return SweepOutput(result, dashboard_path, report_path, plot_paths)

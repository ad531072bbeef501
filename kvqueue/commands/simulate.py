"""`kvqueue simulate`: run strategies on a workload in virtual time, write the dashboard.

    kvqueue simulate --trace trace.jsonl --preset llama-3.1-8b@h100-80gb --workers 8 --json
    kvqueue simulate --workload shared-prefix --engine batched --latency calibrated

Settings not given as flags (latency constants, pending TTL, hash seed, decode model) come from
the environment exactly as for the live workers (see `kvqueue.config`), so a simulated and a
live run of the same settings model the same GPUs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import orjson

from kvqueue.commands.engine_flags import add_engine_arguments, engine_overrides
from kvqueue.commands.strategy_flags import add_strategies_argument, parse_strategies
from kvqueue.config import Settings
from kvqueue.errors import KVQueueError
from kvqueue.gpu.oracle import make_oracle
from kvqueue.progress import progress_reporter
from kvqueue.report.comparison import simulate_comparison
from kvqueue.report.dashboard import (
    format_engine_table,
    format_table,
    results_path,
    write_run,
)
from kvqueue.report.plots import write_plots
from kvqueue.report.run_report import write_run_report
from kvqueue.sim.parallel import default_jobs
from kvqueue.sim.simulation import DEFAULT_STRATEGIES, worker_names
from kvqueue.workloads.fit_advice import unfit_warning
from kvqueue.workloads.options import add_workload_arguments, build_requests
from kvqueue.workloads.traces import fits_report

DEFAULT_WORKLOAD = "shared-prefix-small"


def configure(parser: argparse.ArgumentParser) -> None:
    add_workload_arguments(parser, default=DEFAULT_WORKLOAD)
    add_strategies_argument(parser, DEFAULT_STRATEGIES)
    parser.add_argument("--workers", type=int, default=4, help="simulated GPUs (default 4)")
    parser.add_argument("--preset", help="MODEL@GPU preset (default: KVQ_PRESET or llama-2-13b)")
    parser.add_argument("--num-blocks", type=int, help="override the preset's KV block count")
    parser.add_argument("--max-context", type=int, help="override the model's context length")
    parser.add_argument("--tokenizer", help="tokenizer name or path for --prompts")
    add_engine_arguments(parser)
    parser.add_argument(
        "--jobs",
        type=int,
        help="strategies simulated in parallel processes (default: one per strategy, up to "
        "twice the CPUs; 1 with a decode model)",
    )
    parser.add_argument("--run-id", help="run id in the results (default: the out dir's name)")
    parser.add_argument("--out", type=Path, help="output directory (default runs/sim-<time>)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the dashboard as one JSON object on stdout (and nothing else on stdout)",
    )


def run(args: argparse.Namespace) -> int:
    started = time.strftime("%Y%m%d-%H%M%S")
    try:
        settings = Settings.from_env(
            preset=args.preset,
            num_blocks=args.num_blocks,
            max_context_tokens=args.max_context,
            tokenizer=args.tokenizer,
            **engine_overrides(args),
        )
        strategies = parse_strategies(args.strategies, args.index)
        workers = worker_names(args.workers)
        preset = settings.gpu_preset()
        requests, meta = build_requests(args, settings.hash_seed, settings.tokenizer)
    except (KVQueueError, ValueError) as exc:
        print(f"kvqueue simulate: {exc}", file=sys.stderr)
        return 2
    if not requests:
        print("kvqueue simulate: the workload has no requests", file=sys.stderr)
        return 2
    # A loaded torch model is not safe to fork; a decode model means one process.
    jobs = args.jobs or (1 if settings.decode_model else default_jobs(len(strategies)))
    out_dir = args.out or Path("runs") / f"sim-{started}"
    run_id = args.run_id or out_dir.name

    fit = fits_report(requests, preset.max_context_tokens, preset.num_blocks)
    warning = unfit_warning(fit, preset, requests)
    if warning:
        print(f"kvqueue simulate: {warning}", file=sys.stderr)

    engine = settings.engine_config()
    meta.update(
        {
            "mode": "simulated",
            "max_context_tokens": preset.max_context_tokens,
            "latency": {
                "prefill_base_ms": settings.prefill_base_ms,
                "prefill_per_block_ms": settings.prefill_per_block_ms,
                "decode_per_token_ms": settings.decode_per_token_ms,
            },
            "pending_ttl_s": settings.pending_ttl_s,
            "hash_seed": settings.hash_seed,
            "decode_model": settings.decode_model,
            "fit": fit.to_dict(),
            "jobs": jobs,
        }
    )
    clock = time.perf_counter()
    total = len(requests) * len(strategies)
    with progress_reporter(total, "simulating", enabled=not args.json) as progress:
        simulated = simulate_comparison(
            requests,
            strategies,
            len(workers),
            preset=preset,
            latency=settings.latency_model(),
            oracle=make_oracle(settings.decode_model),
            run_id=run_id,
            pending_ttl_ms=settings.pending_ttl_s * 1000.0,
            meta=meta,
            jobs=jobs,
            engine=engine,
            progress=progress,
            status=None if args.json else lambda text: print(text, file=sys.stderr),
        )
    elapsed = time.perf_counter() - clock
    dashboard, results = simulated.dashboard, simulated.results
    dashboard["meta"]["wall_s"] = round(elapsed, 3)
    dashboard_file = write_run(out_dir, dashboard, results)
    plots = write_plots(out_dir, dashboard, results)
    report = write_run_report(out_dir, dashboard, plots)

    if args.json:
        sys.stdout.write(orjson.dumps(dashboard).decode() + "\n")
        return 0
    print(
        f"{len(requests):,} requests × {len(strategies)} strategies on {len(workers)} × "
        f"{preset.name} ({preset.num_blocks:,} blocks, {engine.engine} engine, "
        f"{engine.latency} latency) simulated in {elapsed:.1f} s"
    )
    print(format_table(dashboard))
    engine_table = format_engine_table(dashboard)
    if engine_table:
        print(f"\n{engine_table}")
    print(f"\nwrote {dashboard_file}")
    for path in [*(results_path(out_dir, name) for name in results), report, *plots]:
        print(f"      {path}")
    return 0

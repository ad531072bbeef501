"""`kvqueue sweep`: capacity and SLO sweep over offered rates and cluster sizes, in virtual time.

    kvqueue sweep --workload shared-prefix-small --rates 15,30,45,60,75,90,105 \\
        --strategies round_robin,cache_aware,predictive --slo-ttft 2000 --json
    kvqueue sweep --trace trace.jsonl --preset qwen2.5-7b@h100-80gb --target-rate 12
    kvqueue sweep ... --engine sequential --latency seed   # the seed's one-at-a-time GPUs
    kvqueue sweep ... --distributed          # cells as RQ jobs for `rq worker ... kvq-sim`

Every GPU runs the batched engine with the preset's calibrated latencies unless told
otherwise (flags, or KVQ_ENGINE / KVQ_LATENCY): capacity planning on a one-request-at-a-time
model would understate what a batching server takes. Every report names the model used.

What it runs and how the defaults are chosen: `kvqueue.report.sweep`; where the cells run:
`kvqueue.report.sweep_local` and `kvqueue.report.sweep_distributed`. Writes
``dashboard_results.json`` (the sweep), ``report.html`` and the PNG plots to --out.
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
from kvqueue.progress import progress_reporter
from kvqueue.report.slo import DEFAULT_ATTAINMENT
from kvqueue.report.sweep import (
    DEFAULT_SWEEP_STRATEGIES,
    DEFAULT_TARGET_WORKERS,
    DEFAULT_WORKERS,
    SWEEP_ENGINE_DEFAULTS,
)
from kvqueue.report.sweep_distributed import DEFAULT_TIMEOUT_S, SIM_QUEUE
from kvqueue.report.sweep_run import SweepRequest, execute_sweep, format_sweep
from kvqueue.workloads.options import add_workload_arguments

DEFAULT_WORKLOAD = "shared-prefix-small"


def configure(parser: argparse.ArgumentParser) -> None:
    add_workload_arguments(parser, default=DEFAULT_WORKLOAD)
    group = parser.add_argument_group("sweep")
    add_strategies_argument(group, DEFAULT_SWEEP_STRATEGIES)
    group.add_argument(
        "--rates",
        help="comma-separated offered rates in requests/s (default: fractions of the capacity "
        "measured by a saturating run, see `kvqueue.report.sweep`)",
    )
    group.add_argument(
        "--workers",
        default=str(DEFAULT_WORKERS),
        help=f"comma-separated cluster sizes to sweep the rates on (default {DEFAULT_WORKERS})",
    )
    group.add_argument(
        "--target-rate", type=float, help="find the fewest GPUs that serve this many requests/s"
    )
    group.add_argument(
        "--target-workers",
        default=",".join(map(str, DEFAULT_TARGET_WORKERS)),
        help="cluster sizes tried at --target-rate (default "
        f"{','.join(map(str, DEFAULT_TARGET_WORKERS))})",
    )
    group.add_argument(
        "--slo-ttft", type=float, help="TTFT objective in ms (default: sized to the workload)"
    )
    group.add_argument(
        "--slo-tpot", type=float, help="TPOT objective in ms (default: sized to the workload)"
    )
    group.add_argument(
        "--attainment",
        type=float,
        default=DEFAULT_ATTAINMENT,
        help=f"share of requests that must meet the SLO (default {DEFAULT_ATTAINMENT:g})",
    )
    group.add_argument("--preset", help="MODEL@GPU preset (default: KVQ_PRESET or llama-2-13b)")
    group.add_argument("--num-blocks", type=int, help="override the preset's KV block count")
    group.add_argument("--max-context", type=int, help="override the model's context length")
    group.add_argument("--tokenizer", help="tokenizer name or path for --prompts")
    add_engine_arguments(
        parser, SWEEP_ENGINE_DEFAULTS["engine"], SWEEP_ENGINE_DEFAULTS["latency_profile"]
    )
    group.add_argument("--jobs", type=int, help="local processes (default: up to twice the CPUs)")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="run the cells as RQ jobs on --queue at REDIS_URL, for `rq worker` processes "
        "started with --serializer rq.serializers.JSONSerializer",
    )
    group.add_argument("--queue", default=SIM_QUEUE, help=f"RQ queue (default {SIM_QUEUE})")
    group.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for the cells of --distributed (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    group.add_argument("--out", type=Path, help="output directory (default runs/sweep-<time>)")
    group.add_argument(
        "--json",
        action="store_true",
        help="print the sweep as one JSON object on stdout (and nothing else on stdout)",
    )


def _numbers(text: str, flag: str, kind: type[float] | type[int]) -> tuple:
    """A comma-separated list of `kind` from a flag, or ValueError naming the flag and text."""
    what = "numbers" if kind is float else "whole numbers"
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated {what}, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values


def run(args: argparse.Namespace) -> int:
    started = time.strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or Path("runs") / f"sweep-{started}"

    def status(message: str) -> None:
        print(f"kvqueue sweep: {message}", file=sys.stderr, flush=True)

    try:
        if args.rate is not None or args.arrival_scale != 1.0:
            raise ValueError("a sweep sets the arrival rate itself: give --rates, not --rate")
        settings = Settings.from_env(
            preset=args.preset,
            num_blocks=args.num_blocks,
            max_context_tokens=args.max_context,
            tokenizer=args.tokenizer,
            defaults=SWEEP_ENGINE_DEFAULTS,
            **engine_overrides(args),
        )
        request = SweepRequest(
            args=args,
            settings=settings,
            strategies=tuple(parse_strategies(args.strategies, args.index)),
            workers=_numbers(args.workers, "--workers", int),
            rates=None if args.rates is None else _numbers(args.rates, "--rates", float),
            target_rate=args.target_rate,
            target_workers=_numbers(args.target_workers, "--target-workers", int),
            slo_ttft_ms=args.slo_ttft,
            slo_tpot_ms=args.slo_tpot,
            attainment=args.attainment,
            jobs=args.jobs,
            distributed=args.distributed,
            queue=args.queue,
            timeout_s=args.timeout,
        )
        output = execute_sweep(
            request,
            out_dir,
            status=status,
            progress=lambda label, total: progress_reporter(total, f"{label} cells", unit="cell"),
        )
    except (KVQueueError, ValueError) as exc:
        print(f"kvqueue sweep: {exc}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(orjson.dumps(output.result).decode() + "\n")
        return 0
    print(format_sweep(output.result))
    print(f"\nwrote {output.dashboard_path}")
    for path in [output.report_path, *output.plot_paths]:
        print(f"      {path}")
    return 0

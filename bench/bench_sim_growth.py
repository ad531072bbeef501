"""Simulator growth: wall time against the number of requests and against prompt length.

Two sweeps over a Mooncake trace, each point one ``simulate(requests, --strategy, --workers,
preset=--preset, engine=...)`` on fresh workers, for each engine model of ``--engines``
(``time.perf_counter``, best of ``--repeat``):

1. *requests*: the first N requests of the trace (``--requests``; 0 is all of them), prompts
   at full length;
2. *prompt length*: the first ``--limit`` requests (all by default) read with
   ``read_mooncake(length_scale=s)`` for each s of ``--scales``: every 512-token id expands
   to ``32·s`` blocks instead of 32, so every prompt scales by s and the sharing between
   requests stays the same (arrival times are unchanged, so the load on the simulated GPUs
   grows with s too).

Baseline, measured in the same process for every point: the *set pass* of
``bench_simulator.py`` (every block hash of every request added to one set, in C; best of at
least 3): the floor of any per-block work. ``÷ set pass`` is the point's seconds over its set
pass's — flat when the simulator's cost grows like the number of blocks, as the set pass
does. The table also gives microseconds per request and nanoseconds per block. With ``--plot
PATH`` both sweeps are drawn into one PNG (seconds against requests, and against mean prompt
tokens, one line per engine model). Usage::

    python bench/bench_sim_growth.py [--trace ../shared/data/mooncake_fast25_synthetic_trace.jsonl]
        [--preset qwen2.5-7b-1m@h100-80gb] [--workers 8] [--strategy cache_aware]
        [--engines sequential:seed,batched:calibrated] [--requests 250,500,1000,2000,0]
        [--scales 0.125,0.25,0.5,1,2] [--limit N] [--repeat 1] [--plot PATH] [--quick]

Exits 0 with a message if the trace file is absent.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from bench_args import parse_args
from bench_simulator import DEFAULT_TRACE, best_of, set_pass

from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.presets import get_preset
from kvqueue.gpu.request import Request
from kvqueue.sim.simulation import simulate
from kvqueue.workloads.traces import read_mooncake

DEFAULT_PRESET = "qwen2.5-7b-1m@h100-80gb"  # a 1M-token context: every prompt fits, even ×2
QUICK = {"requests": "25,50,100", "scales": "0.125,0.25", "limit": 100}


@dataclass(frozen=True, slots=True)
class Point:
    sweep: str  # "requests" or "length"
    engine: str
    num_requests: int
    num_blocks: int
    mean_prompt_tokens: float
    seconds: float
    floor_seconds: float


def measure(
    sweep: str, requests: list[Request], engine: EngineConfig, args: argparse.Namespace
) -> Point:
    preset = get_preset(args.preset)
    floor_s, _ = best_of(max(3, args.repeat), lambda: set_pass(requests))
    seconds, _ = best_of(
        args.repeat,
        lambda: simulate(requests, args.strategy, args.workers, preset=preset, engine=engine),
    )
    return Point(
        sweep,
        f"{engine.engine}/{engine.latency}",
        len(requests),
        sum(r.num_blocks for r in requests),
        statistics.fmean(r.num_prompt_tokens for r in requests),
        seconds,
        floor_s,
    )


def print_table(points: list[Point]) -> None:
    header = (
        f"{'sweep':<9} {'engine':<20} {'requests':>8} {'prompt tok':>10} {'blocks':>10} "
        f"{'seconds':>8} {'req/s':>8} {'µs/req':>8} {'ns/block':>8} {'÷ set pass':>10}"
    )
    print(header)
    print("-" * len(header))
    for p in points:
        print(
            f"{p.sweep:<9} {p.engine:<20} {p.num_requests:>8,} {p.mean_prompt_tokens:>10,.0f} "
            f"{p.num_blocks:>10,} {p.seconds:>8.2f} {p.num_requests / p.seconds:>8,.0f} "
            f"{p.seconds / p.num_requests * 1e6:>8,.0f} {p.seconds / p.num_blocks * 1e9:>8,.0f} "
            f"{p.seconds / p.floor_seconds:>9.2f}x"
        )


def plot(points: list[Point], path: Path, title: str) -> None:
    """Both sweeps on log-log axes, with a dotted line proportional to x for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for ax, sweep, x_label in (
        (axes[0], "requests", "requests simulated (first N of the trace)"),
        (axes[1], "length", "mean prompt tokens (trace prompts × length scale)"),
    ):
        xs_seen: list[float] = []
        for engine in dict.fromkeys(p.engine for p in points):
            line = [p for p in points if p.sweep == sweep and p.engine == engine]
            xs = [p.num_requests if sweep == "requests" else p.mean_prompt_tokens for p in line]
            ax.plot(xs, [p.seconds for p in line], marker="o", label=engine)
            xs_seen = xs
            last_x, last_s = xs[-1], line[-1].seconds
        if xs_seen:
            ax.plot(
                xs_seen,
                [last_s * x / last_x for x in xs_seen],
                linestyle=":",
                color="grey",
                label="proportional to x",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs_seen)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        seconds = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(seconds)
        ax.yaxis.set_minor_formatter(seconds)
        ax.set_xlabel(x_label)
        ax.set_ylabel("simulation wall time (s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(frameon=False)
    axes[0].set_title("time vs number of requests")
    axes[1].set_title("time vs prompt length (same requests)")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse_list(text: str, kind: type) -> list:
    return [kind(item) for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake JSONL")
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="model@gpu preset")
    parser.add_argument("--workers", type=int, default=8, help="simulated GPUs")
    parser.add_argument("--strategy", default="cache_aware", help="routing strategy")
    parser.add_argument(
        "--engines",
        default="sequential:seed,batched:calibrated",
        help="comma-separated ENGINE:LATENCY models",
    )
    parser.add_argument(
        "--requests", default="250,500,1000,2000,0", help="request counts (0: the whole trace)"
    )
    parser.add_argument("--scales", default="0.125,0.25,0.5,1,2", help="prompt length scales")
    parser.add_argument("--limit", type=int, help="requests in the length sweep (default all)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per point (best kept)")
    parser.add_argument("--plot", type=Path, help="write both sweeps into this PNG")
    args = parse_args(parser, argv, QUICK)
    if args.workers <= 0 or args.repeat <= 0:
        parser.error("--workers and --repeat must be positive")
    engines = []
    for item in parse_list(args.engines, str):
        engine, _, latency = item.partition(":")
        engines.append(EngineConfig(engine, latency or "seed"))
    if not args.trace.is_file():
        print(f"skipped: trace {args.trace} not found (pass --trace PATH)")
        return 0
    load_before = os.getloadavg()[0]

    points: list[Point] = []
    counts = parse_list(args.requests, int)
    trace = read_mooncake(args.trace, limit=None if 0 in counts else max(counts))
    for count in counts:
        requests = trace[:count] if count else trace
        points += [measure("requests", requests, engine, args) for engine in engines]
    del trace
    for scale in parse_list(args.scales, float):
        requests = read_mooncake(args.trace, limit=args.limit, length_scale=scale)
        points += [measure("length", requests, engine, args) for engine in engines]
        del requests

    title = (
        f"{args.trace.name}, {args.strategy}, {args.workers} workers, {args.preset}; "
        f"{os.cpu_count()} cores, load average {load_before:.2f} → {os.getloadavg()[0]:.2f}"
    )
    print(f"{title}; python {sys.version.split()[0]}, best of {args.repeat}\n")
    print_table(points)
    if args.plot:
        plot(points, args.plot, title)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

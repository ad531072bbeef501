"""Simulator speed: simulated requests per second on a Mooncake trace, per strategy.

Steps, each timed with ``time.perf_counter`` (best of ``--repeat``):

1. trace expansion: `read_mooncake` (JSON parsing, 512-token ids expanded to 16-token block
   hashes), in its own table against its own baseline: `kvqueue.gpu.hashing.chain` (the
   chained SHA-256 every tokenized prompt goes through) over as many 16-token blocks as the
   expanded trace holds. ``× baseline`` is expansion's blocks/s divided by the baseline's;
2. two baselines over the same requests, in arrival order. *Set pass*: every request's
   block hashes added to one set (`set.update`, one C-level touch of every block, nothing
   else): the floor of any per-block work, independent of kvqueue's code, so its column
   compares runs of different versions of the code on a loaded machine. *Cache loop*: only
   ``BlockCache.allocate`` then ``release`` on one cache of the preset's size (no router, no
   index, no events consumed, no event loop; a request larger than the cache is skipped);
3. `simulate(requests, strategy, --workers, preset=--preset, engine=...)` for each engine
   model of ``--engines`` and each strategy: the whole virtual-time run (router, in-memory
   index fed by cache events, per-worker engines, caches, latency model, results); with
   ``--single-step`` the batched engine also runs without fast-forward (one forward pass
   at a time), to show what jumping over decode runs buys.

``× baseline`` in the simulator table is the strategy's requests/s divided by the cache
loop's: the price of everything the simulator does beyond touching a block cache once per
request. ``÷ set pass`` is the row's seconds divided by the set pass's: how many C-level
touches of every block the row costs.
The table also shows each strategy's block hit rate and completed/rejected counts, so a fast
but wrong run stands out; the baseline's hit rate is that of one cache of one GPU's size
serving everything. Usage::

    python bench/bench_simulator.py [--trace ../shared/data/mooncake_fast25_synthetic_trace.jsonl]
        [--preset llama-3.1-8b@h100-80gb] [--workers 8] [--limit N] [--repeat 1] [--quick]
        [--engines sequential:seed,batched:calibrated] [--single-step]

Exits 0 with a message if the trace file is absent.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from bench_args import parse_args

from kvqueue.errors import RequestRejected
from kvqueue.gpu.cache import BlockCache
from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.hashing import BLOCK_SIZE, BlockHash, chain, root_hash
from kvqueue.gpu.presets import get_preset
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.metrics import hit_rates, ideal_hit_rate
from kvqueue.sim.simulation import DEFAULT_STRATEGIES, simulate
from kvqueue.workloads.traces import read_mooncake

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "data" / "mooncake_fast25_synthetic_trace.jsonl"
DEFAULT_PRESET = "llama-3.1-8b@h100-80gb"
QUICK = {"limit": 200, "strategies": "cache_aware"}
NUM_DISTINCT_BLOCKS = 1_024  # the baseline cycles over these token blocks (hashing cost only)

T = TypeVar("T")


def best_of(repeat: int, fn: Callable[[], T]) -> tuple[float, T]:
    """(best wall seconds over `repeat` runs, the last run's value)."""
    best = float("inf")
    value: T
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def chained_hashing(num_blocks: int) -> list[BlockHash]:
    """`chain` over `num_blocks` 16-token blocks: the baseline of trace expansion."""
    blocks = [tuple(range(k, k + BLOCK_SIZE)) for k in range(NUM_DISTINCT_BLOCKS)]
    return chain(root_hash(), itertools.islice(itertools.cycle(blocks), num_blocks))


def cache_loop(requests: Sequence[Request], num_blocks: int) -> BlockCache:
    """Allocate and release every request's blocks on one cache (skipping what never fits)."""
    cache = BlockCache(num_blocks)
    ordered = sorted(requests, key=lambda r: r.arrival_ms)
    for request in ordered:
        try:
            allocation = cache.allocate(request.block_hashes)
        except RequestRejected:
            continue
        cache.release(allocation)
        cache.take_events()
    return cache


def set_pass(requests: Sequence[Request]) -> set[BlockHash]:
    """Every request's block hashes added to one set, in arrival order."""
    seen: set[BlockHash] = set()
    for request in sorted(requests, key=lambda r: r.arrival_ms):
        seen.update(request.block_hashes)
    return seen


def describe(results: Sequence[RequestResult]) -> tuple[float | None, int, int]:
    done = [r for r in results if r.status is RequestStatus.COMPLETED]
    rejected = sum(r.status is RequestStatus.REJECTED for r in results)
    return hit_rates(done)["hit_rate"], len(done), rejected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake JSONL")
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="model@gpu preset")
    parser.add_argument("--workers", type=int, default=8, help="simulated GPUs")
    parser.add_argument(
        "--strategies", default=",".join(DEFAULT_STRATEGIES), help="comma-separated"
    )
    parser.add_argument("--limit", type=int, help="first N requests of the trace only")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (best kept)")
    parser.add_argument(
        "--engines",
        default="sequential:seed",
        help="comma-separated ENGINE:LATENCY models (default sequential:seed)",
    )
    parser.add_argument(
        "--single-step",
        action="store_true",
        help="also run each batched engine one forward pass at a time (no fast-forward)",
    )
    args = parse_args(parser, argv, QUICK)
    if args.workers <= 0 or args.repeat <= 0:
        parser.error("--workers and --repeat must be positive")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    engines = []
    for item in (e.strip() for e in args.engines.split(",") if e.strip()):
        engine, _, latency = item.partition(":")
        engines.append(EngineConfig(engine, latency or "seed"))
        if args.single_step and engine == "batched":
            engines.append(EngineConfig(engine, latency or "seed", fast_forward=False))
    if not args.trace.is_file():
        print(f"skipped: trace {args.trace} not found (pass --trace PATH)")
        return 0
    preset = get_preset(args.preset)
    load_before = os.getloadavg()[0]

    read_s, requests = best_of(args.repeat, lambda: read_mooncake(args.trace, limit=args.limit))
    num_requests = len(requests)
    num_blocks = sum(r.num_blocks for r in requests)
    hash_s, _ = best_of(args.repeat, lambda: chained_hashing(num_blocks))
    floor_s, _ = best_of(args.repeat, lambda: set_pass(requests))
    base_s, cache = best_of(args.repeat, lambda: cache_loop(requests, preset.num_blocks))
    num_skipped = num_requests - sum(
        request.num_blocks <= preset.num_blocks for request in requests
    )
    base_rate = num_requests / base_s

    rows = []
    for engine in engines:
        label = f"{engine.engine}/{engine.latency}" + ("" if engine.fast_forward else ", 1 step")
        for strategy in strategies:
            seconds, results = best_of(
                args.repeat,
                lambda s=strategy, e=engine: simulate(
                    requests, s, args.workers, preset=preset, engine=e
                ),
            )
            rows.append((f"{strategy} ({label})", seconds, describe(results)))

    print(
        f"trace {args.trace.name}: {num_requests:,} requests, {num_blocks:,} blocks "
        f"({statistics.fmean(r.num_prompt_tokens for r in requests):,.0f} prompt tokens on "
        f"average), ideal hit rate {ideal_hit_rate(requests):.1%}; preset {preset.name} "
        f"({preset.num_blocks:,} blocks/GPU), {args.workers} workers; {os.cpu_count()} cores, "
        f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; "
        f"python {sys.version.split()[0]}, best of {args.repeat}\n"
    )
    header = (
        f"{'trace expansion':<40} {'seconds':>8} {'req/s':>9} {'blocks/s':>12} {'× baseline':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, seconds, rate in (
        ("baseline: chain() over as many blocks", hash_s, None),
        ("read_mooncake", read_s, num_requests / read_s),
    ):
        rate_text = "-" if rate is None else f"{rate:,.0f}"
        print(
            f"{name:<40} {seconds:>8.2f} {rate_text:>9} {num_blocks / seconds:>12,.0f} "
            f"{hash_s / seconds:>9.2f}x"
        )
    header = (
        f"{'step':<52} {'seconds':>8} {'req/s':>9} {'× baseline':>10} {'hit rate':>8} "
        f"{'completed':>9} {'rejected':>8} {'÷ set pass':>10}"
    )
    print()
    print(header)
    print("-" * len(header))
    print(
        f"{'baseline: set pass, every block once':<52} {floor_s:>8.2f} "
        f"{num_requests / floor_s:>9,.0f} {base_s / floor_s:>9.2f}x {'-':>8} {'-':>9} "
        f"{'-':>8} {1.0:>9.2f}x"
    )
    print(
        f"{'baseline: one cache, allocate+release':<52} {base_s:>8.2f} {base_rate:>9,.0f} "
        f"{1.0:>9.2f}x {cache.stats.hit_rate:>8.1%} {num_requests - num_skipped:>9,} "
        f"{num_skipped:>8,} {base_s / floor_s:>9.2f}x"
    )
    for strategy, seconds, (hit, done, rejected) in rows:
        rate = num_requests / seconds
        hit_text = "-" if hit is None else f"{hit:.1%}"
        print(
            f"{'simulate: ' + strategy:<52} {seconds:>8.2f} {rate:>9,.0f} "
            f"{rate / base_rate:>9.2f}x {hit_text:>8} {done:>9,} {rejected:>8,} "
            f"{seconds / floor_s:>9.2f}x"
        )
    total = read_s + sum(seconds for _, seconds, _ in rows)
    print(f"\nexpansion + all strategies: {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

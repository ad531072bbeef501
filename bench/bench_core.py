"""Throughput of the pure core: chained block hashing and the block cache.

Each measurement is paired with a baseline run in the same process on the same input, so the
ratio column says how far kvqueue is from the floor, whatever the machine:

- hashing: `hash_token_blocks` vs ``hashlib.sha256`` over the same token bytes in one pass
  (and, for scale, one sha256 call per pre-packed block);
- cache: `BlockCache` lookup + allocate + release on a shared-prefix workload with eviction
  vs a plain dict lookup/insert loop over the same block hashes (no capacity, no eviction);
- index: the simulator's `InMemoryIndex` replaying what the router does with that workload on
  one worker — per request `match`, `mark_pending` of the whole chain, then the cache events
  the request produced (recorded once from the cache run, outside the timer) — vs the same
  dict baseline.

Times are the best of ``--repeat`` runs (``time.perf_counter``). Usage::

    python bench/bench_core.py [--tokens 1000000] [--requests 3000] [--num-blocks 924] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from bench_args import parse_args

from kvqueue.errors import CacheFullError, RequestRejected
from kvqueue.gpu.cache import Allocation, BlockCache
from kvqueue.gpu.events import CacheEvent
from kvqueue.gpu.hashing import BLOCK_SIZE, BlockHash, chain, hash_token_blocks
from kvqueue.gpu.presets import get_preset
from kvqueue.routing.index import InMemoryIndex, apply_events

QUICK = {"tokens": 100_000, "requests": 300, "repeat": 1}
PENDING_TTL_MS = 30_000.0  # the router's default pending TTL (Settings.pending_ttl_s)


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    num_items: int
    unit: str
    seconds: float
    baseline_seconds: float | None  # None: this row is the baseline

    @property
    def rate(self) -> float:
        return self.num_items / self.seconds

    @property
    def ratio(self) -> float:
        """Throughput relative to the baseline (1.0 = as fast as the baseline)."""
        if self.baseline_seconds is None:
            return 1.0
        return self.baseline_seconds / self.seconds


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_hashing(num_tokens: int, repeat: int, rng: random.Random) -> list[Row]:
    num_tokens = max(BLOCK_SIZE, num_tokens - num_tokens % BLOCK_SIZE)
    tokens = [rng.randrange(128_000) for _ in range(num_tokens)]
    packed = struct.pack(f"<{num_tokens}I", *tokens)
    block_bytes = [packed[i : i + 4 * BLOCK_SIZE] for i in range(0, len(packed), 4 * BLOCK_SIZE)]

    def per_block() -> None:
        for block in block_bytes:
            hashlib.sha256(block).digest()

    baseline = best_of(repeat, lambda: hashlib.sha256(packed).digest())
    return [
        Row("hashing: sha256, one pass (baseline)", num_tokens, "tok", baseline, None),
        Row(
            "hashing: sha256 per pre-packed block",
            num_tokens,
            "tok",
            best_of(repeat, per_block),
            baseline,
        ),
        Row(
            "hashing: hash_token_blocks",
            num_tokens,
            "tok",
            best_of(repeat, lambda: hash_token_blocks(tokens)),
            baseline,
        ),
    ]


@dataclass(frozen=True, slots=True)
class Workload:
    requests: list[tuple[list[BlockHash], int]]  # (block hashes, anonymous blocks)

    @property
    def num_blocks(self) -> int:
        return sum(len(hashes) for hashes, _ in self.requests)


def make_workload(
    num_requests: int, rng: random.Random, num_groups: int, system_blocks: int
) -> Workload:
    """Shared system prompts (Zipf-like popularity) + a unique question, with some multi-turn
    follow-ups that extend an earlier request; output tokens take anonymous slots."""
    systems = [
        hash_token_blocks([rng.randrange(128_000) for _ in range(system_blocks * BLOCK_SIZE)])
        for _ in range(num_groups)
    ]
    weights = [1.0 / (rank + 1) for rank in range(num_groups)]
    requests: list[tuple[list[BlockHash], int]] = []
    for _ in range(num_requests):
        if requests and rng.random() < 0.2:  # a follow-up turn of a recent conversation
            previous, _ = requests[rng.randrange(max(0, len(requests) - 50), len(requests))]
            prefix = previous
        else:
            prefix = rng.choices(systems, weights)[0]
        new_blocks = [
            [rng.randrange(128_000) for _ in range(BLOCK_SIZE)] for _ in range(rng.randint(2, 12))
        ]
        hashes = prefix + chain(prefix[-1], new_blocks)
        if len(hashes) > 600:  # keep conversations inside a 4k-token-ish budget
            hashes = systems[0] + chain(systems[0][-1], new_blocks)
        requests.append((hashes, rng.randint(1, 16)))
    return Workload(requests)


IndexSteps = list[tuple[list[BlockHash], list[CacheEvent]]]  # (request chain, its events)


def run_cache(
    workload: Workload, num_blocks: int, max_running: int, recorded: IndexSteps | None = None
) -> tuple[BlockCache, int]:
    """Serve the workload with up to `max_running` requests pinned at once (oldest finishes
    first; a request that finds the cache full of pinned blocks waits for the next release).
    Returns the cache and the number of requests rejected as larger than the whole cache;
    appends each request's chain and the events it caused to `recorded` when given."""
    cache = BlockCache(num_blocks)
    num_rejected = 0
    running: deque[Allocation] = deque()
    for hashes, num_anonymous in workload.requests:
        cache.lookup(hashes)  # what the router asks before placing the request
        if len(running) == max_running:
            cache.release(running.popleft())
        while True:
            try:
                running.append(cache.allocate(hashes, num_anonymous))
                break
            except RequestRejected:
                num_rejected += 1
                break  # larger than the whole cache: a real worker reports it and moves on
            except CacheFullError:
                if not running:
                    raise
                cache.release(running.popleft())
        events = cache.take_events()
        if recorded is not None:
            recorded.append((hashes, events))
    while running:
        cache.release(running.popleft())
    return cache, num_rejected


def run_index(steps: IndexSteps) -> InMemoryIndex:
    """What the router does per request on one worker: match, mark pending, apply events."""
    index = InMemoryIndex()
    for hashes, events in steps:
        index.match(hashes)
        index.mark_pending("worker-0", hashes, PENDING_TTL_MS)
        apply_events(index, "worker-0", events)
    return index


def run_dict(workload: Workload) -> dict:
    cached: dict[BlockHash, bool] = {}
    for hashes, _ in workload.requests:
        for block_hash in hashes:
            if block_hash not in cached:
                cached[block_hash] = True
    return cached


def bench_cache(
    workload: Workload, num_blocks: int, max_running: int, repeat: int
) -> tuple[list[Row], BlockCache, int]:
    baseline = best_of(repeat, lambda: run_dict(workload))
    seconds = best_of(repeat, lambda: run_cache(workload, num_blocks, max_running))
    steps: IndexSteps = []
    cache, num_rejected = run_cache(workload, num_blocks, max_running, steps)
    index_seconds = best_of(repeat, lambda: run_index(steps))
    return (
        [
            Row("cache: dict lookup/insert (baseline)", workload.num_blocks, "blk", baseline, None),
            Row(
                "cache: BlockCache lookup+allocate+release",
                workload.num_blocks,
                "blk",
                seconds,
                baseline,
            ),
            Row(
                "index: InMemoryIndex match+pending+events",
                workload.num_blocks,
                "blk",
                index_seconds,
                baseline,
            ),
        ],
        cache,
        num_rejected,
    )


def format_rate(rate: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= scale:
            return f"{rate / scale:.2f}{suffix}"
    return f"{rate:.0f}"


def print_table(rows: list[Row]) -> None:
    header = f"{'benchmark':<44} {'items':>13} {'best s':>9} {'rate/s':>12} {'vs baseline':>12}"
    print(header)
    print("-" * len(header))
    for row in rows:
        items = f"{row.num_items:,} {row.unit}"
        rate = f"{format_rate(row.rate)} {row.unit}"
        print(f"{row.name:<44} {items:>13} {row.seconds:>9.4f} {rate:>12} {row.ratio:>11.3f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="tokens to hash")
    parser.add_argument("--requests", type=int, default=3_000, help="requests in the workload")
    parser.add_argument(
        "--num-blocks", type=int, default=get_preset().num_blocks, help="cache capacity"
    )
    parser.add_argument("--groups", type=int, default=32, help="distinct system prompts")
    parser.add_argument("--system-blocks", type=int, default=64, help="blocks per system prompt")
    parser.add_argument("--max-running", type=int, default=4, help="requests pinned at once")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best kept)")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser, argv, QUICK)
    positive = (
        "tokens",
        "requests",
        "num_blocks",
        "groups",
        "system_blocks",
        "max_running",
        "repeat",
    )
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")

    rng = random.Random(args.seed)
    rows = bench_hashing(args.tokens, args.repeat, rng)
    workload = make_workload(args.requests, rng, args.groups, args.system_blocks)
    cache_rows, cache, num_rejected = bench_cache(
        workload, args.num_blocks, args.max_running, args.repeat
    )
    print_table(rows + cache_rows)
    stats = cache.stats
    print(
        f"\ncache workload: {len(workload.requests):,} requests, {workload.num_blocks:,} blocks, "
        f"{args.groups} system prompts × {args.system_blocks} blocks, capacity "
        f"{args.num_blocks:,} blocks, ≤{args.max_running} running; block hit rate "
        f"{stats.hit_rate:.1%}, {stats.num_evictions:,} evictions, {num_rejected:,} rejected "
        "as larger than the cache"
    )
    print(f"python {sys.version.split()[0]}, best of {args.repeat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

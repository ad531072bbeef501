"""Router decision latency by prompt length, and Redis memory per prefix-tree node.

A prefix tree of ``--nodes`` block nodes is loaded into Redis (and into an `InMemoryIndex`)
for ``--workers`` live workers, then the same requests go through five methods:

- ``lua-bsearch``: `RedisIndex.route_view`, the router's real read (the ROUTE_VIEW script:
  live workers, a binary search per worker over the request's positions, and the six state
  hashes `RedisRouterState.view` asks for: loads, backlog, cache usage, capacity, output stats);
- ``pipeline``: llm-d's layout read — one pipeline with ZRANGEBYSCORE of the live workers,
  the same state hashes and HKEYS of *every* block key; the client computes each worker's
  match, stopping at its first miss;
- ``lua-walk``: a naive Lua script returning the same view, HKEYS per block, walking the chain
  until no live worker holds the block (the walk DESIGN.md §3 measured);
- ``in-memory``: `InMemoryIndex.match` over the same tree (no Redis, no loads);
- ``router.route``: for scale, the whole decision of `Router.route` with ``cache_aware`` over
  `RedisRouterState` (the lua-bsearch read, decoding into a `RouterView`, the policy).

The tree is built like a busy cluster's: system prompts (16–128 blocks) that conversations
and documents extend; later chains fork from random cut points of earlier ones (follow-up
turns, edited prompts), to depths of 64–768 blocks. Each chain is cached by one worker (the
one its system prompt has affinity to) and, for 40% of them, by one to seven more; a worker
holds every block of the chains it caches, so each worker's set is prefix-closed, as
`BlockCache` keeps it.

A request of n blocks is a *follow-up turn*: the first ⌈7n/8⌉ blocks of a cached chain at
least that deep, then n/8 new blocks — the expensive case for a walk, whose cost grows with
the match. The first four must return the same matches for every request (checked, not timed).
Timings interleave the methods request by request (``time.perf_counter_ns`` around one
call, client encoding and decoding included), after a warm-up.

Memory: ``INFO memory`` used_memory after loading minus before (on a flushed db), divided by
the number of nodes. used_memory is server-wide (activity in other dbs leaks in), so the
MEMORY USAGE split (node hashes sampled, the per-worker block sets exact) is printed as a
cross-check. Usage::

    python bench/bench_router.py [--nodes 100000] [--workers 8] [--repeats 1000]
        [--redis-url redis://127.0.0.1:6379/11] [--quick]

The db of ``--redis-url`` is flushed before and (unless ``--keep``) after the run.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

import redis
from bench_args import parse_args

from kvqueue import keys
from kvqueue.gpu.hashing import BLOCK_SIZE, BlockHash, to_hex
from kvqueue.gpu.request import make_request
from kvqueue.live.connection import connect, redact
from kvqueue.routing.index import InMemoryIndex
from kvqueue.routing.policies.base import make_policy
from kvqueue.routing.redis_index import RedisIndex
from kvqueue.routing.router import Router
from kvqueue.routing.state import RedisRouterState

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"
BENCH_PREFIX = keys.DEFAULT_PREFIX  # the db is dedicated: real key sizes
HEARTBEAT_TTL_MS = 10**12  # every registered worker stays live for the whole run
DEFAULT_BLOCKS = (64, 128, 512)
QUICK = {"nodes": 5_000, "repeats": 50, "warmup": 5, "blocks": "64,128"}
FOLLOW_UP_FRACTION = 7 / 8

# The naive walk: the same keys, arguments and reply as ROUTE_VIEW, HKEYS per block.
NAIVE_WALK = """
-- KEYS[1] = live workers (zset: worker -> last heartbeat, ms)
-- KEYS[2] = the shared round-robin counter (unused here)
-- KEYS[3..] = state hashes (field = worker), returned whole
-- ARGV[1] = key prefix, ARGV[2] = heartbeat TTL in ms, ARGV[3] = '1' to take a ticket
-- ARGV[4..] = the request's block hashes, in chain order
-- Walks the chain with one HKEYS per block until no live worker holds the block. Pending
-- fields (p:<worker>) count without their expiry check: the benchmark sets none.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[2]), '+inf')
local alive, matches, num_alive = {}, {}, #live
for i, worker in ipairs(live) do alive[worker] = i; matches[i] = 0 end
for pos = 4, #ARGV do
  if num_alive == 0 then break end
  local holding = {}
  for _, f in ipairs(redis.call('HKEYS', prefix .. 'node:' .. ARGV[pos])) do
    local kind = string.sub(f, 1, 2)
    if kind == 'w:' or kind == 'p:' then holding[string.sub(f, 3)] = true end
  end
  for worker, i in pairs(alive) do
    if holding[worker] then matches[i] = pos - 3
    else alive[worker] = nil; num_alive = num_alive - 1 end
  end
end
local out = {live, matches, 0}
for k = 3, #KEYS do out[#out + 1] = redis.call('HGETALL', KEYS[k]) end
return out
"""


# -- the tree ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Chain:
    block_hashes: tuple[BlockHash, ...]
    workers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Tree:
    chains: list[Chain]
    num_nodes: int
    num_entries: int  # (node, worker) pairs


def build_tree(num_nodes: int, workers: Sequence[str], rng: random.Random) -> Tree:
    """Chains until the union of their blocks reaches `num_nodes` (see the module docstring)."""
    num_systems = max(8, num_nodes // 2_000)
    systems = [
        tuple(BlockHash(rng.randbytes(32)) for _ in range(rng.randint(16, 128)))
        for _ in range(num_systems)
    ]
    seen: set[BlockHash] = set()
    held: dict[str, set[BlockHash]] = {w: set() for w in workers}
    chains: list[Chain] = []
    while len(seen) < num_nodes:
        depth = rng.randint(64, 768)
        if chains and rng.random() < 0.5:  # fork an earlier chain: a follow-up or an edit
            source = rng.choice(chains)
            base = source.block_hashes[: rng.randint(1, min(depth, len(source.block_hashes)))]
            system = source.workers[0]
        else:
            index = rng.randrange(num_systems)
            base = systems[index][:depth]
            system = workers[index % len(workers)]
        fresh = tuple(BlockHash(rng.randbytes(32)) for _ in range(max(1, depth - len(base))))
        block_hashes = base + fresh
        holders = [system]
        if rng.random() < 0.4:
            others = [w for w in workers if w != system]
            holders += rng.sample(others, rng.randint(1, len(others)))
        chains.append(Chain(block_hashes, tuple(holders)))
        seen.update(block_hashes)
        for worker in holders:
            held[worker].update(block_hashes)
    return Tree(chains, len(seen), sum(len(s) for s in held.values()))


def load_redis(index: RedisIndex, tree: Tree, batch: int = 200) -> None:
    """Store each worker's chains with the STORE script, only the part not stored yet."""
    stored: dict[str, set[BlockHash]] = {}
    pipe = index.client.pipeline(transaction=False)
    pending = 0
    for chain in tree.chains:
        for worker in chain.workers:
            have = stored.setdefault(worker, set())
            start = 0
            while start < len(chain.block_hashes) and chain.block_hashes[start] in have:
                start += 1  # prefix-closed: what the worker holds of a chain is a prefix
            new = chain.block_hashes[start:]
            if not new:
                continue
            parent = chain.block_hashes[start - 1] if start else None
            index.add(worker, new, parent, pipeline=pipe)
            have.update(new)
            pending += 1
            if pending >= batch:
                pipe.execute()
                pending = 0
    pipe.execute()


def load_memory(tree: Tree) -> InMemoryIndex:
    index = InMemoryIndex()
    for chain in tree.chains:
        for worker in chain.workers:
            index.add(worker, chain.block_hashes)
    return index


def make_requests(
    tree: Tree, num_blocks: int, count: int, rng: random.Random
) -> list[tuple[BlockHash, ...]]:
    """Follow-up turns: ⌈7n/8⌉ cached blocks of a deep enough chain, then fresh blocks."""
    cached = -(-num_blocks * 7 // 8)
    deep = [c for c in tree.chains if len(c.block_hashes) >= cached] or tree.chains
    requests = []
    for _ in range(count):
        prefix = rng.choice(deep).block_hashes[:cached]
        fresh = tuple(BlockHash(rng.randbytes(32)) for _ in range(num_blocks - len(prefix)))
        requests.append(prefix + fresh)
    return requests


# -- the methods ----------------------------------------------------------------------------
Matcher = Callable[[Sequence[BlockHash]], dict[str, int]]


def lua_bsearch(index: RedisIndex, state_keys: list[str]) -> Matcher:
    def match(block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        return index.route_view(block_hashes, HEARTBEAT_TTL_MS, state_keys).matches

    return match


def lua_walk(client: redis.Redis, prefix: str, state_keys: list[str]) -> Matcher:
    script = client.register_script(NAIVE_WALK)
    view_keys = [keys.workers(prefix), keys.round_robin(prefix), *state_keys]

    def match(block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        live, lengths, _, *_states = script(
            keys=view_keys, args=[prefix, HEARTBEAT_TTL_MS, "0", *to_hex(block_hashes)]
        )
        return {w.decode(): int(n) for w, n in zip(live, lengths, strict=True)}

    return match


def one_pipeline(client: redis.Redis, prefix: str, state_keys: list[str]) -> Matcher:
    node_prefix = keys.node_prefix(prefix)
    workers_key = keys.workers(prefix)

    def match(block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        pipe = client.pipeline(transaction=False)
        now_ms = int(time.time() * 1000)
        pipe.zrangebyscore(workers_key, now_ms - HEARTBEAT_TTL_MS, "+inf")
        for key in state_keys:
            pipe.hgetall(key)
        for block_hash in block_hashes:
            pipe.hkeys(node_prefix + block_hash.hex())
        reply = pipe.execute()
        live = [w.decode() for w in reply[0]]
        matches = dict.fromkeys(live, 0)
        alive = set(live)
        for position, fields in enumerate(reply[1 + len(state_keys) :], start=1):
            holding = {f[2:].decode() for f in fields if f[:2] in (b"w:", b"p:")}
            alive &= holding
            if not alive:
                break
            for worker in alive:
                matches[worker] = position
        return matches

    return match


def in_memory(index: InMemoryIndex, workers: Sequence[str]) -> Matcher:
    def match(block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        return {w: 0 for w in workers} | index.match(block_hashes)

    return match


def router_route(client: redis.Redis, prefix: str) -> Matcher:
    """`Router.route` (cache_aware); returns only the chosen worker's match (not compared)."""
    state = RedisRouterState(client, prefix, heartbeat_ttl_s=HEARTBEAT_TTL_MS / 1e3)
    router = Router(state, make_policy("cache_aware"))

    def match(block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        decision = router.route(make_request("bench", block_hashes))
        return {decision.worker: decision.matched_blocks}

    return match


def router_state_keys(prefix: str) -> list[str]:
    """The state hashes `RedisRouterState.view` reads with the prefix tree."""
    return [
        keys.load(prefix),
        keys.load_tokens(prefix),
        keys.load_work(prefix),
        keys.usage(prefix),
        keys.capacity(prefix),
        keys.output_stats(prefix),
    ]


# -- measuring -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Row:
    num_blocks: int
    method: str
    times_ns: list[int]
    mean_longest: float

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.times_ns)
        rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
        return ordered[rank] / 1e6


def measure(
    methods: dict[str, Matcher],
    requests: list[tuple[BlockHash, ...]],
    num_warmup: int,
    compared: Sequence[str],
) -> dict[str, tuple[list[int], float]]:
    """Time every method on every request; the `compared` ones must agree (first = reference)."""
    names = list(methods)
    times: dict[str, list[int]] = {name: [] for name in names}
    longest: list[int] = []
    for i, request in enumerate(requests):
        answers = {}
        for k in range(len(names)):  # rotate the order: no method always runs first
            name = names[(i + k) % len(names)]
            start = time.perf_counter_ns()
            answers[name] = methods[name](request)
            elapsed = time.perf_counter_ns() - start
            if i >= num_warmup:
                times[name].append(elapsed)
        reference = answers[compared[0]]
        for name in compared:
            if answers[name] != reference:
                raise RuntimeError(
                    f"{name} disagrees with {compared[0]} on a {len(request)}-block request: "
                    f"{answers[name]} vs {reference}"
                )
        if i >= num_warmup:
            longest.append(max(reference.values(), default=0))
    return {name: (times[name], statistics.fmean(longest)) for name in names}


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def memory_split(
    client: redis.Redis, prefix: str, workers: Sequence[str], tree: Tree, rng: random.Random
) -> tuple[float, int]:
    """(mean MEMORY USAGE of a node hash over a sample, total of the worker block sets)."""
    nodes = list({h for chain in rng.sample(tree.chains, min(200, len(tree.chains))) for h in
                  chain.block_hashes})  # fmt: skip
    sample = rng.sample(nodes, min(2_000, len(nodes)))
    pipe = client.pipeline(transaction=False)
    for block_hash in sample:
        pipe.memory_usage(keys.node(block_hash.hex(), prefix), samples=0)
    node_bytes = statistics.fmean(pipe.execute())
    for worker in workers:
        pipe.memory_usage(keys.worker_blocks(worker, prefix), samples=0)
    set_bytes = sum(n or 0 for n in pipe.execute())
    return node_bytes, set_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100_000, help="prefix-tree nodes to load")
    parser.add_argument("--workers", type=int, default=8, help="live workers")
    parser.add_argument("--repeats", type=int, default=1_000, help="timed requests per length")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests per length")
    parser.add_argument(
        "--blocks",
        default=",".join(map(str, DEFAULT_BLOCKS)),
        help="request lengths in 16-token blocks, comma-separated",
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="its db is flushed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="leave the tree in Redis")
    args = parse_args(parser, argv, QUICK)
    for name in ("nodes", "workers", "repeats"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    try:
        lengths = [int(b) for b in args.blocks.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--blocks must be comma-separated integers, got {args.blocks!r}")
    if not lengths or min(lengths) < 1:
        parser.error(f"--blocks needs positive lengths, got {args.blocks!r}")

    rng = random.Random(args.seed)
    client = connect(args.redis_url)
    workers = [keys.worker_name(i) for i in range(args.workers)]
    prefix = BENCH_PREFIX
    state_keys = router_state_keys(prefix)

    load_before = os.getloadavg()[0]
    tree = build_tree(args.nodes, workers, rng)
    client.flushdb()
    before = used_memory(client)
    index = RedisIndex(client, prefix)
    started = time.perf_counter()
    load_redis(index, tree)
    load_s = time.perf_counter() - started
    after = used_memory(client)
    node_bytes, set_bytes = memory_split(client, prefix, workers, tree, rng)
    client.zadd(keys.workers(prefix), {w: int(time.time() * 1000) for w in workers})
    for key in (keys.load(prefix), keys.load_tokens(prefix), keys.load_work(prefix)):
        client.hset(key, mapping=dict.fromkeys(workers, 0))
    client.hset(keys.usage(prefix), mapping=dict.fromkeys(workers, 0))
    client.hset(keys.capacity(prefix), mapping=dict.fromkeys(workers, 28_967))
    memory_index = load_memory(tree)

    methods: dict[str, Matcher] = {
        "lua-bsearch": lua_bsearch(index, state_keys),
        "pipeline": one_pipeline(client, prefix, state_keys),
        "lua-walk": lua_walk(client, prefix, state_keys),
        "in-memory": in_memory(memory_index, workers),
        "router.route": router_route(client, prefix),
    }
    compared = ["lua-bsearch", "pipeline", "lua-walk", "in-memory"]
    rows: list[Row] = []
    for num_blocks in lengths:
        requests = make_requests(tree, num_blocks, args.warmup + args.repeats, rng)
        for name, (times, longest) in measure(methods, requests, args.warmup, compared).items():
            rows.append(Row(num_blocks, name, times, longest))
    if not args.keep:
        client.flushdb()

    print(
        f"tree: {tree.num_nodes:,} nodes, {tree.num_entries:,} (node, worker) entries, "
        f"{len(tree.chains):,} chains, {args.workers} live workers; loaded in {load_s:.1f} s"
    )
    print(
        f"redis {client.info('server')['redis_version']} at {redact(args.redis_url)}; "
        f"{os.cpu_count()} cores; load average before {load_before:.2f}, after "
        f"{os.getloadavg()[0]:.2f}\n"
    )
    header = (
        f"{'blocks':>6} {'tokens':>6} {'method':<12} {'longest':>7} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'p50 ÷ lua-bsearch':>18} {'p99 ÷ lua-bsearch':>18}"
    )
    print(header)
    print("-" * len(header))
    for num_blocks in lengths:
        group = [r for r in rows if r.num_blocks == num_blocks]
        base = group[0]
        for row in group:
            print(
                f"{num_blocks:>6} {num_blocks * BLOCK_SIZE:>6} {row.method:<12} "
                f"{row.mean_longest:>7.0f} {row.percentile_ms(0.5):>8.3f} "
                f"{row.percentile_ms(0.99):>8.3f} "
                f"{row.percentile_ms(0.5) / base.percentile_ms(0.5):>17.2f}x "
                f"{row.percentile_ms(0.99) / base.percentile_ms(0.99):>17.2f}x"
            )
    delta = after - before
    print(
        f"\n'longest' = mean longest match (blocks); {args.repeats:,} timed requests per "
        f"length after {args.warmup} warm-up, methods interleaved"
    )
    print(
        f"redis memory: used_memory +{delta:,} B for {tree.num_nodes:,} nodes = "
        f"{delta / tree.num_nodes:,.0f} B/node ({delta / tree.num_entries:,.0f} B per "
        f"(node, worker) entry); MEMORY USAGE: node hash {node_bytes:,.0f} B/node, worker "
        f"block sets {set_bytes / tree.num_nodes:,.0f} B/node"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

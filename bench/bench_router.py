"""Router decision latency by prompt length and how it grows; Redis memory per tree node.

A prefix tree of ``--nodes`` block nodes is loaded into Redis twice, in the tree's layout
(`kvqueue.routing.redis_index`: binary node keys, one slot field per holder) and in the
layout of commit fe01c73 (``kvq:node:<hex>`` hashes with a ``parent`` and ``w:<worker>``
fields, plus a set of hex hashes per worker; its STORE and ROUTE_VIEW scripts are kept below),
and into an `InMemoryIndex`, for ``--workers`` live workers. Then the same requests go
through six methods:

- ``route_view``: `RedisIndex.route_view`, the router's real read (the ROUTE_VIEW script: live
  workers, one joint search of every worker's match, the six state hashes
  `RedisRouterState.view` asks for: loads, backlog, cache usage, capacity, output stats);
- ``fe01c73``: the same read over the old layout with the old script (a binary search per
  worker, hex hashes): the baseline of the change, in the same process;
- ``pipeline``: llm-d's layout read — one pipeline with ZRANGEBYSCORE of the live workers,
  the same state hashes, the slots and HKEYS of *every* block key; the client computes each
  worker's match, stopping at its first miss;
- ``lua-walk``: a naive Lua script returning the same view, HKEYS per block, walking the chain
  until no live worker holds the block (the walk DESIGN.md §3 measured);
- ``in-memory``: `InMemoryIndex.match` over the same tree (no Redis, no loads);
- ``router.route``: for scale, the whole decision of `Router.route` with ``cache_aware`` over
  `RedisRouterState` (the route_view read, decoding into a `RouterView`, the policy).

The tree is built like a busy cluster's: system prompts (16–128 blocks) that conversations
and documents extend; later chains fork from random cut points of earlier ones (follow-up
turns, edited prompts), to depths of 64–768 blocks. Each chain is cached by one worker (the
one its system prompt has affinity to) and, for 40% of them, by one to seven more; a worker
holds every block of the chains it caches, so each worker's set is prefix-closed, as
`BlockCache` keeps it.

A request of n blocks is a *follow-up turn*: the first ⌈7n/8⌉ blocks of a cached chain at
least that deep, then n/8 new blocks — the expensive case for a walk, whose cost grows with
the match. The first five must return the same matches for every request (checked, not timed).
Timings interleave the methods request by request (``time.perf_counter_ns`` around one
call, client encoding and decoding included), after a warm-up.

Memory: ``INFO memory`` used_memory after loading a layout minus before (on a flushed db),
divided by the number of nodes: the new layout is loaded first, then the old one. used_memory
is server-wide (activity in other dbs leaks in), so the MEMORY USAGE split (node hashes
sampled; the slots' keys, or the old per-worker block sets, exact) is printed as a cross-check.

With ``--growth``, a second table: for each tree size of ``--growth-nodes`` (``--workers``
workers) and each worker count of ``--growth-workers`` (``--nodes`` nodes), a fresh tree,
both layouts' bytes per node, and p50/p99 of ``route_view``, ``fe01c73`` (on trees up to
``--old-max-nodes``) and ``in-memory`` for ``--growth-blocks``-block requests; ``--plot PATH``
draws it into a PNG. Last, "where the time goes": route_view and fe01c73 each alone on requests
of the longest length, with the time Redis spent in the call (its mean, from INFO commandstats)
and a PING for the bare round trip. Usage::

    python bench/bench_router.py [--nodes 100000] [--workers 8] [--repeats 1000]
        [--blocks 64,128,512] [--growth] [--growth-nodes 10000,100000,1000000]
        [--growth-workers 8,32,128] [--growth-blocks 512] [--growth-repeats 300]
        [--old-max-nodes 1000000] [--plot PATH]
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
from bench_args import parse_args, positive_ints

from kvqueue import keys
from kvqueue.gpu.hashing import BLOCK_SIZE, BlockHash, to_hex
from kvqueue.gpu.request import make_request
from kvqueue.live.connection import connect, redact
from kvqueue.routing.index import InMemoryIndex
from kvqueue.routing.policies.base import make_policy
from kvqueue.routing.redis_index import RedisIndex, RouteRead
from kvqueue.routing.router import Router
from kvqueue.routing.state import RedisRouterState

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"
BENCH_PREFIX = keys.DEFAULT_PREFIX  # the db is dedicated: real key sizes
HEARTBEAT_TTL_MS = 10**12  # every registered worker stays live for the whole run
DEFAULT_BLOCKS = (64, 128, 512)
QUICK = {
    "nodes": 5_000,
    "repeats": 50,
    "warmup": 5,
    "blocks": "64,128",
    "growth": True,
    "growth_nodes": "2000,5000",
    "growth_workers": "8,16",
    "growth_blocks": 128,
    "growth_repeats": 30,
}
FOLLOW_UP_FRACTION = 7 / 8
MAX_EXTRA_HOLDERS = 7  # a chain shared by up to 8 workers, whatever the cluster's size
OLD = "fe01c73"  # the commit whose layout and read the `fe01c73` method replays

# -- the layout of fe01c73 (hex keys, parent, w:<worker> fields, per-worker block sets) -------
OLD_STORE = """
-- KEYS[1] = the worker's block set (kvq:worker:<w>:blocks)
-- ARGV[1] = key prefix, ARGV[2] = worker, ARGV[3] = parent hash of the first block ('' if none)
-- ARGV[4..] = stored block hashes, parent first
local prefix, worker, parent = ARGV[1], ARGV[2], ARGV[3]
local stored, pending = 'w:' .. worker, 'p:' .. worker
for i = 4, #ARGV do
  local node = prefix .. 'node:' .. ARGV[i]
  redis.call('HSET', node, 'parent', parent, stored, '1')
  redis.call('HDEL', node, pending)
  redis.call('PERSIST', node)
  redis.call('SADD', KEYS[1], ARGV[i])
  parent = ARGV[i]
end
return #ARGV - 3
"""

OLD_ROUTE_VIEW = """
-- ROUTE_VIEW of fe01c73, precise index only: a binary search per live worker, each probe one
-- HMGET of its w:/p: fields; the chain as hex, 64 characters a hash.
-- KEYS[1] = live workers, KEYS[2] = round-robin counter, KEYS[3..] = state hashes
-- ARGV[1] = key prefix, ARGV[2] = heartbeat TTL in ms, ARGV[3] = '1' to take a ticket,
-- ARGV[4] = the chain, hex, concatenated
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, chain = ARGV[1], ARGV[4]
local n = math.floor(#chain / 64)
local function block_key(pos)
  return prefix .. 'node:' .. string.sub(chain, pos * 64 - 63, pos * 64)
end
local function holds(pos, worker)
  local v = redis.call('HMGET', block_key(pos), 'w:' .. worker, 'p:' .. worker)
  if v[1] then return true end
  return v[2] ~= false and tonumber(v[2]) > now
end
local function leading_run(worker)
  if n == 0 or not holds(1, worker) then return 0 end
  local lo, hi = 1, n
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if holds(mid, worker) then lo = mid else hi = mid - 1 end
  end
  return lo
end
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[2]), '+inf')
local ticket = 0
if ARGV[3] == '1' then ticket = redis.call('INCR', KEYS[2]) end
local matches, sizes = {}, {}
for i, worker in ipairs(live) do
  matches[i] = leading_run(worker)
  sizes[i] = redis.call('SCARD', prefix .. 'worker:' .. worker .. ':blocks')
end
local out = {live, matches, ticket, sizes, now}
for k = 3, #KEYS do out[#out + 1] = redis.call('HGETALL', KEYS[k]) end
return out
"""

# The naive walk: the same keys and reply as ROUTE_VIEW, HKEYS per block, over the slots.
NAIVE_WALK = """
-- KEYS[1] = live workers (zset: worker -> last heartbeat, ms)
-- KEYS[2] = the shared round-robin counter (unused here)
-- KEYS[3..] = state hashes (field = worker), returned whole
-- ARGV[1] = key prefix, ARGV[2] = heartbeat TTL in ms, ARGV[3] = '1' to take a ticket
-- ARGV[4] = the request's block hashes, raw, concatenated
-- Walks the chain with one HKEYS per block until no live worker's slot holds the block.
-- Pending fields are not looked at: the benchmark sets none.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, chain = ARGV[1], ARGV[4]
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[2]), '+inf')
local alive, matches, num_alive = {}, {}, 0
for i, worker in ipairs(live) do
  matches[i] = 0
  local slot = redis.call('HGET', prefix .. 'slots', worker)
  if slot then alive[slot] = i; num_alive = num_alive + 1 end
end
for pos = 1, math.floor(#chain / 32) do
  if num_alive == 0 then break end
  local holding = {}
  local node = prefix .. 'n:' .. string.sub(chain, pos * 32 - 31, pos * 32)
  for _, f in ipairs(redis.call('HKEYS', node)) do holding[f] = true end
  for slot, i in pairs(alive) do
    if holding[slot] then matches[i] = pos
    else alive[slot] = nil; num_alive = num_alive - 1 end
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
        if rng.random() < 0.4 and len(workers) > 1:
            others = [w for w in workers if w != system]
            holders += rng.sample(others, rng.randint(1, min(MAX_EXTRA_HOLDERS, len(others))))
        chains.append(Chain(block_hashes, tuple(holders)))
        seen.update(block_hashes)
        for worker in holders:
            held[worker].update(block_hashes)
    return Tree(chains, len(seen), sum(len(s) for s in held.values()))


Store = Callable[[str, Sequence[BlockHash], BlockHash | None, object], None]


def load_redis(client: redis.Redis, tree: Tree, store: Store, batch: int = 200) -> None:
    """Store each worker's chains, only the part not stored yet, `batch` calls a pipeline."""
    stored: dict[str, set[BlockHash]] = {}
    pipe = client.pipeline(transaction=False)
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
            store(worker, new, chain.block_hashes[start - 1] if start else None, pipe)
            have.update(new)
            pending += 1
            if pending >= batch:
                pipe.execute()
                pending = 0
    pipe.execute()


def new_store(index: RedisIndex) -> Store:
    def store(worker, block_hashes, parent, pipe) -> None:
        index.add(worker, block_hashes, parent, pipeline=pipe)

    return store


def old_store(client: redis.Redis, prefix: str) -> Store:
    script = client.register_script(OLD_STORE)

    def store(worker, block_hashes, parent, pipe) -> None:
        script(
            keys=[f"{prefix}worker:{worker}:blocks"],
            args=[prefix, worker, parent.hex() if parent else "", *to_hex(block_hashes)],
            client=pipe,
        )

    return store


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


def route_view(index: RedisIndex, state_keys: list[str]) -> Matcher:
    def match(block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        return index.route_view(block_hashes, HEARTBEAT_TTL_MS, state_keys).matches

    return match


def old_route_view(client: redis.Redis, prefix: str, state_keys: list[str]) -> Matcher:
    script = client.register_script(OLD_ROUTE_VIEW)
    view_keys = [keys.workers(prefix), keys.round_robin(prefix), *state_keys]

    def match(block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        reply = script(
            keys=view_keys, args=[prefix, HEARTBEAT_TTL_MS, "0", b"".join(block_hashes).hex()]
        )
        return RouteRead.from_reply(reply).matches  # decoded as route_view decodes

    return match


def lua_walk(client: redis.Redis, prefix: str, state_keys: list[str]) -> Matcher:
    script = client.register_script(NAIVE_WALK)
    view_keys = [keys.workers(prefix), keys.round_robin(prefix), *state_keys]

    def match(block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        live, lengths, _, *_states = script(
            keys=view_keys, args=[prefix, HEARTBEAT_TTL_MS, "0", b"".join(block_hashes)]
        )
        return {w.decode(): int(n) for w, n in zip(live, lengths, strict=True)}

    return match


def one_pipeline(client: redis.Redis, prefix: str, state_keys: list[str]) -> Matcher:
    workers_key, slots_key = keys.workers(prefix), keys.slots(prefix)

    def match(block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        pipe = client.pipeline(transaction=False)
        now_ms = int(time.time() * 1000)
        pipe.zrangebyscore(workers_key, now_ms - HEARTBEAT_TTL_MS, "+inf")
        pipe.hgetall(slots_key)
        for key in state_keys:
            pipe.hgetall(key)
        for block_hash in block_hashes:
            pipe.hkeys(keys.node(block_hash, prefix))
        reply = pipe.execute()
        live = [w.decode() for w in reply[0]]
        slots = {slot: worker.decode() for worker, slot in reply[1].items()}
        matches = dict.fromkeys(live, 0)
        alive = set(live)
        for position, fields in enumerate(reply[2 + len(state_keys) :], start=1):
            alive &= {slots[f] for f in fields if f in slots}
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
def percentile_ms(times_ns: Sequence[int], q: float) -> float:
    ordered = sorted(times_ns)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank] / 1e6


@dataclass(frozen=True, slots=True)
class Row:
    num_blocks: int
    method: str
    times_ns: list[int]
    mean_longest: float

    def percentile_ms(self, q: float) -> float:
        return percentile_ms(self.times_ns, q)


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


def sample_nodes(tree: Tree, rng: random.Random, count: int = 2_000) -> list[BlockHash]:
    chains = rng.sample(tree.chains, min(200, len(tree.chains)))
    nodes = list({h for chain in chains for h in chain.block_hashes})
    return rng.sample(nodes, min(count, len(nodes)))


def mean_memory_usage(client: redis.Redis, node_keys: Sequence[bytes | str]) -> float:
    pipe = client.pipeline(transaction=False)
    for key in node_keys:
        pipe.memory_usage(key, samples=0)
    return statistics.fmean(n or 0 for n in pipe.execute())


@dataclass(frozen=True, slots=True)
class Memory:
    """Bytes per node of one layout: used_memory's growth, and MEMORY USAGE's split."""

    used_bytes: int
    node_hash: float  # mean MEMORY USAGE of a node (sampled)
    per_worker: int  # the slots' keys (new) or the per-worker block sets (old), exact

    def per_node(self, num_nodes: int) -> float:
        return self.used_bytes / num_nodes


@dataclass(slots=True)
class Loaded:
    tree: Tree
    new: Memory
    old: Memory | None
    load_s: float


def load_both(
    client: redis.Redis,
    prefix: str,
    workers: Sequence[str],
    tree: Tree,
    rng: random.Random,
    with_old: bool,
) -> Loaded:
    """Flush, load the new layout then (`with_old`) the old one, measuring each."""
    client.flushdb()
    index = RedisIndex(client, prefix)
    sample = sample_nodes(tree, rng)
    before = used_memory(client)
    started = time.perf_counter()
    load_redis(client, tree, new_store(index))
    load_s = time.perf_counter() - started
    middle = used_memory(client)
    new = Memory(
        middle - before,
        mean_memory_usage(client, [keys.node(h, prefix) for h in sample]),
        sum(
            int(client.memory_usage(key, samples=0) or 0)
            for key in (keys.slots(prefix), keys.slot_blocks(prefix), keys.slots_next(prefix))
        ),
    )
    old = None
    if with_old:
        load_redis(client, tree, old_store(client, prefix))
        after = used_memory(client)
        sets = [f"{prefix}worker:{w}:blocks" for w in workers]
        pipe = client.pipeline(transaction=False)
        for key in sets:
            pipe.memory_usage(key, samples=0)
        old = Memory(
            after - middle,
            mean_memory_usage(client, [f"{prefix}node:{h.hex()}" for h in sample]),
            sum(n or 0 for n in pipe.execute()),
        )
    client.zadd(keys.workers(prefix), {w: int(time.time() * 1000) for w in workers})
    for key in (keys.load(prefix), keys.load_tokens(prefix), keys.load_work(prefix)):
        client.hset(key, mapping=dict.fromkeys(workers, 0))
    client.hset(keys.usage(prefix), mapping=dict.fromkeys(workers, 0))
    client.hset(keys.capacity(prefix), mapping=dict.fromkeys(workers, 28_967))
    return Loaded(tree, new, old, load_s)


def server_split(
    client: redis.Redis,
    methods: dict[str, Matcher],
    requests: list[tuple[BlockHash, ...]],
) -> list[tuple[str, float, float]]:
    """(method, Redis's own mean µs per call, the caller's p50 µs) for each method, run alone
    on `requests`; and a PING's, the round trip with no work. Redis's time is its INFO
    commandstats (EVALSHA) after CONFIG RESETSTAT: a mean over the calls, and unlike SLOWLOG it
    adds no cost per command a script runs. The difference is the client's encoding and
    decoding and the network."""
    split = []
    for name, method in [*methods.items(), ("PING", lambda _: client.ping())]:
        client.config_resetstat()
        times = []
        for request in requests:
            start = time.perf_counter_ns()
            method(request)
            times.append(time.perf_counter_ns() - start)
        stats = client.info("commandstats")
        command = stats.get("cmdstat_ping" if name == "PING" else "cmdstat_evalsha", {})
        in_redis = float(command.get("usec_per_call", 0.0))
        split.append((name, in_redis, statistics.median(times) / 1e3))
    return split


def joint_probes(lengths: Sequence[int], n: int) -> int:
    """Node reads of ROUTE_VIEW's joint search when the workers' matches are `lengths` (the
    positions the script probes: block 1, then the widest open interval's midpoint)."""
    lo, hi = [0] * len(lengths), [n] * len(lengths)
    probes, position = 0, 1 if n else None
    while position is not None:
        probes += 1
        for i, length in enumerate(lengths):
            if lo[i] < position <= hi[i]:
                lo[i], hi[i] = (position, hi[i]) if position <= length else (lo[i], position - 1)
        widest = max(range(len(lengths)), key=lambda i: hi[i] - lo[i])
        open_ = hi[widest] > lo[widest]
        position = (lo[widest] + hi[widest] + 1) // 2 if open_ else None
    return probes


def per_worker_probes(length: int, n: int) -> int:
    """Node reads of a binary search for one worker (block 1, then halving [1, n])."""
    if n == 0 or length == 0:
        return 1 if n else 0
    lo, hi, probes = 1, n, 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        probes += 1
        lo, hi = (mid, hi) if mid <= length else (lo, mid - 1)
    return probes


def probe_counts(
    index: InMemoryIndex, workers: Sequence[str], requests: list[tuple[BlockHash, ...]]
) -> tuple[float, float]:
    """Mean node reads per request: the joint search, and one binary search per worker."""
    joint, separate = [], []
    for request in requests:
        matches = index.match(request)
        lengths = [matches.get(w, 0) for w in workers]
        joint.append(joint_probes(lengths, len(request)))
        separate.append(sum(per_worker_probes(m, len(request)) for m in lengths))
    return statistics.fmean(joint), statistics.fmean(separate)


# -- growth ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Point:
    sweep: str  # "nodes" or "workers"
    num_nodes: int
    num_workers: int
    num_entries: int
    new_bytes: float  # per node
    old_bytes: float | None
    times: dict[str, list[int]]  # method -> ns


def growth_point(
    client: redis.Redis,
    sweep: str,
    num_nodes: int,
    num_workers: int,
    args: argparse.Namespace,
    rng: random.Random,
) -> Point:
    prefix = BENCH_PREFIX
    workers = [keys.worker_name(i) for i in range(num_workers)]
    tree = build_tree(num_nodes, workers, rng)
    with_old = num_nodes <= args.old_max_nodes
    loaded = load_both(client, prefix, workers, tree, rng, with_old)
    state_keys = router_state_keys(prefix)
    methods: dict[str, Matcher] = {
        "route_view": route_view(RedisIndex(client, prefix), state_keys),
        "in-memory": in_memory(load_memory(tree), workers),
    }
    if with_old:
        methods[OLD] = old_route_view(client, prefix, state_keys)
    requests = make_requests(tree, args.growth_blocks, args.warmup + args.growth_repeats, rng)
    compared = ["route_view", "in-memory"] + ([OLD] if with_old else [])
    timed = measure(methods, requests, args.warmup, compared)
    n = tree.num_nodes
    return Point(
        sweep,
        n,
        num_workers,
        tree.num_entries,
        loaded.new.per_node(n),
        loaded.old.per_node(n) if loaded.old else None,
        {name: times for name, (times, _) in timed.items()},
    )


def print_growth(points: list[Point], num_blocks: int) -> None:
    header = (
        f"{'sweep':<7} {'nodes':>9} {'workers':>7} {'entries/node':>12} {'B/node':>7} "
        f"{'B/node ' + OLD:>15} {'p50 ms':>7} {'p99 ms':>7} {'p50 ' + OLD:>12} "
        f"{'p99 ' + OLD:>12} {'p99 ÷ in-memory':>15}"
    )
    print(header)
    print("-" * len(header))
    for p in points:
        new, mem = p.times["route_view"], p.times["in-memory"]
        old = p.times.get(OLD)
        dash = "-"
        print(
            f"{p.sweep:<7} {p.num_nodes:>9,} {p.num_workers:>7} "
            f"{p.num_entries / p.num_nodes:>12.2f} {p.new_bytes:>7.0f} "
            f"{(f'{p.old_bytes:.0f}' if p.old_bytes else dash):>15} "
            f"{percentile_ms(new, 0.5):>7.3f} {percentile_ms(new, 0.99):>7.3f} "
            f"{(f'{percentile_ms(old, 0.5):.3f}' if old else dash):>12} "
            f"{(f'{percentile_ms(old, 0.99):.3f}' if old else dash):>12} "
            f"{percentile_ms(new, 0.99) / percentile_ms(mem, 0.99):>14.1f}x"
        )
    print(
        f"\n{num_blocks}-block requests ({num_blocks * BLOCK_SIZE:,} tokens), follow-up turns; "
        f"B/node = used_memory growth per node; '-' = not loaded (over --old-max-nodes)"
    )


def plot(points: list[Point], path: Path, title: str) -> None:
    """p99 against nodes and against workers, and bytes per node against nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
    by_nodes = [p for p in points if p.sweep == "nodes"]
    by_workers = [p for p in points if p.sweep == "workers"]
    for ax, line, x_of, xlabel in (
        (axes[0], by_nodes, lambda p: p.num_nodes, "tree nodes"),
        (axes[1], by_workers, lambda p: p.num_workers, "live workers"),
    ):
        for method, label, color in (
            ("route_view", "route_view (joint search)", "tab:blue"),
            (OLD, OLD, "tab:orange"),
        ):
            xs = [x_of(p) for p in line if method in p.times]
            for q, style in ((0.5, "--"), (0.99, "-")):
                ys = [percentile_ms(p.times[method], q) for p in line if method in p.times]
                ax.plot(xs, ys, style, color=color, marker="o", label=f"{label} p{round(q * 100)}")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("router read, ms")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot([p.num_nodes for p in by_nodes], [p.new_bytes for p in by_nodes], marker="o",
            color="tab:blue", label="slots layout")  # fmt: skip
    old = [p for p in by_nodes if p.old_bytes]
    ax.plot([p.num_nodes for p in old], [p.old_bytes for p in old], marker="o",
            color="tab:orange", label=OLD)  # fmt: skip
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tree nodes")
    ax.set_ylabel("Redis bytes per node (used_memory)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the command ---------------------------------------------------------------------------------
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
    parser.add_argument("--growth", action="store_true", help="also the growth sweeps")
    parser.add_argument("--growth-nodes", default="10000,100000,1000000", help="tree sizes")
    parser.add_argument("--growth-workers", default="8,32,128", help="worker counts")
    parser.add_argument("--growth-blocks", type=int, default=512, help="request length there")
    parser.add_argument("--growth-repeats", type=int, default=300, help="timed requests a point")
    parser.add_argument(
        "--old-max-nodes", type=int, default=1_000_000, help=f"largest tree loaded as {OLD}"
    )
    parser.add_argument("--plot", type=Path, help="write the growth sweeps into this PNG")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="its db is flushed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="leave the tree in Redis")
    args = parse_args(parser, argv, QUICK)
    for name in ("nodes", "workers", "repeats", "growth_blocks", "growth_repeats"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    lengths = positive_ints(parser, "blocks", args.blocks)
    growth_nodes = positive_ints(parser, "growth-nodes", args.growth_nodes)
    growth_workers = positive_ints(parser, "growth-workers", args.growth_workers)

    rng = random.Random(args.seed)
    client = connect(args.redis_url)
    workers = [keys.worker_name(i) for i in range(args.workers)]
    prefix = BENCH_PREFIX
    state_keys = router_state_keys(prefix)

    load_before = os.getloadavg()[0]
    tree = build_tree(args.nodes, workers, rng)
    loaded = load_both(client, prefix, workers, tree, rng, with_old=True)
    memory_index = load_memory(tree)
    index = RedisIndex(client, prefix)

    methods: dict[str, Matcher] = {
        "route_view": route_view(index, state_keys),
        OLD: old_route_view(client, prefix, state_keys),
        "pipeline": one_pipeline(client, prefix, state_keys),
        "lua-walk": lua_walk(client, prefix, state_keys),
        "in-memory": in_memory(memory_index, workers),
        "router.route": router_route(client, prefix),
    }
    compared = ["route_view", OLD, "pipeline", "lua-walk", "in-memory"]
    rows: list[Row] = []
    for num_blocks in lengths:
        requests = make_requests(tree, num_blocks, args.warmup + args.repeats, rng)
        for name, (times, longest) in measure(methods, requests, args.warmup, compared).items():
            rows.append(Row(num_blocks, name, times, longest))

    longest = max(lengths)
    split_requests = make_requests(tree, longest, args.repeats, rng)
    argument_only = client.register_script("return 1")
    where = server_split(
        client,
        {
            "route_view": methods["route_view"],
            "- state": lambda hashes: index.route_view(hashes, HEARTBEAT_TTL_MS, []),
            "- hashes": lambda _: index.route_view((), HEARTBEAT_TTL_MS, state_keys),
            "argument": lambda hashes: argument_only(args=[b"".join(hashes)]),
            OLD: methods[OLD],
        },
        split_requests,
    )
    probes = probe_counts(memory_index, workers, split_requests)

    points: list[Point] = []
    if args.growth:
        for num_nodes in growth_nodes:
            points.append(growth_point(client, "nodes", num_nodes, args.workers, args, rng))
        for num_workers in growth_workers:
            points.append(growth_point(client, "workers", args.nodes, num_workers, args, rng))
    if not args.keep:
        client.flushdb()

    print(
        f"tree: {tree.num_nodes:,} nodes, {tree.num_entries:,} (node, worker) entries, "
        f"{len(tree.chains):,} chains, {args.workers} live workers; loaded in "
        f"{loaded.load_s:.1f} s"
    )
    print(
        f"redis {client.info('server')['redis_version']} at {redact(args.redis_url)}; "
        f"{os.cpu_count()} cores; load average before {load_before:.2f}, after "
        f"{os.getloadavg()[0]:.2f}\n"
    )
    header = (
        f"{'blocks':>6} {'tokens':>6} {'method':<12} {'longest':>7} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'p50 ÷ in-memory':>16} {'p99 ÷ ' + OLD:>14}"
    )
    print(header)
    print("-" * len(header))
    for num_blocks in lengths:
        group = {r.method: r for r in rows if r.num_blocks == num_blocks}
        memory, old = group["in-memory"], group[OLD]
        for row in group.values():
            print(
                f"{num_blocks:>6} {num_blocks * BLOCK_SIZE:>6} {row.method:<12} "
                f"{row.mean_longest:>7.0f} {row.percentile_ms(0.5):>8.3f} "
                f"{row.percentile_ms(0.99):>8.3f} "
                f"{row.percentile_ms(0.5) / memory.percentile_ms(0.5):>15.1f}x "
                f"{row.percentile_ms(0.99) / old.percentile_ms(0.99):>13.2f}x"
            )
    print(
        f"\n'longest' = mean longest match (blocks); {args.repeats:,} timed requests per "
        f"length after {args.warmup} warm-up, methods interleaved"
    )
    n = tree.num_nodes
    for name, memory in (("tree layout", loaded.new), (f"{OLD} layout", loaded.old)):
        assert memory is not None
        split = "slots' keys" if memory is loaded.new else "worker block sets"
        print(
            f"redis memory, {name}: used_memory +{memory.used_bytes:,} B for {n:,} nodes = "
            f"{memory.per_node(n):,.0f} B/node ({memory.used_bytes / tree.num_entries:,.0f} B "
            f"per (node, worker) entry); MEMORY USAGE: node hash {memory.node_hash:,.0f} "
            f"B/node, {split} {memory.per_worker / n:,.1f} B/node"
        )
    print(f"\nwhere the time goes, {longest}-block requests, each method alone:")
    header = (
        f"{'method':<12} {'in Redis µs (mean)':>18} {'caller p50 µs':>13} "
        f"{'client + network µs':>19}"
    )
    print(header)
    print("-" * len(header))
    for name, in_redis, caller in where:
        print(f"{name:<12} {in_redis:>18.1f} {caller:>13.1f} {caller - in_redis:>19.1f}")
    print(
        "('- state': route_view without the six state hashes; '- hashes': with no request "
        "hashes, no search; 'argument': a script that only receives the request's hashes)\n"
        f"probes per request (node reads, on the same requests): joint search "
        f"{probes[0]:.1f}, a binary search per worker ({OLD}) {probes[1]:.1f}"
    )
    if points:
        print()
        print_growth(points, args.growth_blocks)
        if args.plot:
            title = (
                f"router read ({args.growth_blocks}-block follow-up turns) and Redis bytes per "
                f"node; {args.workers} workers for the node sweep, {args.nodes:,} nodes for "
                f"the worker sweep"
            )
            plot(points, args.plot, title)
            print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

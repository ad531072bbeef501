"""Routing policies from the field: SGLang, NVIDIA Dynamo, llm-d, Preble and CHWBL.

Each class restates its source's rule on this testbed's `RouterView`: the prefix match per
worker comes from the precise index (the workers' own cache events, pending marks included),
loads from the router's accounting of outstanding work. Where a source reads something the
view does not carry, the docstring says what stands in for it. Parameters default to the
values the sources document. Importing `kvqueue.policies` registers them all.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from typing import ClassVar

from kvqueue.hashing import BLOCK_SIZE
from kvqueue.latency import LatencyModel
from kvqueue.policies import RouterView, least_loaded, register_policy, worker_order
from kvqueue.request import Request


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def best_match(view: RouterView) -> int:
    """The longest prefix match (in blocks) any live worker holds."""
    return max((view.matched(w) for w in view.workers), default=0)


def match_fraction(request: Request, matched_blocks: int) -> float:
    """Share of the prompt's tokens covered by `matched_blocks` (0 for an empty prompt)."""
    if request.num_prompt_tokens <= 0:
        return 0.0
    return min(1.0, matched_blocks * BLOCK_SIZE / request.num_prompt_tokens)


def expected_output_blocks(request: Request, view: RouterView) -> int:
    """KV slots for the partial last prompt block and the expected output (never cached).

    Output length: the request's declared `max_tokens`, else the mean of completed outputs,
    else none (what a real router knows).
    """
    output = request.max_tokens
    if output is None:
        output = round(view.mean_output_tokens) if view.mean_output_tokens is not None else 0
    total = math.ceil((request.num_prompt_tokens + output) / BLOCK_SIZE)
    return max(0, total - request.num_blocks)


@register_policy("sglang")
class SGLangCacheAware:
    """SGLang's cache-aware router (sgl-router, "SGLang v0.4" cache-aware load balancer):
    least loaded when imbalanced past both thresholds, else the best match above
    `cache_threshold`, else least loaded.

    Load = outstanding requests per worker. If the cluster is imbalanced — ``max − min >
    balance_abs`` *and* ``max > balance_rel × min`` — route to the least loaded worker.
    Otherwise, if the best prefix match covers more than `cache_threshold` of the prompt's
    tokens, route to the best-matching worker (ties: least loaded); else to the least loaded.

    Defaults are the original sgl-router's, as DESIGN.md §7 lists them: ``balance_abs = 32``,
    ``balance_rel = 1.1``, ``cache_threshold = 0.5`` (its successor gateway ships 64 / 1.5 /
    0.3). Differences: sgl-router matches against an approximate radix tree of the text it
    routed, here the index follows the real caches; and on a low match it sends the request
    to the worker with the smallest tree, here (as issue 6 asks) to the least loaded.
    """

    needs_ticket: ClassVar[bool] = False

    def __init__(
        self, balance_abs: int = 32, balance_rel: float = 1.1, cache_threshold: float = 0.5
    ) -> None:
        _check(balance_abs >= 0, f"balance_abs must be >= 0, got {balance_abs}")
        _check(balance_rel >= 1.0, f"balance_rel must be >= 1, got {balance_rel}")
        _check(
            0 <= cache_threshold <= 1, f"cache_threshold must be in [0, 1], got {cache_threshold}"
        )
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.cache_threshold = cache_threshold

    def is_imbalanced(self, view: RouterView) -> bool:
        loads = [view.load(w).requests for w in view.workers]
        high, low = max(loads), min(loads)
        return high - low > self.balance_abs and high > self.balance_rel * low

    def choose(self, request: Request, view: RouterView) -> str:
        if self.is_imbalanced(view):
            return least_loaded(view.workers, view)
        best = best_match(view)
        if best > 0 and match_fraction(request, best) > self.cache_threshold:
            return least_loaded([w for w in view.workers if view.matched(w) == best], view)
        return least_loaded(view.workers, view)


@register_policy("dynamo")
class DynamoKvRouter:
    """NVIDIA Dynamo's KV router (docs "KV Cache Routing", `DefaultWorkerSelector`): lowest
    ``overlap_weight × prefill_blocks + active_decode_blocks``.

    - ``prefill_blocks`` = the request's blocks the worker does not hold (to be computed);
    - ``active_decode_blocks`` = blocks of requests in flight on the worker (outstanding
      prompt + declared output tokens / 16, rounded up) plus the blocks this request adds.
      Dynamo counts the new request's blocks that are not already active on the worker; the
      router cannot see which matched blocks are pinned by in-flight requests, so it counts
      the ones the worker lacks (its prefill blocks) and treats matched ones as resident.

    Ties go to the worker with the smaller cache usage, then worker order. With
    ``temperature > 0`` the worker is sampled from a softmax of the min–max-normalized costs,
    ``p ∝ exp(−normalized / temperature)`` (all equal → uniform), from a ``random.Random``
    seeded with `seed`. Defaults are Dynamo's: ``overlap_weight = 1.0``, ``temperature = 0``.

    Documented example: prefill 8/5/2 and decode 10/5/9 blocks → costs 18/10/11 → worker 2.
    """

    needs_ticket: ClassVar[bool] = False

    def __init__(self, overlap_weight: float = 1.0, temperature: float = 0.0, seed: int = 0):
        _check(overlap_weight >= 0, f"overlap_weight must be >= 0, got {overlap_weight}")
        _check(temperature >= 0, f"temperature must be >= 0, got {temperature}")
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self.rng = random.Random(seed)

    def prefill_blocks(self, request: Request, view: RouterView, worker: str) -> int:
        return max(0, request.num_blocks - view.matched(worker))

    def active_blocks(self, request: Request, view: RouterView, worker: str) -> int:
        in_flight = math.ceil(view.load(worker).tokens / BLOCK_SIZE)
        return in_flight + self.prefill_blocks(request, view, worker)

    def costs(self, request: Request, view: RouterView) -> dict[str, float]:
        return {
            w: self.overlap_weight * self.prefill_blocks(request, view, w)
            + self.active_blocks(request, view, w)
            for w in view.workers
        }

    def choose(self, request: Request, view: RouterView) -> str:
        costs = self.costs(request, view)
        if self.temperature > 0:
            return self._sample(costs)
        return min(view.workers, key=lambda w: (costs[w], view.load(w).kv_usage, worker_order(w)))

    def _sample(self, costs: dict[str, float]) -> str:
        workers = sorted(costs, key=worker_order)
        low, high = min(costs.values()), max(costs.values())
        span = high - low
        weights = [
            math.exp(-((costs[w] - low) / span) / self.temperature) if span > 0 else 1.0
            for w in workers
        ]
        point = self.rng.random() * sum(weights)
        for worker, weight in zip(workers, weights, strict=True):
            point -= weight
            if point < 0:
                return worker
        return workers[-1]


@register_policy("llmd")
class LlmdScorers:
    """llm-d inference scheduler's weighted scorers (prefix-cache 2, queue 1, KV-cache
    utilization 1, as DESIGN.md §7 lists them); highest total wins.

    - prefix: fraction of the request's blocks the worker holds, ``matched / num_blocks``;
    - queue: ``(maxQ − q) / (maxQ − minQ)`` over outstanding requests q, 1 when all equal;
    - KV utilization: ``1 − used_blocks / capacity_blocks`` as last reported.

    Ties (llm-d picks at random among them) go to the least loaded, then worker order. The
    usage here counts cached-but-evictable blocks too (the simulated cache evicts lazily), so
    once caches are warm the third scorer is near 0 everywhere and mostly breaks early ties.
    """

    needs_ticket: ClassVar[bool] = False

    def __init__(
        self, prefix_weight: float = 2.0, queue_weight: float = 1.0, kv_weight: float = 1.0
    ) -> None:
        for name, value in (
            ("prefix_weight", prefix_weight),
            ("queue_weight", queue_weight),
            ("kv_weight", kv_weight),
        ):
            _check(value >= 0, f"{name} must be >= 0, got {value}")
        self.prefix_weight = prefix_weight
        self.queue_weight = queue_weight
        self.kv_weight = kv_weight

    def scores(self, request: Request, view: RouterView) -> dict[str, float]:
        queues = {w: view.load(w).requests for w in view.workers}
        high, low = max(queues.values()), min(queues.values())
        scores = {}
        for w in view.workers:
            prefix = view.matched(w) / request.num_blocks if request.num_blocks else 0.0
            queue = (high - queues[w]) / (high - low) if high > low else 1.0
            kv = 1.0 - min(1.0, view.load(w).kv_usage)
            scores[w] = (
                self.prefix_weight * prefix + self.queue_weight * queue + self.kv_weight * kv
            )
        return scores

    def choose(self, request: Request, view: RouterView) -> str:
        scores = self.scores(request, view)
        top = max(scores.values())
        return least_loaded([w for w in view.workers if scores[w] == top], view)


@register_policy("preble")
class PrebleE2:
    """Preble's E2 scheduler (Srivatsa et al., "Preble: Efficient Distributed Prompt Scheduling
    for LLM Serving", ICLR 2025): exploit the holders of a long match, else explore by
    load + eviction + prefill cost, in ms.

    Exploit when the longest match covers more tokens than it leaves (``matched tokens >
    unmatched tokens``): among the workers holding that longest prefix, the lowest load.
    Otherwise explore: the worker minimizing ``load + eviction cost + prefill cost``, all in
    milliseconds of the latency model:

    - load = the router's estimate of the worker's outstanding work (`WorkerLoad.work_ms`).
      Preble sums the prefill and decode time of requests of a recent window; outstanding
      work is the same quantity for the requests that still matter;
    - prefill = ``latency.prefill_ms(blocks the worker lacks)``;
    - eviction = blocks this request would evict × ``prefill_per_block_ms``: it needs the
      blocks it lacks plus its output's slots; what exceeds the free slots last reported
      (``capacity − used``) evicts cached blocks, each assumed to cost one recomputation
      later. (Preble weights each evicted node by its hit count; the index keeps none, so
      the weight is 1.)

    Preble's post-assignment rebalancing and prefix autoscaling are not modelled. `latency`
    defaults to the router's model (`Router` fills it in).
    """

    needs_ticket: ClassVar[bool] = False

    def __init__(self, latency: LatencyModel | None = None) -> None:
        self.latency = latency

    @property
    def _latency(self) -> LatencyModel:
        return self.latency or LatencyModel()

    def prefill_ms(self, request: Request, view: RouterView, worker: str) -> float:
        return self._latency.prefill_ms(max(0, request.num_blocks - view.matched(worker)))

    def eviction_ms(self, request: Request, view: RouterView, worker: str) -> float:
        load = view.load(worker)
        if load.capacity_blocks <= 0:
            return 0.0  # capacity never reported: nothing known to evict
        needed = max(0, request.num_blocks - view.matched(worker))
        needed += expected_output_blocks(request, view)
        free = max(0, load.capacity_blocks - load.used_blocks)
        return max(0, needed - free) * self._latency.prefill_per_block_ms

    def explore_cost_ms(self, request: Request, view: RouterView, worker: str) -> float:
        return (
            view.load(worker).work_ms
            + self.eviction_ms(request, view, worker)
            + self.prefill_ms(request, view, worker)
        )

    def exploits(self, request: Request, view: RouterView) -> bool:
        matched_tokens = min(best_match(view) * BLOCK_SIZE, request.num_prompt_tokens)
        return matched_tokens > request.num_prompt_tokens - matched_tokens

    def choose(self, request: Request, view: RouterView) -> str:
        if self.exploits(request, view):
            best = best_match(view)
            holders = [w for w in view.workers if view.matched(w) == best]
            return min(holders, key=lambda w: (view.load(w).work_ms, *_load_key(view, w)))
        return min(
            view.workers,
            key=lambda w: (self.explore_cost_ms(request, view, w), *_load_key(view, w)),
        )


def _load_key(view: RouterView, worker: str) -> tuple:
    load = view.load(worker)
    return (load.requests, load.tokens, worker_order(worker))


def _ring_point(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


@register_policy("chwbl")
class BoundedLoadHashing:
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, SODA 2018) on
    the prompt's first blocks, as KubeAI's `PrefixHash` strategy routes LLM requests.

    The key is the chained hash of the first `prefix_blocks` blocks (it stands for that whole
    prefix); a shorter prompt hashes what it has, a prompt without a full block goes to the
    least loaded. Each worker has `replicas` points on a 64-bit ring; the request walks the
    ring clockwise from its key to the first worker whose outstanding requests, counting this
    one, stay within ``ceil(load_factor × (total outstanding + 1) / workers)``. Since that
    bound times the number of workers exceeds the total, some worker always qualifies.

    Defaults: load factor 1.25 and 256 points per worker (issue 6; KubeAI's
    ``meanLoadFactor: 125`` and ``replication: 256``). KubeAI hashes the first 100
    characters of the prompt, about 25 tokens, hence 2 blocks here. A short key keeps a
    conversation on one worker from its first turn on (a longer one changes once the history
    outgrows it); the load bound, not the key, stops hot prefixes from piling up.
    """

    needs_ticket: ClassVar[bool] = False

    def __init__(
        self, prefix_blocks: int = 2, load_factor: float = 1.25, replicas: int = 256
    ) -> None:
        _check(prefix_blocks >= 1, f"prefix_blocks must be >= 1, got {prefix_blocks}")
        _check(load_factor >= 1.0, f"load_factor must be >= 1, got {load_factor}")
        _check(replicas >= 1, f"replicas must be >= 1, got {replicas}")
        self.prefix_blocks = prefix_blocks
        self.load_factor = load_factor
        self.replicas = replicas
        self._rings: dict[tuple[str, ...], tuple[list[int], list[str]]] = {}

    def ring(self, workers: tuple[str, ...]) -> tuple[list[int], list[str]]:
        """Sorted ring points and the worker owning each; cached per set of live workers."""
        ring = self._rings.get(workers)
        if ring is None:
            pairs = sorted(
                (_ring_point(f"{w}#{i}".encode()), w) for w in workers for i in range(self.replicas)
            )
            ring = ([p for p, _ in pairs], [w for _, w in pairs])
            self._rings[workers] = ring
        return ring

    def load_bound(self, view: RouterView) -> int:
        total = sum(view.load(w).requests for w in view.workers)
        return math.ceil(self.load_factor * (total + 1) / len(view.workers))

    def key(self, request: Request) -> int:
        depth = min(self.prefix_blocks, request.num_blocks)
        return int.from_bytes(request.block_hashes[depth - 1][:8], "big")

    def choose(self, request: Request, view: RouterView) -> str:
        if request.num_blocks == 0:
            return least_loaded(view.workers, view)
        points, owners = self.ring(view.workers)
        bound = self.load_bound(view)
        start = bisect.bisect_left(points, self.key(request))
        seen: set[str] = set()
        for step in range(len(points)):
            worker = owners[(start + step) % len(points)]
            if worker in seen:
                continue
            if view.load(worker).requests + 1 <= bound:
                return worker
            seen.add(worker)
            if len(seen) == len(view.workers):
                break
        raise AssertionError("the load bound always admits a worker")

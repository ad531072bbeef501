"""Preble's global scheduler state: one prefix tree of every routed prompt, a sliding window of
per-prefix load, GPU allocations, simulated per-GPU eviction and post-assignment rebalancing.

A transcription of WukLab/preble@8e7906a3 (`preble/global_scheduler_with_time.py`,
`preble/global_lru_cache.py`, `preble/ttft_overload_detector.py`) onto kvqueue's requests:
a prompt is its chain of 16-token block hashes, so tree segments are runs of blocks and a
node's token counts are 16 × its blocks (a prompt's trailing partial block is left out).
Line numbers below are those files'. Times are the router's clock in ms.

Invariants: a node's `ref_counter[g]` counts the unfinished requests routed to GPU g whose
path passes through it; `allocated_tokens[g]` counts the tokens of nodes marked cached on g;
the window holds the (time, important node, leaf) of every request routed in the last
`WINDOW_MS`, and a node outside it has no allocation of its own.
"""

from __future__ import annotations

import heapq
import itertools
import statistics
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvqueue.gpu.hashing import BLOCK_SIZE, BlockHash

WINDOW_MS = 3 * 60_000.0  # SlidingWindowHistogram(window_duration=timedelta(minutes=3)), L199
HIGH_LOAD_THRESHOLD = 1.5  # L208
REBALANCING_CHAIN_LENGTH = 3  # L209
REBALANCE_AFTER_PER_GPU = 50  # handle_important_node_stealing: sum(per_gpu_load) >= 50·N, L378
MIN_COUNT_FOR_LOAD = 2  # current_allocation_per_gpu_with_atleast_min_load(2), L381
TPOT_PRIOR_MS = 150.0  # avg_topt_per_gpu seeded with 0.15 s, L195-197
TPOT_HISTORY = 200  # deque(maxlen=200), L195
DEFAULT_DECODE_TOKENS = 45  # sampling_params max_new_tokens default, L313
OVERLOAD_RATIO = 2.0  # ttft_overload_detector.py L60-63: second half ≥ 2 × first half

PrefillTime = Callable[[int, int], float]  # (extend tokens, context tokens) → ms


class Node:
    """A tree node: a run of blocks (`key`) under `parent`. Identity is the object."""

    __slots__ = (
        "cached_gpus",
        "children",
        "context_blocks",
        "depth",
        "key",
        "last_access",
        "parent",
        "ref_counter",
        "seq",
    )

    def __init__(self, key: tuple[BlockHash, ...], parent: Node | None, num_gpus: int, seq: int):
        self.key = key
        self.children: dict[BlockHash, Node] = {}
        self.parent = parent
        self.ref_counter = [0] * num_gpus
        self.last_access = 0.0
        self.cached_gpus: set[int] = set()
        self.context_blocks = 0
        self.depth = 0
        self.seq = seq  # creation order: a deterministic tie-break for heaps

    @property
    def num_tokens(self) -> int:
        return len(self.key) * BLOCK_SIZE

    @property
    def context_length(self) -> int:
        return self.context_blocks * BLOCK_SIZE

    @property
    def context_so_far(self) -> int:
        return self.context_length - self.num_tokens

    def is_large(self) -> bool:
        """Preble's "important" test: more tokens of its own than above it (L258-259)."""
        return self.num_tokens > self.context_so_far

    def lru_key(self) -> tuple:
        """`TreeNode.__lt__`: the whole ref-counter list first, then last access time."""
        return (tuple(self.ref_counter), self.last_access, self.seq)


@dataclass(slots=True)
class _Window:
    """`SlidingWindowHistogram`: per important node, over the requests of the window."""

    entries: deque[tuple[float, Node, Node]] = field(default_factory=deque)
    weight: dict[Node, int] = field(default_factory=lambda: defaultdict(int))  # Σ context length
    count: dict[Node, int] = field(default_factory=lambda: defaultdict(int))
    hit_tokens: dict[Node, int] = field(default_factory=lambda: defaultdict(int))
    prompt_tokens: dict[Node, int] = field(default_factory=lambda: defaultdict(int))
    miss_rate: dict[Node, float] = field(default_factory=dict)
    decode_tokens: dict[Node, int] = field(default_factory=dict)


class PrebleScheduler:
    """`GlobalSchedulerWithTime` with eviction and rebalancing on (as `server.py` L238 runs
    it). GPUs are numbered in worker order. `prefill_time(extend, context)` prices a
    prefill (Preble's fitted A6000 regression, the engine's own model here);
    `capacity_tokens` is each GPU's KV capacity (198,516 tokens upstream, L207).
    """

    def __init__(
        self, num_gpus: int, prefill_time: PrefillTime, capacity_tokens: int, upstream_argmin=False
    ):
        self.num_gpus = num_gpus
        self.prefill_time = prefill_time
        self.capacity_tokens = capacity_tokens
        self.upstream_argmin = upstream_argmin
        self._seq = itertools.count()
        self.root = Node((), None, num_gpus, next(self._seq))
        self.root.ref_counter = [1] * num_gpus
        self.nodes: list[Node] = [self.root]
        self.allocations: dict[Node, set[int]] = {}
        self.allocated_tokens = [0] * num_gpus
        self.cached_on: list[set[Node]] = [
            set() for _ in range(num_gpus)
        ]  # node.cached_gpus, by GPU
        self.window = _Window()
        self.per_gpu_load = [0] * num_gpus  # routed requests, never decremented
        self.tpot_ms = [deque([TPOT_PRIOR_MS], maxlen=TPOT_HISTORY) for _ in range(num_gpus)]
        self.ttfts: dict[tuple[Node, int], deque[tuple[float, float]]] = {}
        self.num_migrations = 0
        self.num_replications = 0

    # -- the tree (LPRadixCache) ----------------------------------------------------------
    def insert(self, chain: Sequence[BlockHash], now: float) -> tuple[Node, dict[Node, Node]]:
        """`LPRadixCache.insert`: the node where the chain ends, and {split child: new parent}."""
        splits: dict[Node, Node] = {}
        node, key, context, depth = self.root, tuple(chain), 0, 0
        while True:
            node.last_access = now
            if key and key[0] in node.children:
                child = node.children[key[0]]
                shared = _shared(child.key, key)
                if shared == len(child.key):
                    if shared == len(key):
                        return child, splits
                    node, key, context, depth = child, key[shared:], context + shared, depth + 1
                    continue
                parent = self._split(child, shared)
                splits[child] = parent
                node, key, context, depth = parent, key[shared:], context + shared, depth + 2
                continue
            if key:
                leaf = Node(key, node, self.num_gpus, next(self._seq))
                leaf.context_blocks = context + len(key)
                leaf.depth = depth + 1
                leaf.last_access = now
                node.children[key[0]] = leaf
                self.nodes.append(leaf)
                return leaf, splits
            return node, splits

    def _split(self, child: Node, at: int) -> Node:
        """`_split_node`: a new node holding `child`'s first `at` blocks, above it."""
        parent = child.parent
        assert parent is not None
        new = Node(child.key[:at], parent, self.num_gpus, next(self._seq))
        new.children = {child.key[at]: child}
        new.ref_counter = list(child.ref_counter)
        new.cached_gpus = set(child.cached_gpus)
        for gpu in new.cached_gpus:
            self.cached_on[gpu].add(new)
        new.depth = child.depth
        new.last_access = child.last_access
        new.context_blocks = parent.context_blocks + at
        parent.children[child.key[0]] = new
        child.key = child.key[at:]
        child.parent = new
        child.depth = new.depth + 1
        self.nodes.append(new)
        return new

    def find(self, chain: Sequence[BlockHash], now: float) -> Node:
        """`find_node`: the node where the chain ends (the path's access times refreshed)."""
        node, key = self.root, tuple(chain)
        while True:
            node.last_access = now
            if not key or key[0] not in node.children:
                return node
            child = node.children[key[0]]
            shared = _shared(child.key, key)
            assert shared == len(child.key), "a routed chain always ends at a node boundary"
            node, key = child, key[shared:]

    def important(self, node: Node) -> Node | None:
        """The nearest ancestor-or-self that is large (`get_important_node`)."""
        current: Node | None = node
        while current is not None and not current.is_large():
            current = current.parent
        return current

    def allocation_of(self, node: Node) -> set[int]:
        """`get_parent_gpu_allocation`: the nearest allocated ancestor-or-self; all GPUs."""
        current: Node | None = node
        while current is not None:
            allocation = self.allocations.get(current)
            if allocation:
                return allocation
            current = current.parent
        return set(range(self.num_gpus))

    # -- routing --------------------------------------------------------------------------
    def prepare(self, chain: Sequence[BlockHash], now: float) -> tuple[Node, Node | None]:
        """Insert the prompt (L318-322): (leaf, important node)."""
        leaf, splits = self.insert(chain, now)
        for child, parent in splits.items():  # handle_split_nodes_gpu_allocations
            if child in self.allocations:
                self.allocations[parent] = set(self.allocations[child])
        for child, parent in splits.items():  # handle_split_node_histogram
            if parent.is_large() and not child.is_large():
                self._rename(child, parent)
        return leaf, self.important(leaf)

    def exploits(self, leaf: Node) -> bool:
        """Cached (by some earlier request) longer than new: ``num_tokens < context_so_far``."""
        return leaf.num_tokens < leaf.context_so_far

    def min_load_cost(self, leaf: Node, gpus: Sequence[int]) -> int:
        """`calculate_min_load_cost` with eviction on: window load + eviction cost, argmin."""
        loads = self.allocation_costs()
        costs = [loads[g] + self.eviction_cost(leaf, g) for g in gpus]
        position = min(range(len(costs)), key=costs.__getitem__)
        return position if self.upstream_argmin else gpus[position]

    def commit(self, leaf: Node, important: Node | None, gpu: int, decode_tokens: int, now: float):
        """Record the choice (L333-347): allocation, ref counters, window, eviction, rebalancing."""
        current: Node | None = leaf
        while current is not None:  # update_gpu_allocation_for_parent (root included)
            self.allocations.setdefault(current, set()).add(gpu)
            current = current.parent
        current = leaf
        while current is not None:  # update_allocated_size
            current.ref_counter[gpu] += 1
            if gpu not in current.cached_gpus:
                self.allocated_tokens[gpu] += current.num_tokens
                current.cached_gpus.add(gpu)
                self.cached_on[gpu].add(current)
            current = current.parent
        if important is not None:
            self._window_add(now, important, leaf, decode_tokens)
        self.per_gpu_load[gpu] += 1
        self._handle_eviction(gpu)
        if important is not None and leaf.depth - important.depth < REBALANCING_CHAIN_LENGTH:
            self._rebalance(now)

    def finish(
        self,
        chain: Sequence[BlockHash],
        gpu: int,
        now: float,
        ttft_ms: float | None,
        tpot_ms: float | None,
        output_tokens: int,
    ) -> None:
        """`finish_request`: TTFT to the overload detector, ref counters down, TPOT kept."""
        node = self.find(chain, now)
        important = self.important(node)
        if ttft_ms is not None and important is not None:
            samples = self.ttfts.setdefault((important, gpu), deque())
            samples.append((now, ttft_ms))
            while samples and samples[0][0] < now - WINDOW_MS:
                samples.popleft()
        current: Node | None = node
        while current is not None and current is not self.root:
            current.ref_counter[gpu] -= 1
            assert current.ref_counter[gpu] >= 0
            current = current.parent
        if tpot_ms and output_tokens != 1:
            self.tpot_ms[gpu].append(tpot_ms)

    # -- the window's costs ---------------------------------------------------------------
    def _window_add(self, now: float, node: Node, leaf: Node, decode_tokens: int) -> None:
        w = self.window
        w.entries.append((now, node, leaf))
        w.weight[node] += leaf.context_length
        w.count[node] += 1
        w.decode_tokens[node] = decode_tokens
        w.hit_tokens[node] += leaf.context_length - leaf.num_tokens
        w.prompt_tokens[node] += leaf.context_length
        w.miss_rate[node] = 1 - w.hit_tokens[node] / w.prompt_tokens[node]
        start = now - WINDOW_MS
        while w.entries and w.entries[0][0] < start:
            _, old, old_leaf = w.entries.popleft()
            w.weight[old] -= old_leaf.context_length
            w.count[old] -= 1
            w.hit_tokens[old] -= old_leaf.context_length - old_leaf.num_tokens
            w.prompt_tokens[old] -= old_leaf.context_length
            if w.weight[old] <= 0:
                for table in (w.weight, w.count, w.miss_rate, w.hit_tokens, w.prompt_tokens):
                    table.pop(old, None)
                w.decode_tokens.pop(old, None)
                self.allocations[old] = set()  # out of the window, unallocated (L96)

    def _rename(self, old: Node, new: Node) -> None:
        """`rename_node`: a split made the new parent the important node of old's entries."""
        w = self.window
        if old not in w.weight:
            return
        for table in (w.weight, w.count, w.miss_rate, w.hit_tokens, w.prompt_tokens):
            if old in table:
                table[new] = table.pop(old)
        if old in w.decode_tokens:
            w.decode_tokens[new] = w.decode_tokens.pop(old)
        w.entries = deque((t, new if n is old else n, leaf) for t, n, leaf in w.entries)
        for gpu in self.allocations.get(old, ()):
            if (old, gpu) in self.ttfts:
                self.ttfts[(new, gpu)] = self.ttfts.pop((old, gpu))

    def prefill_cost(self, node: Node) -> float:
        """miss rate × count × prefill time, shared by the GPUs holding it (L149-150)."""
        w = self.window
        holders = len(self.allocations.get(node) or ()) or 1
        return (
            w.miss_rate[node]
            * w.count[node]
            * self.prefill_time(node.num_tokens, node.context_length)
            / holders
        )

    def node_cost(self, node: Node, gpu: int, tpot: float) -> float:
        """Prefill cost + active requests × output length × TPOT (L152-159)."""
        decode = node.ref_counter[gpu] * self.window.decode_tokens[node] * tpot
        return self.prefill_cost(node) + decode

    def allocation_costs(self, min_count: int = 0) -> list[float]:
        """`current_allocation_per_gpu` (`_with_atleast_min_load` with `min_count`)."""
        tpots = [statistics.median(t) for t in self.tpot_ms]
        costs = [0.0] * self.num_gpus
        w = self.window
        for node in w.weight:
            if w.count[node] < min_count:
                continue
            for gpu in self.allocations.get(node) or ():
                costs[gpu] += self.node_cost(node, gpu, tpots[gpu])
        return costs

    # -- simulated eviction ---------------------------------------------------------------
    def eviction_cost(self, leaf: Node, gpu: int) -> float:
        """`virtual_evict_for_routing`: evict as many tokens as the leaf's own, LRU on `gpu`
        (GPU memory assumed full), and price the large victims' recomputation (L161-167)."""
        victims = self._virtual_lru(leaf.num_tokens, gpu)
        w = self.window
        cost = 0.0
        for victim in victims:
            if victim.is_large():
                cost += (
                    w.miss_rate.get(victim, 1.0)
                    * w.count.get(victim, victim.ref_counter[gpu])
                    * self.prefill_time(victim.num_tokens, victim.context_length)
                )
        return cost

    def _virtual_lru(self, num_tokens: int, gpu: int) -> set[Node]:
        """`virtual_lru_eviction`: every node cached on `gpu`, least (ref counters, access)
        first; a parent joins once all its cached children went."""
        if num_tokens <= 0:
            return set()
        heap = [(n.lru_key(), n) for n in self.cached_on[gpu]]
        heapq.heapify(heap)
        evicted: set[Node] = set()
        num_evicted = 0
        while num_evicted < num_tokens and heap:
            _, node = heapq.heappop(heap)
            if node is self.root:
                break
            num_evicted += node.num_tokens
            evicted.add(node)
            parent = node.parent
            assert parent is not None
            if all(
                c is node or gpu not in c.cached_gpus or c in evicted
                for c in parent.children.values()
            ):
                heapq.heappush(heap, (parent.lru_key(), parent))
        return evicted

    def _handle_eviction(self, gpu: int) -> None:
        """`handle_eviction`: over capacity, unpinned nodes stop counting as cached on `gpu`."""
        if self.allocated_tokens[gpu] <= self.capacity_tokens:
            return
        to_evict = self.allocated_tokens[gpu] - self.capacity_tokens
        heap = []
        allocated = 0
        for node in self.cached_on[gpu]:  # collected_nodes_with_runtime_idx recounts
            allocated += node.num_tokens
            if node.ref_counter[gpu] == 0:
                heap.append((node.lru_key(), node))
        self.allocated_tokens[gpu] = allocated
        heapq.heapify(heap)
        num_evicted = 0
        while num_evicted < to_evict and heap:
            _, node = heapq.heappop(heap)
            if node is self.root:
                break
            if node.ref_counter[gpu] > 0 or gpu not in node.cached_gpus:
                continue
            self.allocated_tokens[gpu] -= node.num_tokens
            num_evicted += node.num_tokens
            node.cached_gpus.discard(gpu)
            self.cached_on[gpu].discard(node)
            parent = node.parent
            assert parent is not None
            if not any(gpu in c.cached_gpus for c in parent.children.values() if c is not node):
                heapq.heappush(heap, (parent.lru_key(), parent))

    # -- rebalancing (handle_important_node_stealing, L377-457) ---------------------------
    def _rebalance(self, now: float) -> None:
        if sum(self.per_gpu_load) < REBALANCE_AFTER_PER_GPU * self.num_gpus:
            return
        costs = self.allocation_costs(MIN_COUNT_FOR_LOAD)
        ranked = sorted(((g, costs[g]) for g in range(self.num_gpus)), key=lambda x: -x[1])
        self._rebalance_pairs(ranked, now)

    def _rebalance_pairs(self, ranked: list[tuple[int, float]], now: float) -> None:
        """The recursion of `handle_important_node_stealing_recursive` as a loop: the list
        keeps its order (updated costs in place), minus its head each round."""
        while len(ranked) > 1:
            larger, larger_cost = ranked[0]
            smaller, smaller_cost = ranked[-1]
            if larger_cost < HIGH_LOAD_THRESHOLD * smaller_cost:
                return
            tpot = statistics.median(self.tpot_ms[larger])
            w = self.window
            candidates = [
                (self.node_cost(node, larger, tpot), node.seq, node)
                for node in w.weight
                if larger in (self.allocations.get(node) or ())
                and node.is_large()
                and w.count[node] > 1
            ]
            heapq.heapify(candidates)
            if len(candidates) == 1:
                cost, _, node = candidates[0]
                cost /= 2
                overloaded = self.is_overloaded(node, larger, now)
                if smaller not in self.allocations[node] and overloaded:
                    larger_cost -= cost
                    smaller_cost += cost
                    self.allocations[node].add(smaller)
                    self.ttfts.pop((node, larger), None)
                    self.num_replications += 1
            else:
                while candidates:
                    cost, _, node = heapq.heappop(candidates)
                    if larger_cost - cost < smaller_cost + cost:
                        break
                    larger_cost -= cost
                    smaller_cost += cost
                    self._move_subtree(node, smaller)
                    self.num_migrations += 1
                    if larger_cost < HIGH_LOAD_THRESHOLD * smaller_cost:
                        break
            ranked[0] = (larger, larger_cost)
            ranked[-1] = (smaller, smaller_cost)
            ranked = ranked[1:]

    def _move_subtree(self, node: Node, gpu: int) -> None:
        """The node and all its descendants allocated to `gpu` alone (`update_children`)."""
        stack = [node]
        while stack:
            current = stack.pop()
            self.allocations[current] = {gpu}
            stack.extend(current.children.values())

    def is_overloaded(self, node: Node, gpu: int, now: float) -> bool:
        """`TTFTWindowedOverloadedDetector.is_node_overloaded`: over the window's TTFTs of
        (node, GPU), the newer half (since `now` − 1.5 min) averages at least twice the older."""
        samples = self.ttfts.get((node, gpu))
        if not samples:
            return False
        cutoff = now - WINDOW_MS / 2
        first = [v for t, v in samples if t < cutoff]
        second = [v for t, v in samples if t >= cutoff]
        if not first or not second:
            return False
        return sum(second) / len(second) >= OVERLOAD_RATIO * (sum(first) / len(first))


def _shared(a: tuple[BlockHash, ...], b: tuple[BlockHash, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n

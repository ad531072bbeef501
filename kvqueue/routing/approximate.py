"""The approximate prefix index: what the router itself routed, forgotten by its upstream's rules.

A *precise* index (`kvqueue.routing.index`) follows the workers' cache events. An
*approximate* one never hears from a GPU: when the router sends a request to worker w it
records the request's block chain as held by w, and forgets entries only by its own rules —
a time to live and a size cap — never because a GPU evicted them. So it keeps matching
blocks a busy GPU dropped long ago. This is how SGLang's gateway, llm-d's
``approx-prefix-cache-producer``, Dynamo with ``--no-kv-events`` and Preble route; each
forgets differently, and `ApproximateRules` names each upstream's rules (the constants below,
with their sources).

Entries are (worker, block) pairs kept per worker in recency order: recording a chain moves
its blocks to the most recent end, in an order chosen by `eviction_order`:

- ``"deepest_first"``: the chain's deepest block ends up least recent, so among blocks
  recorded together the deepest is forgotten first and a parent never before its children
  (SGLang evicts leaves only; Dynamo's prune heap breaks equal expiry by the highest sequence
  position). Holdings then stay prefix-closed, and `match` finds each worker's leading run by
  binary search.
- ``"insertion"``: blocks become recent in chain order, so the first block is forgotten
  first (llm-d adds a request's hashes to a golang-lru one by one). Holdings are then not
  prefix-closed and `match` walks the chain as llm-d does (`walk`).

What is forgotten, and when: entries older than `ttl_ms` (counted from their last recording);
then, if a worker's entries exceed `capacity_blocks` (``scope="worker"``; `capacity_from_gpu`
takes the worker's own block count when it registered one) or all workers' together do
(``scope="cluster"``), the least recent go until `prune_to` × the cap remain. With
`sweep_interval_ms` the cap is enforced only at multiples of that interval (SGLang's eviction
thread), else at every recording. Lookups never refresh an entry.

Invariant: a worker holds a block iff it is among that worker's entries; expired entries are
dropped before any read or write, so a read never counts one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from kvqueue.gpu.hashing import BLOCK_SIZE, BlockHash
from kvqueue.routing.index import leading_run

INDEX_MODES = ("precise", "approximate")
CHARS_PER_TOKEN = 4  # the estimate SGLang's and llm-d's character-based indexes assume

EvictionOrder = Literal["deepest_first", "insertion"]
Scope = Literal["worker", "cluster"]


def check_index_mode(mode: str) -> str:
    if mode not in INDEX_MODES:
        raise ValueError(f"unknown index mode {mode!r}; valid: {', '.join(INDEX_MODES)}")
    return mode


@dataclass(frozen=True, slots=True)
class ApproximateRules:
    """How an approximate index forgets (module docstring); `source` names the upstream."""

    source: str
    ttl_ms: float | None = None
    capacity_blocks: int | None = None
    capacity_from_gpu: bool = False
    scope: Scope = "worker"
    prune_to: float = 1.0
    sweep_interval_ms: float | None = None
    eviction_order: EvictionOrder = "deepest_first"
    max_match_blocks: int | None = None
    walk: bool = False

    def __post_init__(self) -> None:
        if self.ttl_ms is not None and not self.ttl_ms > 0:
            raise ValueError(f"ttl_ms must be positive, got {self.ttl_ms}")
        if self.capacity_blocks is not None and self.capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {self.capacity_blocks}")
        if not 0 < self.prune_to <= 1:
            raise ValueError(f"prune_to must be in (0, 1], got {self.prune_to}")
        if self.sweep_interval_ms is not None and not self.sweep_interval_ms > 0:
            raise ValueError(f"sweep_interval_ms must be positive, got {self.sweep_interval_ms}")
        if self.max_match_blocks is not None and self.max_match_blocks < 1:
            raise ValueError(f"max_match_blocks must be >= 1, got {self.max_match_blocks}")

    def to_wire(self) -> str:
        """The one argument the Redis scripts take: ``ttl|cap|scope|prune_to|sweep|order|
        max|walk|from_gpu`` (ms and blocks; empty = none)."""

        def text(value: float | int | None) -> str:
            return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

        return "|".join(
            [
                text(self.ttl_ms),
                text(self.capacity_blocks),
                self.scope,
                text(self.prune_to),
                text(self.sweep_interval_ms),
                self.eviction_order,
                text(self.max_match_blocks),
                "1" if self.walk else "0",
                "1" if self.capacity_from_gpu else "0",
            ]
        )

    def describe(self) -> str:
        """One line for reports: ``TTL 120 s, 1,048,576 blocks over all workers, …``."""
        parts = []
        if self.ttl_ms is not None:
            parts.append(f"TTL {self.ttl_ms / 1000:g} s")
        if self.capacity_from_gpu:
            parts.append("per worker as many blocks as its GPU")
        elif self.capacity_blocks is not None:
            where = "per worker" if self.scope == "worker" else "over all workers"
            parts.append(f"{self.capacity_blocks:,} blocks {where}")
        if self.prune_to < 1:
            parts.append(f"pruned to {self.prune_to:g} of the cap")
        if self.sweep_interval_ms is not None:
            parts.append(f"swept every {self.sweep_interval_ms / 1000:g} s")
        if self.max_match_blocks is not None:
            parts.append(f"first {self.max_match_blocks} blocks matched")
        return ", ".join(parts) or "never forgets"


# -- each upstream's rules ----------------------------------------------------------------------
# SGLang gateway (`sglang_router.launch_router` / `sgl-model-gateway` CLI defaults:
# sgl-project/sglang@e46dcd87:sgl-router/py_src/sglang_router/router_args.py,
# eviction_interval_secs = 120, max_tree_size = 2**26): a per-worker budget of characters,
# trimmed LRU-leaf-first by a thread every 120 s (sgl-project/sglang@24ce7f6c:
# sgl-model-gateway/src/policies/tree.rs `evict_tenant_by_size`). 2**26 characters at 4 per
# token are 2**20 16-token blocks.
SGLANG_MAX_TREE_CHARS = 2**26
SGLANG_TREE = ApproximateRules(
    source="sgl-project/sglang@24ce7f6c:sgl-model-gateway/src/policies/tree.rs",
    capacity_blocks=SGLANG_MAX_TREE_CHARS // (CHARS_PER_TOKEN * BLOCK_SIZE),
    sweep_interval_ms=120_000.0,
)
# Dynamo `ApproxKvIndexer` (`--no-kv-events`): router_ttl_secs = 120, router_max_tree_size =
# 2**20 blocks over the whole tree, router_prune_target_ratio = 0.8
# (ai-dynamo/dynamo@870abbd1:lib/kv-router/src/config.rs; pruning in
# ai-dynamo/dynamo@209c9e83:lib/kv-router/src/approx.rs `PruneManager`).
DYNAMO_APPROX = ApproximateRules(
    source="ai-dynamo/dynamo@209c9e83:lib/kv-router/src/approx.rs",
    ttl_ms=120_000.0,
    capacity_blocks=2**20,
    scope="cluster",
    prune_to=0.8,
)
# llm-d `approx-prefix-cache-producer` defaults (llm-d/llm-d-inference-scheduler@520af478:
# pkg/epp/framework/plugins/requestcontrol/dataproducer/approximateprefix/types.go): autoTune
# on, so the block size is the engine's (16) and each pod's LRU holds as many entries as the
# pod has GPU blocks (plugin.go `makeserver`); 256 blocks matched at most; hashes added in
# chain order to a golang-lru (indexer.go `Add`), lookups do not refresh.
LLMD_APPROX = ApproximateRules(
    source="llm-d/llm-d-inference-scheduler@520af478:pkg/epp/framework/plugins/"
    "requestcontrol/dataproducer/approximateprefix/plugin.go",
    capacity_blocks=31_250,  # defaultLRUCapacityPerServer, when the GPU's count is unknown
    capacity_from_gpu=True,
    eviction_order="insertion",
    max_match_blocks=256,
    walk=True,
)
# The same producer with autoTune off, or before it existed: the Gateway API Inference
# Extension's prefix plugin (kubernetes-sigs/gateway-api-inference-extension@00913f92:
# pkg/epp/scheduling/framework/plugins/multi/prefix/plugin.go, `DefaultLRUCapacityPerServer`
# = 31,250 entries per pod, sized for Llama 3 8B on an H100 whatever the pod's GPU).
LLMD_FIXED_LRU = dataclasses.replace(
    LLMD_APPROX,
    source="kubernetes-sigs/gateway-api-inference-extension@00913f92:pkg/epp/scheduling/"
    "framework/plugins/multi/prefix/plugin.go",
    capacity_from_gpu=False,
)
# Preble: one global token tree whose per-GPU copies are evicted LRU once a GPU's allocated
# tokens exceed its capacity (WukLab/preble@8e7906a3:preble/global_scheduler_with_time.py
# `handle_eviction`, L273-278; the capacity, 198,516 tokens there, is the GPU's own here).
PREBLE_TREE = ApproximateRules(
    source="WukLab/preble@8e7906a3:preble/global_scheduler_with_time.py",
    capacity_from_gpu=True,
)
# Policies with no upstream approximate index of their own get Dynamo's: a TTL and a size cap.
DEFAULT_APPROXIMATE = DYNAMO_APPROX


class RoutedIndex:
    """An approximate prefix index under `ApproximateRules` (module docstring).

    `clock` returns milliseconds and never goes back (virtual time in the simulator).
    `record` costs O(chain length); `match` O(workers × log chain) with ``walk=False``,
    O(chain × workers) with it.
    """

    def __init__(self, rules: ApproximateRules, clock: Callable[[], float] | None = None) -> None:
        self.rules = rules
        self._clock = clock or (lambda: time.monotonic() * 1000.0)
        # worker → block → (recorded ms, depth); least recent first.
        self._entries: dict[str, OrderedDict[BlockHash, tuple[float, int]]] = {}
        self._gpu_blocks: dict[str, int] = {}
        self._next_sweep_ms = rules.sweep_interval_ms

    # -- writes --------------------------------------------------------------------------
    def set_capacity(self, worker: str, num_blocks: int) -> None:
        """The worker's GPU holds `num_blocks` (used when `capacity_from_gpu`)."""
        self._gpu_blocks[worker] = num_blocks

    def record(self, worker: str, block_hashes: Sequence[BlockHash]) -> None:
        """The router sent a request with this chain (parent first) to `worker`."""
        now = self._clock()
        self._forget_due(now)
        entries = self._entries.get(worker)
        if entries is None:
            entries = self._entries[worker] = OrderedDict()
        chain = list(enumerate(block_hashes))
        if self.rules.eviction_order == "deepest_first":
            chain.reverse()
        move = entries.move_to_end
        for depth, block in chain:
            entries[block] = (now, depth)
            move(block)
        if self.rules.sweep_interval_ms is None:
            self._enforce_caps()

    def forget(self, worker: str) -> None:
        """Drop everything recorded for `worker` (it left the cluster)."""
        self._entries.pop(worker, None)

    # -- reads ---------------------------------------------------------------------------
    def match(self, block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        """{worker: matched blocks} for every worker that matches at least one block."""
        self._forget_due(self._clock())
        limit = self.rules.max_match_blocks
        chain = block_hashes if limit is None else block_hashes[:limit]
        if not chain:
            return {}
        if self.rules.walk:
            return self._walk(chain)
        matched = {}
        for worker, entries in self._entries.items():
            length = leading_run(chain, entries.__contains__)
            if length:
                matched[worker] = length
        return matched

    def _walk(self, chain: Sequence[BlockHash]) -> dict[str, int]:
        """llm-d's `matchLongestPrefix`: every worker holding block i scores one; the walk
        stops at the first block no worker holds (so a score need not be a leading run)."""
        counts: dict[str, int] = {}
        holders_of = self._entries.items()
        for block in chain:
            holders = [worker for worker, entries in holders_of if block in entries]
            if not holders:
                break
            for worker in holders:
                counts[worker] = counts.get(worker, 0) + 1
        return counts

    def size(self, worker: str) -> int:
        """Blocks recorded for `worker` (its "tree size")."""
        entries = self._entries.get(worker)
        return len(entries) if entries is not None else 0

    def holds(self, worker: str) -> set[BlockHash]:
        entries = self._entries.get(worker)
        return set(entries) if entries is not None else set()

    # -- forgetting ----------------------------------------------------------------------
    def _forget_due(self, now: float) -> None:
        ttl = self.rules.ttl_ms
        if ttl is not None:
            for entries in self._entries.values():
                while entries:
                    block, (recorded, _) = next(iter(entries.items()))
                    if recorded + ttl > now:
                        break
                    del entries[block]
        interval = self.rules.sweep_interval_ms
        if interval is not None and self._next_sweep_ms is not None and now >= self._next_sweep_ms:
            # Nothing changed since the last operation, so one sweep stands for all missed.
            self._enforce_caps()
            self._next_sweep_ms += interval * (
                1 + math.floor((now - self._next_sweep_ms) / interval)
            )

    def _cap(self, worker: str) -> int | None:
        rules = self.rules
        if rules.capacity_from_gpu and worker in self._gpu_blocks:
            return self._gpu_blocks[worker]
        return rules.capacity_blocks

    def _enforce_caps(self) -> None:
        rules = self.rules
        if rules.scope == "worker":
            for worker, entries in self._entries.items():
                cap = self._cap(worker)
                if cap is not None and len(entries) > cap:
                    target = int(cap * rules.prune_to)
                    while len(entries) > target:
                        entries.popitem(last=False)
            return
        cap = rules.capacity_blocks
        total = sum(len(e) for e in self._entries.values())
        if cap is None or total <= cap:
            return
        target = int(cap * rules.prune_to)
        while total > target:
            # The globally least recent entry; equal times: the deepest first.
            oldest = min(
                (e for e in self._entries.values() if e),
                key=lambda e: _oldest_key(e),
            )
            oldest.popitem(last=False)
            total -= 1


def _oldest_key(entries: OrderedDict[BlockHash, tuple[float, int]]) -> tuple[float, int]:
    recorded, depth = next(iter(entries.values()))
    return recorded, -depth

"""What a routing policy may look at: the live workers, their prefix matches and their loads."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kvqueue.gpu.hashing import BlockHash


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """One worker as the router accounts it.

    `requests`, `tokens` (prompt + declared output) and `work_ms` (the router's estimate of
    their service time, see `kvqueue.routing.router.estimate_service_ms`) cover outstanding work:
    queued and running. `used_blocks`/`capacity_blocks` are the cache occupancy the worker
    last reported (after its last request ended). `elapsed_ms` is how long the request at
    the head of the worker's queue has been in service, as the router saw it start (at its
    commit to an idle worker, or at the previous completion); 0 when idle.

    The engine's own load signals, as a serving engine exports them
    (`kvqueue.gpu.load_signals.LoadSignals`, after vLLM's metrics): `num_running` and
    `num_waiting` requests, `engine_kv_usage` (fraction of KV blocks pinned by running
    requests: evictable cached blocks count as free, unlike `kv_usage`) and
    `num_queued_prefill_tokens`. The simulator fills them from each worker's engine at the
    moment of the decision; a live batched worker publishes them at most every
    `kvqueue.live.batched_serving.SIGNALS_INTERVAL_S` and whenever requests join or leave its
    batch; where a worker publishes none (the live sequential worker, whose queue is RQ's)
    they keep their defaults, 0.

    `engine_reported` says whether those four come from the worker's engine (else they are
    the defaults and mean nothing). `since_token_ms` is the time since the worker's last
    output token the router saw (a first token or a request's end, both step boundaries of
    a batched engine); None before any.

    From the router's own records of what it has in flight (`kvqueue.routing.active`, as
    Dynamo's router keeps them): `active_prefill_tokens`, the uncached prompt tokens of the
    worker's requests that have no first token yet (`active_prefilling` of them), and
    `active_blocks`, the distinct full prompt blocks of its unfinished requests.
    `indexed_blocks` is how many blocks the index (precise or approximate, whichever the
    router reads) holds for the worker.
    """

    requests: int = 0
    tokens: int = 0
    work_ms: float = 0.0
    used_blocks: int = 0
    capacity_blocks: int = 0
    elapsed_ms: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    engine_kv_usage: float = 0.0
    num_queued_prefill_tokens: int = 0
    active_prefill_tokens: int = 0
    active_blocks: int = 0
    indexed_blocks: int = 0
    active_prefilling: int = 0
    engine_reported: bool = False
    since_token_ms: float | None = None

    @property
    def kv_usage(self) -> float:
        return self.used_blocks / self.capacity_blocks if self.capacity_blocks else 0.0


NO_LOAD = WorkerLoad()  # a worker the view has no figures for (immutable, so shared)


@dataclass(frozen=True, slots=True)
class RouterView:
    """What a policy may look at. `workers` is the live workers in worker order.

    `matched_blocks` comes from the index the router reads, `index_mode` says which:
    ``"precise"`` (the workers' cache events plus pending marks) or ``"approximate"`` (what
    the router itself routed, `kvqueue.routing.approximate`). `active_matched_blocks` is the
    leading run of the request's blocks among each worker's active blocks (`WorkerLoad`).
    `now_ms` is the router's clock (virtual ms in the simulator). `blocks_since_use(w, block)`
    is how many blocks w has allocated since a request using `block` last ended there
    (`kvqueue.routing.recency`; None if none did, or if the router keeps no such record).
    `since_use_along(w, chain)` answers the same for every position of a chain; a router
    that keeps the record as runs gives it as `release_ages`, read in one walk per chain.
    The in-memory router computes these and `active_matched_blocks` when a policy reads
    them, from its records as they are then: read them while choosing, before the commit.
    """

    workers: tuple[str, ...]
    matched_blocks: Mapping[str, int]
    loads: Mapping[str, WorkerLoad]
    ticket: int = 0
    mean_output_tokens: float | None = None  # over completed requests so far; None before any
    declared_share: float | None = None  # of routed requests, share declaring max_tokens
    index_mode: str = "precise"
    active_matched_blocks: Mapping[str, int] = field(default_factory=dict)
    now_ms: float = 0.0
    blocks_since_use: Callable[[str, BlockHash], int | None] = field(
        default=lambda worker, block: None, repr=False, compare=False
    )
    release_ages: Callable[[str, Sequence[BlockHash]], Callable[[int], int | None]] | None = field(
        default=None, repr=False, compare=False
    )

    def load(self, worker: str) -> WorkerLoad:
        return self.loads.get(worker, NO_LOAD)

    def matched(self, worker: str) -> int:
        return self.matched_blocks.get(worker, 0)

    def active_matched(self, worker: str) -> int:
        return self.active_matched_blocks.get(worker, 0)

    def since_use_along(
        self, worker: str, block_hashes: Sequence[BlockHash]
    ) -> Callable[[int], int | None]:
        """Position i of `block_hashes` → ``blocks_since_use(worker, block_hashes[i])``."""
        if self.release_ages is not None:
            return self.release_ages(worker, block_hashes)
        since = self.blocks_since_use
        return lambda position: since(worker, block_hashes[position])


@functools.lru_cache(maxsize=4_096)
def worker_order(worker: str) -> tuple:
    """Natural order: worker-2 before worker-10. Memoized: policies sort by it per decision."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", worker))

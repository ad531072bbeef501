"""What a simulated worker needs from the simulation it runs in, and the request it carries.

A worker driver (`SequentialWorker`, `BatchedWorker`) advances one engine in virtual time; the
simulation owns the router state and the results. The driver reports back through this
protocol: cache events (to the router's index), the end of a request's load (to the router's
accounting) and the request's result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kvqueue.gpu.cache import BlockCache
from kvqueue.gpu.engine_stats import EngineStats
from kvqueue.gpu.events import CacheEvent
from kvqueue.gpu.load_signals import LoadSignals
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestStatus
from kvqueue.routing.router import Decision


@dataclass(slots=True)
class Queued:
    """A routed request: where its result goes (`position` in the input) and its decision."""

    position: int
    request: Request
    decision: Decision


class SimulationHost(Protocol):
    def apply_events(self, worker: str, events: Sequence[CacheEvent]) -> None: ...

    def first_token(self, worker: str, item: Queued, at_ms: float) -> None:
        """The request's first token comes out at `at_ms` (now or, known ahead, later)."""

    def release_load(
        self, worker: str, item: Queued, used_blocks: int, output_tokens: int | None
    ) -> None:
        """The request no longer counts in `worker`'s load (`output_tokens` None: unserved)."""

    def record(
        self,
        item: Queued,
        worker: str,
        capacity_blocks: int,
        status: RequestStatus,
        **fields: object,
    ) -> None:
        """The request's one result."""


class WorkerDriver(Protocol):
    """One simulated GPU in virtual time. The simulation calls `on_event(t)` exactly at
    `next_event_ms()`, `catch_up(t)` before it routes a request arriving at t, and
    `submit(item, t)` for a request routed to this worker at t; times never decrease."""

    name: str
    stats: EngineStats

    def next_event_ms(self) -> float | None: ...

    def on_event(self, now: float) -> None: ...

    def catch_up(self, now: float) -> None: ...

    def submit(self, item: Queued, now: float) -> None: ...

    def signals(self) -> LoadSignals: ...


def end_unserved(
    host: SimulationHost,
    worker: str,
    cache: BlockCache,
    item: Queued,
    now: float,
    status: RequestStatus,
    reason: str,
) -> None:
    """A request the worker never served (rejected, failed) ends at `now`: its load is
    released and its result recorded with zero latencies and the reason."""
    host.release_load(worker, item, cache.num_used_slots, None)
    host.record(
        item,
        worker,
        cache.num_blocks,
        status,
        reason=reason,
        start_ms=now,
        finish_ms=now,
        cache_used_blocks=cache.num_used_slots,
    )


def forward_events(host: SimulationHost, worker: str, cache: BlockCache) -> None:
    """Hand the cache's new events to the router's index (none: nothing to do)."""
    events = cache.take_events()
    if events:
        host.apply_events(worker, events)

"""The virtual-time simulator: the live pipeline's components around a discrete-event loop.

Nothing here models a GPU, a cache or a policy: each worker is an engine (`SimulatedGpu`, the
sequential one the live KV worker drives, or `BatchedGpu`) advanced by a driver
(`kvqueue.sim.sequential_worker`, `kvqueue.sim.batched_worker`, which state each engine's
timing rules), the router is `Router` over an `InMemoryRouterState` whose index is fed by the
caches' own events, and the policy comes from the registry. This module only decides *when*
things happen, in virtual milliseconds.

Semantics (the live worker's, so a parity test can compare the two exactly):

- A request arrives at its `arrival_ms`. At that instant the router decides and commits
  (pending marks on the chosen worker, outstanding load raised) and the request joins that
  worker's queue. Requests are taken in order of `arrival_ms`; equal arrival times keep their
  list order.
- Each worker has at most one pending event (a request or a step finishing); events run in
  time order, ties in worker order. When a request ends its load is released and its result
  recorded.
- Order of simultaneous events at time t: first every worker event at t (in worker order),
  each followed by whatever that worker starts at t; then every arrival at t (in list order),
  each routed, queued and — if its worker is idle — started at t before the next arrival is
  routed. So an arrival at t sees the loads and the cache events of everything that ended or
  started at t. Before each routing decision every worker catches up to t (a batched worker
  in a decode run performs the allocations of the steps begun by t), so the router's index
  and the engines' load signals (`RouterView`'s `WorkerLoad`) are exact at t.

Invariant: every request ends with exactly one result (completed, rejected or failed); the
results come back in the order of the input list.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvqueue.errors import ConfigError
from kvqueue.gpu.batched_gpu import BatchedGpu
from kvqueue.gpu.engine_stats import EngineStats
from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.events import CacheEvent
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.load_signals import LoadSignals
from kvqueue.gpu.oracle import DecodeLengthOracle, FallbackOracle
from kvqueue.gpu.presets import Preset, get_preset
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.gpu.simulated_gpu import SimulatedGpu
from kvqueue.routing.engine_model import EngineModel
from kvqueue.routing.policies.base import approximate_rules, make_policy, resolve_index_mode
from kvqueue.routing.router import Router
from kvqueue.routing.state import InMemoryRouterState
from kvqueue.sim.batched_worker import BatchedWorker
from kvqueue.sim.host import Queued, WorkerDriver
from kvqueue.sim.sequential_worker import SequentialWorker

DEFAULT_STRATEGIES = ("cache_aware", "round_robin", "least_loaded")
DEFAULT_PENDING_TTL_MS = 30_000.0  # the live router's default (Settings.pending_ttl_s = 30)
DEFAULT_RUN_ID = "sim"

ProgressCallback = Callable[[int], None]


def worker_names(num_workers: int) -> list[str]:
    """The live pipeline's worker ids: ``worker-0`` … ``worker-<n-1>``."""
    if num_workers < 1:
        raise ConfigError(f"need at least one worker, got {num_workers}")
    return [f"worker-{i}" for i in range(num_workers)]


@dataclass(frozen=True, slots=True)
class SimulationRun:
    """One strategy's simulated run: a result per request (input order) and, per worker, what
    its engine did (`EngineStats`)."""

    results: list[RequestResult]
    engine_stats: dict[str, EngineStats]


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the event loop.

    The loop allocates millions of small acyclic objects (cached blocks, heap entries, index
    sets) that reference counting frees; each automatic collection would rescan every live
    object (the requests' block hashes included) for nothing. Measured: ~28% of the run time
    on the Mooncake trace. Reference counting still frees everything as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Simulation:
    """One strategy on fresh workers, caches and router state, driven in virtual time.

    Invariants: `now` never decreases; every request put in gets exactly one result; each
    worker has at most one live event in the heap. Use `run` once per instance.
    `token_times` (batched engine) collects every output token's time per request id.

    `strategy` is a policy name, optionally with the index it reads (``"llmd:approximate"``);
    without one, `index_mode` if given, else the policy's upstream default. The router is told
    the engines' model (`EngineModel`) built from the same engine, preset and latency.
    """

    def __init__(
        self,
        strategy: str,
        num_workers: int,
        preset: Preset | None = None,
        latency: LatencyModel | None = None,
        oracle: DecodeLengthOracle | None = None,
        run_id: str = DEFAULT_RUN_ID,
        pending_ttl_ms: float = DEFAULT_PENDING_TTL_MS,
        engine: EngineConfig | None = None,
        token_times: dict[str, list[float]] | None = None,
        index_mode: str | None = None,
    ) -> None:
        preset = preset or get_preset()
        latency = latency or LatencyModel()
        oracle = oracle or FallbackOracle()
        engine = engine or EngineConfig()
        engine.check(preset)
        self.strategy = strategy
        self.run_id = run_id
        self.engine = engine
        self.now = 0.0
        names = worker_names(num_workers)
        policy_name, self.index_mode = resolve_index_mode(strategy, index_mode)
        policy = make_policy(policy_name)
        self.state = InMemoryRouterState(
            names,
            clock=self._clock,
            pending_ttl_ms=pending_ttl_ms,
            signals=self._signals,
            index_mode=self.index_mode,
            approximate=approximate_rules(policy),
        )
        self.router = Router(self.state, policy, latency, EngineModel.of(engine, preset, latency))
        # Worker index = position in the router's worker order, used to break event ties.
        self.workers: list[WorkerDriver] = [
            self._make_worker(name, preset, latency, oracle, engine, token_times) for name in names
        ]
        for name in names:  # as a live worker does on start
            self.state.register_capacity(name, preset.num_blocks)
        self._by_name = {w.name: i for i, w in enumerate(self.workers)}
        self._events: list[tuple[float, int, int]] = []  # (time, worker index, version)
        self._versions = [0] * len(self.workers)
        self._pending: list[float | None] = [None] * len(self.workers)
        self._results: list[RequestResult | None] = []
        self._progress: ProgressCallback | None = None

    def _make_worker(
        self,
        name: str,
        preset: Preset,
        latency: LatencyModel,
        oracle: DecodeLengthOracle,
        engine: EngineConfig,
        token_times: dict[str, list[float]] | None,
    ) -> WorkerDriver:
        if engine.is_batched:
            gpu = BatchedGpu(preset, oracle, engine.scheduler_config(preset))
            cost = engine.step_cost(preset, latency)
            return BatchedWorker(name, gpu, cost, self, engine.fast_forward, token_times)
        pricing = engine.sequential_pricing(preset)
        return SequentialWorker(name, SimulatedGpu(preset, latency, oracle, pricing), self)

    def _clock(self) -> float:
        return self.now

    def _signals(self, worker: str) -> LoadSignals:
        return self.workers[self._by_name[worker]].signals()

    def run(
        self, requests: Sequence[Request], progress: ProgressCallback | None = None
    ) -> list[RequestResult]:
        """Simulate `requests` to the end; one result per request, in input order.

        `progress(n)` is called with the number of requests that just ended.
        """
        self._progress = progress
        self._results = [None] * len(requests)
        arrivals = sorted(range(len(requests)), key=lambda i: requests[i].arrival_ms)
        events = self._events
        catching_up = self.engine.is_batched
        with _cyclic_gc_paused():
            for position in arrivals:
                request = requests[position]
                arrival = request.arrival_ms
                while events and events[0][0] <= arrival:
                    self._next_event()
                self.now = max(self.now, arrival)
                if catching_up:
                    for worker in self.workers:
                        worker.catch_up(self.now)
                self._arrive(position, request)
            while events:
                self._next_event()
        missing = [requests[i].request_id for i, r in enumerate(self._results) if r is None]
        assert not missing, f"requests without a result: {missing[:5]}"
        return list(self._results)  # type: ignore[arg-type]

    def engine_stats(self) -> dict[str, EngineStats]:
        return {worker.name: worker.stats for worker in self.workers}

    # -- events --------------------------------------------------------------------------
    def _arrive(self, position: int, request: Request) -> None:
        decision = self.router.route(request)
        self.router.commit(request, decision)
        index = self._by_name[decision.worker]
        self.workers[index].submit(Queued(position, request, decision), self.now)
        self._reschedule(index)

    def _next_event(self) -> None:
        time_ms, index, version = heapq.heappop(self._events)
        if version != self._versions[index]:
            return  # superseded: the worker's next event moved
        self._pending[index] = None
        self.now = time_ms
        self.workers[index].on_event(time_ms)
        self._reschedule(index)

    def _reschedule(self, index: int) -> None:
        """Put the worker's next event on the heap if it changed."""
        time_ms = self.workers[index].next_event_ms()
        if time_ms == self._pending[index]:
            return
        self._versions[index] += 1
        self._pending[index] = time_ms
        if time_ms is not None:
            heapq.heappush(self._events, (time_ms, index, self._versions[index]))

    # -- the host protocol (kvqueue.sim.host) ---------------------------------------------
    def apply_events(self, worker: str, events: Sequence[CacheEvent]) -> None:
        self.state.apply_events(worker, events)

    def first_token(self, worker: str, item: Queued, at_ms: float) -> None:
        self.state.first_token(worker, item.request.request_id, at_ms)

    def release_load(
        self, worker: str, item: Queued, used_blocks: int, output_tokens: int | None
    ) -> None:
        self.state.complete(
            worker,
            item.decision.load_tokens,
            item.decision.estimated_ms,
            used_blocks=used_blocks,
            output_tokens=output_tokens,
            request_id=item.request.request_id,
        )

    def record(
        self,
        item: Queued,
        worker: str,
        capacity_blocks: int,
        status: RequestStatus,
        **fields: object,
    ) -> None:
        request = item.request
        assert self._results[item.position] is None, f"{request.request_id} ended twice"
        result = self._results[item.position] = RequestResult(
            request_id=request.request_id,
            run_id=self.run_id,
            worker=worker,
            strategy=self.strategy,
            status=status,
            arrival_ms=request.arrival_ms,
            num_prompt_tokens=request.num_prompt_tokens,
            num_blocks=request.num_blocks,
            cache_capacity_blocks=capacity_blocks,
            **fields,  # type: ignore[arg-type]
        )
        self.router.finished(request, result, self.now)
        if self._progress is not None:
            self._progress(1)


def simulate(
    requests: Sequence[Request],
    strategy: str,
    num_workers: int,
    preset: Preset | None = None,
    latency: LatencyModel | None = None,
    oracle: DecodeLengthOracle | None = None,
    run_id: str = DEFAULT_RUN_ID,
    pending_ttl_ms: float = DEFAULT_PENDING_TTL_MS,
    progress: ProgressCallback | None = None,
    engine: EngineConfig | None = None,
    index_mode: str | None = None,
) -> list[RequestResult]:
    """Run one strategy on `num_workers` fresh simulated GPUs; one result per request, in order.

    See the module docstring for the event semantics. An unknown strategy raises
    `ConfigError` listing the valid ones. `simulate_run` also returns the engines' statistics.
    """
    simulation = Simulation(
        strategy, num_workers, preset, latency, oracle, run_id, pending_ttl_ms, engine,
        index_mode=index_mode,
    )  # fmt: skip
    return simulation.run(requests, progress)


def simulate_run(
    requests: Sequence[Request],
    strategy: str,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> SimulationRun:
    """`simulate` (same keyword `options`), also returning each worker's `EngineStats`."""
    simulation = Simulation(strategy, **options)
    results = simulation.run(requests, progress)
    return SimulationRun(results, simulation.engine_stats())

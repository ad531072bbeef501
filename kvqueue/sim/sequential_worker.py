"""The sequential engine in virtual time: one request at a time, FIFO (the seed's worker).

Starting a request at t calls `SimulatedGpu.start` (lookup, allocation with eviction, prefill
and decode priced) and hands its cache events to the router's index at t; it finishes at
t + prefill + decode, when `finish` releases its blocks and the worker starts its next queued
request at once. A request the GPU can never serve (`RequestRejected`) ends when it would have
started, with status "rejected", its reason and zero latencies, and the worker moves straight
on at the same instant; any other domain error ends it as "failed" the same way.
"""

from __future__ import annotations

from collections import deque

from kvqueue.errors import KVQueueError, RequestRejected
from kvqueue.gpu.engine_stats import EngineStats
from kvqueue.gpu.load_signals import LoadSignals
from kvqueue.gpu.results import RequestStatus
from kvqueue.gpu.simulated_gpu import Execution, SimulatedGpu
from kvqueue.sim.host import Queued, SimulationHost, end_unserved, forward_events


class SequentialWorker:
    """A `SimulatedGpu` and its FIFO queue. `running` is set from start to finish."""

    def __init__(self, name: str, gpu: SimulatedGpu, host: SimulationHost) -> None:
        self.name = name
        self.gpu = gpu
        self.host = host
        self.stats = EngineStats()
        self.queue: deque[Queued] = deque()
        self.running: Queued | None = None
        self.execution: Execution | None = None
        self.start_ms = 0.0
        self.finish_ms: float | None = None
        self.cache_used_blocks = 0
        self._queued_prompt_tokens = 0

    def next_event_ms(self) -> float | None:
        return self.finish_ms

    def catch_up(self, now: float) -> None:
        """Nothing to do: a sequential worker's state changes only at its events."""

    def signals(self) -> LoadSignals:
        cache = self.gpu.cache
        return LoadSignals(
            num_running=0 if self.running is None else 1,
            num_waiting=len(self.queue),
            kv_usage=cache.kv_usage,
            num_queued_prefill_tokens=self._queued_prompt_tokens,
        )

    def submit(self, item: Queued, now: float) -> None:
        self.queue.append(item)
        self._queued_prompt_tokens += item.request.num_prompt_tokens
        if self.running is None:
            self._start_next(now)

    def on_event(self, now: float) -> None:
        """The running request finishes at `now`; the next queued one starts."""
        item, execution = self.running, self.execution
        assert item is not None and execution is not None
        gpu = self.gpu
        gpu.finish(execution)
        self.host.release_load(self.name, item, gpu.cache.num_used_slots, execution.decode_tokens)
        # Release emits nothing today (eviction is lazy); drained so the index never lags.
        self._apply_events()
        self.host.record(
            item,
            self.name,
            gpu.cache.num_blocks,
            RequestStatus.COMPLETED,
            start_ms=self.start_ms,
            finish_ms=now,
            cache_used_blocks=self.cache_used_blocks,
            **execution.result_fields(self.start_ms - item.request.arrival_ms),
        )
        stats = self.stats
        stats.record_gap_series(
            execution.first_token_gap_ms, execution.gap_growth_ms, execution.decode_tokens, 1
        )
        stats.record_kv_usage(now, self.gpu.cache.kv_usage)
        self.running = self.execution = None
        self.finish_ms = None
        self._start_next(now)

    def _start_next(self, now: float) -> None:
        """Start the next queued request now; skip past any that end at once."""
        gpu = self.gpu
        while self.queue:
            item = self.queue.popleft()
            self._queued_prompt_tokens -= item.request.num_prompt_tokens
            try:
                execution = gpu.start(item.request)
            except RequestRejected as exc:
                self._end_unserved(item, now, RequestStatus.REJECTED, exc.reason)
                continue
            except KVQueueError as exc:
                self._end_unserved(item, now, RequestStatus.FAILED, str(exc))
                continue
            self._apply_events()
            self.running, self.execution = item, execution
            self.start_ms = now
            self.cache_used_blocks = gpu.cache.num_used_slots
            self.finish_ms = now + execution.service_ms
            self.host.first_token(self.name, item, now + execution.prefill_ms)
            # One prefill step, then one step per output token, each of a single request.
            self.stats.record_steps(1 + execution.decode_tokens, 1, execution.service_ms)
            self.stats.record_kv_usage(now, self.gpu.cache.kv_usage)
            return

    def _end_unserved(self, item: Queued, now: float, status: RequestStatus, reason: str) -> None:
        self._apply_events()  # a refused start changes nothing, but never lag the index
        end_unserved(self.host, self.name, self.gpu.cache, item, now, status, reason)

    def _apply_events(self) -> None:
        forward_events(self.host, self.name, self.gpu.cache)

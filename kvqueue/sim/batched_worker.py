"""The batched engine in virtual time: the scheduler's steps, priced and laid end to end.

Semantics (`kvqueue.gpu.scheduler` decides what each step does):

- A request routed to the worker at t joins the scheduler's waiting queue at t (or ends at
  once as "rejected" if it can never fit). An idle worker schedules a step at t; a busy one
  considers the request at its next step boundary.
- A step scheduled at t ends at t + `step_ms(shape)`; its cache events (prompt blocks stored
  at scheduling, evictions) reach the router's index at t. At its end, tokens are sampled,
  finished requests release their blocks and end, and the next step is scheduled at once —
  before any request arriving at that same instant is routed.
- Times of a request: queue wait = first admission − arrival; TTFT = end of the step that
  computes its last prompt token (that step emits the first token) − arrival; e2e = end of
  the step emitting its last token − arrival; prefill = TTFT − queue wait; decode = e2e −
  TTFT; TPOT = (finish − first token) / (output tokens − 1).

**Fast-forward.** When the scheduler can promise a decode run (every running request
decoding, admission blocked, nobody finishing or preempting before its last step), the worker
jumps over it instead of stepping — a run costs its planning and the KV slots it allocates,
not its number of steps: step s of a run starting at T0 begins at
``S_s = T0 + s·d0 + δ·s(s−1)/2`` (d0 the first step's time, δ = β_kv × batch, as the summed
context grows by the batch each step). The run is cut short when a request arrives
(the steps already begun still run; the new request waits for the next boundary), and before
any routing decision `catch_up(t)` performs the KV allocations of the steps begun by t, so the
router's index and the load signals are what single steps would show. Per-token times equal
single stepping's up to floating-point rounding (`tests/test_fast_forward.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvqueue.errors import KVQueueError, RequestRejected
from kvqueue.gpu.batched_gpu import BatchedGpu, completed_fields
from kvqueue.gpu.engine_stats import EngineStats
from kvqueue.gpu.load_signals import LoadSignals
from kvqueue.gpu.results import RequestStatus
from kvqueue.gpu.scheduler import DecodeRun, EngineRequest, ScheduledStep, StepOutcome
from kvqueue.gpu.step_cost import StepCost
from kvqueue.sim.host import Queued, SimulationHost, end_unserved, forward_events


@dataclass(slots=True)
class _Timing:
    """The driver's record of one request (the scheduler's `EngineRequest.tag`)."""

    item: Queued
    admitted_ms: float | None = None
    first_token_ms: float | None = None
    last_token_ms: float = 0.0
    cache_used_blocks: int = 0


class BatchedWorker:
    """A `BatchedGpu` driven in virtual time (module docstring).

    `token_times`, when given, collects every output token's emission time per request id
    (for tests; it costs one entry per token).
    """

    def __init__(
        self,
        name: str,
        gpu: BatchedGpu,
        cost: StepCost,
        host: SimulationHost,
        fast_forward: bool = True,
        token_times: dict[str, list[float]] | None = None,
    ) -> None:
        self.name = name
        self.gpu = gpu
        self.scheduler = gpu.scheduler
        self.cost = cost
        self.host = host
        self.fast_forward = fast_forward
        self.token_times = token_times
        self.stats = EngineStats()
        self.step: ScheduledStep | None = None
        self.run: DecodeRun | None = None
        self.start_ms = 0.0
        self.end_ms: float | None = None
        # The current run: first step's time, growth per step, steps begun (allocated).
        self._first_ms = 0.0
        self._growth_ms = 0.0
        self._begun = 0

    # -- the driver protocol ---------------------------------------------------------------
    def next_event_ms(self) -> float | None:
        return self.end_ms

    def signals(self) -> LoadSignals:
        return self.scheduler.signals()

    def submit(self, item: Queued, now: float) -> None:
        try:
            self.gpu.submit(item.request, _Timing(item))
        except RequestRejected as exc:
            self._end_unserved(item, now, RequestStatus.REJECTED, exc.reason)
            return
        except KVQueueError as exc:
            self._end_unserved(item, now, RequestStatus.FAILED, str(exc))
            return
        if self.end_ms is None:
            self._start(now)
        elif self.run is not None:
            self._cut_run(now)

    def catch_up(self, now: float) -> None:
        """Perform the KV allocations of the current run's steps begun by `now`."""
        run = self.run
        if run is None:
            return
        begun = self._steps_begun_by(now)
        if begun > self._begun:
            self.scheduler.advance_run(run, begun)
            self._begun = begun
            self._apply_events()
            self.stats.record_kv_usage(now, self.gpu.cache.kv_usage)

    def on_event(self, now: float) -> None:
        """The current step (or run) ends at `now`; the next one is scheduled at once."""
        if self.run is not None:
            self._end_run(now)
        else:
            self._end_step(now)
        self._start(now)

    # -- steps -----------------------------------------------------------------------------
    def _start(self, now: float) -> None:
        scheduler = self.scheduler
        empty_steps = 0
        while scheduler.has_work:
            if self.fast_forward and self._start_run(now):
                return
            step = scheduler.schedule()
            self._apply_events()
            self.stats.num_preemptions += len(step.preempted)
            for request in step.admitted:
                timing: _Timing = request.tag
                if timing.admitted_ms is None:
                    timing.admitted_ms = now
                    timing.cache_used_blocks = self.gpu.cache.num_used_slots
            if not step.chunks:
                # Only when the last running request preempted itself: the next step admits.
                empty_steps += 1
                assert empty_steps < 2, f"{self.name}: the scheduler made no progress at {now}"
                continue
            duration = self.cost.step_ms(step.shape)
            self.step = step
            self.start_ms = now
            self.end_ms = now + duration
            self.stats.record_steps(1, len(step.chunks), duration)
            self.stats.record_kv_usage(now, self.gpu.cache.kv_usage)
            return
        self.step = None
        self.end_ms = None
        self.stats.record_kv_usage(now, self.gpu.cache.kv_usage)

    def _end_step(self, now: float) -> None:
        step = self.step
        assert step is not None
        self.step = None
        outcome = self.scheduler.complete(step)
        for request in outcome.first_tokens:
            request.tag.first_token_ms = now
            self.host.first_token(self.name, request.tag.item, now)
        same_gap = 0  # tokens whose previous one came out of the previous step
        for request in outcome.sampled:
            timing: _Timing = request.tag
            if request.num_output > 1:
                if timing.last_token_ms == self.start_ms:
                    same_gap += 1
                else:
                    self.stats.record_gap(now - timing.last_token_ms)
            timing.last_token_ms = now
            if self.token_times is not None:
                self.token_times.setdefault(request.request.request_id, []).append(now)
        self.stats.record_gap(now - self.start_ms, same_gap)
        self._end_finished(outcome, now)

    # -- decode runs -----------------------------------------------------------------------
    def _start_run(self, now: float) -> bool:
        run = self.scheduler.plan_decode_run()
        if run is None:
            return False
        cost = self.cost
        self.run = run
        self.start_ms = now
        self._first_ms = (
            cost.decode_base_ms(run.batch) + cost.decode_context_ms * run.decode_context
        )
        self._growth_ms = cost.decode_context_ms * run.batch
        self.end_ms = now + self._run_ms(run.num_steps)
        self._begun = 1  # the first step begins now
        self.scheduler.advance_run(run, 1)
        self._apply_events()
        self.stats.record_kv_usage(now, self.gpu.cache.kv_usage)
        return True

    def _run_ms(self, num_steps: int) -> float:
        """Time of the current run's first `num_steps` steps."""
        return num_steps * self._first_ms + self._growth_ms * num_steps * (num_steps - 1) / 2

    def _steps_begun_by(self, now: float) -> int:
        """How many of the run's steps begin at or before `now` (S_s ≤ now)."""
        run = self.run
        assert run is not None
        elapsed = now - self.start_ms
        first, growth = self._first_ms, self._growth_ms
        if growth > 0:
            b = first - growth / 2
            guess = int((-b + math.sqrt(b * b + 2 * growth * elapsed)) / growth)
        elif first > 0:
            guess = int(elapsed / first)
        else:
            return run.num_steps
        last = min(max(guess, 0), run.num_steps - 1)  # the last step begun, give or take one
        while last + 1 < run.num_steps and self._run_ms(last + 1) <= elapsed:
            last += 1
        while last > 0 and self._run_ms(last) > elapsed:
            last -= 1
        return last + 1

    def _cut_run(self, now: float) -> None:
        """A request arrived: keep the steps begun by now, decide again at the next boundary."""
        run = self.run
        assert run is not None
        self.catch_up(now)
        if self._begun < run.num_steps:
            self.scheduler.cut_run(run, self._begun)
            self.end_ms = self.start_ms + self._run_ms(self._begun)

    def _end_run(self, now: float) -> None:
        run = self.run
        assert run is not None
        self.run = None
        steps, batch = run.num_steps, run.batch
        outcome = self.scheduler.complete_run(run)
        self._apply_events()
        stats = self.stats
        stats.record_steps(steps, batch, self._run_ms(steps))
        first_end = self.start_ms + self._first_ms
        same_gap = 0
        for request in run.requests:
            timing: _Timing = request.tag
            if timing.last_token_ms == self.start_ms:
                same_gap += 1
            else:
                stats.record_gap(first_end - timing.last_token_ms)
            timing.last_token_ms = now
            if self.token_times is not None:
                times = self.token_times.setdefault(request.request.request_id, [])
                times.extend(self.start_ms + self._run_ms(s) for s in range(1, steps + 1))
        stats.record_gap(self._first_ms, same_gap)
        stats.record_gap_series(self._first_ms + self._growth_ms, self._growth_ms, steps - 1, batch)
        self._end_finished(outcome, now)

    # -- requests that end -----------------------------------------------------------------
    def _end_finished(self, outcome: StepOutcome, now: float) -> None:
        cache = self.gpu.cache
        for request in outcome.finished:
            self._apply_events()
            item = request.tag.item
            self.host.release_load(self.name, item, cache.num_used_slots, request.num_output)
            self._record_completed(request, now)
        self.stats.record_kv_usage(now, self.gpu.cache.kv_usage)

    def _record_completed(self, request: EngineRequest, now: float) -> None:
        timing: _Timing = request.tag
        item = timing.item
        assert timing.admitted_ms is not None and timing.first_token_ms is not None
        self.host.record(
            item,
            self.name,
            self.gpu.cache.num_blocks,
            RequestStatus.COMPLETED,
            cache_used_blocks=timing.cache_used_blocks,
            **completed_fields(
                request, item.request.arrival_ms, timing.admitted_ms, timing.first_token_ms, now
            ),
        )

    def _end_unserved(self, item: Queued, now: float, status: RequestStatus, reason: str) -> None:
        end_unserved(self.host, self.name, self.gpu.cache, item, now, status, reason)

    def _apply_events(self) -> None:
        forward_events(self.host, self.name, self.gpu.cache)

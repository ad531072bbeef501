"""The batched engine in a live KV worker: RQ's jobs in, steps on the wall clock, results out.

`BatchedServing.serve(job)` takes over when RQ's work loop hands the KV worker a job, and
gives control back once the engine is idle and the worker's queue is empty. Meanwhile it
drives the worker's `BatchedGpu` — the scheduler the simulator drives
(`kvqueue.gpu.scheduler`), here on the wall clock — one step at a time:

1. **Boundary.** One round trip (MULTI/EXEC) ends the requests the last step finished (their
   results, load records, cache events and RQ jobs) and takes every job queued for the
   worker since (`TAKE_QUEUED`, non-blocking): a taken job waits in the engine, its id on
   the queue's intermediate list, where RQ's own dequeue leaves one.
2. **Accept.** Each taken job joins the scheduler's waiting queue; a request that can never
   fit ends at once, `rejected` with the reason; a `cache_snapshot` job is answered; a job
   that is not kvqueue's, or unreadable, fails in RQ with the reason.
3. **Schedule** (`BatchScheduler.schedule`): running requests first, then admissions.
4. **Admit.** For the requests admitted for the first time, one read-only round trip checks
   that each has no result yet and is still on this worker's intermediate list (a reaper
   may have moved it); a second counts them started in kvqueue's ledger (`START_JOB`) and in
   RQ (an execution in the StartedJobRegistry, status `started`), with the step's cache
   events and load signals.
5. **Run.** Sleep until the step's end — the previous step's end + `step_ms` × time scale:
   steps lie end to end, a boundary's work hidden in the step it precedes unless it takes
   longer (then the step starts late). Then `complete`: tokens sampled at the step's end,
   finished requests released; back to 1.

Times (simulated ms) follow the simulator's rules (`kvqueue.sim.batched_worker`) on the wall
clock ÷ the run's time scale: a request arrives when its producer enqueued it; it is admitted
at the start of the step that first schedules it (queue wait); its first token comes at the
end of the step that computes its last prompt token (TTFT); it ends with the step that
samples its last token (e2e). A step's time scale is its oldest request's.

RQ's view stays true: a job is `queued` until taken, waits on the intermediate list while the
engine holds it unadmitted, is `started` from its admission (StartedJobRegistry, `rq info`:
the worker is busy), and `finished` (return value: the request's status and worker) or
`failed` when its request ends — RQ's per-job bookkeeping, in `kvqueue.live.rq_jobs`. While
it serves, the loop sends RQ's heartbeats (worker and every execution) each
`job_monitoring_interval`; RQ's maintenance waits until the worker is idle again, so that no
one fails a job waiting on the intermediate list as stuck.

Every request ends with exactly one result (`docs/reliability.md`):
- warm shutdown (SIGTERM): no job is taken or admitted any more; the started requests —
  running or preempted — finish, then the worker hands over the rest (waiting in the engine,
  or queued), which moves on as any queued job of a stopping worker;
- a killed worker's started requests fail ("worker X died ... while serving it"); its taken,
  unadmitted ones are on its intermediate list with unstarted records: the reaper reroutes
  them as queued ones, or a process restarted under the name first puts them back at the
  head of its queue (`REQUEUE_TAKEN`, at start);
- a request that already has a result when admitted (its producer gave up) leaves the engine
  after the step, its load released and its RQ job finished with None; one no longer on the
  intermediate list leaves silently (it is another worker's now);
- a Redis outage: every round trip is repeated until Redis answers (every write is safe to
  repeat); jobs taken by an attempt whose reply was lost are read back from the intermediate
  list at the next boundary;
- another process registered the name (superseded): every request leaves the engine, the
  started ones fail in RQ, and the worker stops.

Load signals (`LoadSignals`) go to `kvq:signals` in the boundaries' round trips: whenever
requests joined or left the batch, else at most every `SIGNALS_INTERVAL_S` of wall time.
What the engine did in each run goes to the run's engine log (`kvqueue.live.engine_log`).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rq.job import Job
from rq.worker import BaseWorker, WorkerStatus

from kvqueue.errors import KVQueueError, RequestRejected
from kvqueue.gpu.batched_gpu import BatchedGpu, completed_fields
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.gpu.scheduler import EngineRequest, ScheduledStep
from kvqueue.live.engine_log import EngineLog
from kvqueue.live.jobs import (
    CLEAR_FUNCTION,
    SNAPSHOT_FUNCTION,
    JobContext,
    JobRefused,
    refusal,
)
from kvqueue.live.retry import execute_through_outages
from kvqueue.live.rq_jobs import ConcurrentJobs, Taken
from kvqueue.live.runtime import GpuRuntime, scaled_ms
from kvqueue.routing.membership import StartStatus

log = logging.getLogger(__name__)

SIGNALS_INTERVAL_S = 0.05  # wall seconds between load-signal reports when the batch is steady

Write = Callable[[Any], None]  # adds commands to the next round trip's pipeline


@dataclass(slots=True, eq=False)
class LiveRequest:
    """A request the engine holds and its RQ job (the scheduler's `EngineRequest.tag`).

    Times are wall seconds (epoch). `started`: counted in kvqueue's ledger and RQ as in
    service. `leaving`: leaves the engine after the current step with no result of ours.
    """

    job: Job
    context: JobContext
    engine: EngineRequest | None = None
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    cache_used_blocks: int = 0
    started: bool = False
    leaving: bool = False


@dataclass(slots=True)
class ServingTimes:
    """Where the serving loop's wall time went: `sleep_s` emulating steps, the rest working
    (RQ and Redis round trips, scheduling); `late_steps` began after their nominal start."""

    steps: int = 0
    wall_s: float = 0.0
    sleep_s: float = 0.0
    round_trips: int = 0
    late_steps: int = 0

    def info(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "serving_wall_s": round(self.wall_s, 6),
            "serving_sleep_s": round(self.sleep_s, 6),
            "round_trips": self.round_trips,
            "late_steps": self.late_steps,
        }


@dataclass(slots=True)
class _Owed:
    """What the next round trip owes Redis besides the cache events and the signals."""

    writes: list[Write] = field(default_factory=list)
    runs_ended: set[str] = field(default_factory=set)  # runs whose engine log to report
    batch_changed: bool = False


class BatchedServing:
    """A `GpuRuntime` whose GPU is a `BatchedGpu`, served for `worker` (module docstring).

    Invariants: a request is in `held` from its acceptance until it ends or leaves, and the
    scheduler holds exactly the engine requests of `held`; a started request's job has an
    execution in `jobs`; a step's cache events are published before the step sleeps.
    """

    def __init__(
        self,
        worker: BaseWorker,
        runtime: GpuRuntime,
        jobs: ConcurrentJobs,
        stop_requested: Callable[[], bool],
    ) -> None:
        gpu = runtime.gpu
        if not isinstance(gpu, BatchedGpu):
            raise TypeError(f"{runtime.name} runs the {runtime.engine} engine, not batched")
        self.worker = worker
        self.runtime = runtime
        self.jobs = jobs
        self.gpu = gpu
        self.scheduler = gpu.scheduler
        self.cost = runtime.step_cost
        self.stop_requested = stop_requested
        self.engine_log = EngineLog(runtime.name, runtime.prefix, runtime.settings.run_ttl_s)
        self.times = ServingTimes()
        self.held: dict[str, LiveRequest] = {}  # job id -> request, accepted and not ended
        self._owed = _Owed()
        self._resync = False  # a TAKE_QUEUED reply may have been lost: read the whole list
        # Taken jobs from a cache clear on, waiting until every request before it has ended.
        self._deferred: list[Taken] = []
        self._signals_at = 0.0  # monotonic time of the last signals report
        self._heartbeat_at = time.monotonic()
        self._usage_at_start = 0.0  # KV usage once the current step was scheduled

    # -- the loop ------------------------------------------------------------------------
    def serve(self, first: Job) -> None:
        """Serve `first` and everything queued after it, until nothing is left to serve."""
        began = time.monotonic()
        self._set_state(WorkerStatus.BUSY)
        try:
            self._loop(first)
        except Exception as exc:  # a bug, or Redis refusing a command: end what is held
            log.exception("%s: batched serving failed", self.runtime.name)
            self._fail_everything(f"{type(exc).__name__}: {exc}")
        finally:
            self.times.wall_s += time.monotonic() - began
            runtime = self.runtime
            runtime.serving_info = self.times.info()
            runtime._retry(runtime._write_info, "info")
            self._set_state(WorkerStatus.IDLE)

    def _loop(self, first: Job) -> None:
        taken: list[Taken] = [Taken(first.id, first)]
        end = time.time()  # the current boundary: the end of the last step (or now)
        start = end
        step: ScheduledStep | None = None
        while True:
            with self.runtime._lock:
                if step is not None:
                    self._complete(step, start, end)
                stopping = self.stop_requested()
                taken += self._round_trip(take=not stopping)[0]
                taken, self._deferred = self._deferred + taken, []
                self._accept(taken, end)
                taken = []
                if stopping:
                    self._drop_unadmitted()
                step = self._schedule(end)
                if step is None:
                    if self._resync and not stopping:
                        continue  # a lost reply may have taken jobs: read them back first
                    if self._deferred and not self.held and not stopping:
                        continue  # drained: the cache clear waiting for it goes first
                    self._round_trip(take=False)
                    return
                if not self._admit(step):
                    return  # superseded
                duration_ms = self.cost.step_ms(step.shape)
                scale = step.chunks[0].request.tag.context.time_scale
            start = end
            if scale > 0:
                end = self._sleep_until(start + duration_ms * scale / 1000.0)
            else:  # no emulation: steps take no time
                end = time.time()
            self.times.steps += 1

    def _sleep_until(self, target: float) -> float:
        """Sleep until `target` (wall seconds): the step's end, or now if already late."""
        remaining = target - time.time()
        if remaining <= 0:
            self.times.late_steps += remaining < 0
            return max(target, time.time())
        before = time.monotonic()
        time.sleep(remaining)
        self.times.sleep_s += time.monotonic() - before
        return target

    # -- round trips -------------------------------------------------------------------
    def _round_trip(
        self, take: bool, starting: list[LiveRequest] | None = None
    ) -> tuple[list[Taken], list[StartStatus]]:
        """One MULTI/EXEC: what is owed (endings, cache events, signals, RQ heartbeats, the
        engine log), `START_JOB` and RQ's start for `starting`, and with `take` every job
        newly queued. Returns the jobs taken and the start statuses. Nothing owed, nothing
        sent."""
        runtime = self.runtime
        pipe = runtime.client.pipeline(transaction=True)
        owed, self._owed = self._owed, _Owed()
        for write in owed.writes:
            write(pipe)
        starts = []
        for live in starting or ():
            starts.append(len(pipe))
            runtime.membership.start_job(
                runtime.name, runtime.generation, live.job.id, live.context.record(), pipe
            )
            self.jobs.start(live.job, pipe)
        events = self.gpu.take_events()
        if events:
            runtime.index.publish_events(runtime.name, events, pipeline=pipe)
        now = time.monotonic()
        if owed.batch_changed or (take and now - self._signals_at >= SIGNALS_INTERVAL_S):
            runtime.state.publish_signals(runtime.name, self.scheduler.signals(), pipeline=pipe)
            self._signals_at = now
        if now - self._heartbeat_at >= self.worker.job_monitoring_interval:
            self.jobs.heartbeat(pipe)
            self._heartbeat_at = now
        if owed.runs_ended:
            self.engine_log.report(owed.runs_ended, pipe)
            runtime.serving_info = self.times.info()
            runtime._write_info(pipe)
        take_at = len(pipe)
        if take:
            self.jobs.take_queued(pipe, everything=self._resync)
        if not len(pipe):
            return [], []
        pipe.transaction = len(pipe) > 1  # a lone TAKE_QUEUED needs no MULTI/EXEC
        replies, retried = execute_through_outages(pipe, f"{runtime.name}: step", log)
        self.times.round_trips += 1
        statuses = [StartStatus(_text(replies[i])) for i in starts]
        if not take:
            return [], statuses
        self._resync = retried
        taken = self.jobs.taken(replies[take_at])
        waiting = {t.job_id for t in self._deferred}
        return [t for t in taken if t.job_id not in self.held and t.job_id not in waiting], statuses

    # -- accept --------------------------------------------------------------------------
    def _accept(self, taken: Sequence[Taken], now: float) -> None:
        """Admit each taken job to the engine in queue order, or answer it (a snapshot, a
        refusal). A cache clear waits until every request accepted before it has ended —
        it and every job behind it are deferred until then — so that no block is in use."""
        jobs, writes = self.jobs, self._owed.writes
        for position, item in enumerate(taken):
            job = item.job
            if job is None:  # its hash is gone: RQ's own dequeue skips such an id
                writes.append(lambda pipe, i=item.job_id: jobs.forget(i, pipe))
                continue
            reason = refusal(job)
            if reason is not None:
                log.error("%s: %s", self.runtime.name, reason)
                error = _error_line(JobRefused(reason))
                writes.append(lambda pipe, j=job, r=error: jobs.fail(j, r, pipe))
                continue
            if job.func_name == SNAPSHOT_FUNCTION:
                reply = self.runtime.snapshot_reply()
                writes.append(lambda pipe, j=job, r=reply: jobs.finish(j, r, pipe))
                continue
            if job.func_name == CLEAR_FUNCTION:
                if self.held:
                    self._deferred = list(taken[position:])
                    return
                cleared = self.runtime.clear_cache()
                writes.append(lambda pipe, j=job, r=cleared: jobs.finish(j, r, pipe))
                continue
            try:
                context = JobContext.from_wire(job.args[0])
            except Exception as exc:  # a kvqueue job whose payload is not what it sends
                error = _error_line(exc)
                writes.append(lambda pipe, j=job, r=error: jobs.fail(j, r, pipe))
                continue
            live = LiveRequest(job, context)
            try:
                live.engine = self.gpu.submit(context.request, live)
            except RequestRejected as rejection:
                self._end_unserved(live, RequestStatus.REJECTED, rejection.reason, now)
                continue
            except KVQueueError as exc:
                self._end_unserved(live, RequestStatus.FAILED, str(exc), now)
                continue
            self.held[job.id] = live
            self._owed.batch_changed = True

    def _drop_unadmitted(self) -> None:
        """Warm shutdown: requests never admitted leave the engine; their jobs stay on the
        intermediate list, unstarted, for the hand-over."""
        for job_id, live in list(self.held.items()):
            if not live.started and live.engine is not None:
                self.scheduler.abort(live.engine)
                del self.held[job_id]
                self._owed.batch_changed = True

    # -- schedule and admit --------------------------------------------------------------
    def _schedule(self, start: float) -> ScheduledStep | None:
        """The next step (None when the engine has no work); admissions stamped `start`."""
        scheduler = self.scheduler
        for _ in range(2):  # a step is empty only when its last running request preempted itself
            if not scheduler.has_work:
                return None
            step = scheduler.schedule()
            if step.admitted or step.preempted:
                self._owed.batch_changed = True
            for request in step.admitted:
                live: LiveRequest = request.tag
                if live.admitted_at is None:
                    live.admitted_at = start
                    live.cache_used_blocks = self.gpu.cache.num_used_slots
            if step.chunks:
                self._usage_at_start = scheduler.signals().kv_usage
                return step
        raise AssertionError(f"{self.runtime.name}: the scheduler made no progress")

    def _admit(self, step: ScheduledStep) -> bool:
        """Check and count the step's first admissions (module docstring, 4.) and publish the
        step's cache events and signals. False when this process was superseded."""
        runtime = self.runtime
        newly = [r.tag for r in step.admitted if not r.tag.started]
        counted: list[LiveRequest] = []
        if newly:
            pipe = runtime.client.pipeline(transaction=False)
            for live in newly:
                context = live.context
                runtime.results.reported(context.run_id, [context.request.request_id], pipe)
                pipe.lpos(self.jobs.intermediate_key, live.job.id)
            replies, _ = execute_through_outages(pipe, f"{runtime.name}: admissions", log)
            self.times.round_trips += 1
            for i, live in enumerate(newly):
                (reported,), position = replies[2 * i], replies[2 * i + 1]
                if position is None:  # taken back by a reaper, or handed to a successor
                    live.leaving = True
                elif reported:
                    live.leaving = True
                    self._owed.writes.append(
                        lambda pipe, j=live.job: self._release_reported(j, pipe)
                    )
                    log.info("%s: %s already has a result; not served", runtime.name, live.job.id)
                else:
                    counted.append(live)
        while True:
            _, statuses = self._round_trip(take=False, starting=counted)
            lost = []
            for live, status in zip(counted, statuses, strict=True):
                if status is StartStatus.SUPERSEDED:
                    self._superseded()
                    return False
                if status is StartStatus.LOST:
                    lost.append(live)
                    continue
                live.started = True
                runtime._in_service.add(live.job.id)
            if not lost:
                return True
            runtime.register("Redis lost its registration")
            counted = lost

    def _release_reported(self, job: Job, pipe: Any) -> None:
        self.runtime.state.release(self.runtime.name, job.id, pipeline=pipe)
        self.jobs.finish(job, None, pipe)

    # -- after the step ------------------------------------------------------------------
    def _complete(self, step: ScheduledStep, start: float, end: float) -> None:
        """The step ran from `start` to `end` (wall seconds): tokens, endings, statistics."""
        outcome = self.scheduler.complete(step)
        for request in outcome.first_tokens:
            request.tag.first_token_at = end
        self._record_step(step, outcome.sampled, start, end)
        for request in outcome.sampled:
            request.tag.last_token_at = end
        for request in outcome.finished:
            live: LiveRequest = request.tag
            self.held.pop(live.job.id, None)
            if not live.leaving:
                self._end_completed(live, end)
        for job_id, live in list(self.held.items()):
            if live.leaving:
                assert live.engine is not None
                self.scheduler.abort(live.engine)
                del self.held[job_id]
                self._owed.batch_changed = True

    def _record_step(
        self, step: ScheduledStep, sampled: Iterable[EngineRequest], start: float, end: float
    ) -> None:
        """The step in the engine stats of each run with a request in it (as the simulator
        records one step: `kvqueue.sim.batched_worker`)."""
        usage = self.scheduler.signals().kv_usage
        sampled_ids = {id(r) for r in sampled}
        by_run: dict[str, list[LiveRequest]] = {}
        for chunk in step.chunks:
            live: LiveRequest = chunk.request.tag
            by_run.setdefault(live.context.run_id, []).append(live)
        for run_id, members in by_run.items():
            context = members[0].context
            stats = self.engine_log.stats(run_id)
            t_start, t_end = _run_ms(context, start), _run_ms(context, end)
            stats.record_kv_usage(t_start, self._usage_at_start)
            stats.record_steps(1, len(step.chunks), t_end - t_start)
            stats.num_preemptions += len(step.preempted)
            same_gap = 0
            for live in members:
                engine = live.engine
                if engine is None or id(engine) not in sampled_ids or engine.num_output < 2:
                    continue
                if live.last_token_at == start:
                    same_gap += 1
                elif live.last_token_at is not None:
                    stats.record_gap(t_end - _run_ms(context, live.last_token_at))
            stats.record_gap(t_end - t_start, same_gap)
            stats.record_kv_usage(t_end, usage)

    # -- ending requests -----------------------------------------------------------------
    def _end_completed(self, live: LiveRequest, end: float) -> None:
        runtime, job = self.runtime, live.job
        result = _completed(live, end, runtime.name, self.gpu.cache.num_blocks)
        used = self.gpu.cache.num_used_slots

        def write(pipe: Any) -> None:
            runtime.results.append(result, pipeline=pipe)
            runtime.state.release(runtime.name, job.id, used, result.decode_tokens, pipeline=pipe)
            self.jobs.finish(job, {"status": result.status.value, "worker": runtime.name}, pipe)
            runtime._in_service.discard(job.id)

        self._owed.writes.append(write)
        self._owed.runs_ended.add(live.context.run_id)
        self._owed.batch_changed = True

    def _end_unserved(
        self, live: LiveRequest, status: RequestStatus, reason: str, now: float
    ) -> None:
        """A request that never runs ends at `now` (rejected, failed) with the reason."""
        runtime, job = self.runtime, live.job
        result = _unserved(live, status, reason, now, runtime.name, self.gpu.cache)

        def write(pipe: Any) -> None:
            runtime.results.append(result, pipeline=pipe)
            runtime.state.release(runtime.name, job.id, pipeline=pipe)
            if status is RequestStatus.FAILED:
                self.jobs.fail(job, reason, pipe)
            else:
                self.jobs.finish(job, {"status": status.value, "worker": runtime.name}, pipe)

        self._owed.writes.append(write)
        self._owed.runs_ended.add(live.context.run_id)

    def _superseded(self) -> None:
        """Another process took the name: everything leaves the engine. Started jobs fail in
        RQ (the new process's registration failed their requests); taken, unstarted ones go
        back to the head of the queue, for the new process."""
        runtime = self.runtime
        reason = (
            f"worker {runtime.name} generation {runtime.generation} was superseded by another "
            "process registered under the same name"
        )
        log.error("%s", reason)
        pipe = self._owed_pipeline()
        for live in self.held.values():
            if live.started:
                self.jobs.fail(live.job, reason, pipe)
        unstarted = [live.job.id for live in self.held.values() if not live.started]
        for job_id in reversed(unstarted):
            pipe.lrem(self.jobs.intermediate_key, 1, job_id)
            pipe.lpush(self.jobs.queue.key, job_id)
        if len(pipe):
            execute_through_outages(pipe, f"{runtime.name}: superseded", log)
        self._clear_engine()
        if runtime.on_superseded is not None:
            runtime.on_superseded()

    def _fail_everything(self, reason: str) -> None:
        """Serving broke: every request held ends `failed` with the reason."""
        runtime = self.runtime
        pipe = self._owed_pipeline()
        for live in self.held.values():
            runtime.results.append(live.context.failure(runtime.name, reason), pipeline=pipe)
            runtime.state.release(runtime.name, live.job.id, pipeline=pipe)
            self.jobs.fail(live.job, reason, pipe)
            runtime._in_service.discard(live.job.id)
        self._clear_engine()
        try:
            execute_through_outages(pipe, f"{runtime.name}: fail", log)
        except Exception:  # the producer's wait settles them
            log.exception("%s: could not report the failure", runtime.name)

    def _owed_pipeline(self) -> Any:
        """A MULTI/EXEC pipeline holding what is owed so far (endings, events)."""
        pipe = self.runtime.client.pipeline(transaction=True)
        owed, self._owed = self._owed, _Owed()
        for write in owed.writes:
            write(pipe)
        events = self.gpu.take_events()
        if events:
            self.runtime.index.publish_events(self.runtime.name, events, pipeline=pipe)
        return pipe

    def _clear_engine(self) -> None:
        for live in self.held.values():
            if live.engine is not None:
                self.scheduler.abort(live.engine)
        self.held.clear()
        self.gpu.take_events()  # releases emit none: nothing is left unpublished

    def _set_state(self, state: str) -> None:
        self.runtime._retry(lambda: self.worker.set_state(state), f"RQ state {state}")


def _run_ms(context: JobContext, wall: float) -> float:
    """A wall time (epoch seconds) in the run's simulated ms since it started."""
    return scaled_ms(wall - context.run_started_at, context.time_scale)


def _base(live: LiveRequest, worker: str, capacity_blocks: int) -> dict[str, Any]:
    context = live.context
    request = context.request
    return {
        "request_id": request.request_id,
        "run_id": context.run_id,
        "worker": worker,
        "strategy": context.strategy,
        "arrival_ms": _run_ms(context, context.enqueued_at),
        "num_prompt_tokens": request.num_prompt_tokens,
        "num_blocks": request.num_blocks,
        "cache_capacity_blocks": capacity_blocks,
    }


def _completed(live: LiveRequest, end: float, worker: str, capacity_blocks: int) -> RequestResult:
    """The batched engine's timing rules (`completed_fields`) on the run's clock; the times are
    kept in order should the producer's clock run ahead of the worker's."""
    context, engine = live.context, live.engine
    assert engine is not None and live.admitted_at is not None
    assert live.first_token_at is not None
    base = _base(live, worker, capacity_blocks)
    arrival = base.pop("arrival_ms")
    admitted = max(arrival, _run_ms(context, live.admitted_at))
    first_token = max(admitted, _run_ms(context, live.first_token_at))
    finish = max(first_token, _run_ms(context, end))
    return RequestResult(
        status=RequestStatus.COMPLETED,
        arrival_ms=arrival,
        cache_used_blocks=live.cache_used_blocks,
        **completed_fields(engine, arrival, admitted, first_token, finish),
        **base,
    )


def _unserved(
    live: LiveRequest, status: RequestStatus, reason: str, now: float, worker: str, cache: Any
) -> RequestResult:
    base = _base(live, worker, cache.num_blocks)
    waited = scaled_ms(now - live.context.enqueued_at, live.context.time_scale)
    start = base["arrival_ms"] + max(0.0, waited)
    return RequestResult(
        status=status,
        reason=reason,
        start_ms=start,
        finish_ms=start,
        cache_used_blocks=cache.num_used_slots,
        **base,
    )


def _error_line(exc: BaseException) -> str:
    """An exception as the last line of the traceback RQ would record for it."""
    return "".join(traceback.format_exception_only(exc)).strip()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""A KV worker process's simulated GPU and its Redis side: membership, jobs, results, events.

Invariants:
- the process acts under one generation at a time (`generation`, see
  `kvqueue.routing.membership`). When Redis says that generation is gone — lost (Redis came
  back empty) or reaped (declared dead) — it registers anew and announces a full snapshot of
  its cache, so the tree equals the cache again; when another process took its name
  (superseded) it serves nothing more and asks to stop (`on_superseded`);
- a cache change and the publication of its events happen under `_lock`, so a snapshot taken
  under it agrees with everything published;
- every job that `begin` admits is ended by one `finish`, which releases its load record and
  appends its result (the first result of a request wins) in one MULTI/EXEC;
- whatever it owes Redis is retried through outages (`retry_through_outages`): each write is
  idempotent, so a retry after a lost reply is harmless.

Jobs are keyed by id throughout (`begin`, `finish`): nothing here assumes one job at a time.
The GPU is the configured engine's (`KVQ_ENGINE`): the sequential one serves a job per call of
`serve`; the batched one is driven step by step by `kvqueue.live.batched_serving`, which uses
the same Redis side (`finish`, `register`, the ledger and the result writer).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.errors import KVQueueError, RequestRejected
from kvqueue.gpu.batched_gpu import BatchedGpu
from kvqueue.gpu.oracle import FallbackOracle, make_oracle
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.gpu.simulated_gpu import Execution, SimulatedGpu
from kvqueue.live.jobs import JobContext
from kvqueue.live.pipelines import pipeline
from kvqueue.live.recovery import Recovery
from kvqueue.live.retry import REDIS_OUTAGE_ERRORS, retry_through_outages
from kvqueue.live.rq_jobs import Commands, OneJob
from kvqueue.live.runs import ResultWriter
from kvqueue.routing.membership import HeartbeatStatus, RedisMembership, StartStatus
from kvqueue.routing.redis_index import RedisIndex
from kvqueue.routing.state import RedisRouterState

log = logging.getLogger(__name__)

T = TypeVar("T")


class Superseded(KVQueueError, RuntimeError):
    """Another process registered this worker's name: this one must serve nothing more."""


@dataclass(frozen=True, slots=True)
class Admission:
    """A job `begin` let in: to serve (`execution`) or ended at once (`result`: rejected).

    `started` is when it left its queue (epoch seconds); `used_blocks` the cache occupancy
    once its blocks were allocated.
    """

    started: float
    execution: Execution | None = None
    result: RequestResult | None = None
    used_blocks: int = 0


class GpuRuntime:
    """One simulated GPU in a worker process, registered in Redis under `name`."""

    def __init__(
        self,
        name: str,
        client: redis.Redis,
        settings: Settings,
        on_superseded: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.client = client
        self.settings = settings
        self.prefix = settings.key_prefix
        self.pid = os.getpid()
        engine = settings.engine_config()
        preset = settings.gpu_preset()
        oracle = make_oracle(settings.decode_model)
        # A decode-length model reads the prompt's tokens: the producer sends them only then.
        self.needs_token_ids = not isinstance(oracle, FallbackOracle)
        self.engine = engine.engine
        self.gpu: SimulatedGpu | BatchedGpu
        if engine.is_batched:
            self.gpu = BatchedGpu(preset, oracle, engine.scheduler_config(preset))
            self.step_cost = engine.step_cost(preset, settings.latency_model())
        else:
            self.gpu = SimulatedGpu(
                preset, settings.latency_model(), oracle, settings.sequential_pricing()
            )
        self.serving_info: dict[str, Any] = {}  # the batched loop's own figures, for `info`
        self.index = RedisIndex(client, self.prefix, settings.events_maxlen)
        self.state = RedisRouterState(client, self.prefix)
        self.membership = RedisMembership(client, self.prefix)
        self.results = ResultWriter(client, self.prefix, settings.run_ttl_s)
        self.generation = 0
        self.jobs_begun = 0  # jobs `begin` has counted: RQ's side can tell whether one began
        self._in_service: set[str] = set()  # job ids between `begin` and `finish`
        self.on_superseded = on_superseded
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Register (empty cache) and start heartbeating."""
        self.gpu.cache.clear()
        self.gpu.take_events()
        self.register("started")
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop, name=f"{self.name}-heartbeat", daemon=True
        )
        self._heartbeat_thread.start()
        log.info(
            "%s: %s, %d KV blocks, generation %d",
            self.name,
            self.gpu.preset.name,
            self.gpu.cache.num_blocks,
            self.generation,
        )

    def register(self, why: str) -> None:
        """Become a new generation and announce the whole cache (a snapshot: `cleared`, then
        every cached block). Jobs an earlier generation had started end as failed."""
        with self._lock:
            snapshot = self.gpu.cache.snapshot()
            self._retry(lambda: self.index.publish_events(self.name, snapshot), "snapshot")
            registration = self._retry(
                lambda: self.membership.register(self.name, self.gpu.cache.num_blocks), "register"
            )
            previous, self.generation = self.generation, registration.generation
            for job_id, record in registration.orphans.items():
                if job_id in self._in_service:
                    continue  # this process is serving it still: it ends with its own result
                reason = (
                    f"worker {self.name} (generation {record.generation}) stopped while "
                    f"serving it; the name is now generation {self.generation}"
                )
                result = RequestResult(
                    record.request_id,
                    record.run_id,
                    self.name,
                    record.strategy,
                    RequestStatus.FAILED,
                    reason,
                )
                self._retry(lambda r=result: self.results.append(r), f"fail {job_id}")
            self._retry(self._write_info, "info")
        if previous:
            log.warning(
                "%s: %s; registered again as generation %d with %d cached blocks",
                self.name,
                why,
                self.generation,
                self.gpu.cache.num_cached_blocks,
            )

    def stop(self) -> None:
        """Stop heartbeating and hand over: leave the live set and the tree, and let the
        queued jobs move on (rerouted, or failed if so configured)."""
        self._stop.set()
        try:
            Recovery(self.client, self.settings).hand_over(self.name, self.generation)
        except redis.RedisError as exc:  # shutting down anyway; a reaper settles it later
            log.warning("%s: could not hand over its jobs: %s", self.name, exc)

    def _heartbeat_loop(self) -> None:
        interval = max(0.1, self.settings.heartbeat_ttl_s / 3)
        failing = False
        while not self._stop.wait(interval):
            try:
                if self.membership.heartbeat(self.name, self.generation) is HeartbeatStatus.OK:
                    failing = False
                    continue
                self._heartbeat_trouble()
            except REDIS_OUTAGE_ERRORS as exc:
                if not failing:
                    log.warning("%s: heartbeat failed: %s (retrying)", self.name, exc)
                failing = True
            except Exception:  # the next heartbeat tries again
                log.exception("%s: could not register again", self.name)
            else:
                failing = False

    def _heartbeat_trouble(self) -> None:
        """A heartbeat was refused. Ask again under the lock — the job path may have just
        registered a new generation (one new generation, not two; and not mistaken for
        another process) — then register anew, or stop if another process took the name."""
        with self._lock:
            status = self.membership.heartbeat(self.name, self.generation)
            if status is HeartbeatStatus.OK:
                return
            if status is HeartbeatStatus.SUPERSEDED:
                log.error(
                    "%s: another process registered this name; this one (generation %d) stops",
                    self.name,
                    self.generation,
                )
                self._stop.set()
                if self.on_superseded is not None:
                    self.on_superseded()
                return
            lost = status is HeartbeatStatus.LOST
            self.register(
                "Redis lost its registration"
                if lost
                else "it was declared dead (heartbeat expired)"
            )

    # -- one job -------------------------------------------------------------------------
    def serve(
        self, job_id: str, context: JobContext, rq: OneJob | None = None
    ) -> RequestResult | None:
        """Serve one request end to end; None if it already had a result (nothing served).

        When no emulated time passes (time scale 0) the admission's cache events go out with
        the result, in `finish`'s round trip, the lock held throughout: a snapshot sees the
        request's blocks together with its result, or neither. With `rq`, RQ's bookkeeping
        of the job travels in the job's own round trips (`begin`, `finish`).
        """
        if context.time_scale > 0:
            return self._serve(job_id, context, True, rq)
        with self._lock:
            return self._serve(job_id, context, False, rq)

    def _serve(
        self, job_id: str, context: JobContext, publish_at_start: bool, rq: OneJob | None
    ) -> RequestResult | None:
        admission = self.begin(job_id, context, publish_at_start, rq)
        if admission is None:
            return None
        if admission.result is not None:
            self.finish(job_id, admission.result, rq)
            return admission.result
        execution = admission.execution
        assert execution is not None
        try:
            _sleep_simulated(execution.service_ms, context.time_scale)
        finally:
            with self._lock:
                self.gpu.finish(execution)
        base = self._base(context, admission.started)
        result = _completed(base, execution, admission.used_blocks)
        self.finish(job_id, result, rq)
        return result

    def begin(
        self,
        job_id: str,
        context: JobContext,
        publish_events: bool = True,
        rq: OneJob | None = None,
    ) -> Admission | None:
        """Count the job for this generation and admit its request to the GPU.

        None if the request already has a result (its producer gave up, or a reaper settled
        it): the job's load is released (with `rq`, its RQ job finished with None) and
        nothing is served. Raises `Superseded`. Without `publish_events` the admission's
        cache events wait for `finish` (the caller holds the lock until then). With `rq`,
        RQ's start of the job goes in the same round trip as kvqueue's.
        """
        started = time.time()
        request = context.request
        with self._lock:
            while True:
                reported, status = self._retry(lambda: self._start_job(job_id, context, rq), job_id)
                if status is StartStatus.SUPERSEDED:
                    raise Superseded(
                        f"worker {self.name} generation {self.generation} was superseded by "
                        "another process registered under the same name"
                    )
                if status is not StartStatus.LOST:
                    break
                self.register("Redis lost its registration")
            self.jobs_begun += 1
            if reported:
                self._retry(lambda: self._release_unserved(job_id, rq), job_id)
                log.info("%s: %s already has a result; not served", self.name, request.request_id)
                return None
            self._in_service.add(job_id)
            try:
                execution = self.gpu.start(request)
            except RequestRejected as rejection:
                base = self._base(context, started)
                del base["queue_wait_ms"]  # a rejected request has no latencies
                return Admission(
                    started,
                    result=RequestResult(
                        status=RequestStatus.REJECTED,
                        reason=rejection.reason,
                        finish_ms=base["start_ms"],
                        cache_used_blocks=self.gpu.cache.num_used_slots,
                        **base,
                    ),
                )
            if publish_events:
                events = self.gpu.take_events()
                self._retry(lambda: self.index.publish_events(self.name, events), job_id)
            return Admission(started, execution, used_blocks=self.gpu.cache.num_used_slots)

    def finish(self, job_id: str, result: RequestResult, rq: OneJob | None = None) -> None:
        """Release the job's load and append its result (with any cache events), atomically;
        with `rq`, end its RQ job in the same MULTI/EXEC (failed for a failed result)."""
        with self._lock:
            events = self.gpu.take_events()
            used = self.gpu.cache.num_used_slots
            completed = result.status is RequestStatus.COMPLETED
            output = result.decode_tokens if completed else None
            rq_end: Commands = []
            if rq is not None and result.status is RequestStatus.FAILED:
                rq_end = rq.failed(result.reason)
            elif rq is not None:
                rq_end = rq.finished({"status": result.status.value, "worker": self.name})

            def publish() -> None:
                pipe = pipeline(self.client, transaction=True)
                if events:
                    self.index.publish_events(self.name, events, pipeline=pipe)
                self.state.release(self.name, job_id, used, output, pipeline=pipe)
                self.results.append(result, pipeline=pipe)
                self._write_info(pipe)
                pipe.command_stack.extend(rq_end)
                pipe.execute()

            self._retry(publish, job_id)
            self._in_service.discard(job_id)

    def fail(
        self, job_id: str, context: JobContext, reason: str, rq: OneJob | None = None
    ) -> RequestResult:
        """End a job whose serving raised: a failed result with the reason."""
        result = context.failure(self.name, reason)
        self.finish(job_id, result, rq)
        return result

    def clear_cache(self) -> dict[str, Any]:
        """Drop every cached block and announce `cleared`, so the router's index forgets this
        worker's blocks. Only between jobs: no request may hold blocks (`BlockCache.clear`).
        What `clear_cache` answers: the worker and how many cached blocks it dropped."""
        with self._lock:
            cache = self.gpu.cache
            num_cleared = cache.num_cached_blocks
            cache.clear()
            events = self.gpu.take_events()

            def publish() -> None:
                pipe = pipeline(self.client, transaction=True)
                self.index.publish_events(self.name, events, pipeline=pipe)
                self._write_info(pipe)
                pipe.execute()

            self._retry(publish, "clear")
        log.info("%s: cleared %d cached blocks on request", self.name, num_cleared)
        return {"worker": self.name, "cleared_blocks": num_cleared}

    def cached_hashes(self) -> list[str]:
        with self._lock:
            return sorted(h.hex() for h in self.gpu.cache.cached_hashes())

    def snapshot_reply(self) -> dict[str, Any]:
        """What `cache_snapshot` answers: this GPU's cached blocks, read from process memory."""
        cache = self.gpu.cache
        return {
            "worker": self.name,
            "pid": self.pid,
            "generation": self.generation,
            "capacity_blocks": cache.num_blocks,
            "num_evictions": cache.stats.num_evictions,
            "cached": self.cached_hashes(),
        }

    # -- Redis helpers -------------------------------------------------------------------
    def _start_job(
        self, job_id: str, context: JobContext, rq: OneJob | None = None
    ) -> tuple[bool, StartStatus]:
        pipe = pipeline(self.client, transaction=False)
        self.results.reported(context.run_id, [context.request.request_id], pipeline=pipe)
        self.membership.start_job(self.name, self.generation, job_id, context.record(), pipe)
        if rq is not None:
            pipe.command_stack.extend(rq.start())
        (reported,), status, *_ = pipe.execute()
        return bool(reported), StartStatus(status.decode() if isinstance(status, bytes) else status)

    def _release_unserved(self, job_id: str, rq: OneJob | None) -> None:
        """A job whose request already has a result: its load released, its RQ job ended."""
        if rq is None:
            self.state.release(self.name, job_id)
            return
        pipe = pipeline(self.client, transaction=True)
        self.state.release(self.name, job_id, pipeline=pipe)
        pipe.command_stack.extend(rq.finished(None))
        pipe.execute()

    def _retry(self, operation: Callable[[], T], what: str) -> T:
        return retry_through_outages(operation, f"{self.name}: {what}", log)

    def _write_info(self, pipe: Any = None) -> None:
        cache = self.gpu.cache
        target = pipe if pipe is not None else self.client
        target.hset(
            keys.worker_info(self.name, self.prefix),
            mapping={
                "preset": self.gpu.preset.name,
                "capacity_blocks": cache.num_blocks,
                "max_context_tokens": self.gpu.preset.max_context_tokens,
                "used_blocks": cache.num_used_slots,
                "cached_blocks": cache.num_cached_blocks,
                "evictions": cache.stats.num_evictions,
                "pid": self.pid,
                "generation": self.generation,
                "needs_token_ids": int(self.needs_token_ids),
                **self.settings.engine_config().describe(self.gpu.preset),
                **self.serving_info,
            },
        )

    def _base(self, context: JobContext, started: float) -> dict[str, Any]:
        scale = context.time_scale
        arrival_ms = scaled_ms(context.enqueued_at - context.run_started_at, scale)
        queue_wait_ms = max(0.0, scaled_ms(started - context.enqueued_at, scale))
        return {
            "request_id": context.request.request_id,
            "run_id": context.run_id,
            "worker": self.name,
            "strategy": context.strategy,
            "arrival_ms": arrival_ms,
            "start_ms": arrival_ms + queue_wait_ms,
            "queue_wait_ms": queue_wait_ms,
            "num_prompt_tokens": context.request.num_prompt_tokens,
            "num_blocks": context.request.num_blocks,
            "cache_capacity_blocks": self.gpu.cache.num_blocks,
        }


def _completed(base: dict[str, Any], execution: Execution, used_blocks: int) -> RequestResult:
    fields = {**base, **execution.result_fields(base["queue_wait_ms"])}
    return RequestResult(
        status=RequestStatus.COMPLETED,
        finish_ms=base["start_ms"] + execution.service_ms,
        cache_used_blocks=used_blocks,
        **fields,
    )


def scaled_ms(wall_seconds: float, scale: float) -> float:
    """Wall seconds to simulated milliseconds; at scale 0 (no emulation) time does not pass."""
    return wall_seconds * 1000.0 / scale if scale > 0 else 0.0


def _sleep_simulated(simulated_ms: float, scale: float) -> None:
    if scale > 0 and simulated_ms > 0:
        time.sleep(simulated_ms * scale / 1000.0)

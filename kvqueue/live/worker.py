"""The live KV worker: one RQ `SimpleWorker` process per simulated GPU.

`KVWorker` (public path `workers.KVWorker`) owns a `GpuRuntime` (`kvqueue.live.runtime`) in
its process memory. RQ's default worker forks a fresh process per job, which would simulate
every request on an empty cache; so the job function `serve_request` refuses to run anywhere
but inside the `KVWorker` process that owns the GPU, and says which `-w` to use.

Only kvqueue's job functions run here (`JOB_FUNCTIONS`: `serve_request`, `cache_snapshot`,
`clear_cache`):
the worker's job class (`KVJob`) refuses any other name before importing it, and the refused
job fails in RQ with the reason. Jobs use RQ's JSON serializer, never pickle.

A Redis outage does not end the worker: its own writes are retried with backoff, RQ's
bookkeeping around a job is retried once Redis answers, and RQ's idle loop already waits for
Redis (with its backoff capped at `max_connection_wait_time`).

**Two engines, one RQ worker** (`KVQ_ENGINE`). RQ's work loop stays in charge: it handles
signals (warm and cold shutdown), suspension, maintenance and the blocking dequeue while the
worker is idle, and hands the worker one job at a time (`execute_job`).

- ``sequential``: one request at a time, to its end. For a request job (`serve_request`,
  readable and not refused) `execute_job` calls the runtime itself, and RQ's bookkeeping of
  the job — the same writes RQ's `prepare_execution`, `prepare_job_execution` and
  `handle_job_success`/`_failure` make: an `Execution`, status ``started`` then
  ``finished`` with the return value (or ``failed``), the registries, the worker's counters
  and state — travels in the job's two round trips (`rq_jobs.OneJob`) instead of nine of
  its own. Any other job (`cache_snapshot`, `clear_cache`, a refused or unreadable one)
  takes RQ's `SimpleWorker` path, `perform_job`; `serve_request` runs there too when a
  job's payload is not kvqueue's, and outside a KV worker it refuses to serve.
- ``batched``: many jobs are in service at once, which `SimpleWorker` cannot express, so
  `execute_job` hands the dequeued job to `kvqueue.live.batched_serving.BatchedServing`,
  which keeps stepping the engine — taking newly queued jobs at every step boundary,
  non-blocking, onto the queue's intermediate list as RQ's dequeue does — until the engine
  is idle and the queue empty, then returns to RQ's loop. It does RQ's per-job bookkeeping
  itself (`kvqueue.live.rq_jobs`): an `Execution` per admitted job (StartedJobRegistry,
  status ``started``), the job finished with its return value or failed with the error when
  its request ends, RQ's heartbeats for the worker and every execution while it serves; the
  worker is ``busy`` meanwhile (so SIGTERM is a warm shutdown), and RQ's maintenance runs when
  it is idle again. `serve_request` itself is never called in this mode: the worker reads
  the job's payload. RQ's job timeout, retries, dependents and callbacks do not apply.

A process starting under a name first puts back at the head of its queue any job an earlier
process of that name took but never started (`REQUEUE_TAKEN`).

RQ's bookkeeping of the worker itself is thinned where it repeats: its heartbeat of the worker
key and its check for `rq suspend` run at most once a second (RQ would run them before and
after every dequeue), and a state the worker just wrote is not written again. Per job, RQ's
dequeue, execution record, job status and result stay as RQ writes them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

from rq import Queue, SimpleWorker, get_current_job
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from kvqueue.config import Settings
from kvqueue.errors import AccessDeniedError
from kvqueue.live import scripts
from kvqueue.live.batched_serving import BatchedServing
from kvqueue.live.connection import check_access
from kvqueue.live.jobs import JOB_FUNCTION, JobContext, KVJob, refusal
from kvqueue.live.pipelines import pipeline
from kvqueue.live.retry import REDIS_OUTAGE_ERRORS, RETRY_CAP_S, retry_through_outages
from kvqueue.live.rq_jobs import ConcurrentJobs, OneJob
from kvqueue.live.runs import ResultWriter
from kvqueue.live.runtime import GpuRuntime, Superseded
from kvqueue.routing.state import RedisRouterState

log = logging.getLogger(__name__)

__all__ = [
    "FORKED_WORKER_MESSAGE",
    "JOB_FUNCTION",
    "KVWorker",
    "cache_snapshot",
    "clear_cache",
    "serve_request",
]

FORKED_WORKER_MESSAGE = (
    "this job ran outside a KV worker process: RQ's default worker forks per job and would "
    "simulate every request on a fresh, empty KV cache. Start the worker with "
    "`rq worker -w workers.KVWorker {queue}` (or RQ_WORKER_CLASS=workers.KVWorker)"
)

_RUNTIME: GpuRuntime | None = None

RQ_CHECK_INTERVAL_S = 1.0  # RQ's worker heartbeat and suspension check, at most this often


def _own_runtime() -> GpuRuntime | None:
    """This process's runtime, or None in a forked work horse (or outside any worker)."""
    runtime = _RUNTIME
    return runtime if runtime is not None and runtime.pid == os.getpid() else None


# -- job functions (JOB_FUNCTIONS) ---------------------------------------------------------------
def serve_request(payload: dict[str, Any]) -> dict[str, Any] | None:
    """RQ job function: serve one request on this process's simulated GPU.

    Returns the result's status and worker (the result itself is in the run's stream), or
    None when the request already had a result and nothing was served.
    """
    context = JobContext.from_wire(payload)
    job = get_current_job()
    runtime = _own_runtime()
    if runtime is None:
        queue = job.origin if job is not None else "worker-0"
        reason = FORKED_WORKER_MESSAGE.format(queue=queue)
        if job is not None:
            _publish_orphan_failure(job, context, queue, reason)
        raise RuntimeError(reason)
    job_id = job.id if job is not None else context.request.request_id
    try:
        result = runtime.serve(job_id, context)
    except Superseded as exc:
        runtime.results.append(context.failure(runtime.name, str(exc)))
        raise
    except Exception as exc:
        runtime.fail(job_id, context, f"{type(exc).__name__}: {exc}")
        raise
    return None if result is None else {"status": result.status.value, "worker": result.worker}


def cache_snapshot() -> dict[str, Any]:
    """RQ job function: what this worker's GPU caches right now, read from process memory.

    Queued like any request, so it answers after every request queued before it.
    """
    runtime = _own_runtime()
    if runtime is None:
        raise RuntimeError("cache_snapshot must run inside a KV worker process")
    return runtime.snapshot_reply()


def clear_cache() -> dict[str, Any]:
    """RQ job function: empty this worker's cache and announce `cleared` (a run that must not
    start on warm caches, `--reset-caches`). Queued like any request, so it runs after every
    request queued before it, when none holds a block."""
    runtime = _own_runtime()
    if runtime is None:
        raise RuntimeError("clear_cache must run inside a KV worker process")
    return runtime.clear_cache()


def _ended_in_rq(runtime: GpuRuntime, rq_end: list, result: Any) -> None:
    """A superseded process's job: its failure appended (the first result wins) and its RQ
    job failed, in one round trip."""
    pipe = pipeline(runtime.client, transaction=True)
    runtime.results.append(result, pipeline=pipe)
    pipe.command_stack.extend(rq_end)
    pipe.execute()


def _publish_orphan_failure(job: Job, context: JobContext, queue: str, reason: str) -> None:
    settings = Settings.from_env()
    result = context.failure(queue, reason)
    client = job.connection
    pipe = client.pipeline(transaction=True)
    ResultWriter(client, settings.key_prefix, settings.run_ttl_s).append(result, pipeline=pipe)
    RedisRouterState(client, settings.key_prefix).release(queue, job.id, pipeline=pipe)
    pipe.execute()


# -- the RQ worker ---------------------------------------------------------------------------------
class KVWorker(SimpleWorker):
    """An RQ SimpleWorker that is one simulated GPU, named after its single queue."""

    # RQ's idle loop waits for an unreachable Redis with exponential backoff; cap it as ours.
    max_connection_wait_time = RETRY_CAP_S

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["serializer"] = JSONSerializer
        kwargs["job_class"] = KVJob
        connection = kwargs.get("connection")
        # The CLI builds its queues with its own job class: rebuild them with KVJob.
        queues = [
            Queue(
                q if isinstance(q, str) else q.name,
                connection=connection if connection is not None else q.connection,
                job_class=KVJob,
                serializer=JSONSerializer,
            )
            for q in (queues if isinstance(queues, list | tuple) else [queues])
        ]
        super().__init__(queues, *args, **kwargs)
        names = [q.name for q in self.queues]
        if len(names) != 1:
            raise ValueError(
                f"a KV worker serves exactly one queue (its GPU), got {names}; "
                "start one `rq worker -w workers.KVWorker worker-<i>` per simulated GPU"
            )
        self.gpu_name = names[0]
        self.settings = Settings.from_env()  # a bad setting raises before RQ registers anything
        self.runtime: GpuRuntime | None = None
        self.serving: BatchedServing | None = None
        self.one_at_a_time: ConcurrentJobs | None = None  # RQ's bookkeeping, sequential engine
        self._heartbeat_sent = -RQ_CHECK_INTERVAL_S  # monotonic time of RQ's last heartbeat
        self._suspension_checked = -RQ_CHECK_INTERVAL_S
        self._state_written: str | None = None  # RQ's state as this worker last wrote it

    def register_birth(self) -> None:
        settings = self.settings
        try:
            check_access(self.connection, settings.redis_url, settings.key_prefix)
        except AccessDeniedError as exc:
            log.error("%s: %s", self.gpu_name, exc)
            sys.exit(2)
        super().register_birth()
        global _RUNTIME
        self.runtime = GpuRuntime(
            self.gpu_name, self.connection, settings, on_superseded=self._stop_superseded
        )
        (queue,) = self.queues
        requeue = self.connection.register_script(scripts.REQUEUE_TAKEN)
        moved = self.runtime._retry(
            lambda: requeue(keys=[queue.key, queue.intermediate_queue_key]), "requeue"
        )
        if moved:
            log.warning("%s: %d jobs taken by an earlier process requeued", self.gpu_name, moved)
        self.runtime.start()
        _RUNTIME = self.runtime
        if self.runtime.engine == "batched":
            jobs = ConcurrentJobs(self, queue)
            self.serving = BatchedServing(self, self.runtime, jobs, lambda: self._stop_requested)
        else:
            self.one_at_a_time = ConcurrentJobs(self, queue)

    def register_death(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()
        try:
            super().register_death()
        except REDIS_OUTAGE_ERRORS as exc:
            log.warning("%s: could not deregister from RQ: %s", self.gpu_name, exc)

    def _stop_superseded(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # RQ's warm shutdown: finish, then exit

    # -- only kvqueue's jobs -----------------------------------------------------------------
    def perform_job(self, job: Job, queue: Queue) -> bool:
        reason = refusal(job)
        if reason is not None:
            log.error("%s: %s", self.gpu_name, reason)
            job.retries_left = 0  # refused once is refused for good
        # KVJob raises JobRefused when RQ resolves the function: RQ then fails the job with
        # the reason, running no callback.
        return super().perform_job(job, queue)

    # -- surviving Redis outages -------------------------------------------------------------
    def execute_job(self, job: Job, queue: Queue) -> None:
        """RQ's job execution; if Redis goes away around it, wait for Redis and go on.

        A job whose serving never began is executed again once Redis answers; one that
        began has ended with its result published (the runtime retries that itself), so only
        RQ's own bookkeeping of it may be missing. A batched worker serves from here until
        it is idle (module docstring), riding out outages itself.
        """
        if self.serving is not None:
            self.serving.serve(job)
            return
        if self._serve_lean(job):
            return
        while True:
            began = self._served_jobs
            try:
                super().execute_job(job, queue)
                return
            except REDIS_OUTAGE_ERRORS as exc:
                log.warning("%s: Redis went away around job %s: %s", self.gpu_name, job.id, exc)
                retry_through_outages(self.connection.ping, f"{self.gpu_name}: reconnect", log)
                if self._served_jobs != began or refusal(job) is not None:
                    return

    def _serve_lean(self, job: Job) -> bool:
        """Serve a request job of the sequential engine with RQ's bookkeeping in kvqueue's
        own round trips (`OneJob`); False for any other job, which RQ's path runs."""
        runtime, jobs = self.runtime, self.one_at_a_time
        if runtime is None or jobs is None or refusal(job) is not None:
            return False
        if job.func_name != JOB_FUNCTION:
            return False
        try:
            context = JobContext.from_wire(job.args[0])
        except Exception:  # RQ's path fails it with the error, as for any unreadable job
            return False
        rq = OneJob(jobs, job)
        try:
            runtime.serve(job.id, context, rq)
        except Superseded as exc:
            failure = context.failure(runtime.name, str(exc))
            rq_end = rq.failed(str(exc))
            runtime._retry(lambda: _ended_in_rq(runtime, rq_end, failure), job.id)
        except Exception as exc:
            log.exception("%s: job %s failed", self.gpu_name, job.id)
            runtime.fail(job.id, context, f"{type(exc).__name__}: {exc}", rq)
        self._state_written = WorkerStatus.IDLE  # the job's last round trip wrote it
        return True

    @property
    def _served_jobs(self) -> int:
        runtime = self.runtime
        return runtime.jobs_begun if runtime is not None else 0

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's worker heartbeat, at most once per `RQ_CHECK_INTERVAL_S` on its own.

        RQ heartbeats the worker key before and after each dequeue and after each job — six
        round trips a job — to keep a TTL of minutes (`worker_ttl` + 60 s). Once a second
        keeps it as well; a heartbeat with a TTL of its own or on a pipeline always goes.
        """
        moment = time.monotonic()
        if (
            timeout is None
            and pipeline is None
            and moment - self._heartbeat_sent < RQ_CHECK_INTERVAL_S
        ):
            return
        try:
            super().heartbeat(timeout, pipeline=pipeline)
        except REDIS_OUTAGE_ERRORS as exc:
            log.warning("%s: RQ heartbeat failed: %s", self.gpu_name, exc)
        else:
            self._heartbeat_sent = moment

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's worker state; a state this worker itself just wrote is not written again
        (RQ writes ``idle`` after each job and again entering its dequeue loop)."""
        if pipeline is None and state == self._state_written:
            return
        self._state_written = None  # unknown until written
        # RQ marks itself idle on entering its dequeue loop, outside that loop's own retries.
        try:
            super().set_state(state, pipeline=pipeline)
        except REDIS_OUTAGE_ERRORS as exc:
            log.warning("%s: could not record RQ state %s: %s", self.gpu_name, state, exc)
        else:
            if pipeline is None:
                self._state_written = state

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's check for `rq suspend`, before each dequeue: at most once per
        `RQ_CHECK_INTERVAL_S` (a suspension takes effect within a second, between jobs)."""
        moment = time.monotonic()
        if not burst and moment - self._suspension_checked < RQ_CHECK_INTERVAL_S:
            return
        try:
            super().check_for_suspension(burst)
        except REDIS_OUTAGE_ERRORS as exc:
            log.warning("%s: could not check for suspension: %s", self.gpu_name, exc)
        else:
            self._suspension_checked = moment

    def run_maintenance_tasks(self) -> None:
        try:
            super().run_maintenance_tasks()
        except REDIS_OUTAGE_ERRORS as exc:
            log.warning("%s: RQ maintenance skipped: %s", self.gpu_name, exc)

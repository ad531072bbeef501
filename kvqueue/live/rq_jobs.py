"""RQ's bookkeeping of many jobs in service at once, for a KV worker that batches them.

RQ's `SimpleWorker` serves one job at a time (rq 2.12, `rq/worker/base.py`,
`rq/executions.py`): `dequeue_job_and_maintain_ttl` moves one job id from the queue to the
queue's intermediate list (LMOVE); `prepare_execution` and `prepare_job_execution` create the
job's `Execution` (its ``<job id>:<execution id>`` entry in the queue's StartedJobRegistry),
set the job's status to ``started`` and take it off the intermediate list; `perform_job` runs
it; `handle_job_success` / `handle_job_failure` end it (status, a `Result`, the
Finished/FailedJobRegistry, the execution deleted, the worker's counters).

A batched KV worker holds many jobs in service at once and takes and ends them at step
boundaries. `ConcurrentJobs` does the same bookkeeping per job, each call adding its commands
to the caller's pipeline, so that a step's round trip carries all of it:

- `take_queued` (`TAKE_QUEUED`): every job queued for the worker moves to the intermediate
  list, as RQ's own dequeue moves one, and comes back with its hash in the same round trip;
- `start`: an `Execution` per job (so `StartedJobRegistry` and `rq info` count it), status
  ``started``, the job key persisted (as `Job.perform` does), off the intermediate list;
- `finish` / `fail`: status ``finished`` with the return value as a successful `Result` in
  the FinishedJobRegistry, or ``failed`` with the error in the FailedJobRegistry; the
  execution deleted; the worker's job counters and working time incremented;
- `heartbeat`: the worker's key and every execution's TTL, as `maintain_heartbeats` does for
  the one job a SimpleWorker holds.

Not carried over: retries, dependents, callbacks and RQ's job timeout — kvqueue's jobs have
none (`KVJob` refuses callbacks) and a request's time is the engine's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result
from rq.utils import now, utcformat
from rq.worker import BaseWorker, WorkerStatus

from kvqueue.live import scripts

TAKE_LIMIT = 1_000  # jobs taken from the queue in one round trip at most


@dataclass(slots=True)
class Taken:
    """A job taken off the queue: its `job` (None when its hash is gone), by id."""

    job_id: str
    job: Job | None


class ConcurrentJobs:
    """RQ's per-job bookkeeping for `worker`'s single queue (module docstring)."""

    def __init__(self, worker: BaseWorker, queue: Queue) -> None:
        self.worker = worker
        self.queue = queue
        self.executions: dict[str, Execution] = {}  # job id -> its execution, while in service
        self._ttls: dict[str, int] = {}  # job id -> its execution's heartbeat TTL (s)
        self._take = worker.connection.register_script(scripts.TAKE_QUEUED)

    @property
    def intermediate_key(self) -> str:
        return self.queue.intermediate_queue_key

    # -- taking jobs ---------------------------------------------------------------------
    def take_queued(self, pipeline: Any, everything: bool = False) -> None:
        """Queue `TAKE_QUEUED` on `pipeline`; `taken(reply)` reads its reply. With
        `everything`, the reply lists every job of the intermediate list (after a reply was
        lost, some may have been moved already)."""
        self._take(
            keys=[self.queue.key, self.intermediate_key],
            args=[Job.redis_job_namespace_prefix, TAKE_LIMIT, "1" if everything else "0"],
            client=pipeline,
        )

    def taken(self, reply: list[Any]) -> list[Taken]:
        jobs = []
        for i in range(0, len(reply), 2):
            job_id = _text(reply[i])
            flat = reply[i + 1]
            job = None
            if flat:
                job = self.worker.job_class(
                    job_id, connection=self.worker.connection, serializer=self.worker.serializer
                )
                job.restore({flat[k]: flat[k + 1] for k in range(0, len(flat), 2)})
            jobs.append(Taken(job_id, job))
        return jobs

    def forget(self, job_id: str, pipeline: Any) -> None:
        """A taken job whose hash is gone: off the intermediate list (RQ skips such ids)."""
        pipeline.lrem(self.intermediate_key, 1, job_id)

    # -- one job's life ------------------------------------------------------------------
    def start(self, job: Job, pipeline: Any) -> None:
        worker = self.worker
        ttl = worker.get_heartbeat_ttl(job)
        execution = Execution.create(job, ttl, pipeline=pipeline, worker_name=worker.name)
        self.executions[job.id] = execution
        self._ttls[job.id] = ttl
        job.prepare_for_execution(worker.name, pipeline=pipeline)
        pipeline.persist(job.key)
        pipeline.lrem(self.intermediate_key, 1, job.id)
        worker.set_current_job_id(job.id, pipeline=pipeline)

    def finish(self, job: Job, return_value: Any, pipeline: Any) -> None:
        """The job succeeded with `return_value` (JSON-ready); `start` it first if need be."""
        ttl = job.get_result_ttl(self.worker.default_result_ttl)
        self._end(job, JobStatus.FINISHED, Result.Type.SUCCESSFUL, ttl, pipeline, return_value)
        if ttl != 0:
            job.finished_job_registry.add(job, ttl, pipeline)
        job.cleanup(ttl, pipeline=pipeline, remove_from_queue=False)
        self.worker.increment_successful_job_count(pipeline=pipeline)

    def fail(self, job: Job, exc_string: str, pipeline: Any) -> None:
        """The job failed with `exc_string`; `start` it first if need be."""
        ttl = job.failure_ttl
        self._end(job, JobStatus.FAILED, Result.Type.FAILED, ttl, pipeline, None, exc_string)
        job.failed_job_registry.add(job, ttl=ttl, exc_string=exc_string, pipeline=pipeline)
        self.worker.increment_failed_job_count(pipeline=pipeline)

    def _end(
        self,
        job: Job,
        status: JobStatus,
        result_type: Result.Type,
        ttl: int | None,
        pipeline: Any,
        return_value: Any = None,
        exc_string: str | None = None,
    ) -> None:
        """The job's status, its `Result` and the end of its execution."""
        if job.id not in self.executions:
            self.start(job, pipeline)
        execution = self.executions.pop(job.id)
        del self._ttls[job.id]
        worker = self.worker
        job.ended_at = now()
        job.set_status(status, pipeline=pipeline)
        pipeline.hset(job.key, "ended_at", utcformat(job.ended_at))
        Result.create(
            job,
            result_type,
            ttl,
            return_value=return_value,
            exc_string=exc_string,
            worker_name=worker.name,
            pipeline=pipeline,
            execution_id=execution.id,
            execution_started_at=execution.created_at,
            execution_ended_at=job.ended_at,
        )
        execution.delete(job=job, pipeline=pipeline)
        if job.started_at is not None:
            worker.increment_total_working_time(job.ended_at - job.started_at, pipeline)
        if not self.executions:
            worker.set_current_job_id(None, pipeline=pipeline)

    # -- keeping RQ's view alive ---------------------------------------------------------
    def heartbeat(self, pipeline: Any) -> None:
        """The worker's heartbeat and every execution's, as RQ's `maintain_heartbeats`."""
        worker = self.worker
        worker.heartbeat(worker.job_monitoring_interval + 60, pipeline=pipeline)
        registry = self.queue.started_job_registry
        for job_id, execution in self.executions.items():
            execution.heartbeat(registry, self._ttls[job_id], pipeline=pipeline)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


Commands = list[tuple[Any, Any]]  # a pipeline's command stack: (args, options) per command


class OneJob:
    """RQ's bookkeeping of one job a sequential KV worker serves, as ready pipeline commands.

    RQ's `SimpleWorker` spends about nine round trips on a job's bookkeeping (execution,
    status, result, counters, worker state). Here the same writes (`ConcurrentJobs.start`,
    `finish`, `fail`, and the worker's state) are recorded once as commands, which the
    runtime adds to the round trips it makes anyway — the job's start with `START_JOB`, its
    end with the result — and repeats unchanged if Redis was away (each is safe to repeat).
    """

    def __init__(self, jobs: ConcurrentJobs, job: Job) -> None:
        self.jobs = jobs
        self.job = job
        self._start: Commands | None = None
        self._finished: Commands | None = None
        self._failed: Commands | None = None

    def start(self) -> Commands:
        """The job started: its execution, status ``started``, the worker ``busy``."""
        if self._start is None:
            worker = self.jobs.worker
            self._start = _recorded(
                worker.connection,
                lambda pipe: (
                    self.jobs.start(self.job, pipe),
                    worker.set_state(WorkerStatus.BUSY, pipeline=pipe),
                ),
            )
        return self._start

    def finished(self, return_value: Any) -> Commands:
        """The job succeeded with `return_value`; the worker ``idle``."""
        if self._finished is None:
            self._finished = self._ending(
                lambda pipe: self.jobs.finish(self.job, return_value, pipe)
            )
        return self._finished

    def failed(self, exc_string: str) -> Commands:
        """The job failed with `exc_string`; the worker ``idle``."""
        if self._failed is None:
            self._failed = self._ending(lambda pipe: self.jobs.fail(self.job, exc_string, pipe))
        return self._failed

    def _ending(self, end: Any) -> Commands:
        worker = self.jobs.worker
        return _recorded(
            worker.connection,
            lambda pipe: (end(pipe), worker.set_state(WorkerStatus.IDLE, pipeline=pipe)),
        )


def _recorded(client: Any, write: Any) -> Commands:
    """The commands `write(pipe)` queues on a pipeline, which is never executed."""
    pipe = client.pipeline(transaction=False)
    write(pipe)
    return list(pipe.command_stack)

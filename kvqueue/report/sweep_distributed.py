"""Sweep cells as RQ jobs on a dedicated queue, run by plain ``rq worker`` processes anywhere.

    rq worker --url "$REDIS_URL" --serializer rq.serializers.JSONSerializer kvq-sim

Each cell is one job of `kvqueue.report.sweep_cell.run_cell_job` on the queue (default
``kvq-sim``), its arguments the sweep's spec and the cell as JSON; the worker rebuilds the
requests (a trace or prompts file must exist at the same absolute path on its machine),
simulates and returns the cell's record, which comes back through Redis. Cells are
stateless, so RQ's default forking worker suits them (unlike the KV workers, which must be
``SimpleWorker``\\ s); any number of workers on any number of machines share the queue.

Only JSON crosses Redis: jobs are enqueued with RQ's JSON serializer, so the workers must be
started with ``--serializer rq.serializers.JSONSerializer`` — a worker left on RQ's default
(pickle) cannot read the jobs, and the sweep stops with a message saying so rather than
letting it unpickle anything.

Invariants: every cell gets its record or the sweep raises `KVQueueError` naming the cell
and why (a failed job, no worker listening, a timeout); whatever happens, every job this
sweep enqueued is deleted before `run` returns or raises (KeyboardInterrupt included).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis
from rq import Queue, Worker
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer

from kvqueue.errors import KVQueueError
from kvqueue.report.sweep_spec import Cell, SweepSpec

SIM_QUEUE = "kvq-sim"
JOB_FUNCTION = "kvqueue.report.sweep_cell.run_cell_job"
DEFAULT_TIMEOUT_S = 3600.0
POLL_S = 0.2
RESULT_TTL_S = 24 * 3600  # a record outlives a slow collector; deleted once collected

CellProgress = Callable[[int], None]


def worker_command(queue: str = SIM_QUEUE) -> str:
    """The shell command that starts one worker for `queue` on the Redis at $REDIS_URL."""
    return f'rq worker --url "$REDIS_URL" --serializer rq.serializers.JSONSerializer {queue}'


class DistributedCells:
    """Runs cells as jobs on `queue_name` and collects their records from Redis."""

    def __init__(
        self,
        client: redis.Redis,
        spec: SweepSpec,
        queue_name: str = SIM_QUEUE,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        poll_s: float = POLL_S,
    ) -> None:
        self.client = client
        self.spec = spec
        self.queue = Queue(queue_name, connection=client, serializer=JSONSerializer)
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    def describe(self) -> str:
        return f"distributed: RQ jobs on queue {self.queue.name!r}"

    def listening_workers(self) -> int:
        return len(Worker.all(connection=self.client, queue=self.queue))

    def run(
        self, cells: Sequence[Cell], progress: CellProgress | None = None
    ) -> list[dict[str, Any]]:
        """The record of every cell, in the order given (module docstring)."""
        if not self.listening_workers():
            raise KVQueueError(
                f"no rq worker listens on queue {self.queue.name!r}; start one or more with: "
                f"{worker_command(self.queue.name)}"
            )
        sweep_id = uuid.uuid4().hex[:12]
        spec = self.spec.to_dict()
        job_ids: list[str] = []
        try:
            for index, cell in enumerate(cells):
                job = self.queue.enqueue_call(
                    JOB_FUNCTION,
                    args=(spec, cell.to_dict()),
                    job_id=f"kvq-sweep-{sweep_id}-{index:05d}",
                    timeout=int(self.timeout_s),
                    result_ttl=RESULT_TTL_S,
                    failure_ttl=RESULT_TTL_S,
                    description=f"kvqueue sweep cell: {cell.describe()}",
                )
                job_ids.append(job.id)
            return self._collect(cells, job_ids, progress)
        finally:
            self._delete(job_ids)

    def _collect(
        self, cells: Sequence[Cell], job_ids: Sequence[str], progress: CellProgress | None
    ) -> list[dict[str, Any]]:
        records: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(records) < len(cells):
            pending = [i for i in range(len(cells)) if i not in records]
            jobs = Job.fetch_many(
                [job_ids[i] for i in pending], connection=self.client, serializer=JSONSerializer
            )
            finished = 0
            for index, job in zip(pending, jobs, strict=True):
                if job is None:
                    raise KVQueueError(
                        f"the job of cell {cells[index].describe()} disappeared from Redis"
                    )
                status = job.get_status(refresh=False)
                if status == JobStatus.FINISHED:
                    records[index] = job.return_value()
                    finished += 1
                elif status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                    raise KVQueueError(
                        f"cell {cells[index].describe()} failed on queue {self.queue.name!r}: "
                        f"{_failure_reason(job)}"
                    )
            if finished and progress is not None:
                progress(finished)
            if len(records) < len(cells):
                if time.monotonic() > deadline:
                    raise KVQueueError(
                        f"{len(cells) - len(records)} of {len(cells)} cells had no result within "
                        f"{self.timeout_s:.0f} s on queue {self.queue.name!r} "
                        f"({self.listening_workers()} workers listening)"
                    )
                time.sleep(self.poll_s)
        return [records[i] for i in range(len(cells))]

    def _delete(self, job_ids: Sequence[str]) -> None:
        """Remove this sweep's jobs: queued ones leave the queue, finished ones their records."""
        if not job_ids:
            return
        for job in Job.fetch_many(job_ids, connection=self.client, serializer=JSONSerializer):
            if job is not None:
                Result.delete_all(job)
                job.delete(remove_from_queue=True)


def _failure_reason(job: Job) -> str:
    result = job.latest_result()
    text = (result.exc_string if result is not None else "") or ""
    if "DeserializationError" in text:
        return (
            "a worker could not read the job: start the workers with --serializer "
            f"rq.serializers.JSONSerializer ({worker_command(job.origin)})"
        )
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"RQ reports the job {job.get_status(refresh=False)}"

"""Waiting for a run's results: every request sent ends with exactly one, in bounded time.

While it waits the producer reads the run's results stream and, so that nothing is lost:

- claims workers whose heartbeat expired (`Recovery.maybe_reap`): their requests in service
  fail, their queued ones are rerouted (see `kvqueue.live.recovery`);
- about once a second asks RQ about the jobs still without a result: a job RQ failed
  (e.g. a plain `rq worker` that could not read it) or that vanished gets a `failed` result
  with RQ's error;
- at the timeout, every request still without a result gets `failed` "no result within N s",
  and its job, if still queued, is withdrawn and its load released: no worker serves it later.

All of these append through `ResultWriter`, where the first result of a request wins.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.live.jobs import KVJob
from kvqueue.live.recovery import Recovery
from kvqueue.live.runs import DEFAULT_RUN_TTL_S, ResultWriter, read_results
from kvqueue.routing.state import RedisRouterState

RQ_CHECK_INTERVAL_S = 1.0


def wait_for_results(
    client: redis.Redis,
    run_id: str,
    job_ids: dict[str, str],
    prefix: str = keys.DEFAULT_PREFIX,
    timeout_s: float = 600.0,
    on_progress: Callable[[int], None] | None = None,
    poll_s: float = 0.05,
    recovery: Recovery | None = None,
    run_ttl_s: float = DEFAULT_RUN_TTL_S,
    strategy: str = "",
) -> list[RequestResult]:
    """Block until every request of `job_ids` ({request id: RQ job id}) has its result.

    Returns one result per request of `job_ids`, in their order (see the module docstring
    for what happens to the ones that do not come).
    """
    writer = ResultWriter(client, prefix, run_ttl_s)
    by_request: dict[str, RequestResult] = {}
    last = "-"
    deadline = time.monotonic() + timeout_s
    next_rq_check = time.monotonic() + RQ_CHECK_INTERVAL_S
    while True:
        new, last = read_results(client, run_id, prefix, last)
        for result in new:
            by_request.setdefault(result.request_id, result)
        if on_progress is not None and new:
            on_progress(len(by_request))
        missing = [r for r in job_ids if r not in by_request]
        if not missing:
            break
        if recovery is not None:
            recovery.maybe_reap()
        now = time.monotonic()
        timed_out = now >= deadline
        if timed_out or now >= next_rq_check:
            next_rq_check = now + RQ_CHECK_INTERVAL_S
            for request_id, reason in _failed_jobs(client, missing, job_ids, timed_out, timeout_s):
                writer.append(_failure(run_id, request_id, strategy, reason))
            if timed_out:
                _withdraw(client, prefix, [job_ids[r] for r in missing])
                new, last = read_results(client, run_id, prefix, last)
                for result in new:
                    by_request.setdefault(result.request_id, result)
                break
        time.sleep(poll_s)
    return [by_request[r] for r in job_ids if r in by_request]


def _failed_jobs(
    client: redis.Redis,
    request_ids: Sequence[str],
    job_ids: dict[str, str],
    timed_out: bool,
    timeout_s: float,
) -> list[tuple[str, str]]:
    """(request id, reason) of the jobs that will never report: failed in RQ or gone; at the
    timeout, every job asked about."""
    pipe = client.pipeline(transaction=False)
    for request_id in request_ids:
        pipe.hget(Job.key_for(job_ids[request_id]), "status")
    statuses = [s.decode() if s is not None else None for s in pipe.execute()]
    ended: list[tuple[str, str]] = []
    for request_id, status in zip(request_ids, statuses, strict=True):
        job_id = job_ids[request_id]
        if status is None:
            ended.append((request_id, "its RQ job disappeared without a result"))
        elif status == JobStatus.FAILED.value:
            ended.append((request_id, f"RQ failed its job: {_rq_error(client, job_id)}"))
        elif timed_out:
            ended.append(
                (request_id, f"no result within {timeout_s:g} s (its RQ job was {status})")
            )
    return ended


def _rq_error(client: redis.Redis, job_id: str) -> str:
    job = Job.fetch(job_id, connection=client, serializer=JSONSerializer)
    latest = job.latest_result()
    error = (latest.exc_string if latest is not None else "") or "unknown error"
    return error.strip().splitlines()[-1]


def _withdraw(client: redis.Redis, prefix: str, job_ids: Sequence[str]) -> None:
    """Take still-queued jobs out of their queues and release their load records."""
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(Job.key_for(job_id), "origin")
    origins = pipe.execute()
    state = RedisRouterState(client, prefix)
    for job_id, origin in zip(job_ids, origins, strict=True):
        if origin is None:
            continue
        worker = origin.decode()  # a worker's queue is named after it (keys.queue_name)
        queue = Queue(worker, connection=client, job_class=KVJob, serializer=JSONSerializer)
        if client.lrem(queue.key, 1, job_id):
            state.release(worker, job_id)
            client.delete(Job.key_for(job_id))


def _failure(run_id: str, request_id: str, strategy: str, reason: str) -> RequestResult:
    return RequestResult(
        request_id=request_id,
        run_id=run_id,
        worker="",
        strategy=strategy,
        status=RequestStatus.FAILED,
        reason=reason,
    )

"""A run in Redis: its metadata hash and its results stream, and waiting for them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.gpu.results import RequestResult, RequestStatus


def write_run_meta(
    client: redis.Redis, run_id: str, meta: dict[str, Any], prefix: str = keys.DEFAULT_PREFIX
) -> None:
    client.hset(keys.run(run_id, prefix), mapping={k: orjson.dumps(v) for k, v in meta.items()})


def read_run_meta(
    client: redis.Redis, run_id: str, prefix: str = keys.DEFAULT_PREFIX
) -> dict[str, Any]:
    raw = client.hgetall(keys.run(run_id, prefix))
    return {k.decode(): orjson.loads(v) for k, v in raw.items()}


RESULTS_STREAM_MAXLEN = 1_000_000


def append_result(pipe: Any, result: RequestResult, prefix: str = keys.DEFAULT_PREFIX) -> None:
    """Queue the XADD of `result` to its run's stream on `pipe` (the one encoding `read_results`
    decodes)."""
    pipe.xadd(
        keys.results(result.run_id, prefix),
        {"result": orjson.dumps(result.to_dict())},
        maxlen=RESULTS_STREAM_MAXLEN,
        approximate=True,
    )


def read_results(
    client: redis.Redis, run_id: str, prefix: str = keys.DEFAULT_PREFIX, after: str = "-"
) -> tuple[list[RequestResult], str]:
    """Results appended after stream id `after` (exclusive, '-' for all) and the last id seen."""
    stream = keys.results(run_id, prefix)
    start = after if after == "-" else f"({after}"
    entries = client.xrange(stream, min=start, max="+")
    results = [RequestResult.from_dict(orjson.loads(fields[b"result"])) for _, fields in entries]
    last = entries[-1][0].decode() if entries else after
    return results, last


def wait_for_results(
    client: redis.Redis,
    run_id: str,
    job_ids: dict[str, str],
    prefix: str = keys.DEFAULT_PREFIX,
    timeout_s: float = 600.0,
    on_progress: Callable[[int], None] | None = None,
    poll_s: float = 0.2,
) -> list[RequestResult]:
    """Block until every request in `job_ids` ({request id: RQ job id}) has a result.

    Jobs that RQ reports failed (or that vanished) without a result of their own get a
    `failed` result carrying RQ's error, and so do those still unfinished at the timeout:
    nothing sent is ever lost.
    """
    by_request: dict[str, RequestResult] = {}
    last = "-"
    deadline = time.monotonic() + timeout_s
    next_job_check = time.monotonic() + 5.0
    while True:
        new, last = read_results(client, run_id, prefix, last)
        for result in new:
            by_request.setdefault(result.request_id, result)
        if on_progress is not None and new:
            on_progress(len(by_request))
        missing = [r for r in job_ids if r not in by_request]
        if not missing:
            break
        now = time.monotonic()
        if now >= next_job_check or now >= deadline:
            next_job_check = now + 5.0
            timed_out = now >= deadline
            for request_id, reason in _dead_jobs(client, missing, job_ids, timed_out, timeout_s):
                by_request[request_id] = _synthetic_failure(run_id, request_id, reason)
            if timed_out:
                break
        time.sleep(poll_s)
    return [by_request[r] for r in job_ids if r in by_request]


def _dead_jobs(
    client: redis.Redis,
    request_ids: Iterable[str],
    job_ids: dict[str, str],
    timed_out: bool,
    timeout_s: float,
) -> list[tuple[str, str]]:
    request_ids = list(request_ids)
    jobs = Job.fetch_many(
        [job_ids[r] for r in request_ids], connection=client, serializer=JSONSerializer
    )
    dead: list[tuple[str, str]] = []
    for request_id, job in zip(request_ids, jobs, strict=True):
        if job is None:
            dead.append((request_id, "its RQ job disappeared from Redis without a result"))
            continue
        status = job.get_status(refresh=False)
        if status == JobStatus.FAILED:
            error = (job.latest_result().exc_string if job.latest_result() else "") or "unknown"
            dead.append((request_id, f"RQ job {job.id} failed: {error.strip().splitlines()[-1]}"))
        elif timed_out:
            dead.append(
                (request_id, f"no result within {timeout_s:.0f} s (RQ job {job.id} is {status})")
            )
    return dead


def _synthetic_failure(run_id: str, request_id: str, reason: str) -> RequestResult:
    return RequestResult(
        request_id=request_id,
        run_id=run_id,
        worker="",
        strategy="",
        status=RequestStatus.FAILED,
        reason=reason,
    )

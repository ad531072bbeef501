"""Warm caches at the start of a live run: what the workers still cache, and clearing it.

A live worker keeps its cache between runs (its process is one GPU). A run sent to workers
that served another just before starts on warm caches: its hit rate counts blocks earlier runs
left and can exceed what its own requests share. `warm_blocks` reads how many blocks each live
worker caches, as it last wrote in its info (after every job; a batched worker at the end of
each busy period, so between runs it is current). `reset_caches` queues one `clear_cache` job
on each worker's queue — served after every job queued before it, when no request holds a
block — and waits until every worker has answered; each has then announced `cleared`, so the
router's index holds none of its blocks.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.errors import KVQueueError
from kvqueue.live.jobs import CLEAR_FUNCTION, KVJob

CLEAR_RESULT_TTL_S = 600  # RQ keeps the answer as long as a finished request's job
CLEAR_POLL_S = 0.02


def warm_blocks(client: redis.Redis, workers: Sequence[str], prefix: str) -> dict[str, int]:
    """Cached blocks per worker, from `kvq:worker:<w>:info` (0 when it wrote none)."""
    pipe = client.pipeline(transaction=False)
    for worker in workers:
        pipe.hget(keys.worker_info(worker, prefix), "cached_blocks")
    return {w: int(v or 0) for w, v in zip(workers, pipe.execute(), strict=True)}


def warm_cache_warning(blocks: Mapping[str, int], run_id: str) -> str | None:
    """A warning naming the blocks the workers cache before run `run_id`, or None if none."""
    total = sum(blocks.values())
    if not total:
        return None
    each = ", ".join(f"{w} {n:,}" for w, n in blocks.items() if n)
    return (
        f"the workers' caches are not empty at the start of run {run_id}: {total:,} cached "
        f"blocks ({each}) left by earlier runs count as hits, so the run's hit rate can exceed "
        "what its own requests share; --reset-caches clears them first"
    )


def reset_caches(
    client: redis.Redis, workers: Sequence[str], timeout_s: float = 60.0
) -> dict[str, int]:
    """Clear every worker's cache (module docstring); the blocks each dropped, by worker.

    Raises `KVQueueError` naming the workers that failed or did not answer in `timeout_s`.
    """
    jobs = {
        worker: Queue(
            keys.queue_name(worker), connection=client, job_class=KVJob, serializer=JSONSerializer
        ).enqueue_call(CLEAR_FUNCTION, result_ttl=CLEAR_RESULT_TTL_S, description="clear cache")
        for worker in workers
    }
    deadline = time.monotonic() + timeout_s
    cleared: dict[str, int] = {}
    while True:
        for worker, job in jobs.items():
            if worker in cleared:
                continue
            status = job.get_status(refresh=True)
            if status == JobStatus.FINISHED:
                cleared[worker] = int(job.return_value(refresh=True)["cleared_blocks"])
            elif status in (JobStatus.FAILED, None):
                raise KVQueueError(f"{worker} could not clear its cache: {_error(job)}")
        if len(cleared) == len(jobs):
            return {w: cleared[w] for w in workers}
        if time.monotonic() > deadline:
            missing = ", ".join(w for w in workers if w not in cleared)
            raise KVQueueError(
                f"no answer to the cache reset within {timeout_s:g} s from {missing}"
            )
        time.sleep(CLEAR_POLL_S)


def _error(job: Job) -> str:
    latest = job.latest_result()
    error = (latest.exc_string if latest is not None else "") or "its job disappeared"
    return error.strip().splitlines()[-1]

"""Redis hygiene for runs on a shared Redis: what a comparison deletes, and when it refuses.

Nothing outside the key prefix and a run's own RQ jobs is ever deleted — never FLUSHDB.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.errors import KVQueueError


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def kept_key_prefixes(prefix: str) -> tuple[str, ...]:
    """Key prefixes `clear_routing_state` keeps: results streams and run metadata."""
    return (keys.results("", prefix), keys.run("", prefix))


def clear_routing_state(client: redis.Redis, prefix: str) -> int:
    """Delete every key under `prefix` except results and run metadata; returns how many.

    That is the prefix tree, per-worker sets and info, loads and backlog estimates, cache
    usage, learned statistics, the round-robin counter, live workers and the event stream —
    whatever routing state kvqueue keeps now or later, so no run inherits another's. Keys
    outside `prefix` (RQ's included) are never touched.
    """
    kept = kept_key_prefixes(prefix)
    doomed = [
        name
        for name in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000)
        if not name.decode(errors="replace").startswith(kept)
    ]
    deleted = 0
    for start in range(0, len(doomed), 500):
        deleted += client.delete(*doomed[start : start + 500])
    return deleted


def live_worker_names(client: redis.Redis, prefix: str, heartbeat_ttl_s: float) -> list[str]:
    """kvqueue workers that heartbeat under `prefix` within the TTL."""
    cutoff = int(time.time() * 1000 - heartbeat_ttl_s * 1000)
    return [m.decode() for m in client.zrangebyscore(keys.workers(prefix), cutoff, "+inf")]


def check_redis_is_free(
    client: redis.Redis, prefix: str, workers: Sequence[str], heartbeat_ttl_s: float = 15.0
) -> None:
    """Raise `KVQueueError` if running our own workers there would collide with someone's.

    Checks: live kvqueue workers under `prefix`; RQ workers listening on, or jobs waiting in,
    the queues of `workers` (RQ queue names are not prefixed, so another prefix does not
    isolate them — use another Redis database for that).
    """
    live = live_worker_names(client, prefix, heartbeat_ttl_s)
    if live:
        raise KVQueueError(
            f"{len(live)} kvqueue worker(s) are live under prefix {prefix!r} ({', '.join(live)}); "
            "the comparison starts its own: stop them or set another KVQ_PREFIX and Redis db"
        )
    for worker in workers:
        queue = Queue(keys.queue_name(worker), connection=client, serializer=JSONSerializer)
        listeners = Worker.all(connection=client, queue=queue)
        if listeners:
            raise KVQueueError(
                f"RQ worker {listeners[0].name} already listens on queue {queue.name!r}; the "
                "comparison starts its own workers there: stop it, or use another Redis db "
                "(e.g. REDIS_URL=redis://host:6379/3)"
            )
        if queue.count:
            raise KVQueueError(
                f"RQ queue {queue.name!r} already holds {queue.count} job(s) (an interrupted "
                f"run?); the comparison's workers would serve them: empty it with `rq empty "
                f"{queue.name} --url <REDIS_URL>` or use another Redis db"
            )


def drop_queued_jobs(client: redis.Redis, run_id: str, workers: Sequence[str]) -> int:
    """Delete the run's jobs still waiting in the queues of `workers`; returns how many.

    Only ids of the producer's form ``kvq-<run_id>-<position>`` are touched.
    """
    mark = f"kvq-{run_id}-"
    dropped = 0
    for worker in workers:
        queue = Queue(keys.queue_name(worker), connection=client, serializer=JSONSerializer)
        for job_id in queue.get_job_ids():
            if job_id.startswith(mark):
                queue.remove(job_id)
                client.delete(Job.key_for(job_id))
                dropped += 1
    return dropped

"""The KV worker's RQ side: its work loop outlives Redis outages and runs only KVJob jobs."""

from __future__ import annotations

import pytest
import redis
from rq.serializers import JSONSerializer

from kvqueue.live.jobs import KVJob
from kvqueue.live.worker import KVWorker


class RedisAway(redis.Redis):
    """A client whose every command fails as if Redis were down."""

    def execute_command(self, *args, **options):
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


@pytest.fixture
def worker(fake_redis) -> KVWorker:
    return KVWorker(["worker-0"], connection=fake_redis)


def test_a_kv_worker_reads_its_queue_as_kvjobs_in_json(worker: KVWorker) -> None:
    (queue,) = worker.queues
    assert (worker.job_class, queue.job_class) == (KVJob, KVJob)
    assert worker.serializer is JSONSerializer and queue.serializer is JSONSerializer
    assert worker.gpu_name == "worker-0"


@pytest.mark.parametrize(
    "call",
    [
        lambda w: w.set_state("idle"),  # RQ does this entering its dequeue loop
        lambda w: w.heartbeat(),
        lambda w: w.check_for_suspension(burst=False),
        lambda w: w.run_maintenance_tasks(),
    ],
    ids=["set_state", "heartbeat", "check_for_suspension", "run_maintenance_tasks"],
)
def test_rq_bookkeeping_outside_rqs_own_retries_survives_an_outage(worker: KVWorker, call) -> None:
    worker.connection = RedisAway()

    call(worker)  # logged, not raised: an exception here would end RQ's work loop


def test_a_worker_serves_exactly_one_queue(fake_redis) -> None:
    with pytest.raises(ValueError, match=r"exactly one queue \(its GPU\), got \['a', 'b'\]"):
        KVWorker(["a", "b"], connection=fake_redis)

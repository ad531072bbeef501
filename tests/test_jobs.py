"""What a KV worker agrees to run: kvqueue's job functions, with JSON arguments, nothing else."""

from __future__ import annotations

import pytest
from rq import Callback, Queue
from rq.serializers import JSONSerializer

from kvqueue.live.jobs import JOB_FUNCTION, JOB_FUNCTIONS, SNAPSHOT_FUNCTION, JobRefused, KVJob
from kvqueue.live.jobs import refusal as refusal_of
from kvqueue.live.worker import cache_snapshot, serve_request


@pytest.fixture
def queue(fake_redis) -> Queue:
    return Queue("worker-0", connection=fake_redis, job_class=KVJob, serializer=JSONSerializer)


def test_kvqueues_job_functions_are_the_only_ones_and_resolve_to_themselves(queue) -> None:
    assert {JOB_FUNCTION, SNAPSHOT_FUNCTION} == JOB_FUNCTIONS
    served = KVJob.fetch(queue.enqueue(JOB_FUNCTION, {}).id, connection=queue.connection,
                         serializer=JSONSerializer)  # fmt: skip
    snapshot = KVJob.fetch(queue.enqueue(SNAPSHOT_FUNCTION).id, connection=queue.connection,
                           serializer=JSONSerializer)  # fmt: skip

    assert (refusal_of(served), refusal_of(snapshot)) == (None, None)
    assert (served.func, snapshot.func) == (serve_request, cache_snapshot)


@pytest.mark.parametrize(
    ("func_name", "options", "why"),
    [
        ("os.system", {}, "'os.system' is not a kvqueue job function"),
        ("builtins.eval", {}, "'builtins.eval' is not a kvqueue job function"),
        ("kvqueue.live.worker.GpuRuntime", {}, "is not a kvqueue job function"),
        (JOB_FUNCTION, {"on_failure": Callback("os.system")}, "asks for callbacks (os.system)"),
    ],
)
def test_any_other_function_is_refused_before_it_is_resolved(
    queue, func_name: str, options: dict, why: str
) -> None:
    job = KVJob.fetch(queue.enqueue(func_name, "id", **options).id, connection=queue.connection,
                      serializer=JSONSerializer)  # fmt: skip

    assert why in refusal_of(job)
    with pytest.raises(JobRefused, match=why.replace("(", r"\(").replace(")", r"\)")):
        job.func  # noqa: B018 - resolving it is what must fail
    assert (job.success_callback, job.failure_callback, job.stopped_callback) == (None,) * 3

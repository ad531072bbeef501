"""What a KV worker agrees to run: kvqueue's job functions, with JSON arguments, nothing else."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest
from rq import Callback, Queue
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.gpu.hashing import hash_token_blocks
from kvqueue.gpu.request import Request
from kvqueue.live.jobs import (
    CLEAR_FUNCTION,
    JOB_FUNCTION,
    JOB_FUNCTIONS,
    SNAPSHOT_FUNCTION,
    JobContext,
    JobRefused,
    KVJob,
)
from kvqueue.live.jobs import refusal as refusal_of
from kvqueue.live.producer import Producer
from kvqueue.live.worker import cache_snapshot, clear_cache, serve_request
from kvqueue.routing.membership import RedisMembership
from kvqueue.workloads.synthetic import make_workload


@pytest.fixture
def queue(fake_redis) -> Queue:
    return Queue("worker-0", connection=fake_redis, job_class=KVJob, serializer=JSONSerializer)


def test_kvqueues_job_functions_are_the_only_ones_and_resolve_to_themselves(queue) -> None:
    assert {JOB_FUNCTION, SNAPSHOT_FUNCTION, CLEAR_FUNCTION} == JOB_FUNCTIONS
    served = KVJob.fetch(queue.enqueue(JOB_FUNCTION, {}).id, connection=queue.connection,
                         serializer=JSONSerializer)  # fmt: skip
    snapshot = KVJob.fetch(queue.enqueue(SNAPSHOT_FUNCTION).id, connection=queue.connection,
                           serializer=JSONSerializer)  # fmt: skip
    clear = KVJob.fetch(queue.enqueue(CLEAR_FUNCTION).id, connection=queue.connection,
                        serializer=JSONSerializer)  # fmt: skip

    assert (refusal_of(served), refusal_of(snapshot), refusal_of(clear)) == (None, None, None)
    assert (served.func, snapshot.func, clear.func) == (serve_request, cache_snapshot, clear_cache)


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


def make_context(num_tokens: int = 576, max_tokens: int | None = 32) -> JobContext:
    tokens = tuple(range(1000, 1000 + num_tokens))
    request = Request("r-1", num_tokens, tuple(hash_token_blocks(tokens)), max_tokens, 12.5, tokens)
    return JobContext(request, "run-1", "cache_aware", 1.5, 1.0, 608, 0.0, 495.0, 1)


def test_a_job_carries_its_hashes_as_one_base64_string_and_no_token_ids() -> None:
    context = make_context()
    wire = orjson.loads(orjson.dumps(context.to_wire()))
    back = JobContext.from_wire(wire)

    assert isinstance(wire["block_hashes"], str) and "token_ids" not in wire
    assert back == replace(context, request=replace(context.request, token_ids=None))
    assert len(orjson.dumps(wire)) < 2_000  # 36 hashes (1,152 bytes) of a 576-token prompt


def test_token_ids_travel_for_a_decode_model_and_for_a_prompt_without_a_full_block() -> None:
    context, short = make_context(), make_context(num_tokens=10, max_tokens=None)

    assert JobContext.from_wire(context.to_wire(with_token_ids=True)) == context
    assert JobContext.from_wire(short.to_wire()) == short


def test_a_queued_kvjob_stores_no_empty_field_and_reads_back_the_same(queue) -> None:
    job = queue.enqueue_call(JOB_FUNCTION, args=({"request_id": "r-1"},), description="r-1")
    stored = queue.connection.hgetall(job.key)
    back = KVJob.fetch(job.id, connection=queue.connection, serializer=JSONSerializer)

    assert b"" not in stored.values()
    assert b"started_at" not in stored and b"success_callback_name" not in stored
    assert (back.args, back.description, back.get_status(), back.worker_name, back.started_at) == (
        [{"request_id": "r-1"}],  # JSON: a list
        "r-1",
        "queued",
        None,
        None,
    )
    assert refusal_of(back) is None


@pytest.mark.redis
@pytest.mark.parametrize(("needs", "sent"), [(0, False), (1, True)])
def test_the_producer_sends_token_ids_only_to_workers_whose_decode_model_reads_them(
    redis_client, needs: int, sent: bool
) -> None:
    settings = Settings(redis_url="redis://unused", time_scale=0.0, strategy="round_robin")
    RedisMembership(redis_client, settings.key_prefix).register("worker-0", 924)
    redis_client.hset(keys.worker_info("worker-0", settings.key_prefix), "needs_token_ids", needs)
    (request,) = make_workload("shared-prefix-tiny", num_requests=1)
    Producer(redis_client, settings, run_id="tokens").send([request])

    (job,) = Queue("worker-0", connection=redis_client, job_class=KVJob,
                   serializer=JSONSerializer).get_jobs()  # fmt: skip
    assert ("token_ids" in job.args[0]) is sent
    assert JobContext.from_wire(job.args[0]).request.block_hashes == request.block_hashes

"""Round trips that outlive a Redis outage: a pipeline is sent again, whole, until it is applied.

Every command a worker sends this way must be safe to repeat (a first attempt may have been
applied before its reply was lost), so the caller is told whether there was a second attempt.
"""

from __future__ import annotations

import logging

import pytest
import redis

from kvqueue.live.retry import execute_through_outages

log = logging.getLogger(__name__)

INCREMENT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.mark.redis
def test_a_pipeline_whose_script_redis_forgot_is_sent_again_whole(
    redis_client: redis.Redis,
) -> None:
    increment = redis_client.register_script(INCREMENT)
    pipe = redis_client.pipeline(transaction=True)
    increment(keys=["counter"], args=[5], client=pipe)
    assert execute_through_outages(pipe, "load", log) == ([5], False)

    redis_client.script_flush()  # as after a restart: the script is gone
    pipe = redis_client.pipeline(transaction=True)
    pipe.incr("attempts")
    increment(keys=["counter"], args=[1], client=pipe)
    replies, retried = execute_through_outages(pipe, "reload", log)

    assert (replies, retried) == ([2, 6], True)
    assert redis_client.get("attempts") == b"2"  # the first attempt applied the rest


def test_a_pipeline_is_replayed_until_redis_answers(
    fake_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kvqueue.live.retry.RETRY_BASE_S", 0.001)
    pipe = fake_redis.pipeline(transaction=True)
    pipe.rpush("log", "a")
    pipe.rpush("log", "b")
    execute = pipe.execute
    failures = iter([redis.ConnectionError("Connection refused")] * 2)

    def flaky_execute(*args, **kwargs):
        error = next(failures, None)
        if error is not None:
            pipe.reset()  # as redis-py does after any attempt
            raise error
        return execute(*args, **kwargs)

    monkeypatch.setattr(pipe, "execute", flaky_execute)
    replies, retried = execute_through_outages(pipe, "replay", log)

    assert (replies, retried) == ([1, 2], True)
    assert fake_redis.lrange("log", 0, -1) == [b"a", b"b"]

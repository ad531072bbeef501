"""Worker membership and outstanding-job accounting in Redis, on fakeredis and redis-server.

A job's load is added once and taken away once, whoever ends it; a new generation of a worker
recounts what it owes and nothing of an older one touches its counters; a dead worker's death
is claimed once. (The live tests in test_recovery.py drive the same scripts with real processes.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import fakeredis
import pytest
import redis
from live_support import INDEX_DB, connect_or_fail, delete_matching, real_redis_url, unique_prefix

from kvqueue import keys
from kvqueue.gpu.load_signals import LoadSignals
from kvqueue.routing.membership import (
    HeartbeatStatus,
    JobRecord,
    RedisMembership,
    StartStatus,
)
from kvqueue.routing.redis_index import RedisIndex
from kvqueue.routing.router import Decision
from kvqueue.routing.state import RedisRouterState
from kvqueue.routing.view import WorkerLoad


@dataclass
class Cluster:
    client: redis.Redis
    prefix: str

    @property
    def membership(self) -> RedisMembership:
        return RedisMembership(self.client, self.prefix)

    @property
    def state(self) -> RedisRouterState:
        return RedisRouterState(self.client, self.prefix)

    def route(self, request, worker: str, job_id: str, tokens: int = 100) -> None:
        decision = Decision(worker, "test", 0, tokens, 50.0)
        self.state.commit(request, decision, job_id=job_id, run_id="run-1")

    def load(self, worker: str) -> tuple[int, int, float]:
        p = self.prefix
        return (
            int(self.client.hget(keys.load(p), worker) or 0),
            int(self.client.hget(keys.load_tokens(p), worker) or 0),
            float(self.client.hget(keys.load_work(p), worker) or 0.0),
        )

    def age(self, worker: str, seconds: float) -> None:
        """Make the worker's last heartbeat `seconds` old."""
        self.client.zadd(keys.workers(self.prefix), {worker: (time.time() - seconds) * 1000})


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if request.param == "fakeredis":
        yield Cluster(fakeredis.FakeRedis(server=fakeredis.FakeServer()), "kvq:")
        return
    client = connect_or_fail(
        real_redis_url(request.getfixturevalue("real_redis_base_url"), INDEX_DB)
    )
    prefix = unique_prefix("membership")
    try:
        yield Cluster(client, prefix)
    finally:
        delete_matching(client, f"{prefix}*")
        client.close()


def test_a_jobs_load_is_taken_away_once_however_often_its_end_is_reported(
    cluster: Cluster, make_request
) -> None:
    gen = cluster.membership.register("worker-0", 924).generation
    cluster.route(make_request(32), "worker-0", "job-1", tokens=100)
    cluster.route(make_request(32), "worker-0", "job-2", tokens=40)
    assert cluster.load("worker-0") == (2, 140, 100.0)
    assert gen == 1

    released = [cluster.state.release("worker-0", "job-1") for _ in range(3)]

    assert released == [True, False, False]
    assert cluster.load("worker-0") == (1, 40, 50.0)


def test_counters_never_go_below_zero(cluster: Cluster) -> None:
    cluster.membership.register("worker-0", 924)
    cluster.state.complete("worker-0", 500, 80.0)  # nothing was committed

    assert cluster.load("worker-0") == (0, 0, 0.0)


def test_a_new_generation_recounts_the_queued_jobs_and_hands_back_the_started_ones(
    cluster: Cluster, make_request
) -> None:
    first = cluster.membership.register("worker-0", 924).generation
    for job_id in ("job-1", "job-2", "job-3"):
        cluster.route(make_request(32), "worker-0", job_id, tokens=10)
    assert cluster.membership.start_job(
        "worker-0", first, "job-1", JobRecord("", "", "", 0, 0)
    ) is (StartStatus.COUNTED)
    cluster.client.hset(keys.load(cluster.prefix), "worker-0", -47)  # drifted, somehow

    second = cluster.membership.register("worker-0", 924)

    assert second.generation == first + 1
    assert list(second.orphans) == ["job-1"]  # it was being served by the process that died
    assert second.orphans["job-1"].request_id == "req-0"
    assert cluster.load("worker-0") == (2, 20, 100.0)  # exactly the two still queued
    # The old process finishing job-1 late changes nothing; the queued ones count once.
    assert cluster.state.release("worker-0", "job-1") is False
    assert cluster.state.release("worker-0", "job-2") is True
    assert cluster.load("worker-0") == (1, 10, 50.0)


def test_starting_a_job_counts_it_for_the_serving_generation(
    cluster: Cluster, make_request
) -> None:
    membership = cluster.membership
    gen = membership.register("worker-0", 924).generation
    fallback = JobRecord("run-1", "req-9", "test", 64, 5.0)
    cluster.route(make_request(32), "worker-0", "job-1", tokens=10)

    assert membership.start_job("worker-0", gen, "job-1", fallback) is StartStatus.COUNTED
    assert membership.start_job("worker-0", gen, "job-9", fallback) is StartStatus.ADOPTED
    assert cluster.load("worker-0") == (2, 74, 55.0)
    assert membership.start_job("worker-0", gen + 1, "job-2", fallback) is StartStatus.SUPERSEDED
    cluster.client.delete(keys.worker_generation("worker-0", cluster.prefix))
    assert membership.start_job("worker-0", gen, "job-2", fallback) is StartStatus.LOST


def test_a_heartbeat_tells_a_process_where_it_stands(cluster: Cluster) -> None:
    membership = cluster.membership
    gen = membership.register("worker-0", 924).generation
    assert membership.heartbeat("worker-0", gen) is HeartbeatStatus.OK

    membership.register("worker-0", 924)  # another process took the name
    assert membership.heartbeat("worker-0", gen) is HeartbeatStatus.SUPERSEDED
    cluster.age("worker-0", 60)
    assert membership.reap("worker-0", heartbeat_ttl_s=15) is not None
    assert membership.heartbeat("worker-0", gen + 1) is HeartbeatStatus.REAPED
    cluster.client.delete(keys.worker_generation("worker-0", cluster.prefix))
    assert membership.heartbeat("worker-0", gen + 1) is HeartbeatStatus.LOST


def test_a_dead_worker_is_claimed_once_and_leaves_the_tree_and_its_load(
    cluster: Cluster, make_request
) -> None:
    membership, index = cluster.membership, RedisIndex(cluster.client, cluster.prefix)
    membership.register("worker-0", 924)
    membership.register("worker-1", 924)
    cached, routed = make_request(32), make_request(48)
    index.add("worker-0", cached.block_hashes)
    cluster.route(routed, "worker-0", "job-1")  # marks its chain pending on worker-0
    assert index.match(routed.block_hashes) == {"worker-0": 3}

    assert membership.reap("worker-0", heartbeat_ttl_s=15) is None  # alive: nothing to claim
    cluster.age("worker-0", 16)
    assert membership.expired_workers(15) == ["worker-0"]
    reaped = membership.reap("worker-0", heartbeat_ttl_s=15)

    assert reaped is not None and (reaped.worker, reaped.generation) == ("worker-0", 1)
    assert list(reaped.jobs) == ["job-1"] and reaped.jobs["job-1"].request_id == routed.request_id
    assert membership.reap("worker-0", heartbeat_ttl_s=15) is None  # claimed once
    assert index.match(cached.block_hashes) == {} and index.match(routed.block_hashes) == {}
    assert cluster.load("worker-0") == (0, 0, 0.0)
    assert membership.live_workers(15) == ["worker-1"]


def test_a_stopping_worker_hands_itself_over_only_as_the_current_generation(
    cluster: Cluster,
) -> None:
    membership = cluster.membership
    old = membership.register("worker-0", 924).generation
    new = membership.register("worker-0", 924).generation

    assert membership.reap("worker-0", 15, generation=old) is None
    assert membership.reap("worker-0", 15, generation=new) is not None
    assert membership.live_workers(15) == []


def test_the_router_reads_each_workers_published_engine_signals_until_it_leaves(
    cluster: Cluster, make_request
) -> None:
    membership, state = cluster.membership, cluster.state
    membership.register("worker-0", 924)
    membership.register("worker-1", 924)
    state.publish_signals("worker-0", LoadSignals(3, 2, 0.25, 640))
    request = make_request(32)

    loads = state.view(request, take_ticket=False).loads
    zero = (0, 0, 0.0, 0)
    assert engine_fields(loads["worker-0"]) == (3, 2, 0.25, 640)
    assert engine_fields(loads["worker-1"]) == zero  # publishes none: the defaults

    membership.register("worker-0", 924)  # a new process: the old one's signals are gone
    assert engine_fields(state.view(request, take_ticket=False).load("worker-0")) == zero
    state.publish_signals("worker-1", LoadSignals(1, 0, 0.5, 0))
    cluster.age("worker-1", 60)
    membership.reap("worker-1", heartbeat_ttl_s=15)
    assert cluster.client.hget(keys.engine_signals(cluster.prefix), "worker-1") is None


def engine_fields(load: WorkerLoad) -> tuple[int, int, float, int]:
    return (load.num_running, load.num_waiting, load.engine_kv_usage,
            load.num_queued_prefill_tokens)  # fmt: skip

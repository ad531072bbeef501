"""The router over Redis: policies, live workers, pending marks, and the cost of a decision.

Every Redis test runs twice: on fakeredis (with Lua) and on the real redis-server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import fakeredis
import pytest
import redis
from live_support import (
    INDEX_DB,
    connect_or_fail,
    delete_matching,
    real_redis_url,
    register_workers,
    unique_prefix,
)

from kvqueue import keys
from kvqueue.errors import NoLiveWorkersError
from kvqueue.gpu.request import Request
from kvqueue.routing.policies import base as policy_base
from kvqueue.routing.policies.base import (
    approximate_rules,
    make_policy,
    policy_names,
    register_policy,
    resolve_index_mode,
)
from kvqueue.routing.policies.seed import RoundRobin
from kvqueue.routing.redis_index import RedisIndex
from kvqueue.routing.router import START_WORKER_HINT, Decision, Router
from kvqueue.routing.state import RedisRouterState
from kvqueue.routing.view import RouterView

ISSUE_STRATEGIES = ("cache_aware", "round_robin", "least_loaded")


@dataclass
class Side:
    """One Redis (fake or real) with a key prefix of its own."""

    client: redis.Redis
    prefix: str
    another_client: Callable[[], redis.Redis]  # a second connection to the same Redis

    def router(self, strategy: str, pending_ttl_s: float = 30.0, client: Any = None) -> Router:
        state = RedisRouterState(
            client or self.client, self.prefix, heartbeat_ttl_s=15.0, pending_ttl_s=pending_ttl_s
        )
        return Router(state, make_policy(strategy))

    def register(self, *workers: str, age_s: float = 0.0) -> None:
        register_workers(self.client, self.prefix, workers, age_s)

    def store(self, worker: str, request: Request, num_blocks: int | None = None) -> None:
        """`worker` caches the first `num_blocks` (default all) blocks of `request`."""
        index = RedisIndex(self.client, self.prefix)
        index.add(worker, request.block_hashes[:num_blocks])

    def add_load(self, worker: str, request: Request, tokens: int) -> None:
        """Commit `request` to `worker` (raising its load) without marking any block pending."""
        state = RedisRouterState(self.client, self.prefix)
        state.commit(request, Decision(worker, "test", request.num_blocks, tokens))


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
def side(request: pytest.FixtureRequest) -> Iterator[Side]:
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()
        yield Side(
            fakeredis.FakeRedis(server=server), "kvq:", lambda: fakeredis.FakeRedis(server=server)
        )
        return
    url = real_redis_url(request.getfixturevalue("real_redis_base_url"), INDEX_DB)
    client = connect_or_fail(url)
    prefix = unique_prefix("router")
    try:
        yield Side(client, prefix, lambda: redis.Redis.from_url(url))
    finally:
        delete_matching(client, f"{prefix}*")
        client.close()


# -- cache_aware -----------------------------------------------------------------------------------
def test_cache_aware_prefers_the_longest_match_even_on_a_busier_worker(
    side: Side, make_tokens, make_request
) -> None:
    side.register("worker-0", "worker-1", "worker-2")
    cached = make_request(make_tokens("sys", "a", "b", "c"))
    side.store("worker-0", cached, 1)
    side.store("worker-1", cached, 3)
    side.store("worker-2", cached, 2)
    side.add_load("worker-1", make_request(16), tokens=5_000)
    side.add_load("worker-1", make_request(16), tokens=5_000)

    decision = side.router("cache_aware").route(make_request(make_tokens("sys", "a", "b", "q")))

    assert (decision.worker, decision.strategy) == ("worker-1", "cache_aware")
    assert (decision.matched_blocks, decision.load_tokens) == (3, 64)


def test_cache_aware_breaks_a_tie_in_match_by_least_load(
    side: Side, make_tokens, make_request
) -> None:
    side.register("worker-0", "worker-1", "worker-2")
    cached = make_request(make_tokens("sys", "a"))
    for worker in ("worker-0", "worker-1"):
        side.store(worker, cached)
    side.add_load("worker-0", make_request(16), tokens=100)
    side.add_load("worker-1", make_request(16), tokens=50)

    decision = side.router("cache_aware").route(make_request(make_tokens("sys", "a", "q")))

    # worker-2 is idle but matches nothing; of the two best matches worker-1 has fewer tokens.
    assert (decision.worker, decision.matched_blocks) == ("worker-1", 2)


def test_cache_aware_without_any_match_goes_to_the_least_loaded_worker(
    side: Side, make_tokens, make_request
) -> None:
    side.register("worker-0", "worker-1", "worker-2")
    side.store("worker-0", make_request(make_tokens("other", "prompt")))
    side.add_load("worker-0", make_request(16), tokens=10)

    decision = side.router("cache_aware").route(make_request(make_tokens("fresh", "prompt")))

    assert (decision.worker, decision.matched_blocks) == ("worker-1", 0)


# -- least_loaded ----------------------------------------------------------------------------------
def test_least_loaded_compares_requests_then_tokens_then_worker_order(
    side: Side, make_request
) -> None:
    side.register("worker-10", "worker-2", "worker-3", "worker-4")
    side.add_load("worker-3", make_request(16), tokens=900)
    side.add_load("worker-4", make_request(16), tokens=300)
    side.add_load("worker-10", make_request(16), tokens=10)
    side.add_load("worker-10", make_request(16), tokens=10)
    router = side.router("least_loaded")

    assert router.route(make_request(32)).worker == "worker-2"  # idle
    side.add_load("worker-2", make_request(16), tokens=600)
    assert router.route(make_request(32)).worker == "worker-4"  # 1 request each: fewest tokens
    side.add_load("worker-4", make_request(16), tokens=1)
    side.add_load("worker-3", make_request(16), tokens=1)
    side.add_load("worker-2", make_request(16), tokens=1)
    # All four hold 2 requests; worker-10 has the fewest tokens.
    assert router.route(make_request(32)).worker == "worker-10"


def test_completing_a_request_lowers_its_workers_load(side: Side, make_request) -> None:
    side.register("worker-0", "worker-1")
    router = side.router("least_loaded")
    first = router.route(make_request(32, max_tokens=8))
    router.commit(make_request(32, max_tokens=8), first)
    assert first.worker == "worker-0"
    assert router.route(make_request(32)).worker == "worker-1"

    router.state.complete("worker-0", first.load_tokens, first.estimated_ms)

    assert router.route(make_request(32)).worker == "worker-0"
    assert side.client.hget(keys.load(side.prefix), "worker-0") == b"0"
    assert side.client.hget(keys.load_tokens(side.prefix), "worker-0") == b"0"


def test_idle_workers_tie_in_natural_worker_order(side: Side, make_request) -> None:
    side.register("worker-10", "worker-2")

    assert side.router("least_loaded").route(make_request(32)).worker == "worker-2"


# -- round_robin -----------------------------------------------------------------------------------
def test_round_robin_ticket_is_shared_by_two_routers_on_the_same_redis(
    side: Side, make_request
) -> None:
    side.register("worker-0", "worker-1", "worker-2")
    first = side.router("round_robin")
    second = side.router("round_robin", client=side.another_client())

    chosen = [
        (first if turn % 2 == 0 else second).route(make_request(32)).worker for turn in range(7)
    ]

    assert chosen == ["worker-0", "worker-1", "worker-2"] * 2 + ["worker-0"]
    assert side.client.get(keys.round_robin(side.prefix)) == b"7"


# -- registry --------------------------------------------------------------------------------------
def test_unknown_strategy_error_lists_every_valid_name() -> None:
    with pytest.raises(ValueError, match="warp_drive") as caught:
        make_policy("warp_drive")

    assert set(ISSUE_STRATEGIES) <= set(policy_names())
    for name in policy_names():
        assert name in str(caught.value)


def test_registering_a_taken_policy_name_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_base, "POLICIES", dict(policy_base.POLICIES))

    class Impostor:
        needs_ticket: ClassVar[bool] = False

        def choose(self, request: Request, view: RouterView) -> str:
            return view.workers[-1]

    with pytest.raises(ValueError, match="'round_robin' is already registered by RoundRobin"):
        register_policy("round_robin")(Impostor)
    assert policy_base.POLICIES["round_robin"] is RoundRobin

    register_policy("last_worker")(Impostor)
    assert isinstance(make_policy("last_worker"), Impostor)
    with pytest.raises(ValueError, match="already registered"):
        register_policy("last_worker")(Impostor)


# -- live workers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ISSUE_STRATEGIES)
def test_no_live_workers_raises_with_how_to_start_one(
    side: Side, make_request, strategy: str
) -> None:
    with pytest.raises(NoLiveWorkersError) as caught:
        side.router(strategy).route(make_request(32))

    assert START_WORKER_HINT in str(caught.value)
    assert "rq worker -w workers.KVWorker worker-0" in str(caught.value)


def test_a_worker_with_a_stale_heartbeat_is_not_a_candidate(
    side: Side, make_tokens, make_request
) -> None:
    cached = make_request(make_tokens("sys", "a"))
    side.register("worker-0", age_s=60)  # heartbeat TTL is 15 s
    side.store("worker-0", cached)
    side.register("worker-1")

    assert side.router("cache_aware").route(cached).worker == "worker-1"
    assert {side.router("round_robin").route(cached).worker for _ in range(4)} == {"worker-1"}

    side.register("worker-1", age_s=16)
    with pytest.raises(NoLiveWorkersError):
        side.router("least_loaded").route(cached)


# -- no thundering herd ----------------------------------------------------------------------------
def test_two_requests_with_the_same_new_prefix_routed_back_to_back_go_to_the_same_worker(
    side: Side, make_tokens, make_request
) -> None:
    side.register("worker-0", "worker-1", "worker-2")
    router = side.router("cache_aware")
    first = make_request(make_tokens("new-sys", "p1", "q1"))
    second = make_request(make_tokens("new-sys", "p1", "q2"))
    unrelated = make_request(make_tokens("other-sys", "q3"))

    first_decision = router.route(first)
    router.commit(first, first_decision)
    # No worker has served anything yet: only the pending marks know where "new-sys" is going.
    second_decision = router.route(second)
    router.commit(second, second_decision)
    unrelated_decision = router.route(unrelated)

    assert first_decision.worker == "worker-0"
    assert (second_decision.worker, second_decision.matched_blocks) == ("worker-0", 2)
    # worker-0 is now the busiest: without the pending marks the second request would not
    # have gone there, as the unrelated one shows.
    assert unrelated_decision.worker == "worker-1"


def test_an_expired_pending_mark_no_longer_attracts_requests(
    side: Side, make_tokens, make_request
) -> None:
    side.register("worker-0", "worker-1")
    router = side.router("cache_aware", pending_ttl_s=0.1)
    first = make_request(make_tokens("new-sys", "q1"))
    router.commit(first, router.route(first))

    time.sleep(0.15)
    decision = router.route(make_request(make_tokens("new-sys", "q2")))

    assert (decision.worker, decision.matched_blocks) == ("worker-1", 0)


# -- cost of a decision ----------------------------------------------------------------------------
class RoundTrips:
    """Counts the round trips a client makes: single commands and whole pipelines."""

    def __init__(self, client: redis.Redis) -> None:
        self.calls: list[str] = []
        command, pipeline = client.execute_command, client.pipeline

        def counted_command(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(str(args[0]).upper())
            return command(*args, **kwargs)

        def counted_pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = pipeline(*args, **kwargs)
            execute = pipe.execute

            def counted_execute(*a: Any, **kw: Any) -> Any:
                self.calls.append(f"PIPELINE({len(pipe.command_stack)} commands)")
                return execute(*a, **kw)

            pipe.execute = counted_execute
            return pipe

        client.execute_command = counted_command  # type: ignore[method-assign]
        client.pipeline = counted_pipeline  # type: ignore[method-assign]


@pytest.mark.parametrize("strategy", ISSUE_STRATEGIES)
@pytest.mark.parametrize("num_blocks", [1, 64, 512])
def test_a_decision_is_one_redis_round_trip(
    side: Side, make_request, strategy: str, num_blocks: int
) -> None:
    workers = [f"worker-{i}" for i in range(8)]
    side.register(*workers)
    request = make_request(16 * num_blocks, max_tokens=16)
    for i, worker in enumerate(workers):
        side.store(worker, request, num_blocks * (i + 1) // 8)
        side.add_load(worker, make_request(16), tokens=100 + i)
    router = side.router(strategy)
    router.route(make_request(32))  # the script is loaded once per connection, not per decision

    trips = RoundTrips(side.client)
    decision = router.route(request)

    assert trips.calls == ["EVALSHA"]
    if strategy == "cache_aware":
        assert (decision.worker, decision.matched_blocks) == ("worker-7", num_blocks)

    router.commit(request, decision)  # pending marks and load: one more trip, a pipeline

    assert len(trips.calls) == 2 and trips.calls[1].startswith("PIPELINE")


@pytest.mark.parametrize("strategy", ["sglang", "dynamo:approximate", "llmd:approximate"])
@pytest.mark.parametrize("num_blocks", [1, 512])
def test_an_approximate_decision_is_one_redis_round_trip_too(
    side: Side, make_request, strategy: str, num_blocks: int
) -> None:
    workers = [f"worker-{i}" for i in range(8)]
    side.register(*workers)
    name, mode = resolve_index_mode(strategy)
    policy = make_policy(name)
    state = RedisRouterState(
        side.client, side.prefix, index_mode=mode, approximate=approximate_rules(policy)
    )
    router = Router(state, policy)
    request = make_request(16 * num_blocks, max_tokens=16)
    router.commit(request, router.route(request))  # scripts loaded; the chain recorded

    trips = RoundTrips(side.client)
    decision = router.route(request)

    assert trips.calls == ["EVALSHA"]
    limit = approximate_rules(policy).max_match_blocks or num_blocks
    assert decision.matched_blocks == min(num_blocks, limit)  # it matches what it routed
    router.commit(request, decision)  # the record and the load: one pipeline
    assert len(trips.calls) == 2 and trips.calls[1].startswith("PIPELINE")

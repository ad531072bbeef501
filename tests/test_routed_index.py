"""The approximate index in Redis (`RECORD_ROUTED`, `ROUTE_VIEW` on the routed zsets) against
the in-memory `RoutedIndex`: one suite of scenarios, run on both, expecting the same matches.

Both backends read a real clock here (Redis has only its own), so the scenarios that need time
to pass — a TTL, a sweep — sleep well past it; records that must be told apart in time are a
few ms apart.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence

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
from kvqueue.gpu.hashing import BlockHash
from kvqueue.gpu.request import make_request
from kvqueue.routing.approximate import LLMD_APPROX, ApproximateRules, RoutedIndex
from kvqueue.routing.membership import RedisMembership
from kvqueue.routing.policies.llmd import LlmdScorers
from kvqueue.routing.redis_index import RedisIndex
from kvqueue.routing.router import Decision, Router
from kvqueue.routing.state import RedisRouterState

WORKERS = ("w0", "w1")
GAP_S = 0.005  # between records whose order in time matters


def chain(label: str, n: int) -> list[BlockHash]:
    return [BlockHash(hashlib.sha256(f"{label}/{i}".encode()).digest()) for i in range(n)]


class Memory:
    """The in-memory backend on a real clock (ms since it was made)."""

    def __init__(self, rules: ApproximateRules) -> None:
        start = time.monotonic()
        self.index = RoutedIndex(rules, lambda: (time.monotonic() - start) * 1000.0)

    def set_capacity(self, worker: str, blocks: int) -> None:
        self.index.set_capacity(worker, blocks)

    def record(self, worker: str, hashes: Sequence[BlockHash]) -> None:
        self.index.record(worker, hashes)

    def match(self, hashes: Sequence[BlockHash]) -> dict[str, int]:
        return self.index.match(hashes)

    def size(self, worker: str) -> int:
        return self.index.size(worker)


class InRedis:
    """The Redis backend: the producer's write and the router's one read."""

    def __init__(self, client: redis.Redis, prefix: str, rules: ApproximateRules) -> None:
        self.client, self.prefix, self.rules = client, prefix, rules
        self.index = RedisIndex(client, prefix)
        register_workers(client, prefix, WORKERS, 0.0)

    def set_capacity(self, worker: str, blocks: int) -> None:
        self.client.hset(keys.capacity(self.prefix), worker, blocks)

    def record(self, worker: str, hashes: Sequence[BlockHash]) -> None:
        self.index.record_routed(worker, hashes, self.rules)

    def read(self, hashes: Sequence[BlockHash]):
        return self.index.route_view(hashes, 60_000.0, approximate=self.rules)

    def match(self, hashes: Sequence[BlockHash]) -> dict[str, int]:
        return {w: n for w, n in self.read(hashes).matches.items() if n > 0}

    def size(self, worker: str) -> int:
        return self.read(chain("probe", 1)).sizes[worker]


@pytest.fixture(params=["memory", "fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
def make_index(request: pytest.FixtureRequest) -> Iterator:
    if request.param == "memory":
        yield Memory
        return
    if request.param == "fakeredis":
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        yield lambda rules: InRedis(client, "kvq:", rules)
        return
    url = real_redis_url(request.getfixturevalue("real_redis_base_url"), INDEX_DB)
    client = connect_or_fail(url)
    prefix = unique_prefix("routed")
    try:
        yield lambda rules: InRedis(client, prefix, rules)
    finally:
        delete_matching(client, f"{prefix}*")
        client.close()


def test_a_routed_chain_is_matched_as_a_leading_run(make_index) -> None:
    index = make_index(ApproximateRules("test"))
    a = chain("a", 6)
    index.record("w0", a[:4])
    index.record("w1", a[:2])
    assert index.match(a) == {"w0": 4, "w1": 2}
    assert index.match(chain("b", 3)) == {}
    assert (index.size("w0"), index.size("w1")) == (4, 2)


def test_llmd_pods_forget_first_blocks_first_and_the_walk_counts_past_gaps(make_index) -> None:
    index = make_index(LLMD_APPROX)
    index.set_capacity("w0", 4)  # autoTune: as many entries as the pod's GPU blocks
    a = chain("a", 3)
    index.record("w0", a)
    time.sleep(GAP_S)
    index.record("w0", chain("b", 2))  # 5 > 4: a's first block goes
    assert index.size("w0") == 4
    assert index.match(a) == {}  # nobody holds a[0]: the walk stops at once
    index.record("w1", [a[0], a[2]])
    # w1 holds a[0] and a[2], w0 a[1] and a[2]: the walk goes on, each scores 2.
    assert index.match(a) == {"w1": 2, "w0": 2}


def test_a_cap_over_all_workers_prunes_the_oldest_and_deepest_first(make_index) -> None:
    index = make_index(ApproximateRules("test", capacity_blocks=10, scope="cluster", prune_to=0.8))
    a, b, c = chain("a", 4), chain("b", 4), chain("c", 3)
    index.record("w0", a)
    time.sleep(GAP_S)
    index.record("w1", b)
    time.sleep(GAP_S)
    index.record("w0", c)  # 11 > 10 → 8 kept: a's three deepest blocks go
    assert index.match(a) == {"w0": 1}
    assert index.match(b) == {"w1": 4} and index.match(c) == {"w0": 3}


def test_entries_expire_a_ttl_after_their_last_recording(make_index) -> None:
    index = make_index(ApproximateRules("test", ttl_ms=300.0))
    a = chain("a", 3)
    index.record("w0", a)
    assert index.match(a) == {"w0": 3}
    time.sleep(0.6)
    assert index.match(a) == {}
    index.record("w0", a)
    assert index.match(a) == {"w0": 3}


def test_a_size_budget_is_enforced_only_by_the_sweep(make_index) -> None:
    index = make_index(ApproximateRules("test", capacity_blocks=3, sweep_interval_ms=400.0))
    a, b = chain("a", 3), chain("b", 3)
    index.record("w0", a)
    time.sleep(GAP_S)
    index.record("w0", b)
    assert index.size("w0") == 6  # over budget until the next sweep
    time.sleep(0.8)
    assert index.match(a) == {} and index.match(b) == {"w0": 3}


# -- the router state over Redis ------------------------------------------------------------------
def test_an_approximate_router_in_redis_records_routing_and_reads_it_in_one_view(
    fake_redis,
) -> None:
    register_workers(fake_redis, "kvq:", WORKERS, 0.0)
    state = RedisRouterState(fake_redis, index_mode="approximate", approximate=LLMD_APPROX)
    router = Router(state, LlmdScorers())
    first = make_request("a", chain("sys", 8))
    decision = router.route(first)
    router.commit(first, decision)
    view = state.view(make_request("b", chain("sys", 8) + chain("b", 2)), take_ticket=False)
    assert view.index_mode == "approximate"
    assert view.matched(decision.worker) == 8
    assert view.load(decision.worker).indexed_blocks == 8
    assert view.now_ms > 0
    # Nothing was marked pending in the precise index: the approximate router writes only its own.
    assert not fake_redis.keys(keys.node_pattern("kvq:"))


def test_a_dead_workers_routed_blocks_are_forgotten(fake_redis) -> None:
    register_workers(fake_redis, "kvq:", WORKERS, 0.0)
    index = RedisIndex(fake_redis, "kvq:")
    index.record_routed("w0", chain("a", 3), ApproximateRules("test"))
    register_workers(fake_redis, "kvq:", ["w0"], 60.0)  # its heartbeat is a minute old
    assert RedisMembership(fake_redis, "kvq:").reap("w0", 15.0) is not None
    assert not fake_redis.exists(keys.worker_routed("w0"))


def test_the_precise_view_reports_each_workers_cached_blocks(fake_redis) -> None:
    register_workers(fake_redis, "kvq:", WORKERS, 0.0)
    index = RedisIndex(fake_redis, "kvq:")
    index.add("w1", chain("a", 5))
    read = index.route_view(chain("a", 5), 60_000.0)
    assert read.matches == {"w0": 0, "w1": 5} and read.sizes == {"w0": 0, "w1": 5}


def test_a_decision_state_in_approximate_mode_is_unchanged_by_a_pending_commit(
    fake_redis,
) -> None:
    """A precise commit marks pending; an approximate one records: each index hears only its
    own writes (`Decision` carries nothing mode-specific)."""
    register_workers(fake_redis, "kvq:", WORKERS, 0.0)
    request = make_request("r", chain("r", 4))
    precise = RedisRouterState(fake_redis)
    precise.commit(request, Decision("w0", "t", 0, 64))
    assert not fake_redis.exists(keys.worker_routed("w0"))
    approximate = RedisRouterState(fake_redis, index_mode="approximate")
    approximate.commit(request, Decision("w1", "t", 0, 64))
    assert approximate.view(request, False).matched("w1") == 4
    assert approximate.view(request, False).matched("w0") == 0

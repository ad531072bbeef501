"""ROUTE_VIEW's joint search against a plain walk, on random holdings in Redis.

The router's script finds every live worker's match at once: one node read per probe narrows
the bounds of every worker whose open interval holds the position. On prefix-closed holdings
(what workers' events and pending marks produce) each match must equal a walk along the
request that stops at the worker's first missing block; on holdings with gaps, a held
boundary (block L held, block L+1 not), and for one worker the same length as
`InMemoryIndex.match`, which probes the positions a per-worker binary search probes.
"""

from __future__ import annotations

import random
import time

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from live_support import INDEX_DB, connect_or_fail, delete_matching, real_redis_url, unique_prefix

from kvqueue import keys
from kvqueue.gpu.hashing import BlockHash
from kvqueue.routing.index import InMemoryIndex
from kvqueue.routing.redis_index import RedisIndex

HEARTBEAT_TTL_MS = 10**12
PENDING_TTL_MS = 10**9  # never expires within a test


def fresh_index() -> RedisIndex:
    return RedisIndex(fakeredis.FakeRedis(server=fakeredis.FakeServer()), "kvq:")


def make_live(index: RedisIndex, workers: list[str]) -> None:
    index.client.zadd(keys.workers(index.prefix), dict.fromkeys(workers, int(time.time() * 1e3)))


def walk(chain: list[BlockHash], held: set[BlockHash]) -> int:
    length = 0
    while length < len(chain) and chain[length] in held:
        length += 1
    return length


@st.composite
def prefix_closed_holdings(draw: st.DrawFn) -> tuple[list[BlockHash], list[tuple[int, int]], int]:
    """A chain, and per worker (stored prefix, pending run after it); a seed for noise."""
    n = draw(st.integers(min_value=0, max_value=40))
    num_workers = draw(st.integers(min_value=1, max_value=8))
    holdings = []
    for _ in range(num_workers):
        stored = draw(st.integers(min_value=0, max_value=n))
        pending = draw(st.integers(min_value=0, max_value=n - stored))
        holdings.append((stored, pending))
    seed = draw(st.integers(min_value=0, max_value=2**32))
    rng = random.Random(seed)
    chain = [BlockHash(rng.randbytes(32)) for _ in range(n)]
    return chain, holdings, seed


@settings(max_examples=150, deadline=None)
@given(prefix_closed_holdings())
def test_the_joint_search_equals_a_walk_on_prefix_closed_holdings(case) -> None:
    chain, holdings, seed = case
    rng = random.Random(f"other chains {seed}")
    index = fresh_index()
    workers = [f"worker-{i}" for i in range(len(holdings))]
    expected = {}
    for worker, (stored, pending) in zip(workers, holdings, strict=True):
        index.add(worker, chain[:stored])
        index.mark_pending(worker, chain[stored : stored + pending], PENDING_TTL_MS)
        # Blocks of other chains (a fork, a leaf past a gap of the request) change nothing.
        index.add(worker, [BlockHash(rng.randbytes(32)) for _ in range(rng.randint(0, 3))])
        expected[worker] = walk(chain, set(chain[: stored + pending]))
    make_live(index, workers)

    assert index.route_view(chain, HEARTBEAT_TTL_MS).matches == expected


@settings(max_examples=150, deadline=None)
@given(
    st.integers(min_value=1, max_value=40),
    st.lists(st.integers(min_value=0, max_value=2**32), min_size=1, max_size=6),
)
def test_on_holdings_with_gaps_the_joint_search_returns_a_held_boundary(
    n: int, seeds: list[int]
) -> None:
    rng = random.Random(seeds[0] * 7919 + n)
    chain = [BlockHash(rng.randbytes(32)) for _ in range(n)]
    index = fresh_index()
    workers = [f"worker-{i}" for i in range(len(seeds))]
    held: dict[str, set[BlockHash]] = {}
    for worker, seed in zip(workers, seeds, strict=True):
        mine = random.Random(seed)
        held[worker] = {h for h in chain if mine.random() < 0.7}
        index.add(worker, [h for h in chain if h in held[worker]])
    make_live(index, workers)

    matches = index.route_view(chain, HEARTBEAT_TTL_MS).matches

    for worker, length in matches.items():
        assert 0 <= length <= n
        assert length == 0 or chain[length - 1] in held[worker]
        assert length == n or chain[length] not in held[worker]
    if len(workers) == 1:
        memory = InMemoryIndex()
        memory.add(workers[0], [h for h in chain if h in held[workers[0]]])
        assert matches[workers[0]] == memory.match(chain).get(workers[0], 0)


@pytest.mark.redis
def test_the_joint_search_equals_a_walk_on_the_real_redis_server(real_redis_base_url) -> None:
    client = connect_or_fail(real_redis_url(real_redis_base_url, INDEX_DB))
    prefix = unique_prefix("joint")
    rng = random.Random(3)
    try:
        index = RedisIndex(client, prefix)
        for trial in range(30):
            chain = [BlockHash(rng.randbytes(32)) for _ in range(rng.randint(1, 600))]
            workers = [f"w{trial}-{i}" for i in range(rng.choice((1, 8, 32)))]
            expected = {}
            for worker in workers:
                stored = rng.randint(0, len(chain))
                pending = rng.randint(0, len(chain) - stored)
                index.add(worker, chain[:stored])
                index.mark_pending(worker, chain[stored : stored + pending], PENDING_TTL_MS)
                expected[worker] = stored + pending
            make_live(index, workers)
            matches = index.route_view(chain, HEARTBEAT_TTL_MS).matches
            assert {w: matches[w] for w in workers} == expected
    finally:
        delete_matching(client, f"{prefix}*")
        client.close()

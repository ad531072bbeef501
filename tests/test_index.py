"""One test suite for every `PrefixIndex` backend.

The same tests run against `InMemoryIndex`, `RedisIndex` on fakeredis (with Lua) and
`RedisIndex` on the real redis-server, because backends of one interface tend to disagree
exactly on the edge cases: empty input, a gap in the chain, duplicate adds, removing what is
absent, clearing one worker, pending marks. The last tests are Redis-only: the event stream
and the shape of the tree in Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import fakeredis
import pytest
import redis
from live_support import INDEX_DB, connect_or_fail, delete_matching, real_redis_url, unique_prefix

from kvqueue import keys
from kvqueue.gpu.cache import BlockCache
from kvqueue.gpu.events import decode_event, replay
from kvqueue.gpu.hashing import BlockHash
from kvqueue.routing import scripts
from kvqueue.routing.index import InMemoryIndex, PrefixIndex, apply_events
from kvqueue.routing.redis_index import RedisIndex

PENDING_TTL_MS = 100.0
REAL_REDIS = pytest.param("redis", marks=pytest.mark.redis)
BACKENDS = ["memory", "fakeredis", REAL_REDIS]
REDIS_BACKENDS = ["fakeredis", REAL_REDIS]


@dataclass
class Backend:
    name: str
    index: PrefixIndex
    advance: Callable[[float], None]  # let this many milliseconds pass (pending-mark TTLs)
    client: redis.Redis | None = None
    prefix: str = ""


@pytest.fixture
def real_index_client(real_redis_base_url: str) -> Iterator[tuple[redis.Redis, str]]:
    client = connect_or_fail(real_redis_url(real_redis_base_url, INDEX_DB))
    prefix = unique_prefix("index")
    try:
        yield client, prefix
    finally:
        delete_matching(client, f"{prefix}*")
        client.close()


def _make_backend(name: str, request: pytest.FixtureRequest) -> Backend:
    if name == "memory":
        now = [1_000_000.0]

        def advance(ms: float) -> None:
            now[0] += ms

        return Backend(name, InMemoryIndex(clock=lambda: now[0]), advance)
    if name == "fakeredis":
        client, prefix = fakeredis.FakeRedis(server=fakeredis.FakeServer()), "kvq:"
    else:
        client, prefix = request.getfixturevalue("real_index_client")
    # Redis judges pending marks by its own clock: real time has to pass.
    return Backend(
        name, RedisIndex(client, prefix), lambda ms: time.sleep(ms / 1000), client, prefix
    )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return _make_backend(request.param, request)


@pytest.fixture(params=REDIS_BACKENDS)
def redis_backend(request: pytest.FixtureRequest) -> Backend:
    return _make_backend(request.param, request)


# -- empty input -----------------------------------------------------------------------------------
def test_an_empty_index_matches_nothing(backend: Backend, make_hashes) -> None:
    index = backend.index

    assert index.match(make_hashes("sys", "q1")) == {}
    assert index.match([]) == {}
    assert index.cached_by("worker-0") == set()


def test_empty_block_lists_change_nothing(backend: Backend, make_hashes) -> None:
    index = backend.index
    chain = make_hashes("sys", "q1")
    index.add("worker-0", chain)

    index.add("worker-1", [])
    index.remove("worker-0", [])
    index.mark_pending("worker-1", [], PENDING_TTL_MS)

    assert index.match(chain) == {"worker-0": 2}
    assert index.match([]) == {}
    assert index.cached_by("worker-0") == set(chain)
    assert index.cached_by("worker-1") == set()


# -- longest match ---------------------------------------------------------------------------------
def test_match_stops_at_the_first_block_a_worker_lacks(backend: Backend, make_hashes) -> None:
    index = backend.index
    index.add("worker-0", make_hashes("sys", "a", "b"))
    index.add("worker-1", make_hashes("sys", "a"))
    index.add("worker-2", make_hashes("sys", "x", "y"))
    index.add("worker-3", make_hashes("other", "a", "b"))

    assert index.match(make_hashes("sys", "a", "b", "c")) == {
        "worker-0": 3,
        "worker-1": 2,
        "worker-2": 1,
    }
    # A request that diverges after "sys" matches only the shared first block.
    assert index.match(make_hashes("sys", "z", "b")) == {
        "worker-0": 1,
        "worker-1": 1,
        "worker-2": 1,
    }
    # Same block contents behind a different first block are different blocks.
    assert index.match(make_hashes("unseen", "a", "b")) == {}


@pytest.mark.parametrize("hole", [1, 2, 3, 4])
def test_a_gap_in_a_workers_chain_yields_a_held_boundary_the_same_in_every_backend(
    backend: Backend, make_hashes, hole: int
) -> None:
    # Workers' caches are prefix-closed, so a gap never comes from their events; the index
    # finds a match by binary search and, on a gap, returns a boundary: block L-1 held,
    # block L not. Both backends probe the same positions, so they agree exactly.
    chain = make_hashes("b0", "b1", "b2", "b3", "b4", "b5")
    backend.index.add("worker-0", chain[:hole])
    backend.index.add("worker-0", chain[hole + 1 :])

    expected = InMemoryIndex()
    expected.add("worker-0", chain[:hole])
    expected.add("worker-0", chain[hole + 1 :])
    length = backend.index.match(chain)["worker-0"]

    assert length == expected.match(chain)["worker-0"]
    held = set(chain) - {chain[hole]}
    assert chain[length - 1] in held
    assert length == len(chain) or chain[length] not in held


def test_a_worker_lacking_a_block_matches_up_to_it_when_its_chain_is_prefix_closed(
    backend: Backend, make_hashes
) -> None:
    chain = make_hashes("b0", "b1", "b2", "b3", "b4", "b5")
    for length in range(1, len(chain) + 1):
        backend.index.clear("worker-0")
        backend.index.add("worker-0", chain[:length])
        assert backend.index.match(chain) == {"worker-0": length}


# -- duplicates and absent entries -----------------------------------------------------------------
def test_adding_the_same_blocks_twice_is_the_same_as_once(backend: Backend, make_hashes) -> None:
    index = backend.index
    chain = make_hashes("sys", "q1", "q2")
    index.add("worker-0", chain)
    index.add("worker-0", chain)
    index.add("worker-0", chain[:2])

    assert index.match(chain) == {"worker-0": 3}
    assert index.cached_by("worker-0") == set(chain)

    # Not reference-counted: a single removal undoes any number of adds.
    index.remove("worker-0", chain)
    assert index.match(chain) == {}
    assert index.cached_by("worker-0") == set()


def test_removing_what_is_absent_changes_nothing(backend: Backend, make_hashes) -> None:
    index = backend.index
    chain = make_hashes("sys", "q1")
    index.add("worker-0", chain)

    index.remove("worker-0", make_hashes("never", "added"))
    index.remove("worker-1", chain)  # held by worker-0, not by worker-1
    index.remove("worker-9", chain)  # a worker the index has never seen

    assert index.match(chain) == {"worker-0": 2}
    assert index.cached_by("worker-0") == set(chain)
    assert index.cached_by("worker-1") == set()


def test_removing_a_leaf_shortens_the_match_to_the_remaining_prefix(
    backend: Backend, make_hashes
) -> None:
    index = backend.index
    chain = make_hashes("sys", "a", "b", "c")
    index.add("worker-0", chain)

    index.remove("worker-0", chain[2:][::-1])  # eviction order: children first

    assert index.match(chain) == {"worker-0": 2}
    assert index.cached_by("worker-0") == set(chain[:2])


# -- clearing --------------------------------------------------------------------------------------
def test_clearing_one_worker_leaves_the_others(backend: Backend, make_hashes) -> None:
    index = backend.index
    shared = make_hashes("sys", "a")
    own = make_hashes("sys", "b", "c")
    index.add("worker-0", shared)
    index.add("worker-0", own)
    index.add("worker-1", shared)

    index.clear("worker-0")
    index.clear("worker-0")  # twice is fine
    index.clear("worker-7")  # never seen is fine

    assert index.match(shared) == {"worker-1": 2}
    assert index.match(own) == {"worker-1": 1}
    assert index.cached_by("worker-0") == set()
    assert index.cached_by("worker-1") == set(shared)


def test_clearing_a_worker_keeps_its_pending_marks(backend: Backend, make_hashes) -> None:
    index = backend.index
    stored = make_hashes("sys", "a")
    routed = make_hashes("new", "prefix")
    index.add("worker-0", stored)
    index.mark_pending("worker-0", routed, 10_000)

    index.clear("worker-0")  # e.g. the worker restarted; requests already routed still come

    assert index.match(stored) == {}
    assert index.match(routed) == {"worker-0": 2}


def test_forgetting_a_worker_drops_its_blocks_and_its_pending_marks_but_no_one_elses(
    backend: Backend, make_hashes
) -> None:
    index = backend.index
    stored = make_hashes("sys", "a")
    routed = make_hashes("new", "prefix")
    index.add("worker-0", stored)
    index.add("worker-1", stored)
    index.mark_pending("worker-0", routed, 10_000)
    index.mark_pending("worker-1", routed[:1], 10_000)

    index.forget("worker-0")  # e.g. it died: its routed requests go elsewhere

    assert index.match(stored) == {"worker-1": 2}
    assert index.match(routed) == {"worker-1": 1}
    assert index.cached_by("worker-0") == set()


# -- pending marks ---------------------------------------------------------------------------------
def test_pending_marks_count_until_their_ttl_runs_out(backend: Backend, make_hashes) -> None:
    index = backend.index
    chain = make_hashes("sys", "q1", "q2")
    index.mark_pending("worker-0", chain, PENDING_TTL_MS)

    assert index.match(chain) == {"worker-0": 3}
    assert index.cached_by("worker-0") == set()  # pending is not cached

    backend.advance(PENDING_TTL_MS * 1.5)

    assert index.match(chain) == {}


def test_pending_marks_extend_a_stored_prefix_until_they_expire(
    backend: Backend, make_hashes
) -> None:
    index = backend.index
    chain = make_hashes("sys", "a", "b", "c")
    index.add("worker-0", chain[:2])
    index.mark_pending("worker-0", chain[2:], PENDING_TTL_MS)

    assert index.match(chain) == {"worker-0": 4}

    backend.advance(PENDING_TTL_MS * 1.5)

    assert index.match(chain) == {"worker-0": 2}


def test_a_stored_block_replaces_its_pending_mark(backend: Backend, make_hashes) -> None:
    index = backend.index
    kept = make_hashes("sys", "kept")
    evicted = make_hashes("sys", "evicted")
    index.mark_pending("worker-0", kept, PENDING_TTL_MS)
    index.mark_pending("worker-0", evicted, PENDING_TTL_MS)
    index.add("worker-0", kept)
    index.add("worker-0", evicted)

    # Removed before the TTL: had the pending mark survived the store, it would still count.
    index.remove("worker-0", evicted[1:])
    assert index.match(evicted) == {"worker-0": 1}

    backend.advance(PENDING_TTL_MS * 1.5)  # stored blocks do not expire

    assert index.match(kept) == {"worker-0": 2}
    assert index.cached_by("worker-0") == set(kept) | {evicted[0]}


def test_a_pending_mark_keeps_a_routed_chain_prefix_closed_when_its_hits_are_evicted(
    backend: Backend, make_hashes
) -> None:
    # A request routed to worker-0 matched "sys" there; the router marks its whole chain.
    # If worker-0 evicts "sys" before the request runs, the request will store it again:
    # until then the chain still counts as held, with no gap in front of the pending "q1".
    index = backend.index
    chain = make_hashes("sys", "q1")
    index.add("worker-0", chain[:1])

    index.mark_pending("worker-0", chain, 10_000)
    index.remove("worker-0", chain[:1])

    assert index.match(chain) == {"worker-0": 2}
    assert index.cached_by("worker-0") == set()


def test_a_stored_event_ends_the_pending_mark_of_its_blocks(backend: Backend, make_hashes) -> None:
    index = backend.index
    chain = make_hashes("sys", "q1")
    index.mark_pending("worker-0", chain, 10_000)
    index.add("worker-0", chain)

    index.remove("worker-0", chain)

    assert index.match(chain) == {}


def test_pending_marks_of_one_worker_do_not_count_for_another(
    backend: Backend, make_hashes
) -> None:
    index = backend.index
    chain = make_hashes("sys", "q1")
    index.add("worker-1", chain[:1])
    index.mark_pending("worker-0", chain, 10_000)

    assert index.match(chain) == {"worker-0": 2, "worker-1": 1}


# -- events ----------------------------------------------------------------------------------------
def _drive_two_caches(
    make_hashes, on_events: Callable[[str, BlockCache], None]
) -> tuple[dict[str, BlockCache], list[list[BlockHash]]]:
    """Two small caches with hits, evictions and a clear; `on_events` after every step."""
    caches = {"worker-0": BlockCache(8), "worker-1": BlockCache(6)}
    chains = [
        make_hashes("s", "a", "b"),
        make_hashes("s", "a", "c"),
        make_hashes("t", "u", "v", "x"),
        make_hashes("y", "z", "q"),
        make_hashes("s", "a", "b", "d", "e"),
    ]
    steps = [
        ("worker-0", chains[0]),
        ("worker-1", chains[0]),
        ("worker-0", chains[1]),
        ("worker-0", chains[2]),
        ("worker-1", None),  # a restarted GPU: cleared
        ("worker-1", chains[1]),
        ("worker-0", chains[3]),  # needs slots: evicts least recently used leaves first
        ("worker-1", chains[4]),
        ("worker-0", chains[4]),
    ]
    for worker, chain in steps:
        cache = caches[worker]
        if chain is None:
            cache.clear()
        else:
            cache.release(cache.allocate(chain))
        on_events(worker, cache)
    assert caches["worker-0"].stats.num_evictions > 0
    return caches, chains


def test_events_applied_in_order_reproduce_each_workers_cache(
    backend: Backend, make_hashes
) -> None:
    index = backend.index

    def on_events(worker: str, cache: BlockCache) -> None:
        apply_events(index, worker, cache.take_events())

    caches, chains = _drive_two_caches(make_hashes, on_events)

    for worker, cache in caches.items():
        assert index.cached_by(worker) == cache.cached_hashes()
    for chain in chains:
        expected = {w: c.lookup(chain) for w, c in caches.items() if c.lookup(chain) > 0}
        assert index.match(chain) == expected


# -- Redis only: the event stream and the tree -----------------------------------------------------
def test_published_events_land_in_the_stream_and_the_tree_follows_them(
    redis_backend: Backend, make_hashes
) -> None:
    index, client, prefix = redis_backend.index, redis_backend.client, redis_backend.prefix
    assert isinstance(index, RedisIndex) and client is not None
    num_published = 0

    def on_events(worker: str, cache: BlockCache) -> None:
        nonlocal num_published
        events = cache.take_events()
        index.publish_events(worker, events)
        num_published += len(events)

    caches, _ = _drive_two_caches(make_hashes, on_events)

    entries = client.xrange(keys.events(prefix))
    assert len(entries) == num_published
    for worker, cache in caches.items():
        events = [decode_event(f[b"event"]) for _, f in entries if f[b"worker"] == worker.encode()]
        assert replay(events) == cache.cached_hashes()
        assert index.cached_by(worker) == cache.cached_hashes()
    assert index.sweep()
    union = set().union(*(c.cached_hashes() for c in caches.values()))
    node_keys = set(client.scan_iter(match=keys.node_pattern(prefix)))
    assert node_keys == {keys.node(h, prefix) for h in union}


def test_tree_nodes_hold_their_workers_slots_and_vanish_with_their_last_holder(
    redis_backend: Backend, make_hashes
) -> None:
    index, client, prefix = redis_backend.index, redis_backend.client, redis_backend.prefix
    assert isinstance(index, RedisIndex) and client is not None
    chain = make_hashes("sys", "a", "b")
    index.add("worker-0", chain)
    index.add("worker-1", chain[:2])
    slot_0, slot_1 = client.hmget(keys.slots(prefix), ["worker-0", "worker-1"])

    assert slot_0 != slot_1
    assert client.hgetall(keys.node(chain[2], prefix)) == {slot_0: b"1"}
    assert client.hgetall(keys.node(chain[0], prefix)) == {slot_0: b"1", slot_1: b"1"}

    index.remove("worker-0", chain[::-1])
    index.remove("worker-0", make_hashes("never", "added"))
    assert not client.exists(keys.node(chain[2], prefix))
    assert client.hgetall(keys.node(chain[1], prefix)) == {slot_1: b"1"}

    index.clear("worker-1")
    assert index.match(chain) == {}  # a retired slot is invisible at once
    assert index.sweep()
    assert list(client.scan_iter(match=keys.node_pattern(prefix))) == []
    assert not client.exists(keys.slots_dead(prefix), keys.slots_sweeping(prefix))


def test_a_cleared_workers_next_blocks_take_a_new_slot_and_writes_sweep_the_old_one(
    redis_backend: Backend, make_hashes
) -> None:
    index, client, prefix = redis_backend.index, redis_backend.client, redis_backend.prefix
    assert isinstance(index, RedisIndex) and client is not None
    before, after = make_hashes("before", "clear"), make_hashes("after", "clear")
    index.add("worker-0", before)
    old = client.hget(keys.slots(prefix), "worker-0")
    index.clear("worker-0")
    index.add("worker-0", after)  # a write: its sweep step visits the few keys there are
    new = client.hget(keys.slots(prefix), "worker-0")

    assert new != old
    assert index.cached_by("worker-0") == set(after)
    assert index.match(before) == {} and index.match(after) == {"worker-0": 2}
    assert not client.exists(*(keys.node(h, prefix) for h in before))
    assert client.hget(keys.slot_blocks(prefix), old) is None


def test_writes_sweep_a_retired_slot_a_step_at_a_time_and_readers_never_see_it(
    make_hashes,
) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    index, prefix = RedisIndex(client, "kvq:"), "kvq:"
    chain = make_hashes(*(f"b{i}" for i in range(1_000)))
    index.add("worker-0", chain)
    index.add("worker-1", chain[:400])
    slot = client.hget(keys.slots(prefix), "worker-0")
    index.clear("worker-0")  # one sweep step here: at most SWEEP_KEYS keys visited

    assert index.match(chain) == {"worker-1": 400}
    left = [h for h in chain if client.hexists(keys.node(h, prefix), slot)]
    assert 0 < len(left) < len(chain)
    writes = 0
    while client.exists(keys.slots_dead(prefix), keys.slots_sweeping(prefix)):
        index.add("worker-2", make_hashes("w", str(writes)))  # each write: one step
        writes += 1
    assert writes <= len(chain) // scripts.SWEEP_KEYS + 1
    assert not any(client.hexists(keys.node(h, prefix), slot) for h in chain)
    assert not any(client.exists(keys.node(h, prefix)) for h in chain[400:])
    assert index.match(chain) == {"worker-1": 400}


def test_pending_marks_live_under_a_pending_slot_that_only_forgetting_retires(
    redis_backend: Backend, make_hashes
) -> None:
    index, client, prefix = redis_backend.index, redis_backend.client, redis_backend.prefix
    assert isinstance(index, RedisIndex) and client is not None
    chain = make_hashes("sys", "a", "b")
    index.add("worker-1", chain[:1])
    index.mark_pending("worker-0", chain, 10_000)
    pending_slot = client.hget(keys.slots_pending(prefix), "worker-0")
    field = keys.pending_field(pending_slot.decode()).encode()
    node_start = keys.node_prefix(prefix)

    assert set(client.hkeys(keys.node(chain[2], prefix))) == {field}
    others = {k for k in client.scan_iter(match=f"{prefix}*") if not k.startswith(node_start)}
    assert {k.decode() for k in others} <= {
        keys.slots(prefix),
        keys.slots_pending(prefix),
        keys.slot_blocks(prefix),
        keys.slots_next(prefix),
    }  # no per-worker record of the marks
    index.clear("worker-0")
    assert client.hget(keys.slots_pending(prefix), "worker-0") == pending_slot

    index.forget("worker-0")

    assert index.match(chain) == {"worker-1": 1}  # hidden at once, before any sweep
    assert client.hget(keys.slots_pending(prefix), "worker-0") is None
    assert index.sweep()
    assert not client.exists(keys.node(chain[1], prefix), keys.node(chain[2], prefix))
    slot_1 = client.hget(keys.slots(prefix), "worker-1")
    assert client.hgetall(keys.node(chain[0], prefix)) == {slot_1: b"1"}
    index.mark_pending("worker-0", chain, 10_000)  # e.g. registered again, then routed to
    assert client.hget(keys.slots_pending(prefix), "worker-0") not in (None, pending_slot)
    assert index.match(chain) == {"worker-0": 3, "worker-1": 1}


def test_a_node_only_marked_pending_expires_with_its_last_mark(
    redis_backend: Backend, make_hashes
) -> None:
    index, client, prefix = redis_backend.index, redis_backend.client, redis_backend.prefix
    assert isinstance(index, RedisIndex) and client is not None
    never_stored = make_hashes("rejected", "prompt")
    stored_later = make_hashes("served", "prompt")
    index.mark_pending("worker-0", never_stored, PENDING_TTL_MS)
    index.mark_pending("worker-1", never_stored[:1], 10 * PENDING_TTL_MS)
    index.mark_pending("worker-0", stored_later, PENDING_TTL_MS)
    index.add("worker-0", stored_later)
    # worker-1 drops a block whose node still carries worker-0's live pending mark.
    leaf = make_hashes("rejected", "prompt", "leaf")[-1:]
    index.add("worker-1", leaf)
    index.mark_pending("worker-0", leaf, PENDING_TTL_MS)
    index.remove("worker-1", leaf)

    first, second = (keys.node(h, prefix) for h in never_stored)
    assert 0 < client.pttl(second) <= PENDING_TTL_MS
    assert PENDING_TTL_MS < client.pttl(first) <= 10 * PENDING_TTL_MS  # the later mark wins
    assert 0 < client.pttl(keys.node(leaf[0], prefix)) <= PENDING_TTL_MS
    assert [client.pttl(keys.node(h, prefix)) for h in stored_later] == [-1, -1]

    redis_backend.advance(PENDING_TTL_MS * 1.5)

    assert not client.exists(second, keys.node(leaf[0], prefix))
    assert client.exists(first)
    assert index.match(stored_later) == {"worker-0": 2}

"""Narrative scenarios for the block cache, with exact hit counts and eviction orders.

Block labels name block contents (see `make_hashes`): ``make_hashes("a0", "a1")`` is a
two-block prompt, and any prompt starting with the same labels shares those block hashes.
"""

from __future__ import annotations

import pytest

from kvqueue.errors import CacheFullError, ConfigError, RequestRejected
from kvqueue.gpu.cache import Allocation, BlockCache, BlockTable
from kvqueue.gpu.events import AllBlocksCleared, BlocksRemoved, BlocksStored
from kvqueue.gpu.hashing import BlockHash


def serve(cache: BlockCache, hashes: list[BlockHash], num_anonymous: int = 0) -> Allocation:
    """Allocate and release at once: one request that ran to completion."""
    allocation = cache.allocate(hashes, num_anonymous)
    cache.release(allocation)
    return allocation


def removed(cache: BlockCache) -> list[BlockHash]:
    """Every hash evicted since the last drain, in eviction order."""
    return [h for e in cache.take_events() if isinstance(e, BlocksRemoved) for h in e.block_hashes]


def snapshot(cache: BlockCache) -> tuple:
    hashes = cache.cached_hashes()
    return (
        hashes,
        {h: cache.ref_count(h) for h in hashes},
        cache.num_free_slots,
        cache.num_evictable_blocks,
        cache.num_active_blocks,
        (cache.stats.num_queried_blocks, cache.stats.num_hit_blocks, cache.stats.num_evictions),
    )


def test_lru_scenario_evicts_least_recently_released_blocks_in_exact_order(make_hashes):
    cache = BlockCache(10)
    a = make_hashes("a0", "a1", "a2")
    b = make_hashes("b0", "b1")
    c = make_hashes("a0", "a1", "c2")  # shares a0, a1 with a
    d = make_hashes(*(f"d{i}" for i in range(7)))

    assert serve(cache, a).num_hit_blocks == 0  # released at t=1
    assert serve(cache, b).num_hit_blocks == 0  # t=2
    hit_c = serve(cache, c)  # t=3: a0 and a1 are now as recent as c2
    assert (hit_c.num_hit_blocks, hit_c.num_blocks_to_compute) == (2, 1)
    assert cache.num_cached_blocks == 6 and cache.num_evictable_blocks == 6
    cache.take_events()

    # d needs 7 slots, 4 are free: evict a2 (t=1), then b1 and b0 (t=2, deepest first).
    alloc_d = cache.allocate(d)
    assert alloc_d.num_evicted == 3
    assert cache.take_events() == [
        BlocksRemoved((a[2], b[1], b[0])),
        BlocksStored(tuple(d), None),
    ]
    assert [cache.lookup(x) for x in (a, b, c, d)] == [2, 0, 3, 7]
    cache.release(alloc_d)  # t=4

    # b again: 2 new blocks, nothing free: the oldest release is c's (t=3), deepest first.
    assert serve(cache, b).num_evicted == 2
    assert removed(cache) == [c[2], a[1]]
    assert cache.cached_hashes() == {a[0], *b, *d}
    assert cache.stats.num_evictions == 5


def test_released_blocks_stay_cached_and_a_later_request_hits_them(make_hashes):
    cache = BlockCache(8)
    a = make_hashes("a0", "a1", "a2")
    serve(cache, a)
    assert cache.cached_hashes() == set(a)
    assert [cache.ref_count(h) for h in a] == [0, 0, 0]
    assert cache.num_evictable_blocks == 3
    assert cache.num_free_slots == 5

    again = cache.allocate(make_hashes("a0", "a1", "a2", "a3"))
    assert (again.num_hit_blocks, again.num_blocks_to_compute, again.num_evicted) == (3, 1, 0)
    assert [cache.ref_count(h) for h in a] == [1, 1, 1]
    assert cache.num_evictable_blocks == 0


def test_a_revived_evictable_block_is_not_evicted(make_hashes):
    cache = BlockCache(6)
    a = make_hashes("a0", "a1")
    b = make_hashes("b0", "b1")
    serve(cache, a)  # t=1
    serve(cache, b)  # t=2
    assert serve(cache, a).num_hit_blocks == 2  # revived, released again at t=3
    cache.take_events()

    serve(cache, make_hashes("c0", "c1", "c2", "c3"))  # 2 free, 2 to evict
    assert removed(cache) == [b[1], b[0]]
    assert set(a) <= cache.cached_hashes()


def test_a_revived_block_pinned_by_a_running_request_is_not_evicted(make_hashes):
    cache = BlockCache(4)
    a = make_hashes("a0", "a1")
    serve(cache, a)
    running = cache.allocate(a)  # revived and pinned
    serve(cache, make_hashes("x0", "x1"))
    cache.take_events()

    serve(cache, make_hashes("y0", "y1"))
    assert removed(cache) == [make_hashes("x0", "x1")[1], make_hashes("x0")[0]]
    with pytest.raises(CacheFullError):
        cache.allocate(make_hashes("z0", "z1", "z2"))
    assert set(a) <= cache.cached_hashes()
    cache.release(running)


def test_block_shared_by_two_requests_stays_pinned_until_both_release(make_hashes):
    cache = BlockCache(5)
    p = make_hashes("p0", "p1", "x2")
    q = make_hashes("p0", "p1", "y2")
    alloc_p = cache.allocate(p)
    alloc_q = cache.allocate(q)
    assert alloc_q.num_hit_blocks == 2
    assert [cache.ref_count(h) for h in (p[0], p[1], p[2], q[2])] == [2, 2, 1, 1]

    cache.release(alloc_p)
    assert [cache.ref_count(h) for h in (p[0], p[1], p[2])] == [1, 1, 0]
    assert cache.num_evictable_blocks == 1
    cache.take_events()

    # 1 free slot + 1 evictable (x2): the shared prefix, still used by q, must survive.
    z = cache.allocate(make_hashes("z0", "z1"))
    assert removed(cache) == [p[2]]
    assert {p[0], p[1], q[2]} <= cache.cached_hashes()
    with pytest.raises(CacheFullError):
        cache.allocate(make_hashes("w0"))

    cache.release(alloc_q)
    assert [cache.ref_count(h) for h in q] == [0, 0, 0]
    assert cache.num_evictable_blocks == 3
    cache.release(z)


def test_never_evicts_a_block_with_ref_count_above_zero(make_hashes):
    cache = BlockCache(4)
    pinned = make_hashes("a0", "a1", "a2")
    serve(cache, pinned)  # released first: the least recently used blocks...
    cache.allocate(pinned)  # ...but pinned again by a running request
    x = make_hashes("x0")
    serve(cache, x)
    cache.take_events()

    serve(cache, make_hashes("y0"))  # the only evictable block is x0
    assert removed(cache) == x
    assert all(cache.ref_count(h) == 1 for h in pinned)
    assert set(pinned) <= cache.cached_hashes()


def test_blocks_released_together_are_evicted_deepest_first(make_hashes):
    cache = BlockCache(4)
    a = make_hashes("a0", "a1", "a2", "a3")
    serve(cache, a)
    cache.take_events()
    order = []
    for i in range(4):
        serve(cache, make_hashes(f"n{i}"))  # one slot each: evict exactly one block of a
        order += removed(cache)
        assert cache.lookup(a) == 3 - i  # what is left is still a matchable prefix
    assert order == [a[3], a[2], a[1], a[0]]


def test_shared_parent_is_evicted_after_the_children_of_every_request(make_hashes):
    cache = BlockCache(4)
    p = make_hashes("p0", "p1", "x2")
    q = make_hashes("p0", "p1", "y2")
    alloc_p = cache.allocate(p)
    alloc_q = cache.allocate(q)
    cache.release(alloc_q)  # t=1: only y2 drops to 0
    cache.release(alloc_p)  # t=2: x2, p1, p0 drop to 0 together
    cache.take_events()

    serve(cache, make_hashes("n0", "n1", "n2", "n3"))
    assert removed(cache) == [q[2], p[2], p[1], p[0]]


@pytest.mark.parametrize("pinned_first", ["low", "high"])
def test_blocks_tied_on_release_time_and_depth_are_evicted_by_ascending_hash(
    make_hashes, pinned_first
):
    # Two blocks at the same depth released together only happen with a gap (a cached
    # block beyond the first miss, kept at the depth it was stored at); then the hash decides.
    low, high = sorted([make_hashes("u")[0], make_hashes("v")[0]])
    first, second = (low, high) if pinned_first == "low" else (high, low)
    cache = BlockCache(3)
    serve(cache, [first])  # depth 0
    serve(cache, [second, first])  # second stored at depth 0; first pinned beyond the miss
    cache.take_events()

    serve(cache, make_hashes("n0", "n1", "n2"))
    assert removed(cache) == [low, high]


def test_recompute_from_the_first_missing_block(make_hashes):
    full = make_hashes("g0", "g1", "g2", "g3")
    cache = BlockCache(8)
    serve(cache, full[:1])
    serve(cache, full[2:])  # g2, g3 cached without their parent g1: a gap
    cache.take_events()

    allocation = cache.allocate(full)
    assert allocation.num_hit_blocks == 1
    assert allocation.num_blocks_to_compute == 3  # g1, and g2, g3 although cached
    assert cache.lookup(full) == 4
    # Only the missing block is stored; cached ones are pinned, not stored twice.
    assert cache.take_events() == [BlocksStored((full[1],), full[0])]
    assert [cache.ref_count(h) for h in full] == [1, 1, 1, 1]
    assert cache.num_cached_blocks == 4
    assert (cache.stats.num_queried_blocks, cache.stats.num_hit_blocks) == (1 + 2 + 4, 1)


def test_cache_full_of_pinned_blocks_raises_and_changes_nothing(make_hashes):
    cache = BlockCache(5)
    a = make_hashes("a0", "a1", "a2")
    cache.allocate(a)
    cache.allocate(make_hashes("y0"))
    serve(cache, make_hashes("x0"))  # the one evictable block; no slot is free
    cache.take_events()
    before = snapshot(cache)

    with pytest.raises(CacheFullError, match="needs 2 new KV blocks; only 1 are free or evictable"):
        cache.allocate(make_hashes("n0", "n1"))
    with pytest.raises(CacheFullError, match="needs 2 new KV blocks"):
        cache.allocate(make_hashes("a0", "a1", "a2", "a3", "a4"))  # hits pin nothing either
    with pytest.raises(CacheFullError):
        cache.allocate(make_hashes("n0"), num_anonymous_blocks=1)

    assert snapshot(cache) == before
    assert cache.take_events() == []


def test_request_larger_than_the_whole_cache_is_rejected_with_the_numbers(make_hashes):
    cache = BlockCache(4)
    serve(cache, make_hashes("a0"))
    cache.take_events()
    before = snapshot(cache)
    with pytest.raises(RequestRejected, match="needs 5 KV blocks; the cache holds 4") as info:
        cache.allocate(make_hashes("b0", "b1", "b2", "b3", "b4"))
    assert "5" in info.value.reason
    with pytest.raises(RequestRejected, match="needs 5 KV blocks"):
        cache.allocate(make_hashes("b0", "b1"), num_anonymous_blocks=3)
    assert snapshot(cache) == before
    assert cache.take_events() == []


def test_anonymous_blocks_take_slots_until_release_and_are_never_cached(make_hashes):
    cache = BlockCache(4)
    a = make_hashes("a0", "a1")
    serve(cache, a)
    cache.take_events()

    b = make_hashes("b0")
    allocation = cache.allocate(b, num_anonymous_blocks=3)
    assert allocation.num_evicted == 2
    assert cache.take_events() == [BlocksRemoved((a[1], a[0])), BlocksStored(tuple(b), None)]
    assert (cache.num_free_slots, cache.num_active_blocks, cache.num_cached_blocks) == (0, 4, 1)

    cache.release(allocation)
    assert (cache.num_free_slots, cache.num_active_blocks, cache.num_cached_blocks) == (3, 0, 1)


def test_lookup_changes_nothing(make_hashes):
    cache = BlockCache(4)
    serve(cache, make_hashes("a0", "a1"))
    before = snapshot(cache)
    assert cache.lookup(make_hashes("a0", "a1", "a2")) == 2
    assert cache.lookup(make_hashes("b0")) == 0
    assert cache.lookup([]) == 0
    assert snapshot(cache) == before


def test_hit_rate_counts_leading_hits_over_queried_blocks(make_hashes):
    cache = BlockCache(8)
    assert cache.stats.hit_rate == 0.0
    serve(cache, make_hashes("a0", "a1"))
    serve(cache, make_hashes("a0", "a1", "a2", "a3"))
    assert cache.stats.hit_rate == 2 / 6


def test_clear_empties_an_idle_cache_but_refuses_while_blocks_are_in_use(make_hashes):
    cache = BlockCache(4)
    running = cache.allocate(make_hashes("a0", "a1"))
    with pytest.raises(CacheFullError, match="2 blocks are in use"):
        cache.clear()
    assert cache.num_cached_blocks == 2
    cache.release(running)
    cache.clear()
    assert cache.cached_hashes() == set()
    assert cache.num_free_slots == 4
    assert cache.allocate(make_hashes("a0", "a1")).num_hit_blocks == 0


def test_heap_compaction_keeps_the_eviction_order(make_hashes):
    # Many releases of the same blocks leave stale heap entries; compaction must not
    # reorder what is evicted.
    cache = BlockCache(4)
    a = make_hashes("a0", "a1")
    b = make_hashes("b0", "b1")
    for _ in range(20):
        serve(cache, b)
        serve(cache, a)
    cache.take_events()
    serve(cache, make_hashes("n0", "n1"))
    assert removed(cache) == [b[1], b[0]]


@pytest.mark.parametrize("num_blocks", [0, -3])
def test_non_positive_capacity_is_rejected_naming_it(num_blocks):
    with pytest.raises(ConfigError, match=f"got {num_blocks}"):
        BlockCache(num_blocks)


# -- the block table API (the batched engine) ---------------------------------------------------
def test_a_block_table_grows_chunk_by_chunk_and_stores_blocks_as_they_fill(make_hashes):
    cache = BlockCache(6)
    hashes = make_hashes("p0", "p1", "p2")
    table = BlockTable()
    cache.pin_prefix(table, hashes, 0)
    # A 20-token chunk: 2 slots, the first block is full.
    assert cache.allocate_slots(table, 2) == 0
    cache.commit_full(table, hashes[:1])
    assert cache.take_events() == [BlocksStored((hashes[0],), None)]
    assert (table.block_hashes, table.num_anonymous_blocks) == ([hashes[0]], 1)
    # The next 28 tokens fill blocks 1 and 2 (one of them in the slot already held).
    cache.allocate_slots(table, 1)
    cache.commit_full(table, hashes[1:])
    assert cache.take_events() == [BlocksStored(tuple(hashes[1:]), hashes[0])]
    assert (len(table.block_hashes), table.num_anonymous_blocks, cache.num_used_slots) == (3, 0, 3)
    assert [cache.ref_count(h) for h in hashes] == [1, 1, 1]


def test_pinning_evictable_hits_takes_them_out_of_the_allocatable_slots(make_hashes):
    cache = BlockCache(4)
    shared = make_hashes("s0", "s1")
    serve(cache, shared)
    assert (cache.num_allocatable, cache.lookup_prefix(shared, 2)) == (4, (2, 2))
    table = BlockTable()
    cache.pin_prefix(table, [*shared, *make_hashes("s0", "s1", "x")[2:]], 2)
    assert (cache.num_allocatable, cache.lookup_prefix(shared, 2)) == (2, (2, 0))
    assert (cache.stats.num_queried_blocks, cache.stats.num_hit_blocks) == (5, 2)
    with pytest.raises(ValueError, match="needs an empty block table"):
        cache.pin_prefix(table, shared, 1)


def test_allocating_slots_evicts_least_recently_released_deepest_first(make_hashes):
    cache = BlockCache(4)
    a, b = make_hashes("a0", "a1"), make_hashes("b0", "b1")
    serve(cache, a)
    serve(cache, b)
    cache.take_events()
    table = BlockTable()
    assert cache.allocate_slots(table, 3) == 3
    assert cache.allocate_slots(table, 0) == 0
    assert removed(cache) == [a[1], a[0], b[1]]  # one event for consecutive allocations
    assert table.num_evicted == 3
    before = snapshot(cache)
    with pytest.raises(CacheFullError, match="2 KV blocks needed; only 1 are free or evictable"):
        cache.allocate_slots(table, 2)
    assert snapshot(cache) == before


def test_one_slot_for_each_table_takes_free_slots_first_then_evicts_in_order(make_hashes):
    cache = BlockCache(5)
    a, b = make_hashes("a0", "a1"), make_hashes("b0")
    serve(cache, a)
    serve(cache, b)
    cache.take_events()
    tables = [BlockTable() for _ in range(4)]
    assert cache.allocate_slot_each(tables) == 2  # 2 free slots, then a1 and a0 go
    assert cache.allocate_slots(tables[0], 1) == 1  # then b0: one removed event for all
    assert removed(cache) == [a[1], a[0], b[0]]
    assert [t.num_anonymous_blocks for t in tables] == [2, 1, 1, 1]
    assert [t.num_evicted for t in tables] == [1, 0, 1, 1]
    before = snapshot(cache)
    with pytest.raises(CacheFullError, match="1 KV blocks needed; only 0 are free or evictable"):
        cache.allocate_slot_each(tables[:1])
    assert snapshot(cache) == before


def test_a_released_table_leaves_its_hashed_blocks_cached_and_frees_the_rest(make_hashes):
    cache = BlockCache(8)
    hashes = make_hashes("q0", "q1")
    table = BlockTable()
    cache.pin_prefix(table, hashes, 0)
    cache.allocate_slots(table, 4)  # 2 prompt blocks, 2 of generated tokens
    cache.commit_full(table, hashes)
    cache.release(table)  # a preemption, or the end
    assert (table.block_hashes, table.num_anonymous_blocks) == ([], 0)
    assert cache.cached_hashes() == set(hashes)
    assert (cache.num_evictable_blocks, cache.num_free_slots) == (2, 6)
    again = BlockTable()
    assert cache.lookup(hashes) == 2
    cache.pin_prefix(again, hashes, 2)  # a recomputation hits its own blocks
    assert [cache.ref_count(h) for h in hashes] == [1, 1]


def test_committing_a_block_that_is_already_cached_shares_it(make_hashes):
    cache = BlockCache(8)
    hashes = make_hashes("c0", "c1")
    first, second = BlockTable(), BlockTable()
    for table in (first, second):  # both computed c0, c1 in the same step
        cache.pin_prefix(table, hashes, 0)
        cache.allocate_slots(table, 2)
        cache.commit_full(table, hashes)
    assert [cache.ref_count(h) for h in hashes] == [2, 2]
    assert cache.num_used_slots == 2  # the second table's own slots went back
    assert [e for e in cache.take_events() if isinstance(e, BlocksStored)] == [
        BlocksStored(tuple(hashes), None)
    ]
    with pytest.raises(ValueError, match="1 blocks to commit, the table has 0 anonymous slots"):
        cache.commit_full(first, make_hashes("c0", "c1", "c2")[2:])


def test_lookup_prefix_caps_the_hit_and_counts_its_evictable_blocks(make_hashes):
    cache = BlockCache(8)
    hashes = make_hashes("l0", "l1", "l2")
    serve(cache, hashes[:2])
    table = BlockTable()
    cache.pin_prefix(table, hashes, 1)  # l0 pinned again, l1 still evictable
    assert cache.lookup_prefix(hashes, 3) == (2, 1)
    assert cache.lookup_prefix(hashes, 1) == (1, 0)
    assert cache.lookup_prefix(hashes, 0) == (0, 0)


def test_pinning_a_prefix_that_is_not_cached_changes_nothing(make_hashes):
    cache = BlockCache(8)
    hashes = make_hashes("m0", "m1")
    serve(cache, hashes[:1])
    before = snapshot(cache)
    with pytest.raises(ValueError, match="to pin is not cached"):
        cache.pin_prefix(BlockTable(), hashes, 2)
    assert snapshot(cache) == before


def test_a_snapshot_announces_each_cached_chain_once_and_leaves_pending_events_alone(
    make_hashes,
):
    cache = BlockCache(8)
    first, second = make_hashes("sys", "q1"), make_hashes("sys", "q2")
    for hashes in (first, second):
        cache.release(cache.allocate(hashes))

    snapshot = cache.snapshot()

    sys_block, q1, q2 = first[0], first[1], second[1]
    # Parents first, each chain as long as it runs: sys→q1 in one event, q2 after its parent.
    assert snapshot[0] == AllBlocksCleared()
    assert sorted(snapshot[1:], key=lambda e: len(e.block_hashes), reverse=True) == [
        BlocksStored((sys_block, min(q1, q2)), None),
        BlocksStored((max(q1, q2),), sys_block),
    ]
    assert cache.take_events() == [
        BlocksStored((sys_block, q1), None),
        BlocksStored((q2,), sys_block),
    ]

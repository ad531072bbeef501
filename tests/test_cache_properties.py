"""Property tests: random request sequences against the block cache's invariants.

A workload is a list of operations on a small cache: allocate a prompt (a random chain of
blocks from a 3-letter alphabet, so prompts share prefixes all the time, optionally salted by
tenant), release one of the (at most 3) running requests, or clear. A plain-Python model
tracks what must be pinned, when each block was last released, and at what depth.
"""

from __future__ import annotations

import functools
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from kvqueue.errors import CacheFullError, RequestRejected
from kvqueue.gpu.cache import Allocation, BlockCache
from kvqueue.gpu.events import BlocksRemoved, CacheEvent, replay
from kvqueue.gpu.hashing import BlockHash, hash_token_blocks

MAX_RUNNING = 3

prompts = st.tuples(
    st.lists(st.sampled_from("abc"), max_size=8).map(tuple),
    st.sampled_from([(), ("tenant-1",)]),
)
allocations = st.tuples(st.just("allocate"), prompts, st.integers(0, 2))
releases = st.tuples(st.just("release"), st.integers(0, MAX_RUNNING - 1))
# Allocations and releases are 3 times as likely as a clear, so caches fill up and evict.
operations = st.lists(
    st.one_of(
        allocations, releases, allocations, releases, allocations, releases, st.just(("clear",))
    ),
    min_size=10,
    max_size=60,
)


@functools.cache
def chain_of(labels: tuple[str, ...], extra_keys: tuple[str, ...]) -> tuple[BlockHash, ...]:
    tokens = [ord(label) for label in labels for _ in range(16)]
    return tuple(hash_token_blocks(tokens, extra_keys=extra_keys))


class Model:
    """What the cache must look like, kept independently of its internals."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.cache = BlockCache(capacity)
        self.running: list[Allocation] = []
        self.pins: Counter[BlockHash] = Counter()
        self.parent: dict[BlockHash, BlockHash | None] = {}
        self.depth: dict[BlockHash, int] = {}
        self.released_at: dict[BlockHash, int] = {}
        self.clock = 0
        self.events: list[CacheEvent] = []

    def snapshot(self) -> tuple:
        c = self.cache
        return (c.cached_hashes(), c.num_free_slots, c.num_evictable_blocks, c.num_active_blocks)

    def allocate(self, hashes: tuple[BlockHash, ...], num_anonymous: int) -> None:
        for depth, block_hash in enumerate(hashes):
            self.parent[block_hash] = hashes[depth - 1] if depth else None
            self.depth[block_hash] = depth
        cached = self.cache.cached_hashes()
        evictable = {h for h in cached if self.pins[h] == 0}
        num_hits = next((i for i, h in enumerate(hashes) if h not in cached), len(hashes))
        num_new = len(hashes) - num_hits
        num_revived = sum(1 for h in hashes[:num_hits] if h in evictable)
        free = self.cache.num_free_slots
        before = self.snapshot()
        try:
            allocation = self.cache.allocate(hashes, num_anonymous)
        except RequestRejected:
            assert len(hashes) + num_anonymous > self.capacity
            assert self.snapshot() == before and self.cache.take_events() == []
            return
        except CacheFullError:
            assert num_new + num_anonymous > free + len(evictable) - num_revived
            assert self.snapshot() == before and self.cache.take_events() == []
            return
        new_events = self.cache.take_events()
        self.events += new_events
        evicted = [h for e in new_events if isinstance(e, BlocksRemoved) for h in e.block_hashes]

        assert allocation.num_hit_blocks == num_hits
        # Nothing pinned is evicted: not by a running request, not by this one.
        assert not set(evicted) & {h for h, n in self.pins.items() if n > 0}
        assert not set(evicted) & set(hashes)
        # Exactly as many evictions as slots were missing, least recently released first,
        # deepest first among blocks released together, then by hash.
        assert len(evicted) == max(0, num_new + num_anonymous - free)
        candidates = sorted(
            evictable - set(hashes),
            key=lambda h: (self.released_at[h], -self.depth[h], h),
        )
        assert evicted == candidates[: len(evicted)]

        self.running.append(allocation)
        self.pins.update(hashes)

    def release(self, index: int) -> None:
        if not self.running:
            return
        allocation = self.running.pop(index % len(self.running))
        self.cache.release(allocation)
        self.clock += 1
        for block_hash in allocation.block_hashes:
            self.pins[block_hash] -= 1
            if self.pins[block_hash] == 0:
                self.released_at[block_hash] = self.clock
        assert self.cache.take_events() == []  # releasing never evicts

    def clear(self) -> None:
        if any(a.block_hashes or a.num_anonymous_blocks for a in self.running):
            before = self.snapshot()
            try:
                self.cache.clear()
            except CacheFullError:
                assert self.snapshot() == before
                return
            raise AssertionError("clear() succeeded while blocks were in use")
        self.cache.clear()
        self.events += self.cache.take_events()
        assert self.cache.cached_hashes() == set()

    def check_invariants(self) -> None:
        cache = self.cache
        cached = cache.cached_hashes()
        assert cache.num_used_slots <= self.capacity
        assert cache.num_free_slots >= 0
        assert replay(self.events) == cached
        assert all(self.parent[h] is None or self.parent[h] in cached for h in cached)
        pinned = {h for h, n in self.pins.items() if n > 0}
        assert pinned <= cached
        assert all(cache.ref_count(h) == self.pins[h] for h in cached)
        assert cache.num_evictable_blocks == len(cached - pinned)
        num_anonymous = sum(a.num_anonymous_blocks for a in self.running)
        assert cache.num_active_blocks == len(pinned) + num_anonymous


def run(capacity: int, ops: list[tuple]) -> Model:
    model = Model(capacity)
    for op in ops:
        if op[0] == "allocate":
            (labels, extra_keys), num_anonymous = op[1], op[2]
            if len(model.running) >= MAX_RUNNING:
                model.release(0)
                model.check_invariants()
            model.allocate(chain_of(labels, extra_keys), num_anonymous)
        elif op[0] == "release":
            model.release(op[1])
        else:
            model.clear()
        model.check_invariants()
    while model.running:
        model.release(0)
        model.check_invariants()
    return model


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 12), ops=operations)
def test_random_request_sequences_keep_every_cache_invariant(capacity, ops):
    model = run(capacity, ops)
    assert model.cache.num_active_blocks == 0
    assert model.cache.num_evictable_blocks == model.cache.num_cached_blocks


@settings(max_examples=100, deadline=None)
@given(capacity=st.integers(4, 12), ops=operations)
def test_replaying_events_into_a_prior_state_reproduces_cached_hashes(capacity, ops):
    # A consumer that joins late applies the events on top of a snapshot it took earlier.
    model = Model(capacity)
    half = len(ops) // 2
    for op in ops[:half]:
        if op[0] == "allocate" and len(model.running) < MAX_RUNNING:
            model.allocate(chain_of(*op[1]), op[2])
        elif op[0] == "release":
            model.release(op[1])
    snapshot = model.cache.cached_hashes()
    later: list[CacheEvent] = []
    for op in ops[half:]:
        if op[0] == "allocate" and len(model.running) < MAX_RUNNING:
            start = len(model.events)
            model.allocate(chain_of(*op[1]), op[2])
            later += model.events[start:]
        elif op[0] == "release":
            model.release(op[1])
    assert replay(later, snapshot) == model.cache.cached_hashes()


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(1, 12), ops=operations)
def test_a_snapshot_alone_replays_to_the_cached_hashes_parents_first(capacity, ops):
    # What a worker announces when Redis lost the router's copy of its cache.
    model = run(capacity, ops)
    snapshot = model.cache.snapshot()
    assert replay(snapshot, {BlockHash(b"stale")}) == model.cache.cached_hashes()
    announced: set[BlockHash] = set()
    for event in snapshot[1:]:
        parent = event.parent_hash
        assert parent is None or parent in announced  # a consumer knows each parent already
        for position, block_hash in enumerate(event.block_hashes):
            assert model.parent[block_hash] == (
                event.block_hashes[position - 1] if position else parent
            )
            announced.add(block_hash)

"""The previous `BlockCache`, kept as a reference for `test_cache_replay`.

It kept one record per cached block (ref count, depth, last release, parent) and did its
Python work block by block: lookups, pins, releases and evictions walked every block of a
request. The current cache keeps runs of blocks that share their state and does per-run
Python work; the replay test checks that both answer every call alike, with the same events,
counters and snapshots. The class bodies are the previous ones verbatim (the cache class
renamed); `Allocation`, `BlockTable` and `CacheStats` are the current module's, which did not
change.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from kvqueue.errors import CacheFullError, ConfigError, RequestRejected
from kvqueue.gpu.cache import Allocation, BlockTable, CacheStats
from kvqueue.gpu.events import AllBlocksCleared, BlocksRemoved, BlocksStored, CacheEvent
from kvqueue.gpu.hashing import BlockHash


@dataclass(slots=True)
class CachedBlock:
    block_hash: BlockHash
    depth: int
    ref_count: int = 0
    last_used: int = 0
    parent_hash: BlockHash | None = None  # the block before it in its chain (for `snapshot`)


class ReferenceBlockCache:
    """A paged KV cache of `num_blocks` slots holding chained-hash blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ConfigError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.stats = CacheStats()
        self._blocks: dict[BlockHash, CachedBlock] = {}
        # One entry per release: (clock, run of hashes; pop() from the end evicts next).
        self._evictable_heap: list[tuple[int, list[BlockHash]]] = []
        self._num_evictable = 0
        self._num_anonymous = 0
        self._clock = 0
        self._events: list[CacheEvent] = []
        self._open_removed: list[BlockHash] = []

    # -- queries -------------------------------------------------------------------------
    @property
    def num_cached_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_used_slots(self) -> int:
        return len(self._blocks) + self._num_anonymous

    @property
    def num_free_slots(self) -> int:
        return self.num_blocks - self.num_used_slots

    @property
    def num_evictable_blocks(self) -> int:
        return self._num_evictable

    @property
    def num_active_blocks(self) -> int:
        """Slots held by running requests (cached blocks with ref_count > 0, and anonymous)."""
        return self.num_used_slots - self._num_evictable

    @property
    def num_allocatable(self) -> int:
        """Slots a new block can take now: free ones plus evictable cached ones (vLLM's
        free-block queue holds both)."""
        return self.num_blocks - self.num_used_slots + self._num_evictable

    def lookup_prefix(self, block_hashes: Sequence[BlockHash], max_hits: int) -> tuple[int, int]:
        """The leading cached run of `block_hashes`, capped at `max_hits`, and how many of those
        hits are evictable (ref_count 0): pinning them takes them out of `num_allocatable`, as
        touching a free block does in vLLM. Changes nothing."""
        blocks = self._blocks
        hits = evictable = 0
        for block_hash in block_hashes[:max_hits]:
            block = blocks.get(block_hash)
            if block is None:
                break
            hits += 1
            if not block.ref_count:
                evictable += 1
        return hits, evictable

    def cached_hashes(self) -> set[BlockHash]:
        return set(self._blocks)

    def ref_count(self, block_hash: BlockHash) -> int:
        block = self._blocks.get(block_hash)
        return block.ref_count if block else 0

    def lookup(self, block_hashes: Sequence[BlockHash]) -> int:
        """Length of the leading run of `block_hashes` that is cached. Changes nothing."""
        for i, block_hash in enumerate(block_hashes):
            if block_hash not in self._blocks:
                return i
        return len(block_hashes)

    def check_fits(self, num_hashed_blocks: int, num_anonymous_blocks: int = 0) -> None:
        """Raise `RequestRejected` if the request could never fit, even in an empty cache."""
        needed = num_hashed_blocks + num_anonymous_blocks
        if needed > self.num_blocks:
            raise RequestRejected(
                f"request needs {needed:,} KV blocks; the cache holds {self.num_blocks:,}"
            )

    # -- mutations -----------------------------------------------------------------------
    def allocate(
        self, block_hashes: Sequence[BlockHash], num_anonymous_blocks: int = 0
    ) -> Allocation:
        """Pin the request's blocks: hits are the leading cached run; the rest is computed.

        Blocks after the first miss are recomputed even if some of them happen to be cached
        ("recompute from first missing block"); a recomputed block that is still cached is
        pinned rather than stored twice. Raises `RequestRejected` if the request can never
        fit and `CacheFullError` if it does not fit now (running requests pin too much);
        in both cases nothing changes.
        """
        hashes = tuple(block_hashes)
        self.check_fits(len(hashes), num_anonymous_blocks)
        num_hits = self.lookup(hashes)
        self._check_room(hashes, num_anonymous_blocks)

        for block_hash in hashes[:num_hits]:
            self._pin(self._blocks[block_hash])
        evicted: list[BlockHash] = []
        stored_runs: list[BlocksStored] = []
        blocks = self._blocks
        free = self.num_blocks - len(blocks) - self._num_anonymous
        run_start = num_hits
        for depth in range(num_hits, len(hashes)):
            block_hash = hashes[depth]
            existing = blocks.get(block_hash)
            if existing is not None:  # cached beyond the first miss: recomputed, not stored twice
                self._pin(existing)
                stored_runs += _stored_run(list(hashes[run_start:depth]), hashes, depth)
                run_start = depth + 1
                continue
            if free:
                free -= 1
            else:
                evicted.append(self._evict_one())
            parent = hashes[depth - 1] if depth else None
            blocks[block_hash] = CachedBlock(block_hash, depth, 1, parent_hash=parent)
        stored_runs += _stored_run(list(hashes[run_start:]), hashes, len(hashes))
        for _ in range(num_anonymous_blocks):
            if free:
                free -= 1
            else:
                evicted.append(self._evict_one())
        self._num_anonymous += num_anonymous_blocks
        # Evicted hashes are never among the stored ones, so reporting the removals first
        # replays to the same set of cached hashes.
        self._flush_removed()
        if evicted:
            self._events.append(BlocksRemoved(tuple(evicted)))
        self._events.extend(stored_runs)

        self.stats.num_queried_blocks += len(hashes)
        self.stats.num_hit_blocks += num_hits
        self.stats.num_evictions += len(evicted)
        return Allocation(hashes, num_hits, num_anonymous_blocks, len(evicted))

    def release(self, allocation: Allocation | BlockTable) -> None:
        """Unpin a request's blocks; blocks reaching ref_count 0 become evictable together.

        They enter the eviction heap as one run sharing this release's clock, ordered so that
        popping from its end yields the smallest ``(-depth, block_hash)`` first: the order the
        class docstring states, at one heap operation per release instead of one per block.
        Anonymous slots are freed. A released `BlockTable` is left empty.
        """
        self._clock += 1
        clock = self._clock
        blocks = self._blocks
        freed: list[CachedBlock] = []
        in_order = True  # a chain released tail first comes out deepest first already
        for block_hash in reversed(allocation.block_hashes):
            block = blocks[block_hash]
            assert block.ref_count > 0, "release of an unpinned block"
            block.ref_count -= 1
            if block.ref_count == 0:
                block.last_used = clock
                if freed and freed[-1].depth <= block.depth:
                    in_order = False
                freed.append(block)
        if freed:
            if in_order:
                freed.reverse()
            else:
                freed.sort(key=_eviction_key, reverse=True)
            heapq.heappush(self._evictable_heap, (clock, [b.block_hash for b in freed]))
            self._num_evictable += len(freed)
        self._num_anonymous -= allocation.num_anonymous_blocks
        assert self._num_anonymous >= 0
        if isinstance(allocation, BlockTable):
            allocation.block_hashes = []
            allocation.num_anonymous_blocks = 0
        if len(self._evictable_heap) > 2 * self.num_blocks:
            self._compact_heap()

    def pin_prefix(
        self, table: BlockTable, block_hashes: Sequence[BlockHash], num_hits: int
    ) -> None:
        """Admission: pin the first `num_hits` of a request's `block_hashes` into its empty
        `table`, and count the lookup in `stats` (all of `block_hashes` queried).

        The hits must be cached (a leading run as `lookup` returns, possibly capped), else
        `ValueError` and nothing changes. Reviving evictable hits takes them out of
        `num_allocatable`; nothing is evicted.
        """
        if table.num_slots:
            raise ValueError(f"pin_prefix needs an empty block table, got {table.num_slots} slots")
        if not 0 <= num_hits <= len(block_hashes):
            raise ValueError(f"num_hits {num_hits} outside 0..{len(block_hashes)}")
        hits = block_hashes[:num_hits]
        pinned = [self._blocks.get(block_hash) for block_hash in hits]
        if None in pinned:
            missing = hits[pinned.index(None)]
            raise ValueError(f"block {missing.hex()[:12]} to pin is not cached")
        revived = 0
        for block in pinned:
            if not block.ref_count:  # type: ignore[union-attr]
                revived += 1
            block.ref_count += 1  # type: ignore[union-attr]
        self._num_evictable -= revived  # their heap entries are now stale
        table.block_hashes.extend(hits)
        self.stats.num_queried_blocks += len(block_hashes)
        self.stats.num_hit_blocks += num_hits

    def allocate_slots(self, table: BlockTable, num_slots: int) -> int:
        """Give `table` `num_slots` more anonymous slots, evicting the least recently
        released blocks when no slot is free; returns the number evicted.

        Raises `CacheFullError`, changing nothing, if fewer than `num_slots` are allocatable.
        """
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        if num_slots > self.num_allocatable:
            raise CacheFullError(
                f"{num_slots:,} KV blocks needed; only {self.num_allocatable:,} are free or "
                f"evictable ({self.num_active_blocks:,} of {self.num_blocks:,} in use)"
            )
        free = self.num_free_slots
        evicted = self._evict_many(num_slots - min(free, num_slots))
        self._num_anonymous += num_slots
        table.num_anonymous_blocks += num_slots
        if evicted:
            self._record_removed(evicted)
            self.stats.num_evictions += len(evicted)
            table.num_evicted += len(evicted)
        return len(evicted)

    def commit_full(self, table: BlockTable, block_hashes: Sequence[BlockHash]) -> None:
        """Blocks of `table` became full: turn as many of its anonymous slots into these
        cached blocks, which continue its chain, pinned, and report them stored.

        A block already cached (computed by another request, or cached past the request's
        capped hit) is shared instead: the table pins it and its own slot is freed. Raises
        `ValueError` if the table has fewer anonymous slots than blocks to commit.
        """
        if len(block_hashes) > table.num_anonymous_blocks:
            raise ValueError(
                f"{len(block_hashes)} blocks to commit, the table has "
                f"{table.num_anonymous_blocks} anonymous slots"
            )
        self._flush_removed()
        blocks = self._blocks
        chain = table.block_hashes
        run: list[BlockHash] = []
        run_parent = chain[-1] if chain else None
        for block_hash in block_hashes:
            existing = blocks.get(block_hash)
            if existing is not None:
                self._pin(existing)
                if run:
                    self._events.append(BlocksStored(tuple(run), run_parent))
                    run = []
                run_parent = block_hash
            else:
                parent = chain[-1] if chain else None
                blocks[block_hash] = CachedBlock(block_hash, len(chain), 1, parent_hash=parent)
                run.append(block_hash)
            chain.append(block_hash)
        if run:
            self._events.append(BlocksStored(tuple(run), run_parent))
        self._num_anonymous -= len(block_hashes)
        table.num_anonymous_blocks -= len(block_hashes)

    def clear(self) -> None:
        """Drop every block (a restarted GPU). Only valid while no request is running."""
        if self.num_active_blocks:
            raise CacheFullError(f"cannot clear: {self.num_active_blocks} blocks are in use")
        self._blocks.clear()
        self._evictable_heap.clear()
        self._num_evictable = 0
        self._flush_removed()
        self._events.append(AllBlocksCleared())

    def take_events(self) -> list[CacheEvent]:
        """Return and forget the events since the last call, oldest first."""
        self._flush_removed()
        events, self._events = self._events, []
        return events

    def snapshot(self) -> list[CacheEvent]:
        """Events that rebuild this cache from nothing: `cleared`, then every cached block.

        Blocks come parents first (by depth), grouped into `stored` runs along chains, so a
        consumer that needs each block's parent already holds it. Changes nothing; pending
        `take_events` are not affected.
        """
        events: list[CacheEvent] = [AllBlocksCleared()]
        runs: list[list[BlockHash]] = []
        parents: list[BlockHash | None] = []
        run_ending_with: dict[BlockHash, int] = {}
        for block in sorted(self._blocks.values(), key=lambda b: (b.depth, b.block_hash)):
            index = run_ending_with.pop(block.parent_hash, None) if block.parent_hash else None
            if index is None:
                index = len(runs)
                runs.append([])
                parents.append(block.parent_hash)
            runs[index].append(block.block_hash)
            run_ending_with[block.block_hash] = index
        events.extend(
            BlocksStored(tuple(run), parent) for run, parent in zip(runs, parents, strict=True)
        )
        return events

    # -- internals -----------------------------------------------------------------------
    def _record_removed(self, evicted: list[BlockHash]) -> None:
        """Evictions of consecutive `allocate_slots` calls become one removed event (they
        replay the same either way); it is closed by the next other event or `take_events`."""
        self._open_removed.extend(evicted)

    def _flush_removed(self) -> None:
        if self._open_removed:
            self._events.append(BlocksRemoved(tuple(self._open_removed)))
            self._open_removed = []

    def _pin(self, block: CachedBlock) -> None:
        if block.ref_count == 0:
            self._num_evictable -= 1  # its heap entry is now stale
        block.ref_count += 1

    def _check_room(self, hashes: tuple[BlockHash, ...], num_anonymous: int) -> None:
        num_new = 0
        num_revived = 0
        for block_hash in hashes:
            block = self._blocks.get(block_hash)
            if block is None:
                num_new += 1
            elif block.ref_count == 0:
                num_revived += 1
        available = self.num_free_slots + self._num_evictable - num_revived
        needed = num_new + num_anonymous
        if needed > available:
            raise CacheFullError(
                f"request needs {needed:,} new KV blocks; only {available:,} are free or "
                f"evictable ({self.num_active_blocks:,} of {self.num_blocks:,} in use)"
            )

    def _evict_one(self) -> BlockHash:
        return self._evict_many(1)[0]

    def _evict_many(self, count: int) -> list[BlockHash]:
        """Evict `count` blocks, least recently released first (deepest first among blocks
        released together), in one pass over the heap; stale heap entries are dropped."""
        evicted: list[BlockHash] = []
        if count <= 0:
            return evicted
        heap = self._evictable_heap
        blocks = self._blocks
        while heap:
            last_used, run = heap[0]
            while run:
                block_hash = run.pop()
                block = blocks.get(block_hash)
                if block is None or block.ref_count > 0 or block.last_used != last_used:
                    continue
                del blocks[block_hash]
                evicted.append(block_hash)
                if len(evicted) == count:
                    if not run:
                        heapq.heappop(heap)
                    self._num_evictable -= count
                    return evicted
            heapq.heappop(heap)
        raise CacheFullError("no evictable block left")  # callers check the room first

    def _compact_heap(self) -> None:
        """Rebuild the heap from the evictable blocks, dropping stale runs (same order)."""
        runs: dict[int, list[CachedBlock]] = {}
        for block in self._blocks.values():
            if block.ref_count == 0:
                runs.setdefault(block.last_used, []).append(block)
        self._evictable_heap = []
        for last_used, run in runs.items():
            run.sort(key=_eviction_key, reverse=True)
            self._evictable_heap.append((last_used, [b.block_hash for b in run]))
        heapq.heapify(self._evictable_heap)


def _eviction_key(block: CachedBlock) -> tuple[int, BlockHash]:
    """Order within blocks released together: deepest first, then by hash."""
    return (-block.depth, block.block_hash)


def _stored_run(
    run: list[BlockHash], hashes: tuple[BlockHash, ...], end: int
) -> list[BlocksStored]:
    """The stored event for a run of new blocks ending just before position `end`."""
    if not run:
        return []
    start = end - len(run)
    return [BlocksStored(tuple(run), hashes[start - 1] if start > 0 else None)]

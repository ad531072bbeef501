"""The block cache of one simulated GPU: reference counting, lazy LRU eviction, events.

Invariants:
- at most `num_blocks` slots are used: cached blocks plus anonymous (unhashed) blocks;
- a block with ``ref_count > 0`` is never evicted;
- a block whose ``ref_count`` drops to 0 stays cached (evictable) until a slot is needed;
  a later hit revives it;
- eviction order is the smallest ``(last_used, -depth, block_hash)``: least recently released
  first, and among blocks released together the deepest first. A request releases its blocks
  together, and a child is only ever used together with its parent, so a parent is never
  evicted before its descendants: each worker's cache stays *prefix-closed* (no stranded
  children), which the router's index relies on;
- every change is reported as an event (`take_events`); replaying them reproduces
  `cached_hashes()` exactly, and so does replaying `snapshot()` alone (what a worker
  announces when the router's copy of its cache was lost).

`last_used` is a logical clock that ticks once per release, so runs are deterministic. A
block's depth is its position in the request that stored it.

Two ways to hold blocks. The sequential engine pins a request's whole footprint at once
(`allocate` → `Allocation`, then `release`). The batched engine grows a `BlockTable` as the
request is scheduled, as vLLM's `KVCacheManager.allocate_slots` does: `pin_prefix` pins the
prefix hits at admission, `allocate_slots` takes anonymous slots for the tokens scheduled in a
step (evicting), `commit_full` turns slots whose block just became full into cached blocks, and
`release` (on preemption or at the end) unpins the chain tail first — its hashed blocks stay
cached and evictable. A table's hashed blocks always form one chain from its first block, so
the children-before-parents rule above holds for both.

**Runs: a radix tree over chains.** The state is kept per run of blocks
(`kvqueue.gpu.block_runs`), not per block: a stored stretch of a request's chain is one run,
cut where a later request's pins begin or end, so every block of a run is pinned by the same
requests and was released at the same time; runs are never merged. Only a run's first block
is indexed (`_heads`, as SGLang's `RadixCache` keys a node's children by their first token):
a request's cached blocks are found by walking from its first block run by run, comparing
each run with the request's next blocks in one slice comparison. Lookups, pins, releases,
stores and evictions therefore do Python work and dict operations per run, and the per-block
part is a few C-level slice copies and comparisons: a 1,000-block prompt costs a handful of
runs, not a thousand steps. The eviction order is kept over runs by `kvqueue.gpu.eviction`,
block for block the order stated above.

What the walk assumes, which chained hashing guarantees: a request is a chain from its
first block in which a block's hash determines the block before it (equal hash ⇒ equal
prefix), and a request's first block is the first block of a chain, never a block some
other request has at a later position. Then a cached block the request reaches is always
the first block of a run or the continuation of the run the walk is in, including a block
cached past the request's first miss (scenarios in `tests/test_cache.py`), so the walk
finds exactly what a lookup of every hash would. A request cut out of the middle of another
request's cached chain would not find it, and a request's block hashes must not repeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

from kvqueue.errors import CacheFullError, ConfigError, RequestRejected
from kvqueue.gpu.block_runs import BlockRun, Chain, common_length, first_cached, group_order
from kvqueue.gpu.events import AllBlocksCleared, BlocksRemoved, BlocksStored, CacheEvent
from kvqueue.gpu.eviction import EvictionQueue
from kvqueue.gpu.hashing import BlockHash


@dataclass(frozen=True, slots=True)
class Allocation:
    """Blocks pinned for one request until `BlockCache.release`."""

    block_hashes: tuple[BlockHash, ...]
    num_hit_blocks: int
    num_anonymous_blocks: int
    num_evicted: int

    @property
    def num_blocks_to_compute(self) -> int:
        return len(self.block_hashes) - self.num_hit_blocks


@dataclass(slots=True)
class BlockTable:
    """The slots one request of the batched engine holds, grown step by step.

    `block_hashes` are its pinned cached blocks, a chain from the request's first block
    (position i is the block at depth i). `num_anonymous_blocks` are slots holding tokens that
    are no full prompt block: the partial last prompt block and the generated tokens (which
    kvqueue never hashes). `num_evicted` counts the evictions its allocations caused.
    """

    block_hashes: list[BlockHash] = field(default_factory=list)
    num_anonymous_blocks: int = 0
    num_evicted: int = 0

    @property
    def num_slots(self) -> int:
        return len(self.block_hashes) + self.num_anonymous_blocks


@dataclass(slots=True)
class CacheStats:
    num_queried_blocks: int = 0
    num_hit_blocks: int = 0
    num_evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_blocks / self.num_queried_blocks if self.num_queried_blocks else 0.0


class BlockCache:
    """A paged KV cache of `num_blocks` slots holding chained-hash blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ConfigError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.stats = CacheStats()
        self._heads: dict[BlockHash, BlockRun] = {}  # the first block of every run → the run
        self._num_cached = 0
        self._evictable = EvictionQueue()
        self._num_evictable = 0
        self._num_anonymous = 0
        self._clock = 0
        self._events: list[CacheEvent] = []
        self._open_removed: list[BlockHash] = []

    # -- queries -------------------------------------------------------------------------
    @property
    def num_cached_blocks(self) -> int:
        return self._num_cached

    @property
    def num_used_slots(self) -> int:
        return self._num_cached + self._num_anonymous

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
    def kv_usage(self) -> float:
        """`num_active_blocks` as a fraction of the cache: evictable cached blocks count as
        free (vLLM's `BlockPool.get_usage`)."""
        return (self._num_cached + self._num_anonymous - self._num_evictable) / self.num_blocks

    @property
    def num_allocatable(self) -> int:
        """Slots a new block can take now: free ones plus evictable cached ones (vLLM's
        free-block queue holds both)."""
        return self.num_blocks - self.num_used_slots + self._num_evictable

    def lookup_prefix(self, block_hashes: Sequence[BlockHash], max_hits: int) -> tuple[int, int]:
        """The leading cached run of `block_hashes`, capped at `max_hits`, and how many of those
        hits are evictable (ref_count 0): pinning them takes them out of `num_allocatable`, as
        touching a free block does in vLLM. Changes nothing."""
        hashes = tuple(block_hashes)
        stop = len(range(len(hashes))[:max_hits])  # as hashes[:max_hits] would cut
        hits = evictable = 0
        while hits < stop:
            found = self._cached_stretch(hashes, hits, stop)
            if found is None:
                break
            run, length = found
            if not run.ref_count:
                evictable += length
            hits += length
        return hits, evictable

    def cached_hashes(self) -> set[BlockHash]:
        """Every cached block (a pass over all runs: for tests and inspection)."""
        return set(chain.from_iterable(run.block_hashes() for run in self._heads.values()))

    def ref_count(self, block_hash: BlockHash) -> int:
        """How many requests pin the block, 0 if it is not cached (a pass over all runs:
        for tests and inspection)."""
        for run in self._heads.values():
            if block_hash in run.block_hashes():
                return run.ref_count
        return 0

    def lookup(self, block_hashes: Sequence[BlockHash]) -> int:
        """Length of the leading run of `block_hashes` that is cached. Changes nothing."""
        hashes = tuple(block_hashes)
        return self._num_leading_cached(hashes, len(hashes))

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

        The blocks are taken in chain order, each new one evicting when no slot is free, so
        a cached block past the first miss may be evicted before its turn comes and is then
        stored again.
        """
        hashes = tuple(block_hashes)
        num_blocks = len(hashes)
        self.check_fits(num_blocks, num_anonymous_blocks)
        num_hits, past_miss = self._check_room(hashes, num_anonymous_blocks)

        position = self._pin_cached(hashes, 0, num_hits)
        heads = self._heads
        free = self.num_blocks - self._num_cached - self._num_anonymous
        evicted: list[BlockHash] = []
        stored: list[BlocksStored] = []
        while position < num_blocks:
            if hashes[position] in heads:  # cached beyond the first miss: pinned, not stored
                position = self._pin_cached(hashes, position, num_blocks, stop_at_miss=True)
                continue
            start = position
            while True:  # new blocks up to the next cached one, if evicting spared it
                end = num_blocks
                if past_miss:
                    end = first_cached(heads, hashes, position + 1, num_blocks)
                free = self._take_slots(end - position, free, evicted)
                position = end
                if position == num_blocks or hashes[position] in heads:
                    break
            parent = hashes[start - 1] if start else None
            stored.append(self._store(hashes, start, position, start, parent))
        self._take_slots(num_anonymous_blocks, free, evicted)
        self._num_anonymous += num_anonymous_blocks
        self._num_evictable -= len(evicted)
        # Evicted hashes are never among the stored ones, so reporting the removals first
        # replays to the same set of cached hashes.
        self._flush_removed()
        if evicted:
            self._events.append(BlocksRemoved(tuple(evicted)))
        self._events.extend(stored)

        self.stats.num_queried_blocks += num_blocks
        self.stats.num_hit_blocks += num_hits
        self.stats.num_evictions += len(evicted)
        return Allocation(hashes, num_hits, num_anonymous_blocks, len(evicted))

    def release(self, allocation: Allocation | BlockTable) -> None:
        """Unpin a request's blocks; blocks reaching ref_count 0 become evictable together.

        Their runs form one eviction group sharing this release's clock, deepest block
        first (`kvqueue.gpu.eviction`): the order the class docstring states, at one heap
        operation per release. Anonymous slots are freed. A released `BlockTable` is left
        empty.
        """
        self._clock += 1
        clock = self._clock
        freed: list[BlockRun] = []
        for run in self._runs_of(tuple(allocation.block_hashes)):
            assert run.ref_count > 0, "release of an unpinned block"
            run.ref_count -= 1
            if not run.ref_count:
                run.last_used = clock
                freed.append(run)
        if freed:
            self._num_evictable += sum(run.end - run.start for run in freed)
            self._evictable.push(clock, self._eviction_group(freed))
        self._num_anonymous -= allocation.num_anonymous_blocks
        assert self._num_anonymous >= 0
        if isinstance(allocation, BlockTable):
            allocation.block_hashes = []
            allocation.num_anonymous_blocks = 0
        if len(self._evictable) > 2 * self.num_blocks:
            self._evictable.compact(self._heads.values())

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
        hashes = tuple(block_hashes)
        num_cached = self._num_leading_cached(hashes, num_hits)
        if num_cached < num_hits:
            raise ValueError(f"block {hashes[num_cached].hex()[:12]} to pin is not cached")
        self._pin_cached(hashes, 0, num_hits)
        table.block_hashes.extend(hashes[:num_hits])
        self.stats.num_queried_blocks += len(hashes)
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
        evicted = self._evict(num_slots - min(free, num_slots))
        self._num_anonymous += num_slots
        table.num_anonymous_blocks += num_slots
        if evicted:
            self._num_evictable -= len(evicted)
            self._record_removed(evicted)
            self.stats.num_evictions += len(evicted)
            table.num_evicted += len(evicted)
        return len(evicted)

    def allocate_slot_each(self, tables: Sequence[BlockTable]) -> int:
        """One more anonymous slot for each of `tables`, in order: what ``allocate_slots(table,
        1)`` for each in turn does (the first ones take the free slots, each of the others
        evicts one block), in one eviction pass. Returns the number evicted.

        Raises `CacheFullError`, changing nothing, if fewer than ``len(tables)`` slots are
        allocatable.
        """
        count = len(tables)
        if count > self.num_allocatable:
            raise CacheFullError(
                f"{count:,} KV blocks needed; only {self.num_allocatable:,} are free or "
                f"evictable ({self.num_active_blocks:,} of {self.num_blocks:,} in use)"
            )
        num_free = min(self.num_free_slots, count)
        evicted = self._evict(count - num_free)
        self._num_anonymous += count
        for table in tables:
            table.num_anonymous_blocks += 1
        if evicted:
            self._num_evictable -= len(evicted)
            self._record_removed(evicted)
            self.stats.num_evictions += len(evicted)
            for table in tables[num_free:]:
                table.num_evicted += 1
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
        hashes = tuple(block_hashes)
        heads = self._heads
        chain = table.block_hashes
        base = len(chain)
        position, count = 0, len(hashes)
        while position < count:
            if hashes[position] in heads:
                position = self._pin_cached(hashes, position, count, stop_at_miss=True)
                continue
            start = position
            position = first_cached(heads, hashes, start + 1, count)
            parent = hashes[start - 1] if start else (chain[-1] if chain else None)
            self._events.append(self._store(hashes, start, position, base + start, parent))
        chain.extend(hashes)
        self._num_anonymous -= count
        table.num_anonymous_blocks -= count

    def clear(self) -> None:
        """Drop every block (a restarted GPU). Only valid while no request is running."""
        if self.num_active_blocks:
            raise CacheFullError(f"cannot clear: {self.num_active_blocks} blocks are in use")
        self._heads.clear()
        self._num_cached = 0
        self._evictable.clear()
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

        Blocks come parents first (by depth, then hash), grouped into `stored` runs along
        chains, so a consumer that needs each block's parent already holds it. Changes
        nothing; pending `take_events` are not affected. A pass over every block: it
        announces a whole cache, off the serving path.
        """
        blocks: list[tuple[int, BlockHash, BlockHash | None]] = []
        for run in self._heads.values():
            hashes, start = run.hashes, run.start
            blocks.append((run.depth, hashes[start], run.parent))
            blocks.extend(
                (run.depth + position - start, hashes[position], hashes[position - 1])
                for position in range(start + 1, run.end)
            )
        blocks.sort(key=lambda block: block[:2])
        events: list[CacheEvent] = [AllBlocksCleared()]
        runs: list[list[BlockHash]] = []
        parents: list[BlockHash | None] = []
        run_ending_with: dict[BlockHash, int] = {}
        for _, block_hash, parent in blocks:
            index = run_ending_with.pop(parent, None) if parent else None
            if index is None:
                index = len(runs)
                runs.append([])
                parents.append(parent)
            runs[index].append(block_hash)
            run_ending_with[block_hash] = index
        events.extend(
            BlocksStored(tuple(run), parent) for run, parent in zip(runs, parents, strict=True)
        )
        return events

    # -- internals: events ---------------------------------------------------------------
    def _record_removed(self, evicted: list[BlockHash]) -> None:
        """Evictions of consecutive `allocate_slots` calls become one removed event (they
        replay the same either way); it is closed by the next other event or `take_events`."""
        self._open_removed.extend(evicted)

    def _flush_removed(self) -> None:
        if self._open_removed:
            self._events.append(BlocksRemoved(tuple(self._open_removed)))
            self._open_removed = []

    # -- internals: runs -----------------------------------------------------------------
    def _check_room(self, hashes: Chain, num_anonymous: int) -> tuple[int, bool]:
        """The request's leading hits, and whether any block past its first miss is cached
        (never, for a chain in a prefix-closed cache). Raises `CacheFullError`, changing
        nothing, if its new and anonymous blocks need more slots than are free or evictable
        once its cached blocks are pinned."""
        heads = self._heads
        count = len(hashes)
        num_hits, num_revived = self.lookup_prefix(hashes, count)
        num_new = count - num_hits
        past_miss = not heads.keys().isdisjoint(hashes[num_hits + 1 :])
        position = num_hits
        while past_miss and position < count:
            found = self._cached_stretch(hashes, position, count)
            if found is None:
                position = first_cached(heads, hashes, position + 1, count)
                continue
            run, length = found
            num_new -= length
            if not run.ref_count:
                num_revived += length
            position += length
        available = self.num_free_slots + self._num_evictable - num_revived
        needed = num_new + num_anonymous
        if needed > available:
            raise CacheFullError(
                f"request needs {needed:,} new KV blocks; only {available:,} are free or "
                f"evictable ({self.num_active_blocks:,} of {self.num_blocks:,} in use)"
            )
        return num_hits, past_miss

    def _cached_stretch(
        self, hashes: Chain, position: int, stop: int
    ) -> tuple[BlockRun, int] | None:
        """The run that ``hashes[position]`` heads (None if it heads none: not cached, for a
        request as the class docstring assumes) and how many of ``hashes[position:stop]`` it
        holds in order (at least 1)."""
        run = self._heads.get(hashes[position])
        if run is None:
            return None
        start, end = run.start, run.end
        if run.hashes is hashes and start == position:  # stored from this very chain
            return run, min(end, stop) - position
        limit = min(end - start, stop - position)
        return run, common_length(run.hashes, start, hashes, position, limit)

    def _num_leading_cached(self, hashes: Chain, stop: int) -> int:
        position = 0
        while position < stop:
            found = self._cached_stretch(hashes, position, stop)
            if found is None:
                break
            position += found[1]
        return position

    def _pin_cached(
        self, hashes: Chain, position: int, stop: int, stop_at_miss: bool = False
    ) -> int:
        """Pin the cached blocks ``hashes[position:stop]`` (all cached, or up to the first
        miss with `stop_at_miss`), splitting runs so each pinned one lies inside the
        request; returns the position reached."""
        while position < stop:
            found = self._cached_stretch(hashes, position, stop)
            if found is None:
                assert stop_at_miss, "pinning a block that is not cached"
                break
            run, length = found
            if length < run.end - run.start:
                self._split(run, length)
            if not run.ref_count:
                self._num_evictable -= length  # its eviction group's entry is now stale
            run.ref_count += 1
            position += length
        return position

    def _split(self, run: BlockRun, offset: int) -> BlockRun:
        """Cut `run` before its block `offset` (0 < offset < length): `run` keeps the blocks
        before, a new run (returned) heads the rest and, if `run` is evictable, follows it
        in its eviction group."""
        cut = run.start + offset
        tail = BlockRun(
            run.hashes,
            cut,
            run.end,
            run.depth + offset,
            run.ref_count,
            run.last_used,
            parent=run.hashes[cut - 1],
        )
        run.end = cut
        self._heads[run.hashes[cut]] = tail
        if not run.ref_count:
            self._evictable.insert_after(run, tail)
        return tail

    def _store(
        self, hashes: Chain, start: int, end: int, depth: int, parent: BlockHash | None
    ) -> BlocksStored:
        """New blocks ``hashes[start:end]``, pinned once, as one run at `depth` after
        `parent`; returns their stored event."""
        self._heads[hashes[start]] = BlockRun(hashes, start, end, depth, 1, parent=parent)
        self._num_cached += end - start
        return BlocksStored(hashes[start:end], parent)

    def _take_slots(self, count: int, free: int, evicted: list[BlockHash]) -> int:
        """Take `count` slots, free ones first, evicting for the rest (their hashes appended
        to `evicted`); returns the free slots left."""
        taken = min(free, count)
        if count > taken:
            evicted += self._evict(count - taken)
        return free - taken

    def _evict(self, count: int) -> list[BlockHash]:
        evicted = self._evictable.evict(count, self._heads)
        self._num_cached -= count
        return evicted

    def _runs_of(self, hashes: Chain) -> list[BlockRun]:
        """The runs holding a pinned request's blocks, in its order. Each lies whole and in
        order inside it: runs are only ever cut, and a pin cuts them at the stretches of the
        request they match."""
        heads = self._heads
        found: list[BlockRun] = []
        position, count = 0, len(hashes)
        while position < count:
            run = heads[hashes[position]]
            size = run.end - run.start
            assert (run.hashes is hashes and run.start == position) or (
                run.hashes[run.start : run.end] == hashes[position : position + size]
            ), "a pinned run lies whole and in order inside the request"
            found.append(run)
            position += size
        return found

    def _eviction_group(self, freed: list[BlockRun]) -> list[BlockRun]:
        """Runs released together, in eviction-group order (`kvqueue.gpu.eviction`): by depth
        if their depths are disjoint (always, for a chain), else split into single blocks
        sorted by ``(-depth, hash)``."""
        if not _disjoint_by_depth(freed):
            freed = sorted(freed, key=lambda run: run.depth)
            if not _disjoint_by_depth(freed):
                freed = self._single_blocks(freed)
                freed.sort(key=group_order, reverse=True)
        return freed

    def _single_blocks(self, group: list[BlockRun]) -> list[BlockRun]:
        """Replace each run of `group` by runs of one block (same state); the old runs end
        empty."""
        singles: list[BlockRun] = []
        for run in group:
            for i in range(run.end - run.start):
                position = run.start + i
                single = BlockRun(
                    run.hashes,
                    position,
                    position + 1,
                    run.depth + i,
                    0,
                    run.last_used,
                    parent=run.hashes[position - 1] if i else run.parent,
                )
                self._heads[run.hashes[position]] = single
                singles.append(single)
            run.end = run.start
        return singles


def _disjoint_by_depth(runs: list[BlockRun]) -> bool:
    """Each run lies at depths after the previous run's (so evicting them from the last one
    back, each from its end, goes deepest block first)."""
    reached = -1
    for run in runs:
        if run.depth < reached:
            return False
        reached = run.depth + run.end - run.start
    return True

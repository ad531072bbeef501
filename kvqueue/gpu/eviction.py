"""The block cache's eviction order: lazy LRU over runs of blocks released together.

One *group* per release: the runs whose `ref_count` dropped to 0 together, in a list whose
end is evicted first, each run from its own end (its deepest block) back. A group holds runs
at disjoint depths sorted shallowest first, so it is evicted deepest block first — or, when
their depths overlap (a request that pinned cached blocks past a gap in its chain), runs of
one block sorted by ``(-depth, hash)``. The groups sit in a heap keyed by their release
clock, least recent first.

Lazy: nothing is removed from a group when one of its runs is pinned again (or released again
later, or evicted); the eviction pass skips runs whose `ref_count` is not 0, whose
`last_used` is not the group's clock, or that are empty. A run split while evictable keeps
its first part and has the rest, deeper, inserted right after it in its group
(`insert_after`), so the order holds.

Invariant: every evictable run (``ref_count == 0``, not empty) is in the group of the release
that made it evictable (its `group`, whose clock is its `last_used`), and the blocks of all
evictable runs come out of `evict` in increasing ``(last_used, -depth, hash)``.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, MutableMapping

from kvqueue.errors import CacheFullError
from kvqueue.gpu.block_runs import BlockRun, group_order
from kvqueue.gpu.hashing import BlockHash


class EvictionQueue:
    """Groups of evictable runs in a heap by release clock (module docstring)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, list[BlockRun]]] = []

    def __len__(self) -> int:
        """Groups held, stale ones included (what `compact` shrinks)."""
        return len(self._heap)

    def push(self, clock: int, group: list[BlockRun]) -> None:
        """The runs of `group` were released together at `clock`, ordered as the module
        docstring says; `clock` exceeds every clock pushed before."""
        for run in group:
            run.group = group
        heapq.heappush(self._heap, (clock, group))

    def evict(self, count: int, heads: MutableMapping[BlockHash, BlockRun]) -> list[BlockHash]:
        """Evict `count` blocks in order: shorten their runs from the end, delete the runs
        left empty from `heads` (first block → run), and return the hashes in eviction
        order. Stale runs met are dropped.

        Raises `CacheFullError` if fewer than `count` blocks are evictable (callers check
        the room first)."""
        evicted: list[BlockHash] = []
        need = count
        heap = self._heap
        while need > 0:
            if not heap:
                raise CacheFullError("no evictable block left")
            clock, group = heap[0]
            while group:
                run = group[-1]
                size = run.end - run.start
                if run.ref_count or run.last_used != clock or not size:
                    group.pop()
                    continue
                cut = run.end - need if size > need else run.start
                blocks = run.hashes[cut : run.end]
                run.end = cut
                if cut == run.start:
                    del heads[blocks[0]]
                evicted.extend(reversed(blocks))
                need -= len(blocks)
                if not need:
                    break
                group.pop()
            if not group:
                heapq.heappop(heap)
        return evicted

    def insert_after(self, run: BlockRun, tail: BlockRun) -> None:
        """`tail` was cut off the end of the evictable `run`: it joins `run`'s group right
        after it, so it is evicted first."""
        group = run.group
        assert group is not None, "an evictable run is in its group"
        group.insert(group.index(run) + 1, tail)
        tail.group = group

    def compact(self, runs: Iterable[BlockRun]) -> None:
        """Rebuild from `runs` (every cached run), dropping stale entries; same order."""
        groups: dict[int, list[BlockRun]] = {}
        for run in runs:
            if not run.ref_count and run.end > run.start:
                groups.setdefault(run.last_used, []).append(run)
        self._heap = []
        for clock, group in groups.items():
            group.sort(key=group_order, reverse=True)
            for run in group:
                run.group = group
            self._heap.append((clock, group))
        heapq.heapify(self._heap)

    def clear(self) -> None:
        self._heap.clear()

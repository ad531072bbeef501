"""How long ago, in blocks allocated since, each worker last released each block — from the
router's own records of what it sent and what came back.

A worker's cache evicts the least recently used of its unpinned blocks whenever it needs a
slot, so in a warm cache a block released on worker w survives until w has allocated about
as many new blocks as it has unpinned ones (an LRU stack distance). The router cannot see the
cache, but it knows what it sent: every request routed to w allocates its uncached prompt
blocks and its output's blocks there (`allocate`), and when it ends its chain is released,
most recently used (`release`). `AllocationClock` counts the allocations per worker and
stamps each released block with the count, so ``since(w, block)`` is the number of blocks w
has allocated since the block was last released — a proxy for how close it is to eviction.

A release stamps a whole chain with the worker's count, which only grows, so the blocks of
a stretch released together keep one stamp until part of it is released again. Each
worker's released chains are therefore a radix tree of runs (`kvqueue.routing.run_tree`)
whose `value` is the run's stamp: a release walks its chain down the tree, restamps the runs
it covers, splits at most one and adds at most one leaf — Python work per run, not per
block. `along(w, chain)` reads the stamps along a chain the same way (`ReleaseAges`);
`since(w, block)` for a single block scans the tree (for inspection and tests). Memory is a
tuple slot per block the worker ever released plus a node per run: the record keeps every
block, as `since` must tell a block released long ago from one never released.

Invariant: a block's stamp is never above its worker's count, and along a released chain the
stamps never increase with depth; no node of a tree has a single child of its own stamp.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from kvqueue.gpu.hashing import BlockHash
from kvqueue.routing.run_tree import RunNode, extend, holds, merge_into_child, mergeable, walk


class ReleaseAges:
    """Blocks allocated since each block of one chain was last released on one worker.

    ``at(i)`` is ``since(worker, chain[i])``. The released blocks of a chain are a leading
    run of it (chained hashing), cut into stretches of one stamp: position i falls in the
    first stretch whose end is above it."""

    __slots__ = ("_ages", "_ends")

    def __init__(self, ends: Sequence[int], ages: Sequence[int]) -> None:
        self._ends = ends  # exclusive end position of each stretch, increasing
        self._ages = ages

    def at(self, position: int) -> int | None:
        """Blocks allocated since the chain's block at `position` was released; None if never."""
        stretch = bisect_right(self._ends, position)
        return self._ages[stretch] if stretch < len(self._ages) else None


NO_AGES = ReleaseAges((), ())  # a chain no block of which was released


class AllocationClock:
    """Per worker: blocks allocated so far, and each routed block's count at its last use."""

    def __init__(self) -> None:
        self._allocated: dict[str, int] = {}
        self._trees: dict[str, RunNode] = {}

    def allocate(self, worker: str, new_blocks: int) -> None:
        """A request routed to `worker` will allocate `new_blocks` there."""
        self._allocated[worker] = self._allocated.get(worker, 0) + max(0, new_blocks)

    def release(self, worker: str, block_hashes: Sequence[BlockHash]) -> None:
        """A request on `worker` ended: its chain is now its most recently used blocks."""
        root = self._trees.get(worker)
        if root is None:
            root = self._trees[worker] = RunNode()
        stamp = self._allocated.get(worker, 0)
        path = extend(walk(root, block_hashes), root, block_hashes, stamp)
        for node in path:
            node.value = stamp
        for node in reversed(path):  # a run restamped like the only child below it joins it
            if mergeable(node):
                merge_into_child(node)

    def since(self, worker: str, block: BlockHash) -> int | None:
        """Blocks `worker` allocated since `block` was last released there; None if never.
        Scans the worker's record: along a chain, use `along`."""
        root = self._trees.get(worker)
        node = holds(root, block) if root is not None else None
        if node is None:
            return None
        return self._allocated.get(worker, 0) - node.value

    def along(self, worker: str, block_hashes: Sequence[BlockHash]) -> ReleaseAges:
        """`since(worker, block)` for every block of a chain, read in one walk."""
        root = self._trees.get(worker)
        if root is None:
            return NO_AGES
        walked = walk(root, block_hashes)
        now = self._allocated.get(worker, 0)
        ends, ages, end = [], [], 0
        for node in walked.path:
            end += len(node.run)
            ends.append(end)
            ages.append(now - node.value)
        if walked.partial is not None:
            ends.append(end + walked.shared)
            ages.append(now - walked.partial.value)
        return ReleaseAges(ends, ages)

    def forget(self, worker: str) -> None:
        self._allocated.pop(worker, None)
        self._trees.pop(worker, None)

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

Invariant: a block's stamp is never above its worker's count, and along a released chain the
stamps never increase with depth.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvqueue.gpu.hashing import BlockHash


class AllocationClock:
    """Per worker: blocks allocated so far, and each routed block's count at its last use."""

    def __init__(self) -> None:
        self._allocated: dict[str, int] = {}
        self._stamps: dict[str, dict[BlockHash, int]] = {}

    def allocate(self, worker: str, new_blocks: int) -> None:
        """A request routed to `worker` will allocate `new_blocks` there."""
        self._allocated[worker] = self._allocated.get(worker, 0) + max(0, new_blocks)

    def release(self, worker: str, block_hashes: Sequence[BlockHash]) -> None:
        """A request on `worker` ended: its chain is now its most recently used blocks."""
        stamps = self._stamps.get(worker)
        if stamps is None:
            stamps = self._stamps[worker] = {}
        stamps.update(dict.fromkeys(block_hashes, self._allocated.get(worker, 0)))

    def since(self, worker: str, block: BlockHash) -> int | None:
        """Blocks `worker` allocated since `block` was last released there; None if never."""
        stamp = self._stamps.get(worker, {}).get(block)
        if stamp is None:
            return None
        return self._allocated[worker] - stamp

    def forget(self, worker: str) -> None:
        self._allocated.pop(worker, None)
        self._stamps.pop(worker, None)

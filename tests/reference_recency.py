"""The previous `AllocationClock`, kept as a reference for `test_recency_replay`.

It stamped every released block in a per-worker dict that kept every block the worker ever
released. The current class keeps each worker's released chains as a radix tree of runs
with one stamp per run; the replay test checks that both answer every call alike. The class
body is the previous one verbatim (the class renamed).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvqueue.gpu.hashing import BlockHash


class ReferenceAllocationClock:
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

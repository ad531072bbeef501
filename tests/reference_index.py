"""The previous `InMemoryIndex`, kept as a reference for `test_index_replay`.

It held a global dict block → workers and one → {worker: expiry} for pending marks, and did
its Python work block by block. The current index keeps per-worker sets and generations of
pending marks updated a run at a time; the replay test checks that both answer every `match`
and `cached_by` alike. The class body is the previous one verbatim.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from kvqueue.gpu.hashing import BlockHash


class ReferenceInMemoryIndex:
    """Dict-based index. `clock` returns milliseconds (virtual time in the simulator)."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or (lambda: time.monotonic() * 1000.0)
        self._holders: dict[BlockHash, set[str]] = {}
        self._pending: dict[BlockHash, dict[str, float]] = {}
        self._worker_blocks: dict[str, set[BlockHash]] = {}

    def add(self, worker: str, block_hashes: Sequence[BlockHash]) -> None:
        self._worker_blocks.setdefault(worker, set()).update(block_hashes)
        holders = self._holders
        all_pending = self._pending
        for block_hash in block_hashes:
            holding = holders.get(block_hash)
            if holding is None:
                holders[block_hash] = {worker}
            else:
                holding.add(worker)
            pending = all_pending.get(block_hash)
            if pending is not None:
                pending.pop(worker, None)
                if not pending:
                    del all_pending[block_hash]

    def remove(self, worker: str, block_hashes: Sequence[BlockHash]) -> None:
        self._worker_blocks.get(worker, set()).difference_update(block_hashes)
        all_holders = self._holders
        for block_hash in block_hashes:
            holders = all_holders.get(block_hash)
            if holders is not None:
                holders.discard(worker)
                if not holders:
                    del all_holders[block_hash]

    def clear(self, worker: str) -> None:
        # Pending marks stay: requests already routed to the worker will still store them.
        self.remove(worker, list(self._worker_blocks.get(worker, ())))

    def mark_pending(self, worker: str, block_hashes: Sequence[BlockHash], ttl_ms: float) -> None:
        expires = self._clock() + ttl_ms
        all_pending = self._pending
        for block_hash in block_hashes:
            pending = all_pending.get(block_hash)
            if pending is None:
                all_pending[block_hash] = {worker: expires}
            else:
                pending[worker] = expires

    def _holding(self, block_hash: BlockHash, now: float) -> set[str]:
        holding = set(self._holders.get(block_hash, ()))
        for worker, expires in self._pending.get(block_hash, {}).items():
            if expires > now:
                holding.add(worker)
        return holding

    def _holds(self, worker: str, block_hash: BlockHash, now: float) -> bool:
        if worker in self._holders.get(block_hash, ()):
            return True
        expires = self._pending.get(block_hash, {}).get(worker)
        return expires is not None and expires > now

    def match(self, block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        """Binary search per worker holding the first block, exactly as the Redis script does.

        Exact while each worker's holdings are prefix-closed (always, when fed by the workers'
        events and the router's pending marks); on a chain with a gap both backends return
        the same boundary: a length L whose block L−1 is held and block L is not.
        """
        if not block_hashes:
            return {}
        now = self._clock()
        matched: dict[str, int] = {}
        for worker in self._holding(block_hashes[0], now):
            lo, hi = 1, len(block_hashes)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._holds(worker, block_hashes[mid - 1], now):
                    lo = mid
                else:
                    hi = mid - 1
            matched[worker] = lo
        return matched

    def cached_by(self, worker: str) -> set[BlockHash]:
        return set(self._worker_blocks.get(worker, ()))

"""The prefix index: which worker caches which block, kept in step with the workers' events.

One small interface (`PrefixIndex`) with two backends — `InMemoryIndex` (simulator, tests) and
`RedisIndex` (the live pipeline: one Redis hash per block, one field per worker) — and one test
suite run against both.

Match semantics: a worker's match for a request is the length of the leading run of the
request's block hashes that the worker holds (cached, or *pending*: routed there and not yet
confirmed by a stored event, until a TTL runs out). It stops at the first block the worker
lacks. Because every worker's cache is prefix-closed (see `kvqueue.gpu.cache`) and the router
marks a routed request's whole chain pending, each worker's holdings are prefix-closed too, so
both backends find that length by binary search over positions (O(log n) probes per worker)
instead of walking every block — and, probing the same positions, always agree.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Protocol, TypeVar

from kvqueue.gpu.events import AllBlocksCleared, BlocksRemoved, BlocksStored, CacheEvent
from kvqueue.gpu.hashing import BlockHash

T = TypeVar("T")


class PrefixIndex(Protocol):
    def add(self, worker: str, block_hashes: Sequence[BlockHash]) -> None:
        """`worker` now caches `block_hashes` (a chain, parent first)."""

    def remove(self, worker: str, block_hashes: Sequence[BlockHash]) -> None:
        """`worker` no longer caches `block_hashes`; absent entries are ignored."""

    def clear(self, worker: str) -> None:
        """`worker` caches nothing (its pending marks stay until stored or expired)."""

    def forget(self, worker: str) -> None:
        """`worker` is gone: it caches nothing and its pending marks are dropped too."""

    def mark_pending(self, worker: str, block_hashes: Sequence[BlockHash], ttl_ms: float) -> None:
        """Count `block_hashes` as held by `worker` for `ttl_ms` or until stored."""

    def match(self, block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        """{worker: leading blocks held} for every worker holding at least the first block."""

    def cached_by(self, worker: str) -> set[BlockHash]:
        """The blocks `worker` caches (confirmed only, not pending)."""


def leading_run(block_hashes: Sequence[T], holds: Callable[[T], bool], known: int = 0) -> int:
    """How many leading blocks of a chain `holds` accepts, by binary search — exact when the
    accepted blocks are prefix-closed along the chain. `known` leading blocks are taken as
    accepted already. (Any sequence will do: positions, ``range(n)``, are probed alike.)"""
    lo, hi = known, len(block_hashes)
    if lo == 0:
        if not block_hashes or not holds(block_hashes[0]):
            return 0
        lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if holds(block_hashes[mid - 1]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def apply_events(index: PrefixIndex, worker: str, events: Iterable[CacheEvent]) -> None:
    """Feed a worker's cache events into an index, in order."""
    for event in events:
        if isinstance(event, BlocksStored):
            index.add(worker, event.block_hashes)
        elif isinstance(event, BlocksRemoved):
            index.remove(worker, event.block_hashes)
        elif isinstance(event, AllBlocksCleared):
            index.clear(worker)


_ENDED = -math.inf  # the expiry of no mark: never in the future


@dataclass(slots=True)
class _Generation:
    opened_ms: float
    expires_ms: float  # the latest expiry of a mark in `marks`
    marks: dict[BlockHash, float]  # block → expiry ms, or _ENDED once a stored event ends it


class PendingMarks:
    """One worker's pending marks: block → expiry, the latest mark of a block winning.

    Marks are written, a whole run of blocks at once, into the newest of a few generations
    (dicts); a generation opens every half TTL and is dropped whole as soon as every mark in
    it has expired, so no entry is ever visited to expire it and at most about three are
    alive. Invariant: a block's expiry is the one in the newest generation that has it; a
    stored event writes `_ENDED` there. Needs a clock that never goes back.
    """

    def __init__(self) -> None:
        self._generations: deque[_Generation] = deque()

    def _drop_expired(self, now: float) -> None:
        generations = self._generations
        while generations and generations[0].expires_ms <= now:
            generations.popleft()

    def mark(self, block_hashes: Sequence[BlockHash], now: float, ttl_ms: float) -> None:
        self._drop_expired(now)
        generations = self._generations
        expires = now + ttl_ms
        if not generations or now - generations[-1].opened_ms >= ttl_ms / 2:
            generations.append(_Generation(now, expires, {}))
        newest = generations[-1]
        newest.marks.update(zip(block_hashes, repeat(expires)))
        newest.expires_ms = max(newest.expires_ms, expires)

    def end(self, block_hashes: Sequence[BlockHash], now: float) -> None:
        """Stored blocks: their marks count no more (marked or not, they shadow older ones)."""
        self._drop_expired(now)
        if self._generations:
            self._generations[-1].marks.update(zip(block_hashes, repeat(_ENDED)))

    def expiry(self, block_hash: BlockHash) -> float:
        """When the block's latest mark expires; `_ENDED` when it has none or it ended."""
        for generation in reversed(self._generations):
            expires = generation.marks.get(block_hash)
            if expires is not None:
                return expires
        return _ENDED


@dataclass(slots=True)
class _Holdings:
    cached: set[BlockHash] = field(default_factory=set)  # confirmed by stored events
    pending: PendingMarks = field(default_factory=PendingMarks)


class InMemoryIndex:
    """Per-worker sets of cached blocks and `PendingMarks`, updated a run at a time.
    `clock` returns milliseconds (virtual time in the simulator) and never goes back.

    `add`, `remove`, `clear` and `mark_pending` do an amount of Python work independent of
    the number of blocks they name: a stored, removed or marked run of blocks is a few set or
    dict operations done in C (no Python code runs per block). `match` probes O(log n)
    positions per worker, as the Redis script does. Invariant: a worker holds a block iff the
    block is in its cached set or its pending expiry lies in the future.
    """

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or (lambda: time.monotonic() * 1000.0)
        self._workers: dict[str, _Holdings] = {}

    def _holdings(self, worker: str) -> _Holdings:
        holdings = self._workers.get(worker)
        if holdings is None:
            holdings = self._workers[worker] = _Holdings()
        return holdings

    def add(self, worker: str, block_hashes: Sequence[BlockHash]) -> None:
        holdings = self._holdings(worker)
        holdings.cached.update(block_hashes)
        holdings.pending.end(block_hashes, self._clock())

    def remove(self, worker: str, block_hashes: Sequence[BlockHash]) -> None:
        holdings = self._workers.get(worker)
        if holdings is not None:
            holdings.cached.difference_update(block_hashes)

    def clear(self, worker: str) -> None:
        # Pending marks stay: requests already routed to the worker will still store them.
        holdings = self._workers.get(worker)
        if holdings is not None:
            holdings.cached.clear()

    def forget(self, worker: str) -> None:
        self._workers.pop(worker, None)  # its cached set and its pending marks

    def mark_pending(self, worker: str, block_hashes: Sequence[BlockHash], ttl_ms: float) -> None:
        if block_hashes:
            self._holdings(worker).pending.mark(block_hashes, self._clock(), ttl_ms)

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
        for worker, holdings in self._workers.items():
            cached, pending = holdings.cached, holdings.pending
            length = leading_run(
                block_hashes,
                lambda block, cached=cached, pending=pending: (
                    block in cached or pending.expiry(block) > now
                ),
            )
            if length:
                matched[worker] = length
        return matched

    def cached_by(self, worker: str) -> set[BlockHash]:
        holdings = self._workers.get(worker)
        return set(holdings.cached) if holdings is not None else set()

    def size(self, worker: str) -> int:
        """Blocks `worker` caches (confirmed only): its "tree size"."""
        holdings = self._workers.get(worker)
        return len(holdings.cached) if holdings is not None else 0

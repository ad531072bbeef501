"""Runs of cached blocks: the unit of the block cache's bookkeeping.

A run is a stretch of consecutive blocks of one chain that share their whole state: the same
requests pin them (one `ref_count`) and they were released together (one `last_used`). It
holds no copy of its hashes: it is a view ``hashes[start:end]`` of the tuple it was stored
from (a request's chain), the block at ``hashes[start + i]`` being at depth ``depth + i``.
Splitting a run is cutting the view in two; evicting from it moves `end` down.

Comparing a request's chain with a run is a slice comparison (the hash objects of one trace
are shared, so mostly identity checks) and finding where a chain stops being cached is a
scan of the run heads by `dict.__contains__`: both run in C, so walking a chain costs Python
work per run, not per block. The helpers here are pure; `kvqueue.gpu.cache` owns the runs'
state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import compress, count
from operator import ne

from kvqueue.gpu.hashing import BlockHash

Chain = tuple[BlockHash, ...]


@dataclass(slots=True, eq=False)
class BlockRun:
    """Cached blocks ``hashes[start:end]`` at depths ``depth, depth + 1, …`` (see the module
    docstring). `parent` is the block before ``hashes[start]`` in its chain (None for a first
    block); each later block's is the one before it. Empty (``start == end``) once evicted or
    replaced. `group` is the eviction group (`kvqueue.gpu.eviction`) holding it while it is
    evictable."""

    hashes: Chain
    start: int
    end: int
    depth: int
    ref_count: int = 0
    last_used: int = 0
    parent: BlockHash | None = None
    group: list[BlockRun] | None = None

    def block_hashes(self) -> Chain:
        return self.hashes[self.start : self.end]


def common_length(a: Chain, a_start: int, b: Chain, b_start: int, limit: int) -> int:
    """How many leading blocks ``a[a_start:]`` and ``b[b_start:]`` share, at most `limit`."""
    head_a = a[a_start : a_start + limit]
    head_b = b[b_start : b_start + limit]
    if head_a == head_b:
        return len(head_a)
    return next(compress(count(), map(ne, head_a, head_b)))


def first_cached(cached: Mapping[BlockHash, object], hashes: Chain, start: int, stop: int) -> int:
    """The first position in ``start..stop-1`` whose block is in `cached`, else `stop`."""
    rest = hashes[start:stop]
    if cached.keys().isdisjoint(rest):  # the usual answer, found twice as fast
        return stop
    return next(compress(count(start), map(cached.__contains__, rest)))


def group_order(run: BlockRun) -> tuple[int, BlockHash]:
    """Sort key of an eviction group, reversed: the group's end is evicted first, so runs
    go shallowest first there; among runs at one depth, the largest first hash."""
    return (-run.depth, run.hashes[run.start])

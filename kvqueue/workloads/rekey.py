"""Requests made to share no block with other requests, keeping their own shapes.

A chain re-keyed by an *owner* (`rekeyed_chain`) keeps its length; two chains re-keyed by the
same owner share exactly the prefix they shared before, chains re-keyed by different owners
share nothing (every block hash gets the owner's 4 bytes appended, so no re-keyed hash equals
a hash of another owner or an original 32-byte one).

- `isolated`: every request its own owner — the workload with no sharing at all (a cold
  cluster's capacity, `kvqueue.report.evaluation.suite`);
- `repeated`: the workload `copies` times, copy c re-keyed by owner c (copy 0 unchanged) —
  the same sharing within each copy and none across them, so a longer burst keeps the
  workload's hit structure (`kvqueue.report.capacity.saturate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from kvqueue.gpu.hashing import BlockHash
from kvqueue.gpu.request import Request


def rekeyed_chain(block_hashes: Sequence[BlockHash], owner: int) -> tuple[BlockHash, ...]:
    """The same chain keyed by `owner` (0 ≤ owner < 2³²)."""
    suffix = owner.to_bytes(4, "little")
    return tuple(BlockHash(h + suffix) for h in block_hashes)


def isolated(requests: Sequence[Request]) -> list[Request]:
    """Each request re-keyed by its position: no two share a block."""
    return [
        replace(r, block_hashes=rekeyed_chain(r.block_hashes, i)) for i, r in enumerate(requests)
    ]


def repeated(requests: Sequence[Request], copies: int) -> list[Request]:
    """`copies` copies of the workload in order, copy c re-keyed by c and its request ids
    suffixed ``#c`` (copy 0 is the workload itself). Raises ValueError below one copy."""
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    out = list(requests)
    for copy in range(1, copies):
        out += [
            replace(
                r,
                request_id=f"{r.request_id}#{copy}",
                block_hashes=rekeyed_chain(r.block_hashes, copy),
            )
            for r in requests
        ]
    return out

"""Cache events: every change to a worker's block cache, in the past tense.

Replaying a worker's events in order reproduces exactly the set of hashes it caches.
`stored` lists blocks parent-first; `removed` lists them in eviction order (children before
parents). On the wire an event is one JSON object (orjson), hashes in hex.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from kvqueue.gpu.hashing import BlockHash, from_hex, to_hex


@dataclass(frozen=True, slots=True)
class BlocksStored:
    """`block_hashes` became cached, in chain order; the first one's parent is `parent_hash`
    (None when it is a first block)."""

    block_hashes: tuple[BlockHash, ...]
    parent_hash: BlockHash | None


@dataclass(frozen=True, slots=True)
class BlocksRemoved:
    """`block_hashes` were evicted, in eviction order."""

    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The cache was emptied (a worker starts, or restarts, with nothing cached)."""


CacheEvent = BlocksStored | BlocksRemoved | AllBlocksCleared


def event_to_dict(event: CacheEvent) -> dict:
    if isinstance(event, BlocksStored):
        return {
            "type": "stored",
            "hashes": to_hex(event.block_hashes),
            "parent": event.parent_hash.hex() if event.parent_hash is not None else None,
        }
    if isinstance(event, BlocksRemoved):
        return {"type": "removed", "hashes": to_hex(event.block_hashes)}
    if isinstance(event, AllBlocksCleared):
        return {"type": "cleared"}
    raise TypeError(f"not a cache event: {event!r}")


def event_from_dict(data: dict) -> CacheEvent:
    kind = data.get("type")
    if kind == "stored":
        parent = data.get("parent")
        return BlocksStored(
            tuple(from_hex(data["hashes"])),
            from_hex([parent])[0] if parent is not None else None,
        )
    if kind == "removed":
        return BlocksRemoved(tuple(from_hex(data["hashes"])))
    if kind == "cleared":
        return AllBlocksCleared()
    raise ValueError(f"unknown cache event type {kind!r} in {data!r}")


def encode_event(event: CacheEvent) -> bytes:
    return orjson.dumps(event_to_dict(event))


def decode_event(payload: bytes | str) -> CacheEvent:
    return event_from_dict(orjson.loads(payload))


def replay(events: Iterable[CacheEvent], cached: set[BlockHash] | None = None) -> set[BlockHash]:
    """The set of cached hashes after applying `events` to `cached` (empty by default)."""
    state = set() if cached is None else set(cached)
    for event in events:
        if isinstance(event, BlocksStored):
            state.update(event.block_hashes)
        elif isinstance(event, BlocksRemoved):
            state.difference_update(event.block_hashes)
        else:
            state.clear()
    return state

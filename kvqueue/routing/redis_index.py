"""The prefix index in Redis: one hash per block (`kvq:node:<hex>`), one field per worker.

Node fields: ``parent`` (hex of the parent block, '' for a first block), ``w:<worker>`` = 1
while the worker caches the block, ``p:<worker>`` = expiry (server ms) of a pending mark. A
node with no worker field is deleted, or expires (a Redis key TTL) with its last pending mark,
so requests that are routed but never stored leave nothing behind. Each worker also has a set of
its hashes (`kvq:worker:<w>:blocks`) so `cleared` can undo everything it announced, and a
sorted set of its pending marks (`kvq:worker:<w>:pending`) so `forget` can undo those too.

Writes accept an optional pipeline so that a worker can append its events to the event stream
and update the tree in one MULTI/EXEC.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from kvqueue import keys
from kvqueue.gpu.events import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    CacheEvent,
    encode_event,
)
from kvqueue.gpu.hashing import BlockHash, from_hex, to_hex
from kvqueue.routing import scripts
from kvqueue.routing.approximate import ApproximateRules

DEFAULT_EVENTS_MAXLEN = 1_000  # entries; docs/reliability.md has the bytes they come to
HASH_BYTES = 32  # SHA-256; the scripts cut the concatenated hex every 64 characters


class RedisIndex:
    """`PrefixIndex` over Redis hashes. Holds no state but the connection and the prefix."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = keys.DEFAULT_PREFIX,
        events_maxlen: int = DEFAULT_EVENTS_MAXLEN,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.events_maxlen = events_maxlen
        self._store = client.register_script(scripts.STORE)
        self._remove = client.register_script(scripts.REMOVE)
        self._clear = client.register_script(scripts.CLEAR)
        self._forget = client.register_script(scripts.FORGET)
        self._mark_pending = client.register_script(scripts.MARK_PENDING)
        self._route_view = client.register_script(scripts.ROUTE_VIEW)
        self._record_routed = client.register_script(scripts.RECORD_ROUTED)
        self._match = client.register_script(scripts.MATCH)

    # -- writes (each accepts a pipeline) ------------------------------------------------
    def add(
        self,
        worker: str,
        block_hashes: Sequence[BlockHash],
        parent: BlockHash | None = None,
        pipeline: Any = None,
    ) -> None:
        if not block_hashes:
            return
        self._store(
            keys=[keys.worker_blocks(worker, self.prefix)],
            args=[self.prefix, worker, parent.hex() if parent else "", *to_hex(block_hashes)],
            client=pipeline or self.client,
        )

    def remove(self, worker: str, block_hashes: Sequence[BlockHash], pipeline: Any = None) -> None:
        if not block_hashes:
            return
        self._remove(
            keys=[keys.worker_blocks(worker, self.prefix)],
            args=[self.prefix, worker, *to_hex(block_hashes)],
            client=pipeline or self.client,
        )

    def clear(self, worker: str, pipeline: Any = None) -> None:
        self._clear(
            keys=[keys.worker_blocks(worker, self.prefix)],
            args=[self.prefix, worker],
            client=pipeline or self.client,
        )

    def forget(self, worker: str, pipeline: Any = None) -> None:
        """`worker` is gone: its cached blocks and its pending marks leave the tree."""
        self._forget(
            keys=[
                keys.worker_blocks(worker, self.prefix),
                keys.worker_pending(worker, self.prefix),
            ],
            args=[self.prefix, worker],
            client=pipeline or self.client,
        )

    def mark_pending(
        self, worker: str, block_hashes: Sequence[BlockHash], ttl_ms: float, pipeline: Any = None
    ) -> None:
        if not block_hashes:
            return
        self._mark_pending(
            keys=[keys.worker_pending(worker, self.prefix)],
            args=[self.prefix, worker, int(ttl_ms), *to_hex(block_hashes)],
            client=pipeline or self.client,
        )

    def publish_events(
        self, worker: str, events: Iterable[CacheEvent], pipeline: Any = None
    ) -> None:
        """Append each event to the event stream and apply it to the tree, atomically.

        Without a pipeline this opens a MULTI/EXEC of its own.
        """
        pipe = pipeline if pipeline is not None else self.client.pipeline(transaction=True)
        stream = keys.events(self.prefix)
        for event in events:
            pipe.xadd(
                stream,
                {"worker": worker, "event": encode_event(event)},
                maxlen=self.events_maxlen,
                approximate=True,
            )
            if isinstance(event, BlocksStored):
                self.add(worker, event.block_hashes, event.parent_hash, pipeline=pipe)
            elif isinstance(event, BlocksRemoved):
                self.remove(worker, event.block_hashes, pipeline=pipe)
            elif isinstance(event, AllBlocksCleared):
                self.clear(worker, pipeline=pipe)
        if pipeline is None:
            pipe.execute()

    # -- reads ---------------------------------------------------------------------------
    def route_view(
        self,
        block_hashes: Sequence[BlockHash],
        heartbeat_ttl_ms: float,
        state_keys: Sequence[str] = (),
        take_ticket: bool = False,
        approximate: ApproximateRules | None = None,
    ) -> RouteRead:
        """One round trip: the live workers' matches (from the precise index, or from the
        approximate one under `approximate`'s rules), the index's size per worker, the
        round-robin ticket, the server's clock and the state hashes asked for."""
        reply = self._route_view(
            keys=[keys.workers(self.prefix), keys.round_robin(self.prefix), *state_keys],
            args=[
                self.prefix,
                int(heartbeat_ttl_ms),
                "1" if take_ticket else "0",
                _chain_arg(block_hashes),
                "" if approximate is None else approximate.to_wire(),
            ],
        )
        live, lengths, ticket, sizes, now, *states = reply
        workers = [_text(w) for w in live]
        decoded = [
            {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)} for flat in states
        ]
        return RouteRead(
            dict(zip(workers, map(int, lengths), strict=True)),
            dict(zip(workers, map(int, sizes), strict=True)),
            int(ticket),
            float(now),
            decoded,
        )

    def record_routed(
        self,
        worker: str,
        block_hashes: Sequence[BlockHash],
        rules: ApproximateRules,
        pipeline: Any = None,
    ) -> None:
        """The router sent this chain to `worker`: it joins the worker's approximate index."""
        if not block_hashes:
            return
        self._record_routed(
            keys=[],
            args=[self.prefix, worker, rules.to_wire(), _chain_arg(block_hashes)],
            client=pipeline or self.client,
        )

    def routed_by(self, worker: str) -> set[BlockHash]:
        """The blocks the approximate index holds for `worker`."""
        members = self.client.zrange(keys.worker_routed(worker, self.prefix), 0, -1)
        return set(from_hex(_text(m) for m in members))

    def match(self, block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        """Matches of every worker holding the first block, live or not (zeros dropped)."""
        workers, lengths = self._match(keys=[], args=[self.prefix, _chain_arg(block_hashes)])
        return {_text(w): int(n) for w, n in zip(workers, lengths, strict=True)}

    def cached_by(self, worker: str) -> set[BlockHash]:
        members = self.client.smembers(keys.worker_blocks(worker, self.prefix))
        return set(from_hex(_text(m) for m in members))


@dataclass(frozen=True, slots=True)
class RouteRead:
    """What `RedisIndex.route_view` read, in one round trip."""

    matches: dict[str, int]  # live worker -> matched blocks
    sizes: dict[str, int]  # live worker -> blocks the index holds for it
    ticket: int
    now_ms: float  # Redis server time
    states: list[dict[str, str]]


def _chain_arg(block_hashes: Sequence[BlockHash]) -> str:
    """A request's hashes as the one argument ROUTE_VIEW and MATCH take: hex, concatenated.

    One argument instead of one per block: for an 8k-token prompt (512 blocks) the separate
    arguments cost more to encode, send and unpack than the script's binary search.
    """
    joined = b"".join(block_hashes)
    if len(joined) != HASH_BYTES * len(block_hashes):
        raise ValueError(
            f"block hashes must be {HASH_BYTES} bytes each; got {len(joined):,} bytes "
            f"for {len(block_hashes):,} hashes"
        )
    return joined.hex()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

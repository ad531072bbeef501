"""The prefix index in Redis: one small hash per block, one short field per holder.

A node is ``<prefix>n:<the block's 32 raw hash bytes>``; its fields are the *slots* of the
workers that cache the block (a decimal number each, value ``1``) and ``p<pending slot>`` =
expiry (server ms) of a worker's pending mark. No parent and no hex: a reader needs neither,
and the node of a block held by a few workers stays a listpack of a few bytes per holder. A
node with no slot field is deleted, or expires (a Redis key TTL) with its last pending mark,
so requests that are routed but never stored leave nothing behind.

Slots: ``<prefix>slots`` (worker -> its current slot), ``<prefix>slots:blocks`` (slot ->
blocks stored under it), ``<prefix>slots:next`` (the last slot handed out: slots are never
reused), ``<prefix>slots:cursor`` (where the sweep is). A worker gets a slot at its first
stored block, and a *pending slot* (``<prefix>slots:pending``: worker -> slot, from the same
counter) at its first pending mark. `clear` and `forget` *retire* the slot, `forget` the
pending slot too: everything stored (or marked pending) under it leaves the tree for every
reader in the same script (readers only look up current slots), and the worker's next stored
block (or mark) takes a new slot. `clear` keeps the pending slot: requests already routed to
the worker still come. A retired slot's fields are swept from the nodes later
(`<prefix>slots:dead`, then `slots:sweeping` during a pass, holding the field names ``<slot>``
and ``p<slot>``): every write script runs a sweep step of up to `scripts.SWEEP_KEYS` keys
while a retired slot awaits one, and `sweep` finishes the pass on demand. So a worker needs no
list of its blocks or its pending marks to be cleared or forgotten, and a dead one is purged
at once for routing.

Writes accept an optional pipeline so that a worker can append its events to the event stream
and update the tree in one MULTI/EXEC. `kvqueue.routing.inspect` decodes it all for a human.
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
from kvqueue.gpu.hashing import BlockHash
from kvqueue.routing import scripts
from kvqueue.routing.approximate import ApproximateRules

DEFAULT_EVENTS_MAXLEN = 1_000  # entries; docs/reliability.md has the bytes they come to
HASH_BYTES = scripts.HASH_BYTES  # SHA-256; the scripts cut the concatenated hashes at this width
SWEEP_STEPS_PER_CALL = 100  # steps of `sweep`'s script: ~20k keys, a few ms of Redis time


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
        self._sweep = client.register_script(scripts.SWEEP)

    # -- writes (each accepts a pipeline) ------------------------------------------------
    def add(
        self,
        worker: str,
        block_hashes: Sequence[BlockHash],
        parent: BlockHash | None = None,
        pipeline: Any = None,
    ) -> None:
        """`worker` caches `block_hashes` (a run whose first block's parent is `parent`:
        the tree keeps no parent, a reader needs none)."""
        if not block_hashes:
            return
        self._store(
            keys=[],
            args=[self.prefix, worker, _chain_arg(block_hashes)],
            client=pipeline or self.client,
        )

    def remove(self, worker: str, block_hashes: Sequence[BlockHash], pipeline: Any = None) -> None:
        if not block_hashes:
            return
        self._remove(
            keys=[],
            args=[self.prefix, worker, _chain_arg(block_hashes)],
            client=pipeline or self.client,
        )

    def clear(self, worker: str, pipeline: Any = None) -> None:
        """`worker`'s cache is empty: its slot retires (its pending marks stay)."""
        self._clear(
            keys=[],
            args=[self.prefix, worker],
            client=pipeline or self.client,
        )

    def forget(self, worker: str, pipeline: Any = None) -> None:
        """`worker` is gone: its cached blocks and its pending marks leave the tree (its slot
        and its pending slot retire)."""
        self._forget(
            keys=[],
            args=[self.prefix, worker],
            client=pipeline or self.client,
        )

    def mark_pending(
        self, worker: str, block_hashes: Sequence[BlockHash], ttl_ms: float, pipeline: Any = None
    ) -> None:
        if not block_hashes:
            return
        self._mark_pending(
            keys=[],
            args=[self.prefix, worker, int(ttl_ms), _chain_arg(block_hashes)],
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

    def sweep(self, max_calls: int | None = None) -> bool:
        """Finish sweeping retired slots' fields from the nodes (readers already ignore
        them: this only frees their memory). At most `max_calls` round trips of
        `SWEEP_STEPS_PER_CALL` steps each, unbounded if None; True when nothing is left."""
        calls = 0
        while max_calls is None or calls < max_calls:
            calls += 1
            if int(self._sweep(keys=[], args=[self.prefix, SWEEP_STEPS_PER_CALL])):
                return True
        return False

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
        return RouteRead.from_reply(reply)

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
        return {BlockHash(bytes(m)) for m in members}

    def match(self, block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        """Matches of every worker holding the first block, live or not (zeros dropped)."""
        workers, lengths = self._match(keys=[], args=[self.prefix, _chain_arg(block_hashes)])
        return {_text(w): int(n) for w, n in zip(workers, lengths, strict=True)}

    def cached_by(self, worker: str) -> set[BlockHash]:
        """The blocks stored under `worker`'s current slot: a SCAN of every node (for tests
        and inspection; no write or read on the routing path needs it)."""
        slot = self.client.hget(keys.slots(self.prefix), worker)
        if slot is None:
            return set()
        held: set[BlockHash] = set()
        start = len(keys.node_prefix(self.prefix))
        batch: list[bytes] = []

        def check() -> None:
            pipe = self.client.pipeline(transaction=False)
            for node in batch:
                pipe.hexists(node, slot)
            held.update(
                BlockHash(n[start:]) for n, yes in zip(batch, pipe.execute(), strict=True) if yes
            )
            batch.clear()

        for node in self.client.scan_iter(match=keys.node_pattern(self.prefix), count=1_000):
            batch.append(node)
            if len(batch) >= 1_000:
                check()
        check()
        return held


@dataclass(frozen=True, slots=True)
class RouteRead:
    """What `RedisIndex.route_view` read, in one round trip."""

    matches: dict[str, int]  # live worker -> matched blocks
    sizes: dict[str, int]  # live worker -> blocks the index holds for it
    ticket: int
    now_ms: float  # Redis server time
    states: list[dict[str, str]]

    @classmethod
    def from_reply(cls, reply: list[Any]) -> RouteRead:
        """ROUTE_VIEW's reply (bytes from Redis), decoded."""
        live, lengths, ticket, sizes, now, *states = reply
        workers = [w.decode() for w in live]
        decoded = [
            {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
            for flat in states
        ]
        return cls(
            dict(zip(workers, map(int, lengths), strict=True)),
            dict(zip(workers, map(int, sizes), strict=True)),
            int(ticket),
            float(now),
            decoded,
        )


def _chain_arg(block_hashes: Sequence[BlockHash]) -> bytes:
    """Hashes as the one argument the scripts take: the raw hashes, concatenated.

    One argument instead of one per block: for an 8k-token prompt (512 blocks) the separate
    arguments cost more to encode, send and unpack than the script's search; raw bytes need
    no hex encoding here and are half as many to send.
    """
    joined = b"".join(block_hashes)
    if len(joined) != HASH_BYTES * len(block_hashes):
        raise ValueError(
            f"block hashes must be {HASH_BYTES} bytes each; got {len(joined):,} bytes "
            f"for {len(block_hashes):,} hashes"
        )
    return joined


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

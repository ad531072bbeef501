"""The Redis prefix tree decoded for a human: what `kvqueue inspect` prints.

The tree's keys are binary and its fields are slot numbers (`kvqueue.routing.redis_index`);
this module turns them back into hex hashes and worker names. Read-only: it changes nothing,
and a node's stored holders (pending marks) are the workers whose *current* slot (pending
slot) it carries; a retired slot's fields, not yet swept, are reported apart, as readers
ignore them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from kvqueue import keys
from kvqueue.gpu.hashing import BlockHash
from kvqueue.routing.scripts import HASH_BYTES


@dataclass(frozen=True, slots=True)
class Slots:
    """The slots decoded: each worker's current slot and how many blocks it stores, and its
    current pending slot."""

    worker_to_slot: dict[str, str]
    slot_to_blocks: dict[str, int]
    retired: frozenset[str]  # fields awaiting a sweep (dead or sweeping): `<slot>`, `p<slot>`
    next_slot: int
    worker_to_pending_slot: dict[str, str] = field(default_factory=dict)

    def owner(self, slot: str) -> str | None:
        for worker, current in self.worker_to_slot.items():
            if current == slot:
                return worker
        return None

    def pending_owner(self, name: str) -> str | None:
        """The worker whose current pending slot a node field (``p<slot>``) names."""
        for worker, current in self.worker_to_pending_slot.items():
            if keys.pending_field(current) == name:
                return worker
        return None


@dataclass(frozen=True, slots=True)
class NodeView:
    """One block's node: who stores it, who has it pending (until when, server ms)."""

    block_hash: BlockHash
    stored_by: tuple[str, ...]
    pending: dict[str, int]
    retired_slots: tuple[str, ...]  # fields of retired slots (`<slot>`, `p<slot>`) still in it
    ttl_ms: int  # -1: no expiry (some worker stores it); -2: no such node
    memory_bytes: int | None  # MEMORY USAGE

    @property
    def exists(self) -> bool:
        return self.ttl_ms != -2


@dataclass(slots=True)
class TreeSummary:
    """Counts over every node (a SCAN of the whole tree)."""

    num_nodes: int = 0
    stored_by_worker: Counter[str] = field(default_factory=Counter)
    pending_by_worker: Counter[str] = field(default_factory=Counter)
    num_retired_fields: int = 0
    num_holders: Counter[int] = field(default_factory=Counter)  # holders -> nodes
    node_bytes: int = 0  # MEMORY USAGE summed over the nodes


def parse_hash(text: str) -> BlockHash:
    """A block hash from its hex (64 characters), or a clear error naming the value."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"block hash {text!r} is not hex") from None
    if len(raw) != HASH_BYTES:
        raise ValueError(
            f"block hash {text!r} has {len(raw)} bytes; a block hash has {HASH_BYTES} "
            f"({2 * HASH_BYTES} hex characters)"
        )
    return BlockHash(raw)


def read_slots(client: redis.Redis, prefix: str = keys.DEFAULT_PREFIX) -> Slots:
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.slots(prefix))
    pipe.hgetall(keys.slot_blocks(prefix))
    pipe.get(keys.slots_next(prefix))
    pipe.sunion(keys.slots_dead(prefix), keys.slots_sweeping(prefix))
    pipe.hgetall(keys.slots_pending(prefix))
    workers, blocks, next_slot, retired, pending = pipe.execute()
    return Slots(
        {_text(k): _text(v) for k, v in workers.items()},
        {_text(k): int(v) for k, v in blocks.items()},
        frozenset(_text(s) for s in retired),
        int(next_slot or 0),
        {_text(k): _text(v) for k, v in pending.items()},
    )


def decode_node(
    block_hash: BlockHash, fields: dict[Any, Any], slots: Slots, ttl_ms: int, memory: int | None
) -> NodeView:
    stored, pending, retired = [], {}, []
    for name, value in ((_text(k), _text(v)) for k, v in fields.items()):
        if name.startswith("p"):
            if (worker := slots.pending_owner(name)) is not None:
                pending[worker] = int(value)
            else:
                retired.append(name)
        elif (worker := slots.owner(name)) is not None:
            stored.append(worker)
        else:
            retired.append(name)
    return NodeView(block_hash, tuple(sorted(stored)), pending, tuple(sorted(retired)), ttl_ms,
                    memory)  # fmt: skip


def read_node(
    client: redis.Redis, block_hash: BlockHash, prefix: str = keys.DEFAULT_PREFIX
) -> NodeView:
    key = keys.node(block_hash, prefix)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(key)
    pipe.pttl(key)
    pipe.memory_usage(key, samples=0)
    fields, ttl_ms, memory = pipe.execute()
    return decode_node(block_hash, fields, read_slots(client, prefix), int(ttl_ms), memory)


def read_tree(
    client: redis.Redis, prefix: str = keys.DEFAULT_PREFIX, with_memory: bool = False
) -> list[NodeView]:
    """Every node, decoded (a SCAN: for tests, debugging and small trees)."""
    slots = read_slots(client, prefix)
    start = len(keys.node_prefix(prefix))
    nodes: list[NodeView] = []
    batch: list[bytes] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.hgetall(key)
            pipe.pttl(key)
            if with_memory:
                pipe.memory_usage(key, samples=0)
        replies = pipe.execute()
        step = 3 if with_memory else 2
        for i, key in enumerate(batch):
            fields, ttl_ms = replies[i * step], replies[i * step + 1]
            memory = replies[i * step + 2] if with_memory else None
            if fields:
                nodes.append(decode_node(BlockHash(key[start:]), fields, slots, ttl_ms, memory))
        batch.clear()

    for key in client.scan_iter(match=keys.node_pattern(prefix), count=1_000):
        batch.append(key)
        if len(batch) >= 500:
            flush()
    flush()
    return nodes


def summarize(nodes: list[NodeView]) -> TreeSummary:
    summary = TreeSummary(num_nodes=len(nodes))
    for node in nodes:
        summary.stored_by_worker.update(node.stored_by)
        summary.pending_by_worker.update(node.pending.keys())
        summary.num_retired_fields += len(node.retired_slots)
        summary.num_holders[len(node.stored_by)] += 1
        summary.node_bytes += node.memory_bytes or 0
    return summary


def format_node(node: NodeView, now_ms: int) -> str:
    """A node as a few lines of text."""
    lines = [f"block {node.block_hash.hex()}"]
    if not node.exists:
        return lines[0] + "\n  not in the tree (no worker stores it, no pending mark)"
    lines.append(f"  stored by: {', '.join(node.stored_by) or '(none)'}")
    for worker, expires in sorted(node.pending.items()):
        left = (expires - now_ms) / 1000
        state = f"expires in {left:.1f} s" if left > 0 else "expired"
        lines.append(f"  pending on {worker}: {state}")
    if node.retired_slots:
        lines.append(f"  retired slots awaiting the sweep: {', '.join(node.retired_slots)}")
    expiry = "none (stored)" if node.ttl_ms == -1 else f"{node.ttl_ms / 1000:.1f} s"
    lines.append(f"  key TTL: {expiry}; memory: {node.memory_bytes} B")
    return "\n".join(lines)


def format_summary(slots: Slots, summary: TreeSummary, live: set[str]) -> str:
    """The tree in a table: per worker, its slot, the blocks it stores and has pending."""
    lines = [f"nodes: {summary.num_nodes:,}"]
    if summary.num_nodes:
        lines[0] += (
            f"; {summary.node_bytes / summary.num_nodes:,.0f} B per node (MEMORY USAGE)"
            if summary.node_bytes
            else ""
        )
        spread = ", ".join(f"{k}: {v:,}" for k, v in sorted(summary.num_holders.items()))
        lines.append(f"nodes by number of workers storing them: {spread}")
    header = f"{'worker':<20} {'slot':>6} {'live':>5} {'stored':>9} {'counted':>9} {'pending':>8}"
    lines += ["", header, "-" * len(header)]
    workers = sorted(set(slots.worker_to_slot) | set(summary.pending_by_worker) | live)
    for worker in workers:
        slot = slots.worker_to_slot.get(worker, "-")
        counted = slots.slot_to_blocks.get(slot, 0) if slot != "-" else 0
        lines.append(
            f"{worker:<20} {slot:>6} {'yes' if worker in live else 'no':>5} "
            f"{summary.stored_by_worker[worker]:>9,} {counted:>9,} "
            f"{summary.pending_by_worker[worker]:>8,}"
        )
    lines.append("")
    lines.append(
        f"retired slots awaiting the sweep: {', '.join(sorted(slots.retired)) or 'none'} "
        f"({summary.num_retired_fields:,} fields left in nodes); slots handed out: "
        f"{slots.next_slot}"
    )
    return "\n".join(lines)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

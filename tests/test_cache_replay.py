"""`BlockCache` against the previous implementation (`reference_cache`), on recorded calls.

Simulations of random workloads through both engines (small caches, so that requests evict
and the batched engine preempts) record every call each worker makes on its block cache; each
worker's stream is then replayed into a fresh previous and a fresh current cache, which must
return the same from every call (hits, allocations, eviction counts, errors and their
messages), report the same events (so the same evictions in the same order) and agree on
every counter, every block table, every cached block's ref count and the snapshot a worker
would announce after every call. At the end both evict everything left, in the same order.
A property test does the same with call sequences the engines do not make: interleavings of
both APIs on one cache, tables pinning any part of their hit and committing blocks cached by
others, clears, capacities of 1 to 12.

Requests are chains from their first block (prefixes of chained hashes), as every request
is: the current cache finds cached blocks by walking runs from a request's first block, as a
radix tree does, where the previous one looked every hash up on its own. The two differ only
for a request that starts in the middle of another's cached chain, which chained hashing
rules out (`kvqueue.gpu.cache`); gaps and hash lists that are no chain have their own
scenarios in `test_cache`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mooncake_support import random_mooncake_records, write_mooncake_trace
from reference_cache import ReferenceBlockCache

import kvqueue.gpu.batched_gpu as batched_gpu_module
import kvqueue.gpu.simulated_gpu as simulated_gpu_module
from kvqueue.errors import KVQueueError
from kvqueue.gpu.cache import Allocation, BlockCache, BlockTable
from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.events import BlocksRemoved
from kvqueue.gpu.hashing import BlockHash, hash_token_blocks
from kvqueue.gpu.presets import get_preset
from kvqueue.gpu.request import Request
from kvqueue.sim.simulation import simulate_run
from kvqueue.workloads.arrivals import retime
from kvqueue.workloads.synthetic import make_workload
from kvqueue.workloads.traces import read_mooncake

Holder = Allocation | BlockTable


@dataclass(frozen=True, slots=True)
class Call:
    """One call on a cache: `holder` names the allocation or table it concerns (0: none;
    for `allocate`, the allocation it returns), `answer` what it returned when recorded."""

    method: str
    args: tuple[Any, ...] = ()
    holder: int = 0
    answer: Any = None


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", call())
    except (KVQueueError, ValueError) as exc:
        return ("error", (type(exc).__name__, str(exc)))


@dataclass
class Recording:
    calls: list[Call] = field(default_factory=list)
    holders: dict[int, int] = field(default_factory=dict)  # id(object) → holder number
    kept: list[Holder] = field(default_factory=list)  # alive, so that no id is reused

    def holder(self, obj: Holder) -> int:
        number = self.holders.get(id(obj))
        if number is None:
            number = self.holders[id(obj)] = len(self.holders) + 1
            self.kept.append(obj)
        return number


def recording_cache_class(recordings: list[Recording]) -> type[BlockCache]:
    """A `BlockCache` that records every call the engines make (one recording per cache)."""

    class RecordingCache(BlockCache):
        def __init__(self, num_blocks: int) -> None:
            super().__init__(num_blocks)
            self.recording = Recording()
            recordings.append(self.recording)

        def _log(self, method: str, args: tuple, holder: Holder | None, run: Callable) -> Any:
            recording = self.recording
            try:
                value = run()
            except (KVQueueError, ValueError) as exc:
                number = recording.holder(holder) if holder is not None else 0
                error = ("error", (type(exc).__name__, str(exc)))
                recording.calls.append(Call(method, args, number, error))
                raise
            if method == "allocate":
                holder = value
            number = recording.holder(holder) if holder is not None else 0
            recording.calls.append(Call(method, args, number, _comparable(("ok", value))))
            return value

        def allocate(self, block_hashes, num_anonymous_blocks=0):
            args = (tuple(block_hashes), num_anonymous_blocks)
            allocate = super().allocate
            return self._log("allocate", args, None, lambda: allocate(*args))

        def release(self, allocation):
            self.recording.calls.append(Call("release", (), self.recording.holder(allocation)))
            super().release(allocation)

        def pin_prefix(self, table, block_hashes, num_hits):
            args = (tuple(block_hashes), num_hits)
            pin = super().pin_prefix
            return self._log("pin_prefix", args, table, lambda: pin(table, *args))

        def allocate_slots(self, table, num_slots):
            allocate_slots = super().allocate_slots
            return self._log(
                "allocate_slots", (num_slots,), table, lambda: allocate_slots(table, num_slots)
            )

        def allocate_slot_each(self, tables):
            numbers = tuple(self.recording.holder(table) for table in tables)
            allocate = super().allocate_slot_each
            return self._log("allocate_slot_each", numbers, None, lambda: allocate(tables))

        def commit_full(self, table, block_hashes):
            args = (tuple(block_hashes),)
            commit = super().commit_full
            return self._log("commit_full", args, table, lambda: commit(table, *args))

        def lookup_prefix(self, block_hashes, max_hits):
            args = (tuple(block_hashes), max_hits)
            lookup = super().lookup_prefix
            return self._log("lookup_prefix", args, None, lambda: lookup(*args))

        def take_events(self):
            events = super().take_events()
            self.recording.calls.append(Call("take_events", answer=("ok", events)))
            return events

    return RecordingCache


def _comparable(result: tuple[str, Any]) -> tuple[str, Any]:
    kind, value = result
    if kind == "ok" and isinstance(value, Allocation):
        return (kind, (value.num_hit_blocks, value.num_anonymous_blocks, value.num_evicted))
    return result


class Replay:
    """A fresh previous and a fresh current cache, fed the same calls."""

    def __init__(self, num_blocks: int) -> None:
        self.reference = ReferenceBlockCache(num_blocks)
        self.current = BlockCache(num_blocks)
        self.holders: dict[int, tuple[Holder, Holder]] = {}
        self.num_calls = 0
        self.num_evicted = 0

    def apply(self, call: Call) -> tuple[str, Any]:
        answers = []
        for side, cache in enumerate((self.reference, self.current)):
            answers.append(_comparable(outcome(lambda s=side, c=cache: self._call(s, c, call))))
        assert answers[0] == answers[1], f"call {self.num_calls}: {call.method}"
        reference_answer = answers[0]
        if call.method == "take_events":
            self.num_evicted += sum(
                len(e.block_hashes) for e in reference_answer[1] if isinstance(e, BlocksRemoved)
            )
        self.assert_same_state(call.holder)
        self.num_calls += 1
        return reference_answer

    def _call(self, side: int, cache: Any, call: Call) -> Any:
        method, args = call.method, call.args
        if method == "allocate":
            allocation = cache.allocate(*args)
            pair = list(self.holders.get(call.holder, (allocation, allocation)))
            pair[side] = allocation
            self.holders[call.holder] = (pair[0], pair[1])
            return allocation
        if method in ("lookup_prefix", "lookup", "take_events", "clear"):
            return getattr(cache, method)(*args)
        if method == "allocate_slot_each":  # the previous cache had one slot at a time
            tables = [self.holders[number][side] for number in args]
            if side == 0:
                return sum(cache.allocate_slots(table, 1) for table in tables)
            return cache.allocate_slot_each(tables)
        if call.holder not in self.holders:
            self.holders[call.holder] = (BlockTable(), BlockTable())
        return getattr(cache, method)(self.holders[call.holder][side], *args)

    def assert_same_state(self, holder: int = 0) -> None:
        reference, current = self.reference, self.current
        assert snapshot(current) == snapshot(reference)
        pair = self.holders.get(holder)
        if pair is not None and isinstance(pair[0], BlockTable):
            assert pair[1] == pair[0]

    def drain(self) -> list[BlockHash]:
        """Evict everything evictable from both (a slot-hungry table); the removal order."""
        orders = []
        for cache in (self.reference, self.current):
            cache.take_events()
            cache.allocate_slots(BlockTable(), cache.num_allocatable)
            orders.append([h for e in cache.take_events() for h in e.block_hashes])
        assert orders[0] == orders[1]
        self.assert_same_state()
        return orders[0]


def snapshot(cache: Any) -> tuple:
    hashes = cache.cached_hashes()
    return (
        hashes,
        cache.snapshot(),
        {h: cache.ref_count(h) for h in hashes},
        cache.num_cached_blocks,
        cache.num_used_slots,
        cache.num_evictable_blocks,
        cache.num_active_blocks,
        cache.num_allocatable,
        (cache.stats.num_queried_blocks, cache.stats.num_hit_blocks, cache.stats.num_evictions),
    )


def record_simulation(
    monkeypatch: pytest.MonkeyPatch,
    requests: Sequence[Request],
    strategy: str,
    num_blocks: int,
    engine: EngineConfig,
) -> tuple[list[Recording], int]:
    """Every call each worker's cache got in one simulation; and the preemptions."""
    recordings: list[Recording] = []
    cache_class = recording_cache_class(recordings)
    with monkeypatch.context() as patch:
        patch.setattr(simulated_gpu_module, "BlockCache", cache_class)
        patch.setattr(batched_gpu_module, "BlockCache", cache_class)
        preset = get_preset("llama-3.1-8b@h100-80gb", num_blocks=num_blocks)
        run = simulate_run(requests, strategy, num_workers=3, preset=preset, engine=engine)
    preemptions = sum(stats.num_preemptions for stats in run.engine_stats.values())
    return recordings, preemptions


def replay_and_compare(recording: Recording, num_blocks: int) -> Replay:
    replay = Replay(num_blocks)
    for call in recording.calls:
        assert replay.apply(call) == call.answer or call.answer is None
    replay.drain()
    return replay


def methods(recordings: Sequence[Recording]) -> set[str]:
    return {call.method for recording in recordings for call in recording.calls}


ENGINES = {
    "sequential": EngineConfig("sequential", "seed"),
    "batched": EngineConfig("batched", "calibrated"),
}


@pytest.mark.parametrize(
    ("seed", "strategy", "engine"),
    [
        (0, "cache_aware", "sequential"),
        (1, "round_robin", "sequential"),
        (2, "cache_aware", "batched"),
        (3, "least_loaded", "batched"),
    ],
)
def test_a_recorded_mooncake_simulation_replays_alike(
    monkeypatch: pytest.MonkeyPatch, tmp_path, seed: int, strategy: str, engine: str
) -> None:
    trace = write_mooncake_trace(
        tmp_path / "trace.jsonl", random_mooncake_records(random.Random(seed), 150)
    )
    requests = read_mooncake(trace, length_scale=0.25)  # 8 blocks per id
    num_blocks = 96

    recordings, _ = record_simulation(monkeypatch, requests, strategy, num_blocks, ENGINES[engine])
    evicted = sum(replay_and_compare(r, num_blocks).num_evicted for r in recordings)

    assert evicted > 100  # the small caches evicted all along
    expected = {"allocate", "release"} if engine == "sequential" else {"pin_prefix", "commit_full"}
    assert expected <= methods(recordings)


def test_a_recorded_batched_simulation_that_preempts_replays_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Many long conversations at once on caches of 64 blocks: growing decodes run out of
    # blocks, so the latest admitted requests are preempted and recomputed.
    requests = retime(
        make_workload("multi-turn", num_requests=120, seed=5), "poisson", rate_rps=40.0, seed=5
    )
    num_blocks = 64

    recordings, preemptions = record_simulation(
        monkeypatch, requests, "round_robin", num_blocks, ENGINES["batched"]
    )
    for recording in recordings:
        replay_and_compare(recording, num_blocks)

    assert preemptions > 0
    expected = {
        "lookup_prefix",
        "pin_prefix",
        "allocate_slots",
        "allocate_slot_each",
        "commit_full",
    }
    assert expected <= methods(recordings)


# -- arbitrary call sequences ------------------------------------------------------------------
LABELS = "abc"
# Serving (allocate then release at once) and growing tables are the most frequent calls.
OPS = ("serve", "serve", "allocate", "release", "table", "grow", "grow", "lookup", "take_events",
       "clear")  # fmt: skip
chains = st.lists(st.sampled_from(LABELS), min_size=1, max_size=7).map(
    lambda labels: tuple(hash_token_blocks([ord(c) for label in labels for c in label * 16]))
)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), capacity=st.integers(1, 12))
def test_arbitrary_call_sequences_answer_alike(data: st.DataObject, capacity: int) -> None:
    # Requests are prefixes of a few chains (sharing blocks when their labels do). Tables pin
    # a random part of their hit, grow and commit their next blocks in random steps.
    pool = data.draw(st.lists(chains, min_size=1, max_size=3), label="chains")
    replay = Replay(capacity)
    running: list[int] = []
    prompts: dict[int, tuple[BlockHash, ...]] = {}
    next_holder = 1
    for _ in range(data.draw(st.integers(1, 40), label="calls")):
        op = data.draw(st.sampled_from(OPS))
        chain = data.draw(st.sampled_from(pool))
        hashes = chain[: data.draw(st.integers(0, len(chain)))]
        if op in ("allocate", "serve") and len(running) < 3:
            answer = replay.apply(
                Call("allocate", (hashes, data.draw(st.integers(0, 2))), next_holder)
            )
            if answer[0] == "ok" and op == "serve":
                replay.apply(Call("release", (), next_holder))
            elif answer[0] == "ok":
                running.append(next_holder)
            next_holder += 1
        elif op == "table" and len(running) < 3:
            num_hits, _ = replay.apply(Call("lookup_prefix", (hashes, len(hashes))))[1]
            pinned = data.draw(st.integers(0, num_hits))
            replay.apply(Call("pin_prefix", (hashes, pinned), next_holder))
            running.append(next_holder)
            prompts[next_holder] = hashes
            next_holder += 1
        elif op == "grow" and running:
            holder = data.draw(st.sampled_from(running))
            table = replay.holders[holder][0]
            if isinstance(table, BlockTable):
                slots = data.draw(st.integers(0, 3))
                if replay.apply(Call("allocate_slots", (slots,), holder))[0] == "ok":
                    prompt = prompts[holder]
                    done = len(table.block_hashes)
                    room = min(table.num_anonymous_blocks, len(prompt) - done)
                    commit = prompt[done : done + data.draw(st.integers(0, room))]
                    replay.apply(Call("commit_full", (commit,), holder))
        elif op == "release" and running:
            holder = running.pop(data.draw(st.integers(0, len(running) - 1)))
            replay.apply(Call("release", (), holder))
        elif op == "lookup":
            replay.apply(Call("lookup", (hashes,)))
        elif op == "take_events":
            replay.apply(Call("take_events"))
        elif op == "clear":
            replay.apply(Call("clear"))
    for holder in running:
        replay.apply(Call("release", (), holder))
    replay.drain()

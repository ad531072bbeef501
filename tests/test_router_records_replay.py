"""The router's records of what it routed against their previous implementations.

`ActiveSequences` (requests in flight, reference-counted active blocks) and `AllocationClock`
(blocks allocated since each block's last release) used to keep a dict entry per block and
do their Python work block by block; they now keep runs of blocks in a radix tree
(`kvqueue.routing.run_tree`). The previous classes are kept verbatim (`reference_active`,
`reference_recency`). Two kinds of replay feed both the same calls and compare every answer:

- random call sequences on chains that branch off one another at random depths (requests
  replaced while in flight, unknown ids, workers forgotten, negative counts), with every
  query asked after every call and the tree's own invariants checked;
- the calls the simulator's router made in recorded simulations of random Mooncake traces
  (dynamo and predictive, which read both records; both engines), replayed into a fresh
  previous and current record each.

Chains are chains from their first block, as chained hashing makes every request's blocks:
a block fixes every block before it. The previous classes looked every hash up on its own
and the current ones walk a chain down a tree, as the block cache does; they differ only on
hash lists that are no chain, which no request carries.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from mooncake_support import random_mooncake_records, write_mooncake_trace
from reference_active import ReferenceActiveSequences
from reference_recency import ReferenceAllocationClock

import kvqueue.routing.state as state_module
from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.hashing import BlockHash
from kvqueue.gpu.presets import get_preset
from kvqueue.routing.active import ActiveMatches, ActiveSequences
from kvqueue.routing.recency import AllocationClock
from kvqueue.routing.run_tree import RunNode
from kvqueue.sim.simulation import simulate_run
from kvqueue.workloads.traces import read_mooncake

WORKERS = ("w0", "w1", "w2")


class Chains:
    """Random chains: each a prefix of an earlier one (at a random depth) and new blocks."""

    def __init__(self, rng: random.Random, longest: int) -> None:
        self.rng = rng
        self.longest = longest
        self.made: list[tuple[BlockHash, ...]] = [()]
        self._count = 0

    def _block(self) -> BlockHash:
        self._count += 1
        return BlockHash(hashlib.sha256(str(self._count).encode()).digest())

    def new(self) -> tuple[BlockHash, ...]:
        base = self.rng.choice(self.made)
        keep = self.rng.randint(0, len(base))
        grow = self.rng.choice((0, 1, self.rng.randint(0, self.longest)))
        made = base[:keep] + tuple(self._block() for _ in range(grow))
        self.made.append(made)
        return made

    def any(self) -> tuple[BlockHash, ...]:
        """An earlier chain, a prefix of one, or a new one."""
        roll = self.rng.random()
        if roll < 0.2:
            return self.new()
        chain = self.rng.choice(self.made)
        return chain if roll < 0.6 else chain[: self.rng.randint(0, len(chain))]


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", call())
    except KeyError as exc:
        return ("error", repr(exc))


def check_tree(root: RunNode, counted: bool) -> int:
    """The run tree's invariants (see `kvqueue.routing.active` / `recency`); its blocks."""
    blocks = 0
    stack = [root]
    while stack:
        node = stack.pop()
        for key, child in node.children.items():
            assert child.parent is node and child.run and child.run[0] == key
            assert not (len(child.children) == 1 and child.ends == 0) or (
                next(iter(child.children.values())).value != child.value
            ), "a run that should have been joined to its only child"
            if counted:
                assert child.value > 0
                assert child.value == child.ends + sum(c.value for c in child.children.values())
            else:
                assert all(c.value <= child.value for c in child.children.values())
            blocks += len(child.run)
            stack.append(child)
    return blocks


# -- ActiveSequences ------------------------------------------------------------------------------
class ActiveReplay:
    def __init__(self) -> None:
        self.reference = ReferenceActiveSequences()
        self.current = ActiveSequences()

    def call(self, method: str, *args: Any) -> Any:
        answers = [outcome(lambda r=r: getattr(r, method)(*args)) for r in self.records]
        assert answers[0] == answers[1], (method, args)
        return answers[0]

    @property
    def records(self) -> tuple[Any, Any]:
        return (self.reference, self.current)

    def compare_queries(self, ids: Sequence[str], chains: Sequence[Sequence[BlockHash]]) -> None:
        for worker in WORKERS:
            for query in ("prefill_tokens", "prefilling", "num_blocks"):
                self.call(query, worker)
            for chain in chains:
                self.call("matched", worker, chain)
        for chain in chains:  # as a view carries them, each walked when read
            expected = {w: self.reference.matched(w, chain) for w in WORKERS}
            assert dict(ActiveMatches(self.current, WORKERS, chain)) == expected
            flights = self.current._workers.get(worker)
            if flights is not None:
                assert check_tree(flights.tree, counted=True) == flights.num_blocks
        for request_id in ids:
            self.call("blocks_of", request_id)


@pytest.mark.parametrize("seed", range(12))
def test_active_sequences_answer_random_calls_as_before(seed: int) -> None:
    rng = random.Random(seed)
    chains = Chains(rng, longest=rng.choice((4, 24, 200)))
    replay = ActiveReplay()
    ids = [f"r{i}" for i in range(rng.choice((6, 30)))]
    for _ in range(600):
        roll = rng.random()
        request_id = rng.choice(ids)
        if roll < 0.4:
            prefill = rng.randint(-20, 500)
            replay.call("add", request_id, rng.choice(WORKERS), chains.new(), prefill)
        elif roll < 0.4 + 0.25:
            replay.call("free", request_id)
        elif roll < 0.4 + 0.25 + 0.25:
            replay.call("prefill_done", request_id)
        elif roll < 0.99:
            replay.call("add", request_id, rng.choice(WORKERS), chains.any(), 16)
        else:
            replay.call("forget", rng.choice(WORKERS))
        replay.compare_queries([*ids, "unknown"], [chains.any() for _ in range(3)])
    for request_id in ids:  # everything ends: nothing is left active
        replay.call("free", request_id)
    replay.compare_queries(ids, chains.made[-5:])
    assert all(replay.current.num_blocks(w) == 0 for w in WORKERS)


# -- AllocationClock -------------------------------------------------------------------------
class ClockReplay:
    def __init__(self) -> None:
        self.reference = ReferenceAllocationClock()
        self.current = AllocationClock()

    def both(self, method: str, *args: Any) -> None:
        getattr(self.reference, method)(*args)
        getattr(self.current, method)(*args)

    def compare_along(self, worker: str, chain: Sequence[BlockHash]) -> None:
        """`along` answers, position by position, what `since` answered block by block."""
        ages = self.current.along(worker, chain)
        before = [self.reference.since(worker, block) for block in chain]
        assert [ages.at(i) for i in range(len(chain))] == before

    def compare_since(self, worker: str, blocks: Sequence[BlockHash]) -> None:
        for block in blocks:
            assert self.current.since(worker, block) == self.reference.since(worker, block)


@pytest.mark.parametrize("seed", range(12))
def test_the_allocation_clock_answers_random_calls_as_before(seed: int) -> None:
    rng = random.Random(seed)
    chains = Chains(rng, longest=rng.choice((4, 24, 200)))
    replay = ClockReplay()
    for worker in WORKERS:  # the router counts a worker's allocations before any release
        replay.both("allocate", worker, 0)
    for _ in range(500):
        roll = rng.random()
        worker = rng.choice(WORKERS)
        if roll < 0.45:
            replay.both("allocate", worker, rng.choice((0, rng.randint(-3, 60))))
        elif roll < 0.95:
            replay.both("release", worker, chains.any())
        elif roll < 0.99:
            replay.both("release", worker, ())
        else:
            replay.both("forget", worker)
            replay.both("allocate", worker, 0)
        for query in WORKERS:
            for chain in (chains.any(), chains.any()):
                replay.compare_along(query, chain)
            sampled = chains.any()
            replay.compare_since(query, rng.sample(sampled, min(3, len(sampled))))
            tree = replay.current._trees.get(query)
            if tree is not None:
                check_tree(tree, counted=False)


# -- recorded simulations ------------------------------------------------------------------------
class Recorder:
    """Stands in for a record: forwards every call and keeps it with its answer."""

    def __init__(self, record: Any, calls: list[tuple[str, tuple, Any]]) -> None:
        self._record = record
        self._calls = calls

    def __getattr__(self, method: str) -> Callable[..., Any]:
        forward = getattr(self._record, method)

        def recorded(*args: Any) -> Any:
            args = tuple(tuple(a) if isinstance(a, list) else a for a in args)
            result = forward(*args)
            answer = result
            if method == "along":  # kept as its answer at every position
                answer = [result.at(i) for i in range(len(args[1]))]
            self._calls.append((method, args, answer))
            return result

        return recorded


def record_router(
    monkeypatch: pytest.MonkeyPatch, requests: Sequence[Any], strategy: str, engine: EngineConfig
) -> tuple[list[tuple[str, tuple, Any]], list[tuple[str, tuple, Any]]]:
    """The calls one simulation's router made on its two records."""
    active_calls: list[tuple[str, tuple, Any]] = []
    clock_calls: list[tuple[str, tuple, Any]] = []
    with monkeypatch.context() as patch:
        patch.setattr(
            state_module, "ActiveSequences", lambda: Recorder(ActiveSequences(), active_calls)
        )
        patch.setattr(
            state_module, "AllocationClock", lambda: Recorder(AllocationClock(), clock_calls)
        )
        preset = get_preset("llama-3.1-8b@h100-80gb", num_blocks=96)
        simulate_run(requests, strategy, num_workers=3, preset=preset, engine=engine)
    return active_calls, clock_calls


def replay_active(calls: Sequence[tuple[str, tuple, Any]]) -> None:
    reference, current = ReferenceActiveSequences(), ActiveSequences()
    for method, args, answer in calls:
        assert getattr(reference, method)(*args) == answer, method
        assert getattr(current, method)(*args) == answer, method


def replay_clock(calls: Sequence[tuple[str, tuple, Any]]) -> None:
    reference, current = ReferenceAllocationClock(), AllocationClock()
    for method, args, answer in calls:
        if method == "along":  # the previous clock answered block by block
            worker, chain = args
            ages = current.along(worker, chain)
            assert [reference.since(worker, block) for block in chain] == answer
            assert [ages.at(i) for i in range(len(chain))] == answer
        else:
            assert getattr(reference, method)(*args) == answer, method
            assert getattr(current, method)(*args) == answer, method


@pytest.mark.parametrize(
    ("seed", "strategy", "engine"),
    [
        (0, "dynamo", EngineConfig("sequential", "seed")),
        (1, "predictive", EngineConfig("batched", "calibrated")),
        (2, "dynamo", EngineConfig("batched", "calibrated")),
        (3, "predictive", EngineConfig("sequential", "seed")),
    ],
)
def test_a_recorded_simulation_s_router_records_replay_alike(
    monkeypatch: pytest.MonkeyPatch, tmp_path, seed: int, strategy: str, engine: EngineConfig
) -> None:
    trace = write_mooncake_trace(
        tmp_path / "trace.jsonl", random_mooncake_records(random.Random(seed), 150)
    )
    requests = read_mooncake(trace, length_scale=0.25)
    active_calls, clock_calls = record_router(monkeypatch, requests, strategy, engine)

    replay_active(active_calls)
    replay_clock(clock_calls)

    active_methods = {method for method, _, _ in active_calls}
    assert {"add", "free", "num_blocks", "prefill_done"} <= active_methods
    if strategy == "dynamo":  # it reads the active match of every worker
        assert "matched" in active_methods
    releases = [args for method, args, _ in clock_calls if method == "release"]
    assert len(releases) == len(requests)
    if strategy == "predictive" and engine.is_batched:  # it reads the ages along chains
        assert any(
            age is not None for method, _, ages in clock_calls if method == "along" for age in ages
        )

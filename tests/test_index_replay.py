"""`InMemoryIndex` against the previous implementation (`reference_index`), on recorded streams.

Simulations of random workloads record every call the router and the caches' events make on
the index (with the virtual time of each); the stream is then replayed into the previous and
the current index, which must answer every `match` the simulation asked, a match of the
latest chains after every step, and every worker's `cached_by` alike. Small caches force
evictions and a short pending TTL lets marks expire while requests wait. A property test then
does the same with arbitrary call sequences: gaps in chains, marks of partial chains, clears,
removals of what is absent, time passing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mooncake_support import random_mooncake_records, write_mooncake_trace
from reference_index import ReferenceInMemoryIndex

import kvqueue.routing.state as state_module
from kvqueue.gpu.hashing import BlockHash, hash_token_blocks
from kvqueue.gpu.presets import get_preset
from kvqueue.gpu.request import Request
from kvqueue.routing.index import InMemoryIndex
from kvqueue.sim.simulation import simulate
from kvqueue.workloads.arrivals import retime
from kvqueue.workloads.synthetic import make_workload
from kvqueue.workloads.traces import read_mooncake

WORKERS = [f"worker-{i}" for i in range(4)]
PENDING_TTL_MS = 1_500.0


@dataclass(frozen=True, slots=True)
class Step:
    op: str  # add | remove | clear | mark_pending | match
    now: float
    worker: str = ""
    block_hashes: tuple[BlockHash, ...] = ()
    ttl_ms: float = 0.0
    answer: dict[str, int] = field(default_factory=dict)  # what `match` answered when recorded


def record_simulation(
    monkeypatch: pytest.MonkeyPatch,
    requests: Sequence[Request],
    strategy: str,
    num_blocks: int,
    pending_ttl_ms: float,
) -> list[Step]:
    """Every call `simulate` makes on its router's index, in order."""
    steps: list[Step] = []

    class RecordingIndex(InMemoryIndex):
        def __init__(self, clock):
            super().__init__(clock)
            self.now = clock

        def add(self, worker, block_hashes):
            steps.append(Step("add", self.now(), worker, tuple(block_hashes)))
            super().add(worker, block_hashes)

        def remove(self, worker, block_hashes):
            steps.append(Step("remove", self.now(), worker, tuple(block_hashes)))
            super().remove(worker, block_hashes)

        def clear(self, worker):
            steps.append(Step("clear", self.now(), worker))
            super().clear(worker)

        def mark_pending(self, worker, block_hashes, ttl_ms):
            steps.append(Step("mark_pending", self.now(), worker, tuple(block_hashes), ttl_ms))
            super().mark_pending(worker, block_hashes, ttl_ms)

        def match(self, block_hashes):
            answer = super().match(block_hashes)
            steps.append(Step("match", self.now(), "", tuple(block_hashes), answer=answer))
            return answer

    with monkeypatch.context() as patch:
        patch.setattr(state_module, "InMemoryIndex", RecordingIndex)
        preset = get_preset("llama-3.1-8b@h100-80gb", num_blocks=num_blocks)
        simulate(requests, strategy, len(WORKERS), preset=preset, pending_ttl_ms=pending_ttl_ms)
    return steps


class Replay:
    """The previous and the current index fed the same calls at the same clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reference = ReferenceInMemoryIndex(clock=lambda: self.now)
        self.current = InMemoryIndex(clock=lambda: self.now)
        self.num_matches = 0

    def apply(self, step: Step) -> None:
        self.now = step.now
        for index in (self.reference, self.current):
            if step.op == "clear":
                index.clear(step.worker)
            elif step.op == "mark_pending":
                index.mark_pending(step.worker, step.block_hashes, step.ttl_ms)
            elif step.op in ("add", "remove"):
                getattr(index, step.op)(step.worker, step.block_hashes)

    def assert_same_match(self, block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        expected = self.reference.match(block_hashes)
        assert self.current.match(block_hashes) == expected, f"at t={self.now} ms"
        self.num_matches += 1
        return expected

    def assert_same_cached(self, workers: Sequence[str]) -> None:
        for worker in workers:
            assert self.current.cached_by(worker) == self.reference.cached_by(worker)


def replay_and_compare(steps: Sequence[Step]) -> Replay:
    replay = Replay()
    latest: list[tuple[BlockHash, ...]] = []  # the chains of the last two matches
    for step in steps:
        replay.apply(step)
        if step.op == "match":
            assert replay.assert_same_match(step.block_hashes) == step.answer
            latest = [*latest[-1:], step.block_hashes]
        for chain in latest:
            replay.assert_same_match(chain)
        if step.op in ("add", "remove", "clear"):
            replay.assert_same_cached([step.worker])
    replay.assert_same_cached(WORKERS)
    return replay


def kinds(steps: Sequence[Step]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for step in steps:
        counts[step.op] = counts.get(step.op, 0) + 1
    return counts


@pytest.mark.parametrize(
    ("seed", "strategy", "pending_ttl_ms"),
    [
        (0, "cache_aware", 1_500.0),
        (1, "predictive", 1_500.0),
        (2, "least_loaded", 30_000.0),
        (3, "round_robin", 30_000.0),
    ],
)
def test_a_recorded_mooncake_simulation_replays_alike(
    monkeypatch: pytest.MonkeyPatch, tmp_path, seed: int, strategy: str, pending_ttl_ms: float
) -> None:
    trace = write_mooncake_trace(
        tmp_path / "trace.jsonl", random_mooncake_records(random.Random(seed), 120)
    )
    requests = read_mooncake(trace, length_scale=0.25)  # 8 blocks per id

    steps = record_simulation(monkeypatch, requests, strategy, 160, pending_ttl_ms)
    replay = replay_and_compare(steps)

    counts = kinds(steps)
    assert counts["match"] == len(requests) and counts["mark_pending"] > 0
    assert counts["remove"] > 10  # the small caches evicted
    assert replay.num_matches > len(steps)


@pytest.mark.parametrize("strategy", ["cache_aware", "predictive"])
def test_a_recorded_multi_turn_simulation_replays_alike(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    requests = retime(
        make_workload("multi-turn", num_requests=150, seed=4), "poisson", rate_rps=4.0, seed=4
    )

    steps = record_simulation(monkeypatch, requests, strategy, 120, PENDING_TTL_MS)
    replay_and_compare(steps)

    assert kinds(steps)["remove"] > 10


# -- arbitrary call sequences ------------------------------------------------------------------
LABELS = "abcd"
OPS = ("add", "remove", "clear", "mark_pending", "advance", "match")
chains = st.lists(st.sampled_from(LABELS), min_size=1, max_size=6).map(
    lambda labels: tuple(hash_token_blocks([ord(c) for label in labels for c in label * 16]))
)


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_arbitrary_call_sequences_answer_alike(data: st.DataObject) -> None:
    # A few chains (sharing prefixes when their labels do); each call names a slice of one
    # of them, so calls overlap, leave gaps, and mark or remove parts of stored runs.
    pool = data.draw(st.lists(chains, min_size=1, max_size=3), label="chains")
    replay = Replay()
    now = 0.0
    for _ in range(data.draw(st.integers(1, 40), label="calls")):
        op = data.draw(st.sampled_from(OPS))
        if op == "advance":
            now += data.draw(st.sampled_from([0.0, 60.0, 400.0]))
            continue
        chain = data.draw(st.sampled_from(pool))
        start = data.draw(st.integers(0, len(chain) - 1))
        block_hashes = chain[start : data.draw(st.integers(start + 1, len(chain)))]
        if op == "match":
            replay.now = now
            replay.assert_same_match(block_hashes)
            continue
        worker = data.draw(st.sampled_from(WORKERS[:2]))
        ttl_ms = data.draw(st.sampled_from([0.0, 50.0, 300.0]))
        replay.apply(Step(op, now, worker, block_hashes, ttl_ms))
        for probe in pool:
            replay.assert_same_match(probe)
    replay.assert_same_cached(WORKERS)

"""The approximate index (what the router routed, forgotten by its upstream's rules), index
modes, and the router's records of requests in flight (`ActiveSequences`)."""

from __future__ import annotations

import hashlib

import pytest

from kvqueue.errors import ConfigError
from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.events import BlocksRemoved
from kvqueue.gpu.hashing import BlockHash
from kvqueue.gpu.presets import get_preset
from kvqueue.gpu.request import make_request
from kvqueue.gpu.results import RequestStatus
from kvqueue.routing.active import ActiveSequences
from kvqueue.routing.approximate import (
    DYNAMO_APPROX,
    LLMD_APPROX,
    LLMD_FIXED_LRU,
    SGLANG_TREE,
    ApproximateRules,
    RoutedIndex,
)
from kvqueue.routing.policies.base import parse_strategy, resolve_index_mode
from kvqueue.routing.recency import AllocationClock
from kvqueue.routing.router import Decision
from kvqueue.routing.state import InMemoryRouterState
from kvqueue.sim.simulation import Simulation
from kvqueue.workloads.arrivals import retime
from kvqueue.workloads.synthetic import shared_prefix


def chain(label: str, n: int) -> list[BlockHash]:
    """n chained-looking hashes: block i of `label` (distinct labels share nothing)."""
    return [BlockHash(hashlib.sha256(f"{label}/{i}".encode()).digest()) for i in range(n)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def index_of(rules: ApproximateRules) -> tuple[RoutedIndex, Clock]:
    clock = Clock()
    return RoutedIndex(rules, clock), clock


# -- matching ---------------------------------------------------------------------------------
def test_a_routed_chain_matches_its_leading_run_on_its_worker_only() -> None:
    index, _ = index_of(ApproximateRules("test"))
    a = chain("a", 6)
    index.record("w0", a[:4])
    assert index.match(a) == {"w0": 4}
    assert index.match(chain("b", 3)) == {}
    index.record("w1", a[:2])
    assert index.match(a) == {"w0": 4, "w1": 2}
    assert index.size("w0") == 4 and index.size("w1") == 2


def test_matching_never_refreshes_an_entry() -> None:
    rules = ApproximateRules("test", capacity_blocks=4)
    index, clock = index_of(rules)
    a, b = chain("a", 2), chain("b", 2)
    index.record("w0", a)
    clock.now = 1.0
    index.record("w0", b)
    clock.now = 2.0
    assert index.match(a) == {"w0": 2}  # a lookup: a stays the least recent
    index.record("w0", chain("c", 2))
    assert index.match(a) == {} and index.match(b) == {"w0": 2}


# -- Dynamo: TTL refreshed by recording, cluster-wide prune ---------------------------------------
def test_dynamo_entries_expire_120_s_after_their_last_recording() -> None:
    index, clock = index_of(DYNAMO_APPROX)
    a = chain("a", 3)
    index.record("w0", a)
    clock.now = 60_000.0
    index.record("w0", a[:1])  # re-recorded: the first block lives 120 s from now
    clock.now = 119_999.0
    assert index.match(a) == {"w0": 3}
    clock.now = 120_000.0
    assert index.match(a) == {"w0": 1}
    clock.now = 180_000.0
    assert index.match(a) == {}


def test_dynamo_prunes_all_workers_to_80_percent_oldest_and_deepest_first() -> None:
    rules = ApproximateRules("test", capacity_blocks=10, scope="cluster", prune_to=0.8)
    index, clock = index_of(rules)
    a, b, c = chain("a", 4), chain("b", 4), chain("c", 3)
    index.record("w0", a)
    clock.now = 1.0
    index.record("w1", b)
    clock.now = 2.0
    index.record("w0", c)  # 11 > 10: prune to 8 — a's 3 deepest blocks go
    assert index.size("w0") + index.size("w1") == 8
    assert index.match(a) == {"w0": 1}
    assert index.match(b) == {"w1": 4} and index.match(c) == {"w0": 3}


# -- llm-d: per-pod LRU as large as the GPU, first block first, the walk, 256 blocks ------------
def test_llmd_capacity_is_the_gpus_block_count_and_the_first_block_goes_first() -> None:
    index, clock = index_of(LLMD_APPROX)
    index.set_capacity("w0", 4)
    a = chain("a", 3)
    index.record("w0", a)
    clock.now = 1.0
    index.record("w0", chain("b", 2))  # 5 > 4: a's *first* block is the least recent
    assert index.holds("w0") == set(a[1:]) | set(chain("b", 2))
    assert index.match(a) == {}  # the walk stops at the first block nobody holds


def test_llmd_walk_counts_every_block_a_pod_holds_until_nobody_holds_one() -> None:
    index, _ = index_of(LLMD_APPROX)
    a = chain("a", 4)
    index.record("w0", a)
    index.record("w1", [a[0], a[2]])  # not a leading run: llm-d still counts a[2]
    assert index.match(a) == {"w0": 4, "w1": 2}


def test_llmd_matches_at_most_256_blocks() -> None:
    index, _ = index_of(LLMD_APPROX)
    long = chain("long", 300)
    index.record("w0", long)
    assert index.match(long) == {"w0": 256}


# -- SGLang: a per-worker budget enforced only by the sweep every 120 s ---------------------------
def test_sglang_trims_over_budget_trees_only_at_its_sweeps() -> None:
    rules = ApproximateRules("test", capacity_blocks=3, sweep_interval_ms=120_000.0)
    index, clock = index_of(rules)
    a, b = chain("a", 3), chain("b", 3)
    index.record("w0", a)
    clock.now = 1.0
    index.record("w0", b)
    assert index.size("w0") == 6  # over budget until the next sweep
    clock.now = 119_999.0
    assert index.match(a) == {"w0": 3}
    clock.now = 120_000.0
    assert index.match(a) == {} and index.match(b) == {"w0": 3}


def test_sglang_defaults_are_the_gateways() -> None:
    assert SGLANG_TREE.capacity_blocks == 2**26 // (4 * 16)
    assert SGLANG_TREE.sweep_interval_ms == 120_000.0 and SGLANG_TREE.ttl_ms is None


def test_bad_rules_name_the_value() -> None:
    with pytest.raises(ValueError, match="-5"):
        ApproximateRules("x", ttl_ms=-5)
    with pytest.raises(ValueError, match=r"1\.5"):
        ApproximateRules("x", prune_to=1.5)


# -- index modes ----------------------------------------------------------------------------------
def test_each_policy_defaults_to_its_upstreams_index_and_can_be_told_otherwise() -> None:
    assert resolve_index_mode("dynamo") == ("dynamo", "precise")
    assert resolve_index_mode("sglang") == ("sglang", "approximate")
    assert resolve_index_mode("preble") == ("preble", "approximate")
    assert resolve_index_mode("llmd") == ("llmd", "precise")
    assert resolve_index_mode("dynamo", "approximate") == ("dynamo", "approximate")
    assert resolve_index_mode("llmd:approximate", "precise") == ("llmd", "approximate")
    assert parse_strategy("sglang:precise") == ("sglang", "precise")


def test_an_unknown_index_mode_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="precise, approximate"):
        parse_strategy("llmd:exact")
    with pytest.raises(ConfigError, match="precise, approximate"):
        resolve_index_mode("llmd", "exact")


def test_the_approximate_index_never_hears_that_a_gpu_evicted() -> None:
    request = make_request("r", chain("r", 4))
    views = {}
    for mode in ("precise", "approximate"):
        state = InMemoryRouterState(["worker-0"], clock=lambda: 0.0, index_mode=mode)
        state.commit(request, Decision("worker-0", "t", 0, 64))
        state.apply_events("worker-0", [BlocksRemoved(tuple(request.block_hashes))])
        views[mode] = state.view(request, take_ticket=False)
    # Pending marks stand for routed blocks in the precise index too, but its view is also fed
    # by the GPU; the approximate one only by routing.
    assert views["approximate"].matched("worker-0") == 4
    assert views["approximate"].index_mode == "approximate"
    assert views["precise"].index_mode == "precise"


def test_an_approximate_router_matches_blocks_the_gpus_dropped() -> None:
    """On GPUs too small for the groups' prefixes the approximate index keeps promising
    blocks the GPUs evicted (matched at routing, gone at service) far more often than the
    precise one, which hears every eviction."""
    requests = retime(shared_prefix(16, 4, 96, 16, 8, seed=3), "poisson", 4.0, seed=3)
    lost = {}
    for mode in ("precise", "approximate"):
        simulation = Simulation(f"cache_aware:{mode}", 2, get_preset(num_blocks=24))
        matched: dict[str, int] = {}
        route = simulation.router.route

        def recording(request, route=route, matched=matched):
            decision = route(request)
            matched[request.request_id] = decision.matched_blocks
            return decision

        simulation.router.route = recording
        results = simulation.run(requests)
        assert all(r.status == RequestStatus.COMPLETED for r in results)
        lost[mode] = sum(max(0, matched[r.request_id] - r.hit_blocks) for r in results)
    assert lost["approximate"] > 2 * lost["precise"]


# -- the router's records of requests in flight -------------------------------------------------
def test_a_shared_prefix_is_one_set_of_active_blocks() -> None:
    active = ActiveSequences()
    system = chain("system", 8)
    for i in range(5):
        active.add(f"q{i}", "w0", system + chain(f"q{i}", 2), prefill_tokens=32)
    # Dynamo counts 8 + 5 × 2 = 18 distinct blocks, not 5 × 10.
    assert active.num_blocks("w0") == 18
    assert active.prefill_tokens("w0") == 5 * 32
    assert active.matched("w0", system + chain("new", 3)) == 8
    active.prefill_done("q0")
    active.prefill_done("q0")  # once only
    assert active.prefill_tokens("w0") == 4 * 32
    active.free("q0")
    assert active.num_blocks("w0") == 16
    for i in range(1, 5):
        active.free(f"q{i}")
    assert active.num_blocks("w0") == 0 and active.prefill_tokens("w0") == 0
    active.free("unknown")  # ignored


@pytest.mark.parametrize("engine", [EngineConfig(), EngineConfig("batched", "calibrated")])
def test_the_simulator_tells_the_router_of_first_tokens_and_ends(engine: EngineConfig) -> None:
    requests = retime(shared_prefix(2, 3, 64, 16, 4, seed=1), "poisson", 100.0, seed=1)
    simulation = Simulation("dynamo", 2, engine=engine)
    seen = []
    route = simulation.router.route

    def spy(request):
        view = simulation.state.view(request, take_ticket=False)
        seen.append(sum(view.load(w).active_prefill_tokens for w in view.workers))
        return route(request)

    simulation.router.route = spy
    simulation.run(requests)
    assert any(seen)  # prompts waited for their first token while others arrived
    final = simulation.state.view(requests[0], take_ticket=False)
    for worker in final.workers:
        assert final.load(worker).active_prefill_tokens == 0
        assert final.load(worker).active_blocks == 0


# -- the router's clock of allocations (how close a released block is to eviction) ---------------
def test_a_released_block_ages_by_the_blocks_its_worker_allocates_after() -> None:
    clock = AllocationClock()
    system = chain("system", 3)
    clock.allocate("w0", 10)
    assert clock.since("w0", system[0]) is None  # never released there
    clock.release("w0", system)
    clock.allocate("w0", 7)
    clock.allocate("w1", 100)  # another worker's allocations do not age w0's blocks
    assert clock.since("w0", system[2]) == 7
    clock.release("w0", system[:1])  # used again: the root block is young again
    clock.allocate("w0", 2)
    assert [clock.since("w0", b) for b in system] == [2, 9, 9]


def test_the_state_ages_blocks_from_the_end_of_the_request_that_used_them() -> None:
    state = InMemoryRouterState(["w0"], clock=lambda: 0.0)
    first = make_request("a", chain("a", 4), max_tokens=32)
    state.commit(first, Decision("w0", "t", 0, 64 + 32, prefill_tokens=64))
    view = state.view(first, take_ticket=False)
    assert view.blocks_since_use("w0", first.block_hashes[0]) is None  # still running
    state.complete("w0", 96, request_id="a")
    second = make_request("b", chain("b", 4), max_tokens=16)
    state.commit(second, Decision("w0", "t", 0, 64 + 16, prefill_tokens=64))
    view = state.view(first, take_ticket=False)
    # b allocates its 4 uncached prompt blocks and 1 output block after a was released.
    assert view.blocks_since_use("w0", first.block_hashes[3]) == 5


def test_llm_d_before_auto_tune_keeps_a_fixed_lru_per_pod() -> None:
    index, _ = index_of(LLMD_FIXED_LRU)
    index.set_capacity("w0", 4)  # the GPU's size is ignored
    index.record("w0", chain("a", 10))
    assert index.size("w0") == 10 and LLMD_FIXED_LRU.capacity_blocks == 31_250
    assert resolve_index_mode("llmd_fixed_lru") == ("llmd_fixed_lru", "approximate")

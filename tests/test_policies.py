"""Routing policies: each decision rule on tiny hand-made views, with exact expectations.

A view is built by `make_view`: per worker its prefix match (blocks) and its `WorkerLoad`.
Requests come from `request_of(num_blocks)`: full 16-token blocks with distinct hashes, so
only the match a view declares counts. One live test sends a few requests per new policy
through the real pipeline (Redis, RQ, two KV worker processes).
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.errors import ConfigError
from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.hashing import BlockHash
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.request import Request, make_request
from kvqueue.gpu.results import RequestStatus
from kvqueue.live.cluster import LocalCluster
from kvqueue.live.run import run_live
from kvqueue.report.evaluation import markdown, runner, suite
from kvqueue.report.evaluation.rows import EngineRun
from kvqueue.routing.engine_model import EngineModel
from kvqueue.routing.policies.base import POLICIES, make_policy, policy_names
from kvqueue.routing.policies.chwbl import BoundedLoadHashing
from kvqueue.routing.policies.dynamo import DynamoKvRouter
from kvqueue.routing.policies.llmd import LlmdScorers
from kvqueue.routing.policies.preble import PrebleE2
from kvqueue.routing.policies.preble_tree import PrebleScheduler
from kvqueue.routing.policies.predictive import PredictiveTtft
from kvqueue.routing.policies.sglang import SGLangCacheAware
from kvqueue.routing.router import Decision, Router
from kvqueue.routing.state import InMemoryRouterState, RedisRouterState
from kvqueue.routing.view import RouterView, WorkerLoad
from kvqueue.sim.simulation import Simulation
from kvqueue.workloads.arrivals import retime
from kvqueue.workloads.synthetic import make_workload, shared_prefix

NEW_POLICIES = ("sglang", "dynamo", "llmd", "preble", "chwbl", "predictive")
LATENCY = LatencyModel()  # prefill = 5 + 2.5 × blocks; decode = 15 per token

REPO_ROOT = Path(__file__).resolve().parents[1]


def block_hashes(label: str, num_blocks: int) -> list[BlockHash]:
    return [BlockHash(hashlib.sha256(f"{label}/{i}".encode()).digest()) for i in range(num_blocks)]


def request_of(num_blocks: int, label: str = "r", max_tokens: int | None = 0) -> Request:
    return make_request(label, block_hashes(label, num_blocks), max_tokens=max_tokens)


def make_view(
    matched: dict[str, int] | None = None,
    mean_output_tokens: float | None = None,
    declared_share: float | None = None,
    **loads,
) -> RouterView:
    """``make_view({"w1": 3}, w0=WorkerLoad(...), w1=WorkerLoad(...))``; workers in kw order."""
    workers = tuple(loads)
    return RouterView(
        workers,
        matched or {},
        loads,
        mean_output_tokens=mean_output_tokens,
        declared_share=declared_share,
    )


def idle(capacity: int = 100, used: int = 0) -> WorkerLoad:
    return WorkerLoad(used_blocks=used, capacity_blocks=capacity)


def busy(requests: int, work_ms: float = 0.0, tokens: int = 0, **kw) -> WorkerLoad:
    return WorkerLoad(requests=requests, tokens=tokens, work_ms=work_ms, **kw)


# -- registry -------------------------------------------------------------------------------
def test_every_new_policy_is_registered_and_the_old_ones_stay() -> None:
    assert set(policy_names()) >= {"round_robin", "least_loaded", "cache_aware", *NEW_POLICIES}


def test_unknown_policy_lists_the_new_ones() -> None:
    with pytest.raises(ConfigError, match="predictive"):
        make_policy("oracle")


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("sglang", {"balance_rel": 0.5}),
        ("sglang", {"cache_threshold": 1.5}),
        ("dynamo", {"temperature": -1}),
        ("llmd", {"queue_weight": -1}),
        ("chwbl", {"load_factor": 0.9}),
        ("chwbl", {"prefix_blocks": 0}),
    ],
)
def test_bad_parameters_name_the_value(name: str, params: dict) -> None:
    with pytest.raises(ValueError, match=str(next(iter(params.values())))):
        make_policy(name, **params)


# -- sglang ---------------------------------------------------------------------------------
def test_sglang_defaults_are_the_ones_its_launcher_ships() -> None:
    policy = SGLangCacheAware()
    assert (policy.cache_threshold, policy.balance_abs, policy.balance_rel) == (0.3, 64, 1.5)
    assert SGLangCacheAware.index_mode == "approximate"


def test_sglang_imbalanced_load_goes_to_the_least_loaded_every_time() -> None:
    """Upstream's `test_cache_aware_with_imbalanced_load`: threshold 0.5, abs 5, rel 2.0;
    w1 has 20 in flight, w2 none; five requests, all to w2 — even one w1 fully matches."""
    policy = SGLangCacheAware(balance_abs=5, balance_rel=2.0, cache_threshold=0.5)
    view = make_view({"w1": 4}, w1=busy(20), w2=busy(0))
    assert [policy.choose(request_of(4, f"test{i}"), view) for i in range(5)] == ["w2"] * 5


def test_sglang_balanced_load_keeps_a_prompt_and_its_prefix_on_one_worker() -> None:
    """Upstream's `test_cache_aware_with_balanced_load`: "hello world" twice goes to one
    worker, and "hello" (its prefix: match 5/5 = 1.0 > threshold) follows it."""
    state = InMemoryRouterState(["w0", "w1"], clock=lambda: 0.0, index_mode="approximate")
    router = Router(state, SGLangCacheAware())
    hello_world = make_request("hw", block_hashes("hello world", 6))
    hello = make_request("h", block_hashes("hello world", 3))
    first = router.route(hello_world)
    router.commit(hello_world, first)
    again = router.route(hello_world)
    router.commit(hello_world, again)
    assert again.worker == first.worker
    assert router.route(hello).worker == first.worker


@pytest.mark.parametrize(
    ("low", "high", "imbalanced"),
    [
        (0, 65, True),  # 65 − 0 > 64, and max > 1.5 × 0 holds for any max > 0
        (1, 65, False),  # difference exactly 64: not above the absolute threshold
        (200, 290, False),  # absolute exceeded (90 > 64), relative not (290 ≤ 300)
        (200, 301, True),  # both: 101 > 64 and 301 > 300
    ],
)
def test_sglang_goes_least_loaded_only_when_both_thresholds_are_exceeded(
    low: int, high: int, imbalanced: bool
) -> None:
    view = make_view({"w1": 10}, w0=busy(low), w1=busy(high))  # the loaded w1 holds it all
    assert SGLangCacheAware().is_imbalanced(view) is imbalanced
    assert SGLangCacheAware().choose(request_of(10), view) == ("w0" if imbalanced else "w1")


def test_sglang_match_rate_must_exceed_the_threshold_strictly() -> None:
    # 3 of 10 blocks = 0.3: not above 0.3 → the least loaded; 4 of 10 is above.
    view = make_view({"w0": 3}, w0=busy(2), w1=busy(1))
    assert SGLangCacheAware().choose(request_of(10), view) == "w1"
    view = make_view({"w0": 4}, w0=busy(2), w1=busy(1))
    assert SGLangCacheAware().choose(request_of(10), view) == "w0"


def test_sglang_least_loaded_ties_go_to_the_first_worker_and_holders_are_drawn() -> None:
    assert (
        SGLangCacheAware().choose(request_of(4), make_view(w0=busy(1), w1=busy(0), w2=busy(0)))
        == "w1"
    )
    view = make_view({"w0": 9, "w1": 9}, w0=busy(4), w1=busy(2), w2=busy(0))
    # Upstream takes whichever tenant its map yields first, not the less loaded one.
    drawn = {SGLangCacheAware(seed=s).choose(request_of(10), view) for s in range(20)}
    assert drawn == {"w0", "w1"}


def test_sglang_old_router_sends_a_miss_to_the_smallest_tree_even_if_overloaded() -> None:
    """Upstream's `test_prove_cache_aware_overload_flaw` (sgl-router @026f853b), config 0.5 /
    100 / 10.0: the overloaded worker (50 in flight) has the smaller tree and gets the miss;
    the current gateway sends it to the idle one."""
    view = make_view(
        w0=WorkerLoad(requests=50, indexed_blocks=1), w1=WorkerLoad(requests=0, indexed_blocks=63)
    )
    old = SGLangCacheAware(100, 10.0, 0.5, low_match="smallest_tree")
    assert not old.is_imbalanced(view)
    assert old.choose(request_of(4), view) == "w0"
    assert SGLangCacheAware(100, 10.0, 0.5).choose(request_of(4), view) == "w1"


# -- dynamo ---------------------------------------------------------------------------------
def test_dynamo_documented_example() -> None:
    """docs/architecture/kv_cache_routing.md: prefill 8 / 5 / 2 blocks, decode 10 / 5 / 9
    blocks → 18 / 10 / 11: worker 2, though worker 3 caches more."""
    loads = {"w1": (8 * 16, 10), "w2": (5 * 16, 5), "w3": (2 * 16, 9)}
    logits = DynamoKvRouter().logits(loads)
    assert logits == {"w1": 18.0, "w2": 10.0, "w3": 11.0}
    assert min(logits, key=logits.__getitem__) == "w2"


def test_dynamo_counts_in_flight_prefill_and_unique_active_blocks() -> None:
    """B = 16, a 4-block prompt: A holds 3 blocks and is idle → 16/16 + 4 = 5; B holds
    nothing, 32 tokens of another prompt await prefill, 10 blocks active → 96/16 + 14 = 20."""
    view = make_view(
        {"A": 3},
        A=WorkerLoad(),
        B=WorkerLoad(requests=1, active_prefill_tokens=32, active_blocks=10),
    )
    policy = DynamoKvRouter()
    loads = policy.potential_loads(request_of(4), view)
    assert loads == {"A": (16, 4), "B": (96, 14)}
    assert policy.logits(loads) == {"A": 5.0, "B": 20.0}
    assert policy.choose(request_of(4), view) == "A"


def test_dynamo_prefill_blocks_are_a_float_division() -> None:
    request = make_request("r", block_hashes("r", 2), num_prompt_tokens=40)  # 2 blocks + 8
    view = make_view(w0=WorkerLoad())
    assert DynamoKvRouter().logits(DynamoKvRouter().potential_loads(request, view)) == {
        "w0": 40 / 16 + 2
    }


def test_five_queued_requests_of_one_group_count_their_shared_prefix_once() -> None:
    """SGLang's shared-prefix shape: 2,048-token system prompt + 128-token question, 256
    output tokens. Five of one group in flight are 128 + 5 × 8 = 168 active blocks (not 5 ×
    (2,176 + 256) / 16 = 760: output blocks are not tracked)."""
    state = InMemoryRouterState(["w0"], clock=lambda: 0.0)
    system = block_hashes("system", 128)
    for i in range(5):
        request = make_request(f"q{i}", system + block_hashes(f"q{i}", 8), max_tokens=256)
        state.commit(request, Decision("w0", "dynamo", 0, 2176 + 256, prefill_tokens=2176))
    probe = make_request("next", system + block_hashes("next", 8))
    view = state.view(probe, take_ticket=False)
    assert view.load("w0").active_blocks == 168
    assert view.active_matched("w0") == 128
    assert view.load("w0").active_prefill_tokens == 5 * 2176
    _, decode = DynamoKvRouter().potential_loads(probe, view)["w0"]
    assert decode == 168 + 8


def test_dynamo_ties_go_to_the_smallest_tree_else_at_random() -> None:
    view = make_view(
        w0=WorkerLoad(indexed_blocks=90), w1=WorkerLoad(indexed_blocks=10),
        w2=WorkerLoad(indexed_blocks=10),
    )  # fmt: skip
    assert DynamoKvRouter().choose(request_of(4), view) == "w1"  # smallest; first of two
    equal = make_view(w0=WorkerLoad(indexed_blocks=5), w1=WorkerLoad(indexed_blocks=5))
    draws = [DynamoKvRouter(seed=s).choose(request_of(4), equal) for s in range(20)]
    assert set(draws) == {"w0", "w1"}
    assert draws == [DynamoKvRouter(seed=s).choose(request_of(4), equal) for s in range(20)]


def test_dynamo_temperature_samples_the_softmax_of_range_scaled_logits() -> None:
    view = make_view(
        {"w2": 3, "w3": 6}, w1=WorkerLoad(), w2=WorkerLoad(), w3=WorkerLoad(active_blocks=9)
    )
    request = request_of(8)
    logits = DynamoKvRouter().logits(DynamoKvRouter().potential_loads(request, view))
    assert logits == {"w1": 16.0, "w2": 13.0, "w3": 19.0}  # range 6
    first = DynamoKvRouter(temperature=0.5, seed=7)
    second = DynamoKvRouter(temperature=0.5, seed=7)
    assert [first.choose(request, view) for _ in range(50)] == [
        second.choose(request, view) for _ in range(50)
    ]
    policy = DynamoKvRouter(temperature=0.5, seed=1)
    counts = Counter(policy.choose(request, view) for _ in range(4000))
    weights = {w: math.exp(-(v / 6.0) / 0.5) for w, v in logits.items()}
    total = sum(weights.values())
    for worker, weight in weights.items():
        assert counts[worker] / 4000 == pytest.approx(weight / total, abs=0.03)


def test_dynamo_temperature_with_equal_logits_is_uniform() -> None:
    view = make_view(w0=WorkerLoad(), w1=WorkerLoad())
    policy = DynamoKvRouter(temperature=1.0, seed=3)
    counts = Counter(policy.choose(request_of(4), view) for _ in range(2000))
    assert counts["w0"] / 2000 == pytest.approx(0.5, abs=0.05)


# -- llm-d ----------------------------------------------------------------------------------
def test_llmd_precise_config_scores_prefix_kv_and_waiting_queue() -> None:
    """Pod A: 3 of 4 blocks cached, KV usage 0.30, nobody waiting; pod B: nothing cached,
    usage 0.10, 4 waiting → A = 2 × 0.75 + 0.70 + 1.0 = 3.20, B = 0 + 0.90 + 0 = 0.90."""
    view = make_view(
        {"A": 3},
        A=WorkerLoad(requests=9, engine_kv_usage=0.30, num_waiting=0, used_blocks=99,
                     capacity_blocks=100),
        B=WorkerLoad(requests=0, engine_kv_usage=0.10, num_waiting=4),
    )  # fmt: skip
    scores = LlmdScorers().scores(request_of(4), view)
    assert scores == pytest.approx({"A": 3.20, "B": 0.90})
    assert LlmdScorers().choose(request_of(4), view) == "A"


def test_llmd_queue_scores_are_min_max_over_the_waiting_queues() -> None:
    view = make_view(w0=WorkerLoad(num_waiting=0), w1=WorkerLoad(num_waiting=5),
                     w2=WorkerLoad(num_waiting=10))  # fmt: skip
    assert LlmdScorers().queue_scores(view) == {"w0": 1.0, "w1": 0.5, "w2": 0.0}
    even = make_view(w0=WorkerLoad(num_waiting=3), w1=WorkerLoad(num_waiting=3))
    assert LlmdScorers().queue_scores(even) == {"w0": 1.0, "w1": 1.0}


def test_llmd_older_precise_scorer_normalizes_min_max_over_the_holders() -> None:
    view = make_view({"w0": 8, "w1": 2}, w0=WorkerLoad(), w1=WorkerLoad(), w2=WorkerLoad())
    assert LlmdScorers(prefix_normalization="minmax").prefix_scores(request_of(10), view) == {
        "w0": 1.0, "w1": 0.0, "w2": 0.0,
    }  # fmt: skip
    tie = make_view({"w0": 2, "w1": 2}, w0=WorkerLoad(), w1=WorkerLoad(), w2=WorkerLoad())
    assert LlmdScorers(prefix_normalization="minmax").prefix_scores(request_of(10), tie) == {
        "w0": 1.0, "w1": 1.0, "w2": 0.0,
    }  # fmt: skip
    assert LlmdScorers().prefix_scores(request_of(10), view) == {"w0": 0.8, "w1": 0.2, "w2": 0.0}


def test_llmd_approximate_scorer_counts_the_partial_block_and_caps_at_256() -> None:
    view = RouterView(("w0",), {"w0": 2}, {"w0": WorkerLoad()}, index_mode="approximate")
    short = make_request("s", block_hashes("s", 3), num_prompt_tokens=56)  # 3 blocks + 8
    assert LlmdScorers().prefix_scores(short, view) == {"w0": 0.5}
    long = make_request("l", block_hashes("l", 400))
    view = RouterView(("w0",), {"w0": 256}, {"w0": WorkerLoad()}, index_mode="approximate")
    assert LlmdScorers().prefix_scores(long, view) == {"w0": 1.0}


def test_llmd_breaks_exact_ties_at_random() -> None:
    view = make_view(w0=WorkerLoad(requests=5), w1=WorkerLoad(requests=0))
    draws = {LlmdScorers(seed=s).choose(request_of(4), view) for s in range(20)}
    assert draws == {"w0", "w1"}


# -- preble ---------------------------------------------------------------------------------
def preble_view(workers: tuple[str, ...], now_ms: float = 0.0, **matched: int) -> RouterView:
    loads = {w: WorkerLoad(capacity_blocks=1000) for w in workers}
    return RouterView(workers, matched, loads, index_mode="approximate", now_ms=now_ms)


def preble_policy() -> PrebleE2:
    return PrebleE2(EngineModel(latency=LATENCY))


def test_preble_explores_a_new_prefix_and_exploits_it_without_a_load_check() -> None:
    policy = preble_policy()
    workers = ("w0", "w1")
    system = block_hashes("system", 20)
    first = make_request("a", system + block_hashes("a", 2))
    assert policy.choose(first, preble_view(workers)) == "w0"  # explore: both cost 0, first
    # A request of another prefix now explores to the idle w1.
    other = make_request("o", block_hashes("other", 22))
    assert policy.choose(other, preble_view(workers)) == "w1"
    # 20 shared blocks > 2 new ones: exploit the prefix's only GPU, however loaded.
    for i in range(5):
        request = make_request(f"q{i}", system + block_hashes(f"q{i}", 2))
        assert policy.choose(request, preble_view(workers)) == "w0"
    # Shared part shorter than the new part: explore again.
    mostly_new = make_request("n", system[:5] + block_hashes("n", 30))
    state = policy.scheduler(preble_view(workers))
    leaf, _ = state.prepare(mostly_new.block_hashes, 0.0)
    assert not state.exploits(leaf)


def test_preble_precise_mode_exploits_only_what_a_worker_caches() -> None:
    policy = preble_policy()
    view = RouterView(("w0", "w1"), {"w1": 20}, {"w0": WorkerLoad(), "w1": WorkerLoad()},
                      index_mode="precise")  # fmt: skip
    request = make_request("a", block_hashes("sys", 20) + block_hashes("a", 2))
    assert policy.choose(request, view) == "w1"


def test_preble_rebalancing_waits_for_50_requests_per_gpu_then_moves_subtrees() -> None:
    state = PrebleScheduler(2, lambda extend, context: float(extend), capacity_tokens=10**9)
    hot = {g: block_hashes(f"group{g}", 40) for g in "AB"}
    routed = 0

    def route(group: str, i: int, gpu: int) -> None:
        nonlocal routed
        leaf, important = state.prepare(hot[group] + block_hashes(f"{group}{i}", 2), 0.0)
        state.commit(leaf, important, gpu, 10, now=float(routed))
        routed += 1

    route("A", 0, 0)
    route("B", 0, 0)
    for i in range(1, 98):  # both groups piled on GPU 0: 99 routed < 50 × 2
        route("AB"[i % 2], i, 0)
    assert state.num_migrations == 0
    assert state.allocations[state.find(hot["A"], 0.0)] == {0}
    route("A", 98, 0)  # the 100th: rebalancing runs, GPU 1 (cost 0) takes the cheaper group
    assert state.num_migrations == 1
    moved = [g for g in "AB" if state.allocations[state.find(hot[g], 0.0)] == {1}]
    assert len(moved) == 1
    node = state.find(hot[moved[0]], 0.0)
    assert all(state.allocations[child] == {1} for child in node.children.values())


def test_preble_replicates_one_hot_prefix_only_when_its_ttft_doubled() -> None:
    for doubled in (False, True):
        state = PrebleScheduler(2, lambda extend, context: float(extend), capacity_tokens=10**9)
        system = block_hashes("hot", 40)
        chains = [system + block_hashes(f"q{i}", 2) for i in range(100)]
        for i, chain in enumerate(chains[:99]):
            leaf, important = state.prepare(chain, float(i))
            state.commit(leaf, important, 0, 10, now=float(i))
            # The first half of the window answered in 100 ms; the second in 150 or 250.
            late = 250.0 if doubled else 150.0
            state.finish(chain, 0, 90_000.0 * (i >= 50) + i, 100.0 if i < 50 else late, 20.0, 10)
        node = state.find(system, 0.0)
        leaf, important = state.prepare(chains[99], 170_000.0)
        state.commit(leaf, important, 0, 10, now=170_000.0)
        assert (1 in state.allocations[node]) is doubled
        assert state.num_replications == int(doubled)


def test_preble_maps_the_argmin_position_back_to_its_gpu_unless_told_not_to() -> None:
    state = PrebleScheduler(4, lambda extend, context: float(extend), capacity_tokens=10**9)
    leaf, _ = state.prepare(block_hashes("x", 4), 0.0)
    assert state.min_load_cost(leaf, [2, 3]) == 2
    state.upstream_argmin = True
    assert state.min_load_cost(leaf, [2, 3]) == 0  # upstream's quirk: a position, not a GPU


# -- chwbl ----------------------------------------------------------------------------------
def test_chwbl_bound_is_kubeais_without_ceiling_or_own_plus_one() -> None:
    policy = BoundedLoadHashing()
    # N = 3, total 5, factor 1.25 → threshold 6 / 3 × 1.25 = 2.5.
    assert policy.load_ok(2, 5, 3) and not policy.load_ok(3, 5, 3)
    assert policy.load_ok(40, 0, 3)  # nothing in flight: anyone


def test_chwbl_cold_start_goes_to_the_ring_owner_and_an_overloaded_owner_passes_it_on() -> None:
    policy = BoundedLoadHashing()
    request = request_of(4)
    owner = policy.choose(request, make_view(w0=busy(0), w1=busy(0)))
    other = "w1" if owner == "w0" else "w0"
    # N = 2, total 3, the owner has all 3: threshold 4 / 2 × 1.25 = 2.5 → the next worker.
    loads = {owner: busy(3), other: busy(0)}
    assert policy.choose(request, make_view(**dict(sorted(loads.items())))) == other
    loads = {owner: busy(2), other: busy(1)}  # 2 ≤ 2.5: the owner keeps it
    assert policy.choose(request, make_view(**dict(sorted(loads.items())))) == owner


def test_chwbl_is_sticky_for_the_same_prefix() -> None:
    policy = BoundedLoadHashing()
    view = make_view(w0=busy(1), w1=busy(1), w2=busy(1), w3=busy(1))
    shared = block_hashes("system", 2)
    chosen = {
        policy.choose(make_request(f"q{i}", shared + block_hashes(f"q{i}", 5)), view)
        for i in range(20)
    }
    assert len(chosen) == 1


@settings(max_examples=200, deadline=None)
@given(
    loads=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    num_blocks=st.integers(1, 6),
    label=st.text(min_size=1, max_size=8),
    load_factor=st.floats(1.0, 3.0),
)
def test_chwbl_always_finds_a_worker_within_its_bound(
    loads: list[int], num_blocks: int, label: str, load_factor: float
) -> None:
    view = make_view(**{f"w{i}": busy(n) for i, n in enumerate(loads)})
    policy = BoundedLoadHashing(load_factor=load_factor, replicas=16)
    request = make_request(label, block_hashes(label, num_blocks), 16 * num_blocks + 8)
    chosen = policy.choose(request, view)
    assert policy.load_ok(view.load(chosen).requests, sum(loads), len(loads))


# -- predictive -----------------------------------------------------------------------------
def test_predictive_prefers_the_idle_worker_to_a_hit_behind_a_long_queue() -> None:
    # w0 holds all 100 blocks but has 3 requests (12 s) outstanding, the first 1 s in;
    # w1 is idle and cold.
    view = make_view({"w0": 100}, w0=busy(3, work_ms=12_000.0, elapsed_ms=1_000.0), w1=busy(0))
    policy = PredictiveTtft(LATENCY)
    request = request_of(100)
    assert policy.expected_ttft_ms(request, view, "w0") == 11_000 + 5.0
    assert policy.expected_ttft_ms(request, view, "w1") == 5.0 + 2.5 * 100
    # Prefill weight 1 + L, L = (3 + 0) / 2 outstanding requests per worker.
    assert policy.cost_ms(request, view, "w0") == 11_000 + 2.5 * 5.0
    assert policy.cost_ms(request, view, "w1") == 2.5 * 255.0
    assert policy.choose(request, view) == "w1"


def test_predictive_takes_the_hit_when_queues_are_equal() -> None:
    view = make_view({"w1": 100}, w0=busy(2, work_ms=3000.0), w1=busy(2, work_ms=3000.0))
    assert PredictiveTtft(LATENCY).choose(request_of(100), view) == "w1"
    view = make_view({"w1": 100}, w0=busy(0), w1=busy(0))
    assert PredictiveTtft(LATENCY).choose(request_of(100), view) == "w1"


@pytest.mark.parametrize(
    ("externality", "extra_ms", "winner"),
    [
        (False, 240.0, "w1"),  # the hit saves 2.5 × 100 = 250 ms of this request's prefill
        (False, 260.0, "w0"),
        (True, 490.0, "w1"),  # ... and, with one request per worker (L = 1), as much again
        (True, 510.0, "w0"),  # for the request expected to queue behind it
    ],
)
def test_predictive_takes_the_hit_while_it_saves_more_than_the_extra_wait(
    externality: bool, extra_ms: float, winner: str
) -> None:
    view = make_view({"w1": 100}, w0=busy(1, work_ms=1000.0), w1=busy(1, work_ms=1000.0 + extra_ms))
    assert PredictiveTtft(LATENCY, externality=externality).choose(request_of(100), view) == winner


def test_predictive_ties_go_to_the_least_loaded() -> None:
    view = make_view(w0=busy(2, work_ms=0.0, tokens=10), w1=busy(1, tokens=99), w2=busy(1))
    assert PredictiveTtft(LATENCY).choose(request_of(4), view) == "w2"


@pytest.mark.parametrize(
    ("elapsed_ms", "declared_share", "backlog_ms"),
    [
        (0.0, None, 3000.0),  # just started: all of it is ahead
        (400.0, None, 2600.0),  # no declarations seen yet: lengths taken as declared
        (400.0, 1.0, 2600.0),  # declared lengths: the elapsed part is done
        (400.0, 0.0, 3000.0),  # unknown lengths: memoryless, nothing is done
        (400.0, 0.25, 2900.0),
        (5000.0, 1.0, 1500.0),  # past its estimate: at most one mean request comes off
    ],
)
def test_predictive_backlog_credits_the_elapsed_service(
    elapsed_ms: float, declared_share: float | None, backlog_ms: float
) -> None:
    view = make_view(
        declared_share=declared_share, w0=busy(2, work_ms=3000.0, elapsed_ms=elapsed_ms)
    )
    assert PredictiveTtft(LATENCY).backlog_ms(view, "w0") == backlog_ms
    assert PredictiveTtft(LATENCY).backlog_ms(make_view(w1=busy(0)), "w1") == 0.0


def test_router_gives_its_models_to_policies_that_price_in_ms() -> None:
    slow = LatencyModel(prefill_base_ms=50.0, prefill_per_block_ms=10.0)
    state = InMemoryRouterState(["worker-0"])
    assert Router(state, make_policy("predictive"), slow).policy.latency is slow
    engine = EngineModel(batched=True, latency=slow)
    for name in ("preble", "predictive"):
        assert Router(state, make_policy(name), slow, engine).policy.engine is engine
    own = LatencyModel(prefill_base_ms=1.0)
    assert Router(state, PredictiveTtft(own), slow).policy.latency is own


# -- predictive on the batched engine -------------------------------------------------------
# The seed's constants as a step model: 5 ms + 2.5 ms per 16 prefill tokens if the step has
# prefill, + 15 ms if it has decodes; 2,048 tokens per step.
SEED_BATCHED = EngineModel(batched=True, latency=LATENCY, num_gpu_blocks=100)


def engine_load(**fields) -> WorkerLoad:
    return WorkerLoad(engine_reported=True, capacity_blocks=100, **fields)


def test_batched_predictive_prices_the_steps_ahead_with_the_engine_model() -> None:
    policy = PredictiveTtft(engine=SEED_BATCHED)
    request = request_of(100)  # 1,600 tokens
    view = make_view(
        {"w1": 100},
        w0=engine_load(),
        w1=engine_load(requests=4, tokens=4000, num_running=4, engine_kv_usage=0.5),
    )
    # Idle and cold: one step of 1,600 prefill tokens: 5 + 1,600 × 2.5 / 16 = 255 ms.
    assert policy.expected_ttft_ms(request, view, "w0") == pytest.approx(255.0)
    # Holding it all behind 4 decodes: half the decode step now running (7.5 ms), then one
    # step with its last token and the decodes: 5 + 2.5 / 16 + 15.
    assert policy.expected_ttft_ms(request, view, "w1") == pytest.approx(7.5 + 20.15625)
    assert policy.choose(request, view) == "w1"


def test_batched_predictive_counts_the_prefill_queued_and_the_step_running() -> None:
    policy = PredictiveTtft(engine=SEED_BATCHED)
    view = make_view(
        w0=engine_load(active_prefill_tokens=3000, num_queued_prefill_tokens=1000),
    )
    # 2,000 tokens are in the step now running (the router still counts them, the engine no
    # longer): half of a 2,000-token step; then 1,000 queued + 64 of its own in one step.
    assert policy.queued_prefill_tokens(view, "w0") == (2000, 1000)
    running = (5 + 2000 * 2.5 / 16) / 2
    assert policy.queue_ms(request_of(4), view, "w0") == pytest.approx(
        running + 5 + 1064 * 2.5 / 16
    )
    # The engine counts waiting requests' hits as work; the router subtracted them.
    hits = make_view(w0=engine_load(active_prefill_tokens=500, num_queued_prefill_tokens=3000))
    assert policy.queued_prefill_tokens(hits, "w0") == (0, 500)
    # A worker that reports nothing: the router's count is all queued.
    unreported = make_view(w0=WorkerLoad(active_prefill_tokens=700, num_queued_prefill_tokens=0))
    assert policy.queued_prefill_tokens(unreported, "w0") == (0, 700)


def test_batched_predictive_waits_for_blocks_when_the_kv_cache_is_pinned_full() -> None:
    policy = PredictiveTtft(engine=SEED_BATCHED)
    # 90 of 100 blocks pinned by 3 running requests, 20 output tokens each on average.
    view = make_view(
        {"w0": 4},
        mean_output_tokens=20.0,
        w0=engine_load(requests=3, tokens=300, num_running=3, engine_kv_usage=0.9),
    )
    view = RouterView(
        view.workers, view.matched_blocks, view.loads, mean_output_tokens=20.0,
        active_matched_blocks={"w0": 4},
    )  # fmt: skip
    # It needs 30 blocks, 4 of them pinned already: 26 against 10 free → 16 short. Blocks come
    # free at 90 per decode run (20 steps of 15 ms): 16 × 20 × 15 / 90 ms.
    assert policy.kv_wait_ms(request_of(30), view, "w0") == pytest.approx(16 * 20 * 15 / 90)
    roomy = make_view(w0=engine_load(requests=1, tokens=100, num_running=1, engine_kv_usage=0.1))
    assert policy.kv_wait_ms(request_of(30), roomy, "w0") == 0.0


def test_batched_predictive_expects_an_old_unpinned_prefix_to_be_evicted_first() -> None:
    """A match survives until admission if pinned by an in-flight request, or if fewer blocks
    were allocated since its release (plus the queued prefill's) than the worker has unpinned."""
    policy = PredictiveTtft(engine=SEED_BATCHED)
    request = request_of(10)
    ages = {h: 5 * i for i, h in enumerate(request.block_hashes)}  # deeper: released earlier

    def view_of(usage: float, active: int, queued: int = 0) -> RouterView:
        load = engine_load(engine_kv_usage=usage, active_prefill_tokens=queued,
                           num_queued_prefill_tokens=queued)  # fmt: skip
        return RouterView(
            ("w0",), {"w0": 10}, {"w0": load}, active_matched_blocks={"w0": active},
            blocks_since_use=lambda worker, block: ages[block],
        )  # fmt: skip

    # 25 unpinned blocks: blocks aged 0..20 survive (< 25), those aged 25 and more do not.
    assert policy.matched_at_admission(request, view_of(0.75, 0), "w0") == 5
    # 160 queued prefill tokens will allocate 10 more blocks first: only ages below 15 stay.
    assert policy.matched_at_admission(request, view_of(0.75, 0, 160), "w0") == 3
    # Pinned blocks stay whatever their age.
    assert policy.matched_at_admission(request, view_of(0.99, 8), "w0") == 8
    # A roomy cache keeps the whole match.
    assert policy.matched_at_admission(request, view_of(0.0, 0), "w0") == 10


def test_batched_predictive_weighs_a_miss_by_the_requests_awaiting_first_tokens() -> None:
    policy = PredictiveTtft(engine=SEED_BATCHED)
    view = make_view(
        {"w1": 100},
        w0=engine_load(active_prefilling=2),
        w1=engine_load(active_prefilling=0),
    )
    assert policy.mean_outstanding(view) == 1.0  # (2 + 0) / 2 workers
    request = request_of(100)
    miss = policy.prefill_ms(request, view, "w0")
    assert policy.cost_ms(request, view, "w0") == pytest.approx(
        policy.expected_ttft_ms(request, view, "w0") + 1.0 * miss
    )
    assert PredictiveTtft(engine=SEED_BATCHED, externality=False).cost_ms(
        request, view, "w0"
    ) == pytest.approx(policy.expected_ttft_ms(request, view, "w0"))


# -- every policy ---------------------------------------------------------------------------
worker_loads = st.builds(
    WorkerLoad,
    requests=st.integers(0, 50),
    tokens=st.integers(0, 100_000),
    work_ms=st.floats(0, 1e6, allow_nan=False),
    used_blocks=st.integers(0, 1000),
    capacity_blocks=st.integers(0, 1000),
)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(POLICIES)),
    loads=st.lists(worker_loads, min_size=1, max_size=6),
    num_blocks=st.integers(0, 40),
    data=st.data(),
)
def test_every_policy_returns_a_live_worker(
    name: str, loads: list[WorkerLoad], num_blocks: int, data: st.DataObject
) -> None:
    workers = tuple(f"worker-{i}" for i in range(len(loads)))
    matched = {w: data.draw(st.integers(0, num_blocks)) for w in workers}
    ticket = data.draw(st.integers(0, 1000))
    mean_output = data.draw(st.none() | st.floats(0, 1000))
    view = RouterView(workers, matched, dict(zip(workers, loads, strict=True)), ticket, mean_output)
    max_tokens = data.draw(st.none() | st.integers(0, 500))
    request = make_request(
        "r",
        block_hashes("r", num_blocks),
        num_prompt_tokens=16 * num_blocks + 5,
        max_tokens=max_tokens,
    )
    assert make_policy(name).choose(request, view) in workers


# -- live -----------------------------------------------------------------------------------
@pytest.mark.redis
@pytest.mark.slow
def test_each_new_policy_routes_requests_through_the_live_pipeline(redis_url: str) -> None:
    prefix = f"kvq-test-policies-{uuid.uuid4().hex[:8]}:"
    settings = Settings(redis_url=redis_url, key_prefix=prefix, time_scale=0.01)
    requests = shared_prefix(
        num_groups=2, prompts_per_group=3, system_prompt_len=64, question_len=16, output_len=4
    )
    client = redis.Redis.from_url(redis_url)
    env = {"KVQ_TIME_SCALE": "0.01"}
    try:
        with LocalCluster(redis_url, 2, env=env, prefix=prefix):
            for name in (*NEW_POLICIES, "llmd:approximate", "dynamo:approximate"):
                run = run_live(
                    client,
                    settings,
                    requests,
                    name,
                    run_id=f"policies-{name.replace(':', '-')}",
                    progress=False,
                    timeout_s=30.0,
                )
                assert len(run.results) == len(requests), name
                assert {r.status for r in run.results} == {RequestStatus.COMPLETED}, name
                assert {r.strategy for r in run.results} == {name}
                assert sum(r.hit_blocks for r in run.results) > 0, name
            # The approximate runs left their records of what they routed.
            assert client.keys(f"{prefix}worker:*:routed")
    finally:
        client.close()


# -- the router state behind `elapsed_ms` and `declared_share` ------------------------------------
def test_in_memory_state_times_the_request_in_service() -> None:
    now = [0.0]
    state = InMemoryRouterState(["worker-0", "worker-1"], clock=lambda: now[0])
    router = Router(state, make_policy("predictive"))
    first, second = request_of(4, "a", max_tokens=10), request_of(4, "b", max_tokens=None)
    decision = router.route(first)
    assert decision.worker == "worker-0" and decision.worker_idle
    router.commit(first, decision)
    now[0] = 100.0
    view = state.view(second, take_ticket=False)
    assert view.load("worker-0").elapsed_ms == 100.0
    assert view.load("worker-1").elapsed_ms == 0.0  # idle
    assert view.declared_share == 1.0
    # A second request on the busy worker does not restart its clock.
    busy_decision = Decision("worker-0", "test", 0, 64, 50.0)
    state.commit(second, busy_decision)
    now[0] = 250.0
    assert state.view(second, False).load("worker-0").elapsed_ms == 250.0
    assert state.view(second, False).declared_share == 0.5
    # The first one ends: the second starts now.
    state.complete("worker-0", decision.load_tokens, decision.estimated_ms, request_id="a")
    now[0] = 300.0
    assert state.view(second, False).load("worker-0").elapsed_ms == 50.0
    state.complete("worker-0", 64, 50.0, request_id="b")
    assert state.view(second, False).load("worker-0") == WorkerLoad()


def test_redis_state_times_the_request_in_service_in_simulated_ms(
    fake_redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1_000_000.0]  # wall ms
    monkeypatch.setattr("kvqueue.routing.state._wall_ms", lambda: clock[0])
    fake_redis.zadd(
        keys.workers(), {"worker-0": time.time() * 1000, "worker-1": time.time() * 1000}
    )
    state = RedisRouterState(fake_redis, time_scale=0.5)  # 1 wall ms = 2 simulated ms
    router = Router(state, make_policy("predictive"))
    first, second = request_of(4, "a", max_tokens=10), request_of(4, "b", max_tokens=None)
    decision = router.route(first)
    assert decision.worker_idle
    router.commit(first, decision)
    clock[0] += 100.0
    view = state.view(second, take_ticket=False)
    assert view.load(decision.worker).elapsed_ms == 200.0
    assert view.load(decision.worker).work_ms == decision.estimated_ms
    assert view.declared_share == 1.0
    state.commit(second, Decision(decision.worker, "test", 0, 64, 50.0))
    assert state.view(second, False).declared_share == 0.5
    state.complete(decision.worker, decision.load_tokens, decision.estimated_ms)
    clock[0] += 10.0
    assert state.view(second, False).load(decision.worker).elapsed_ms == 20.0
    state.complete(decision.worker, 64, 50.0)
    assert state.view(second, False).load(decision.worker).elapsed_ms == 0.0  # idle


def test_the_simulator_feeds_the_view_every_policy_reads() -> None:
    """Capacity, usage, output lengths and backlog reach the view during a simulated run."""
    requests = retime(shared_prefix(2, 4, 64, 16, 8, seed=1), "poisson", 2.0, seed=1)
    simulation = Simulation("predictive", 2)
    views = []
    route = simulation.router.route

    def spying_route(request: Request):
        views.append(simulation.state.view(request, take_ticket=False))
        return route(request)

    simulation.router.route = spying_route
    simulation.run(requests)
    last = views[-1]
    assert all(last.load(w).capacity_blocks == simulation.workers[0].gpu.cache.num_blocks
               for w in last.workers)  # fmt: skip
    assert any(last.load(w).used_blocks > 0 for w in last.workers)
    assert last.mean_output_tokens == 8 and last.declared_share == 1.0
    assert any(v.load(w).work_ms > 0 and v.load(w).elapsed_ms > 0 for v in views for w in v.workers)


# -- the evaluation suite -----------------------------------------------------------------------
def test_arrival_rate_is_utilization_times_cold_capacity() -> None:
    # 10 blocks, 20 output tokens: 5 + 2.5 × 10 + 15 × 20 = 330 ms cold.
    requests = [request_of(10, f"r{i}", max_tokens=20) for i in range(3)]
    assert suite.cold_service_ms(requests, LATENCY) == 330.0
    # 4 workers serve 4 / 0.33 s = 12.12 req/s; 80% of that:
    assert suite.arrival_rate(requests, 0.8, 4, LATENCY) == pytest.approx(0.8 * 4 / 0.33)


def test_a_trace_is_stretched_to_the_target_rate() -> None:
    requests = [
        make_request(f"t{i}", block_hashes(f"t{i}", 10), max_tokens=20, arrival_ms=100.0 * i)
        for i in range(5)
    ]  # 10 req/s of 330 ms requests
    assert suite.natural_rate(requests) == 10.0
    workload = suite.SuiteWorkload("t", "t", "t", lambda: requests, 0.5, "trace")
    rate, capacity = suite.target_rate(workload, requests, EngineConfig(), LATENCY)
    assert rate == pytest.approx(0.5 * 4 / 0.33) and capacity == pytest.approx(4 / 0.33)
    timed, scale = suite.timed(workload, requests, rate)
    assert scale == pytest.approx(10.0 / rate)
    assert [r.arrival_ms for r in timed] == pytest.approx([100.0 * i * scale for i in range(5)])


def test_the_suite_writes_tables_and_a_figure_and_keeps_the_discussion(tmp_path) -> None:
    tiny = [
        suite.SuiteWorkload(
            "sp", "Shared", "tiny", lambda: make_workload("shared-prefix-tiny", seed=2), 0.8,
            "poisson",
        ),
        suite.SuiteWorkload(
            "ns", "None", "tiny", lambda: make_workload("no-sharing", 16, seed=2), 0.8, "poisson"
        ),
    ]  # fmt: skip
    runs = []
    for engine in suite.EVALUATED_ENGINES:
        reports = runner.evaluate(tiny, ["predictive", "round_robin"], LATENCY, 1, None, engine)
        assert [r.key for r in reports] == ["sp", "ns"]
        assert [row.policy for row in reports[0].rows] == ["predictive", "round_robin"]
        assert reports[0].rows[0].completed == 16 and reports[0].ideal_hit_rate > 0
        assert reports[0].capacity_rps > 0
        runs.append(EngineRun(engine, reports, 1.0))
    assert runs[0].reports[0].cold_service_ms > 0 and runs[1].reports[0].cold_service_ms is None
    out = tmp_path / "policies.md"
    engines_start, engines_end = markdown.markers(markdown.ENGINES_DISCUSSION)
    out.write_text(
        f"old\n{markdown.DISCUSSION_START}\nkept words\n{markdown.DISCUSSION_END}\n"
        f"{engines_start}\nengine words\n{engines_end}\n"
    )
    written, figures = markdown.write_report(runs, out, LATENCY, jobs=1)
    text = written.read_text()
    assert text.splitlines()[3] == suite.COMMAND  # in a code block under the title
    assert text.count(markdown.TABLE_HEADER.splitlines()[0]) == 2  # the sequential tables
    assert text.count(markdown.TPOT_TABLE_HEADER.splitlines()[0]) == 2  # the batched ones
    assert "## Where conclusions change" in text
    assert "kept words" in text and "engine words" in text and "old" not in text.splitlines()[0]
    assert [f.name for f in figures] == [
        "policies_p99_vs_hit.png",
        "policies_batched_calibrated_p99_vs_hit.png",
    ]
    assert all(f.stat().st_size > 10_000 for f in figures)


def test_a_batched_engine_s_load_is_set_against_its_measured_cold_capacity() -> None:
    requests = make_workload("shared-prefix-tiny", seed=5)
    workload = suite.SuiteWorkload("sp", "Shared", "tiny", lambda: requests, 0.5, "poisson")
    engine = EngineConfig("batched", "calibrated")
    rate, capacity = suite.target_rate(workload, requests, engine, LATENCY)
    assert capacity == suite.saturation_rps(requests, 4, workload.preset, engine, LATENCY)
    assert rate == pytest.approx(0.5 * capacity)
    # Batching serves many requests at once: far more than one at a time would.
    sequential = 4 * 1000.0 / suite.cold_service_ms(requests, LATENCY)
    assert capacity > 2 * sequential


def test_kvqueue_evaluate_writes_docs_only_when_asked(tmp_path) -> None:
    docs = REPO_ROOT / "docs" / "policies.md"
    before = docs.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "kvqueue", "evaluate", "--workloads", "no-sharing",
               "--policies", "round_robin", "--size", "0.05", "--quiet"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (written,) = tmp_path.glob("runs/evaluate-*/policies.md")
    assert done.stdout.startswith(f"wrote {written.relative_to(tmp_path)}")
    assert docs.read_bytes() == before

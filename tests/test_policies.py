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
from kvqueue.routing.policies.base import POLICIES, make_policy, policy_names
from kvqueue.routing.policies.chwbl import BoundedLoadHashing
from kvqueue.routing.policies.dynamo import DynamoKvRouter
from kvqueue.routing.policies.llmd import LlmdScorers
from kvqueue.routing.policies.preble import PrebleE2
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
def test_sglang_balanced_cluster_goes_to_the_best_match() -> None:
    view = make_view({"w1": 8}, w0=busy(0), w1=busy(3))
    assert SGLangCacheAware().choose(request_of(10), view) == "w1"


@pytest.mark.parametrize(
    ("low", "high", "imbalanced"),
    [
        (0, 40, True),  # 40 − 0 > 32 and 40 > 1.1 × 0
        (2, 34, False),  # difference exactly 32: not above the absolute threshold
        (1, 10, False),  # relative exceeded (10 > 1.1), absolute not (9 ≤ 32)
        (400, 433, False),  # absolute exceeded (33 > 32), relative not (433 ≤ 440)
        (400, 441, True),  # both: 41 > 32 and 441 > 440
    ],
)
def test_sglang_goes_least_loaded_only_when_both_thresholds_are_exceeded(
    low: int, high: int, imbalanced: bool
) -> None:
    # w1 holds the whole prompt but is the loaded one.
    view = make_view({"w1": 10}, w0=busy(low), w1=busy(high))
    assert SGLangCacheAware().is_imbalanced(view) is imbalanced
    assert SGLangCacheAware().choose(request_of(10), view) == ("w0" if imbalanced else "w1")


def test_sglang_low_match_rate_goes_least_loaded() -> None:
    # 5 of 10 blocks = 0.5: not above the 0.5 threshold; 6 of 10 is.
    view = make_view({"w0": 5}, w0=busy(2), w1=busy(1))
    assert SGLangCacheAware().choose(request_of(10), view) == "w1"
    view = make_view({"w0": 6}, w0=busy(2), w1=busy(1))
    assert SGLangCacheAware().choose(request_of(10), view) == "w0"


def test_sglang_ties_in_match_go_to_the_less_loaded_holder() -> None:
    view = make_view({"w0": 9, "w1": 9}, w0=busy(4), w1=busy(2), w2=busy(0))
    assert SGLangCacheAware().choose(request_of(10), view) == "w1"


# -- dynamo ---------------------------------------------------------------------------------
def dynamo_example() -> tuple[Request, RouterView]:
    """Dynamo's documented example: prefill 8/5/2 blocks, decode 10/5/9 blocks.

    An 8-block request matched 0/3/6 blocks → prefill 8/5/2; in-flight tokens 32/0/112 →
    2/0/7 active blocks, plus the 8/5/2 blocks the request adds → decode 10/5/9.
    """
    view = make_view(
        {"w1": 0, "w2": 3, "w3": 6},
        w1=busy(1, tokens=32),
        w2=busy(0, tokens=0),
        w3=busy(2, tokens=112),
    )
    return request_of(8), view


def test_dynamo_documented_example() -> None:
    request, view = dynamo_example()
    policy = DynamoKvRouter()
    assert [policy.prefill_blocks(request, view, w) for w in view.workers] == [8, 5, 2]
    assert [policy.active_blocks(request, view, w) for w in view.workers] == [10, 5, 9]
    assert policy.costs(request, view) == {"w1": 18, "w2": 10, "w3": 11}
    assert policy.choose(request, view) == "w2"


def test_dynamo_overlap_weight_scales_the_prefill_term() -> None:
    request, view = dynamo_example()
    # weight 3: 24+10, 15+5, 6+9 → the worker holding most of the prompt wins.
    assert DynamoKvRouter(overlap_weight=3.0).costs(request, view) == {
        "w1": 34,
        "w2": 20,
        "w3": 15,
    }
    assert DynamoKvRouter(overlap_weight=3.0).choose(request, view) == "w3"


def test_dynamo_ties_go_to_the_smaller_cache_then_worker_order() -> None:
    view = make_view(w0=idle(100, used=90), w1=idle(100, used=10), w2=idle(100, used=10))
    assert DynamoKvRouter().choose(request_of(4), view) == "w1"


def test_dynamo_temperature_sampling_is_seeded_and_follows_the_softmax() -> None:
    request, view = dynamo_example()
    draws = [DynamoKvRouter(temperature=0.5, seed=7).choose(request, view) for _ in range(3)]
    assert len(set(draws)) == 1  # a fresh policy with the same seed draws the same worker
    first = DynamoKvRouter(temperature=0.5, seed=7)
    second = DynamoKvRouter(temperature=0.5, seed=7)
    sequence = [first.choose(request, view) for _ in range(50)]
    assert sequence == [second.choose(request, view) for _ in range(50)]
    # Normalized costs 1, 0, 1/8 → p ∝ exp(−2), exp(0), exp(−0.25) at temperature 0.5.
    policy = DynamoKvRouter(temperature=0.5, seed=1)
    counts = Counter(policy.choose(request, view) for _ in range(4000))
    weights = {"w1": math.exp(-2.0), "w2": 1.0, "w3": math.exp(-0.25)}
    total = sum(weights.values())
    for worker, weight in weights.items():
        assert counts[worker] / 4000 == pytest.approx(weight / total, abs=0.03)


def test_dynamo_temperature_with_equal_costs_is_uniform() -> None:
    view = make_view(w0=idle(), w1=idle())
    policy = DynamoKvRouter(temperature=1.0, seed=3)
    counts = Counter(policy.choose(request_of(4), view) for _ in range(2000))
    assert counts["w0"] / 2000 == pytest.approx(0.5, abs=0.05)


# -- llm-d ----------------------------------------------------------------------------------
def test_llmd_scores_are_the_weighted_sum_of_the_three_scorers() -> None:
    view = make_view(
        {"w0": 10, "w1": 5},
        w0=busy(4, used_blocks=80, capacity_blocks=100),
        w1=busy(2, used_blocks=50, capacity_blocks=100),
        w2=busy(0, used_blocks=0, capacity_blocks=100),
    )
    scores = LlmdScorers().scores(request_of(10), view)
    # prefix 2 × (1, 0.5, 0); queue (4−q)/(4−0) = 0, 0.5, 1; kv 1 − usage = 0.2, 0.5, 1.
    assert scores == pytest.approx({"w0": 2.2, "w1": 2.0, "w2": 2.0})
    assert LlmdScorers().choose(request_of(10), view) == "w0"
    # With the prefix weight at 1 the idle, empty worker wins: 1.2, 1.5, 2.0.
    assert LlmdScorers(prefix_weight=1.0).choose(request_of(10), view) == "w2"


def test_llmd_equal_queues_score_one_and_ties_go_least_loaded() -> None:
    view = make_view(w0=busy(3, tokens=50), w1=busy(3, tokens=20))
    assert LlmdScorers().scores(request_of(4), view) == {"w0": 2.0, "w1": 2.0}
    assert LlmdScorers().choose(request_of(4), view) == "w1"


# -- preble ---------------------------------------------------------------------------------
def test_preble_exploits_when_more_is_cached_than_not() -> None:
    # 6 of 10 blocks cached on w0 and w1 (the longest match): the lower load of the two wins,
    # even though the idle w2 would be cheaper in explore terms.
    view = make_view(
        {"w0": 6, "w1": 6, "w2": 2},
        w0=busy(2, work_ms=900.0),
        w1=busy(2, work_ms=400.0),
        w2=busy(0),
    )
    assert PrebleE2().exploits(request_of(10), view)
    assert PrebleE2().choose(request_of(10), view) == "w1"


def test_preble_explores_when_half_or_less_is_cached() -> None:
    # 5 of 10 blocks: matched 80 tokens is not more than unmatched 80 → explore.
    # w0: load 100 + prefill(5) 17.5 = 117.5; w1: 0 + prefill(10) 30 + eviction; w2 idle too.
    view = make_view(
        {"w0": 5},
        w0=busy(1, work_ms=100.0, capacity_blocks=100, used_blocks=0),
        w1=busy(0, capacity_blocks=100, used_blocks=95),
        w2=busy(0, capacity_blocks=100, used_blocks=50),
    )
    policy = PrebleE2(LATENCY)
    request = request_of(10)  # max_tokens=0: no output slots
    assert not policy.exploits(request, view)
    assert policy.eviction_ms(request, view, "w1") == 5 * 2.5  # 10 new, 5 free → 5 evicted
    assert policy.eviction_ms(request, view, "w2") == 0.0
    assert [policy.explore_cost_ms(request, view, w) for w in view.workers] == [
        117.5,
        42.5,
        30.0,
    ]
    assert policy.choose(request, view) == "w2"


def test_preble_counts_output_slots_in_the_eviction_cost() -> None:
    view = make_view(w0=busy(0, capacity_blocks=100, used_blocks=100))
    # 4 prompt blocks (64 tokens) + 40 output tokens → ceil(104/16) = 7 slots, all evicting.
    request = request_of(4, max_tokens=40)
    assert PrebleE2(LATENCY).eviction_ms(request, view, "w0") == 7 * 2.5


# -- chwbl ----------------------------------------------------------------------------------
def test_chwbl_is_sticky_for_the_same_prefix() -> None:
    policy = BoundedLoadHashing()
    view = make_view(w0=busy(1), w1=busy(1), w2=busy(1), w3=busy(1))
    shared = block_hashes("system", 2)
    chosen = {
        policy.choose(make_request(f"q{i}", shared + block_hashes(f"q{i}", 5)), view)
        for i in range(20)
    }
    assert len(chosen) == 1
    # A one-block prompt hashes what it has: its first block.
    short = make_request("short", shared[:1])
    longer = make_request("longer", shared[:1] + block_hashes("other", 1))
    assert policy.choose(short, view) == BoundedLoadHashing(prefix_blocks=1).choose(longer, view)


def test_chwbl_moves_on_when_the_home_worker_is_full() -> None:
    policy = BoundedLoadHashing()
    request = request_of(4)
    home = policy.choose(request, make_view(w0=busy(0), w1=busy(0), w2=busy(0)))
    # Bound = ceil(1.25 × (3 + 1) / 3) = 2: home with 3 outstanding is over it.
    loads = {w: busy(3 if w == home else 0) for w in ("w0", "w1", "w2")}
    assert policy.load_bound(make_view(**loads)) == 2
    assert policy.choose(request, make_view(**loads)) != home


@settings(max_examples=200, deadline=None)
@given(
    loads=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    num_blocks=st.integers(0, 6),
    label=st.text(min_size=1, max_size=8),
    load_factor=st.floats(1.0, 3.0),
)
def test_chwbl_never_exceeds_its_load_bound(
    loads: list[int], num_blocks: int, label: str, load_factor: float
) -> None:
    view = make_view(**{f"w{i}": busy(n) for i, n in enumerate(loads)})
    policy = BoundedLoadHashing(load_factor=load_factor, replicas=16)
    request = make_request(label, block_hashes(label, num_blocks), 16 * num_blocks + 8)
    chosen = policy.choose(request, view)
    bound = math.ceil(load_factor * (sum(loads) + 1) / len(loads))
    assert view.load(chosen).requests + 1 <= bound


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


def test_router_gives_its_latency_model_to_policies_that_price_in_ms() -> None:
    slow = LatencyModel(prefill_base_ms=50.0, prefill_per_block_ms=10.0)
    state = InMemoryRouterState(["worker-0"])
    for name in ("preble", "predictive"):
        assert Router(state, make_policy(name), slow).policy.latency is slow
    own = LatencyModel(prefill_base_ms=1.0)
    assert Router(state, PredictiveTtft(own), slow).policy.latency is own


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
            for name in NEW_POLICIES:
                run = run_live(
                    client,
                    settings,
                    requests,
                    name,
                    run_id=f"policies-{name}",
                    progress=False,
                    timeout_s=30.0,
                )
                assert len(run.results) == len(requests), name
                assert {r.status for r in run.results} == {RequestStatus.COMPLETED}, name
                assert {r.strategy for r in run.results} == {name}
                assert sum(r.hit_blocks for r in run.results) > 0, name
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
    state.complete("worker-0", decision.load_tokens, decision.estimated_ms)
    now[0] = 300.0
    assert state.view(second, False).load("worker-0").elapsed_ms == 50.0
    state.complete("worker-0", 64, 50.0)
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

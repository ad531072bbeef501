"""The virtual-time simulator on hand-checked scenarios.

Default latency model: prefill = 5 + 2.5 × blocks to compute, decode = 15 × output tokens.
Default preset: llama-2-13b@a100-40gb (924 blocks of 16 tokens, 4,096-token context).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvqueue.errors import ConfigError
from kvqueue.gpu.presets import get_preset
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.comparison import compare
from kvqueue.report.metrics import ideal_hit_rate
from kvqueue.sim.parallel import run_strategies
from kvqueue.sim.simulation import Simulation, simulate
from kvqueue.workloads.arrivals import retime
from kvqueue.workloads.synthetic import make_workload

REPO_ROOT = Path(__file__).resolve().parents[1]


def by_id(results: list[RequestResult]) -> dict[str, RequestResult]:
    return {r.request_id: r for r in results}


def latencies(r: RequestResult) -> tuple[float, ...]:
    """(queue wait, prefill, decode, TTFT, end-to-end) in ms."""
    return (r.queue_wait_ms, r.prefill_ms, r.decode_ms, r.ttft_ms, r.e2e_ms)


def test_two_workers_three_requests_exact_times_waits_and_hits(make_tokens, make_request):
    # r0: 5 blocks (4 shared + 1 own), 2 output tokens, arrives at 0 on idle workers.
    r0 = make_request(make_tokens("s1", "s2", "s3", "s4", "a"), max_tokens=2, arrival_ms=0.0)
    # r1: same 4-block prefix, arrives while r0 runs: follows it to worker-0 and queues.
    r1 = make_request(make_tokens("s1", "s2", "s3", "s4", "b"), max_tokens=4, arrival_ms=10.0)
    # r2: unrelated 2 blocks: no match anywhere, worker-1 is the least loaded.
    r2 = make_request(make_tokens("c1", "c2"), max_tokens=1, arrival_ms=20.0)

    results = simulate([r0, r1, r2], "cache_aware", num_workers=2, run_id="hand")
    a, b, c = results

    # r0 on worker-0: start 0, prefill 5 + 2.5×5 = 17.5, decode 15×2 = 30, finish 47.5.
    assert (a.worker, a.start_ms, a.finish_ms) == ("worker-0", 0.0, 47.5)
    assert latencies(a) == (0.0, 17.5, 30.0, 17.5, 47.5)
    assert (a.hit_blocks, a.evictions) == (0, 0)
    # 5 prompt blocks + ceil((80 + 2) / 16) − 5 = 1 anonymous slot.
    assert (a.cache_used_blocks, a.cache_capacity_blocks) == (6, 924)

    # r1 waits for r0: start 47.5 (wait 37.5), 4 hits, prefill 5 + 2.5×1 = 7.5, decode 60.
    assert (b.worker, b.start_ms, b.finish_ms) == ("worker-0", 47.5, 115.0)
    assert latencies(b) == (37.5, 7.5, 60.0, 45.0, 105.0)
    assert b.hit_blocks == 4
    assert b.cache_used_blocks == 5 + 1 + 1  # r0's blocks stay cached, + "b", + 1 anonymous

    # r2 on worker-1 at once: prefill 5 + 2.5×2 = 10, decode 15, finish 45.
    assert (c.worker, c.start_ms, c.finish_ms) == ("worker-1", 20.0, 45.0)
    assert (c.queue_wait_ms, c.ttft_ms, c.e2e_ms, c.hit_blocks) == (0.0, 10.0, 25.0, 0)

    for result in results:
        assert result.status == RequestStatus.COMPLETED
        assert (result.strategy, result.run_id) == ("cache_aware", "hand")
        assert result.decode_source == "request"


def test_cache_events_reach_the_index_when_a_request_starts(make_tokens, make_request):
    # Pending marks expire at once, so only r0's stored event can attract r1 to worker-0,
    # and r0 is still running when r1 arrives.
    r0 = make_request(make_tokens("p1", "p2", "x"), max_tokens=10, arrival_ms=0.0)
    r1 = make_request(make_tokens("p1", "p2", "y"), max_tokens=1, arrival_ms=1.0)
    results = simulate([r0, r1], "cache_aware", num_workers=2, pending_ttl_ms=1e-9)
    assert [r.worker for r in results] == ["worker-0", "worker-0"]
    assert results[1].hit_blocks == 2


def test_a_finish_is_processed_before_an_arrival_at_the_same_instant(make_request):
    # r0: 10 blocks, 1 output token → load 161 tokens, service 5 + 25 + 15 = 45 ms.
    # r1: 1 block, 5 output tokens → load 21 tokens, service 5 + 2.5 + 75 = 82.5 ms.
    r0 = make_request(160, max_tokens=1)
    r1 = make_request(16, max_tokens=5)
    # r2 arrives exactly when r0 finishes. Finish first: worker-0 is idle → worker-0 at 45.
    # (Arrival first would see one request on each worker and pick worker-1's fewer tokens.)
    r2 = make_request(16, max_tokens=1, arrival_ms=45.0)
    a, b, c = simulate([r0, r1, r2], "least_loaded", num_workers=2)
    assert (a.worker, a.finish_ms) == ("worker-0", 45.0)
    assert (b.worker, b.finish_ms) == ("worker-1", 82.5)
    assert (c.worker, c.start_ms, c.queue_wait_ms) == ("worker-0", 45.0, 0.0)


def test_an_idle_worker_starts_its_next_request_at_the_finish_instant(make_request):
    first = make_request(32, max_tokens=2)  # 5 + 5 + 30 = 40 ms
    second = make_request(32, max_tokens=2)
    a, b = simulate([first, second], "round_robin", num_workers=1)
    assert (b.start_ms, b.queue_wait_ms, b.finish_ms) == (a.finish_ms, 40.0, 80.0)


def test_herd_two_requests_with_the_same_new_prefix_go_to_the_same_worker(
    make_tokens, make_request
):
    # Both workers busy with long requests, so the first prefix request only queues: its
    # blocks are not stored yet, only marked pending by the router.
    busy0 = make_request(16, max_tokens=100)
    busy1 = make_request(16, max_tokens=100)
    first = make_request(make_tokens("n1", "n2", "n3", "n4", "q1"), max_tokens=1)
    second = make_request(make_tokens("n1", "n2", "n3", "n4", "q2"), max_tokens=1)
    results = by_id(simulate([busy0, busy1, first, second], "cache_aware", num_workers=2))
    assert results[first.request_id].worker == "worker-0"
    # Least loaded alone would send it to worker-1 (one request queued vs two).
    assert results[second.request_id].worker == "worker-0"
    assert results[second.request_id].hit_blocks == 4
    assert results[second.request_id].start_ms == results[first.request_id].finish_ms


def test_round_robin_spreads_requests_evenly_in_turn(make_request):
    requests = [make_request(32, max_tokens=1) for _ in range(8)]
    results = simulate(requests, "round_robin", num_workers=4)
    assert [r.worker for r in results] == [f"worker-{i % 4}" for i in range(8)]


def test_rejected_requests_are_counted_not_dropped(make_request):
    preset = get_preset(num_blocks=8)
    fits = make_request(64, max_tokens=1)  # 4 blocks + 1 anonymous
    too_many_blocks = make_request(160, max_tokens=1)  # 10 blocks > 8
    over_context = make_request(4096, max_tokens=1)  # the 4,096-token context
    after = make_request(64, max_tokens=1)
    requests = [fits, too_many_blocks, over_context, after]
    simulation = Simulation("round_robin", 1, preset=preset)
    results = simulation.run(requests)

    assert [r.request_id for r in results] == [r.request_id for r in requests]
    assert [r.status for r in results] == [
        RequestStatus.COMPLETED,
        RequestStatus.REJECTED,
        RequestStatus.REJECTED,
        RequestStatus.COMPLETED,
    ]
    rejected = results[1]
    assert "needs 11 KV blocks; the cache holds 8" in rejected.reason
    assert "context" in results[2].reason
    # A rejection takes no time: it ends when it would have started, and the next request
    # on the same worker starts at that very instant.
    assert rejected.start_ms == rejected.finish_ms == results[0].finish_ms
    assert (rejected.queue_wait_ms, rejected.ttft_ms, rejected.e2e_ms) == (0.0, 0.0, 0.0)
    assert results[3].start_ms == results[0].finish_ms
    # Every load the router committed was released.
    assert simulation.state.requests == {"worker-0": 0}
    assert simulation.state.tokens == {"worker-0": 0}

    dashboard = compare(requests, ["round_robin", "cache_aware"], num_workers=1, preset=preset)
    for summary in dashboard["strategies"].values():
        assert (summary["completed"], summary["rejected"], summary["failed"]) == (2, 2, 0)


def test_same_seed_same_output():
    def run(seed: int) -> dict:
        requests = make_workload("shared-prefix-tiny", seed=seed)
        requests = retime(requests, "poisson", rate_rps=20.0, seed=seed)
        return compare(requests, num_workers=3, meta={"seed": seed})

    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first != other


def test_parallel_strategies_give_the_serial_results():
    requests = retime(make_workload("shared-prefix-tiny", seed=1), "poisson", 50.0, seed=1)
    strategies = ["cache_aware", "round_robin", "least_loaded"]
    serial = run_strategies(requests, strategies, num_workers=2)
    parallel = run_strategies(requests, strategies, num_workers=2, jobs=3)
    assert list(parallel) == strategies
    assert parallel == serial


def test_ideal_hit_rate_bounds_every_strategy():
    # System prompts of 32 blocks, 4 groups, on caches too small to keep them all.
    requests = make_workload("shared-prefix-small", seed=2, num_groups=4, prompts_per_group=6)
    requests = retime(requests, "poisson", rate_rps=30.0, seed=2)
    preset = get_preset(num_blocks=80)
    dashboard = compare(requests, num_workers=2, preset=preset)
    ideal = dashboard["ideal_hit_rate"]
    assert ideal == ideal_hit_rate(requests)  # nothing rejected: the bound is the workload's
    for name, summary in dashboard["strategies"].items():
        assert summary["ideal_hit_rate"] == ideal, name
        assert summary["hit_rate"] <= ideal, name
    assert dashboard["strategies"]["cache_aware"]["hit_rate"] > 0


def test_every_request_gets_one_result_in_input_order(make_request):
    requests = [make_request(48, max_tokens=2, arrival_ms=t) for t in (30.0, 0.0, 30.0, 5.0, 0.0)]
    results = simulate(requests, "least_loaded", num_workers=2)
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    assert all(r.status == RequestStatus.COMPLETED for r in results)
    assert all(r.arrival_ms == q.arrival_ms for r, q in zip(results, requests, strict=True))


def test_unknown_or_duplicate_strategy_fails_before_running(make_request):
    request = make_request(32)
    with pytest.raises(ConfigError, match="valid: cache_aware"):
        run_strategies([request], ["cache_aware", "bogus"], num_workers=2)
    with pytest.raises(ConfigError, match="duplicate"):
        run_strategies([request], ["round_robin", "round_robin"], num_workers=2)
    with pytest.raises(ConfigError, match="at least one worker"):
        simulate([request], "round_robin", num_workers=0)


def run_cli(args: list[str], cwd: Path) -> dict:
    """`python -m kvqueue ARGS` from `cwd`; its exit status must be 0; the JSON it prints."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "kvqueue", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_cli_simulate_json_prints_one_object_with_every_strategy(tmp_path):
    out = tmp_path / "run"
    args = [
        *("simulate", "--workload", "shared-prefix-tiny", "--workers", "2", "--seed", "3"),
        *("--strategies", "cache_aware,round_robin,least_loaded", "--json", "--out", str(out)),
    ]
    dashboard = run_cli(args, tmp_path)
    assert set(dashboard["strategies"]) == {"cache_aware", "round_robin", "least_loaded"}
    assert 0 < dashboard["ideal_hit_rate"] <= 1
    for summary in dashboard["strategies"].values():
        assert summary["completed"] == 16 and summary["rejected"] == 0
        assert set(summary["ttft_ms"]) == {"mean", "p50", "p90", "p99"}
        assert set(summary["e2e_ms"]) == {"mean", "p50", "p90", "p99"}
        assert summary["hit_rate"] <= summary["ideal_hit_rate"]
    assert dashboard["meta"]["seed"] == 3
    assert json.loads((out / "dashboard_results.json").read_text()) == dashboard
    assert len((out / "results_round_robin.jsonl").read_text().splitlines()) == 16


def test_cli_simulate_batched_calibrated_on_a_mooncake_trace_reports_tpot_and_the_ideal(tmp_path):
    trace = REPO_ROOT / "tests" / "fixtures" / "mooncake_small.jsonl"
    args = [
        *("simulate", "--trace", str(trace), "--preset", "qwen2.5-7b-1m@h100-80gb"),
        *("--workers", "2", "--engine", "batched", "--latency", "calibrated"),
        *("--strategies", "round_robin,cache_aware", "--json", "--out", str(tmp_path / "run")),
    ]
    dashboard = run_cli(args, tmp_path)
    meta = dashboard["meta"]
    assert (meta["engine"], meta["latency_profile"]) == ("batched", "calibrated")
    assert (meta["max_num_batched_tokens"], meta["max_num_seqs"]) == (8192, 1024)
    assert 0 < dashboard["ideal_hit_rate"] <= 1
    for summary in dashboard["strategies"].values():
        assert summary["completed"] == meta["num_requests"] and summary["rejected"] == 0
        assert summary["tpot_ms"]["mean"] > 0 and summary["tpot_ms"]["p99"] > 0
        assert summary["engine"]["mean_batch_size"] >= 1
        assert summary["hit_rate"] <= summary["ideal_hit_rate"]

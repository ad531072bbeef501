"""Aggregate metrics on hand-computed examples, and the ideal (infinite shared cache) hit rate."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvqueue.gpu.hashing import BlockHash
from kvqueue.gpu.request import make_request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.metrics import ideal_hit_rate, imbalance, latency_stats, summarize


def make_result(request_id: str, worker: str, status: str = "completed", **fields) -> RequestResult:
    return RequestResult(
        request_id=request_id,
        run_id="run-1",
        worker=worker,
        strategy="cache_aware",
        status=RequestStatus(status),
        **fields,
    )


def h(label: str) -> BlockHash:
    return BlockHash(label.encode().ljust(32, b"."))


@pytest.fixture
def run_results() -> list[RequestResult]:
    """Three completed requests on w0/w1, one rejected on w1, one failed on w0; w2 idle."""
    return [
        make_result(
            "r1", "w0", arrival_ms=0, start_ms=0, finish_ms=100, queue_wait_ms=0,
            prefill_ms=10, decode_ms=90, ttft_ms=10, e2e_ms=100, num_prompt_tokens=40,
            num_blocks=2, hit_blocks=1, decode_tokens=6, decode_source="request",
        ),
        make_result(
            "r2", "w0", arrival_ms=50, start_ms=100, finish_ms=400, queue_wait_ms=50,
            prefill_ms=20, decode_ms=280, ttft_ms=70, e2e_ms=350, num_prompt_tokens=64,
            num_blocks=4, hit_blocks=0, decode_tokens=18, decode_source="fallback", evictions=2,
        ),
        make_result(
            "r3", "w1", arrival_ms=100, start_ms=100, finish_ms=1000, queue_wait_ms=0,
            prefill_ms=30, decode_ms=870, ttft_ms=30, e2e_ms=900, num_prompt_tokens=32,
            num_blocks=2, hit_blocks=2, decode_tokens=58, decode_source="request", evictions=1,
        ),
        make_result(
            "r4", "w1", "rejected", reason="too long", arrival_ms=5000,
            num_prompt_tokens=99_999, num_blocks=6_249,
        ),
        make_result("r5", "w0", "failed", reason="boom", arrival_ms=7000),
    ]  # fmt: skip


def test_hit_rates_are_block_and_token_weighted_over_completed_requests(run_results):
    summary = summarize(run_results, workers=["w0", "w1", "w2"])
    assert summary["hit_rate"] == 3 / 8
    assert summary["token_hit_rate"] == 48 / 136
    assert (summary["hit_blocks"], summary["num_blocks"], summary["prompt_tokens"]) == (3, 8, 136)


def test_latency_percentiles_interpolate_linearly_over_completed_requests(run_results):
    summary = summarize(run_results)
    assert summary["ttft_ms"] == pytest.approx({"mean": 110 / 3, "p50": 30, "p90": 62, "p99": 69.2})
    assert summary["e2e_ms"] == pytest.approx({"mean": 450, "p50": 350, "p90": 790, "p99": 889})
    assert summary["queue_wait_ms"] == pytest.approx(
        {"mean": 50 / 3, "p50": 0, "p90": 40, "p99": 49}
    )


def test_throughput_counts_completed_requests_per_second_of_makespan(run_results):
    summary = summarize(run_results)
    assert summary["makespan_ms"] == 1000
    assert summary["throughput_rps"] == 3.0
    assert summary["output_tokens_per_s"] == 82.0


def test_counts_evictions_and_decode_sources(run_results):
    summary = summarize(run_results)
    assert (summary["completed"], summary["rejected"], summary["failed"]) == (3, 1, 1)
    assert summary["num_results"] == 5
    assert summary["evictions"] == 3
    assert summary["decode_sources"] == {"fallback": 1, "request": 2}


def test_per_worker_includes_idle_workers_and_imbalance_counts_them_as_zero(run_results):
    summary = summarize(run_results, workers=["w0", "w1", "w2"])
    assert summary["per_worker"] == {
        "w0": {"requests": 2, "prompt_tokens": 104, "num_blocks": 6, "hit_blocks": 1,
               "decode_tokens": 24, "rejected": 0, "failed": 1},
        "w1": {"requests": 1, "prompt_tokens": 32, "num_blocks": 2, "hit_blocks": 2,
               "decode_tokens": 58, "rejected": 1, "failed": 0},
        "w2": {"requests": 0, "prompt_tokens": 0, "num_blocks": 0, "hit_blocks": 0,
               "decode_tokens": 0, "rejected": 0, "failed": 0},
    }  # fmt: skip
    assert summary["imbalance"]["max_over_mean"] == 2.0
    assert summary["imbalance"]["cv"] == pytest.approx(math.sqrt(2 / 3))


def test_imbalance_without_idle_workers_only_sees_workers_in_results(run_results):
    assert summarize(run_results)["imbalance"] == {"max_over_mean": 2 / 1.5, "cv": 1 / 3}


def test_empty_results_give_zero_counts_and_none_ratios():
    summary = summarize([], workers=["w0"])
    assert (summary["completed"], summary["rejected"], summary["failed"]) == (0, 0, 0)
    assert summary["hit_rate"] is None and summary["token_hit_rate"] is None
    assert summary["ttft_ms"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert summary["throughput_rps"] is None and summary["makespan_ms"] == 0.0
    assert summary["imbalance"] == {"max_over_mean": None, "cv": None}
    assert summary["per_worker"]["w0"]["requests"] == 0
    json.dumps(summary)


def test_summary_is_json_ready(run_results):
    summary = summarize(run_results, workers=["w0", "w1", "w2"])
    assert json.loads(json.dumps(summary)) == summary


def test_latency_stats_of_one_value_is_that_value():
    assert latency_stats([7.0]) == {"mean": 7.0, "p50": 7.0, "p90": 7.0, "p99": 7.0}


def test_imbalance_of_perfectly_balanced_workers():
    assert imbalance([4, 4, 4]) == {"max_over_mean": 1.0, "cv": 0.0}


def test_ideal_hit_rate_counts_blocks_seen_in_any_earlier_request():
    requests = [
        make_request("a", [h("a1"), h("a2"), h("a3")]),
        make_request("b", [h("a1"), h("a2"), h("b3")]),
        make_request("c", [h("c1")]),
        make_request("d", [h("a1"), h("a2"), h("b3"), h("d4")]),
    ]
    assert ideal_hit_rate(requests) == 5 / 11


def test_ideal_hit_rate_processes_requests_in_arrival_order():
    late_long = make_request("long", [h("x1"), h("x2"), h("x3")], arrival_ms=10)
    early_short = make_request("short", [h("x1")], arrival_ms=0)
    # The short one arrives first: the long one hits 1 of 3; listed order would give 1 of 1.
    assert ideal_hit_rate([late_long, early_short]) == 1 / 4


def test_ideal_hit_rate_of_nothing_is_none():
    assert ideal_hit_rate([]) is None
    assert ideal_hit_rate([make_request("empty", [], num_prompt_tokens=5)]) is None


result_fields = st.builds(
    lambda blocks, hits, extra, worker, status: make_result(
        "r", worker, status, num_blocks=blocks, hit_blocks=min(hits, blocks),
        num_prompt_tokens=16 * blocks + extra, finish_ms=1.0,
    ),
    st.integers(0, 50), st.integers(0, 50), st.integers(1, 15),
    st.sampled_from(["w0", "w1", "w2"]), st.sampled_from(["completed", "rejected", "failed"]),
)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(st.lists(result_fields, max_size=20))
def test_token_hit_rate_never_exceeds_block_hit_rate(results):
    summary = summarize(results)
    if summary["hit_rate"] is None:
        return
    assert 0.0 <= summary["token_hit_rate"] <= summary["hit_rate"] <= 1.0
    assert sum(w["requests"] for w in summary["per_worker"].values()) == summary["completed"]


def test_tpot_stats_cover_completed_requests_that_have_one_and_preemptions_add_up():
    results = [
        make_result("a", "w0", tpot_ms=10.0, preemptions=1),
        make_result("b", "w0", tpot_ms=30.0),
        make_result("c", "w1", tpot_ms=None),  # a one-token answer: no gap to time
        make_result("d", "w1", "failed", reason="x", tpot_ms=99.0, preemptions=2),
    ]
    summary = summarize(results)
    assert summary["tpot_ms"] == {"mean": 20.0, "p50": 20.0, "p90": 28.0, "p99": 29.8}
    assert summary["preemptions"] == 3

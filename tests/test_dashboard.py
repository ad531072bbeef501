"""The dashboard dict, its files, and the terminal table, on hand-made results."""

from __future__ import annotations

import orjson
import pytest

from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.dashboard import (
    DASHBOARD_FILE,
    build_dashboard,
    format_table,
    load_results,
    load_run,
    write_run,
)
from kvqueue.report.run_summary import format_summary

WORKERS = ["worker-0", "worker-1"]


def result(
    request: Request,
    strategy: str,
    worker: str,
    hit_blocks: int = 0,
    status: RequestStatus = RequestStatus.COMPLETED,
    ttft_ms: float = 10.0,
) -> RequestResult:
    return RequestResult(
        request_id=request.request_id,
        run_id="run",
        worker=worker,
        strategy=strategy,
        status=status,
        reason="" if status == RequestStatus.COMPLETED else "too long",
        arrival_ms=request.arrival_ms,
        ttft_ms=ttft_ms if status == RequestStatus.COMPLETED else 0.0,
        e2e_ms=2 * ttft_ms if status == RequestStatus.COMPLETED else 0.0,
        num_prompt_tokens=request.num_prompt_tokens,
        num_blocks=request.num_blocks,
        hit_blocks=hit_blocks,
    )


@pytest.fixture
def workload(make_hashes) -> list[Request]:
    """a: 4 blocks; b shares a's first 3 (+1 own); c: 2 blocks of its own, rejected below."""
    a = Request("a", 64, tuple(make_hashes("s1", "s2", "s3", "a")), 1, 0.0)
    b = Request("b", 64, tuple(make_hashes("s1", "s2", "s3", "b")), 1, 1.0)
    c = Request("c", 32, tuple(make_hashes("s1", "c")), 1, 2.0)
    return [a, b, c]


@pytest.fixture
def results_by_strategy(workload: list[Request]) -> dict[str, list[RequestResult]]:
    a, b, c = workload
    rejected = RequestStatus.REJECTED
    return {
        "cache_aware": [
            result(a, "cache_aware", "worker-0"),
            result(b, "cache_aware", "worker-0", hit_blocks=3, ttft_ms=30.0),
            result(c, "cache_aware", "worker-1", status=rejected),
        ],
        "round_robin": [
            result(a, "round_robin", "worker-0"),
            result(b, "round_robin", "worker-1"),
            result(c, "round_robin", "worker-0", status=rejected),
        ],
    }


def test_dashboard_puts_the_ideal_hit_rate_beside_every_strategy(workload, results_by_strategy):
    dashboard = build_dashboard(results_by_strategy, workload, WORKERS, {"seed": 5})
    # Served requests a, b: 8 blocks, b's 3 shared blocks hit an infinite shared cache.
    assert dashboard["ideal_hit_rate"] == 3 / 8
    # Over the whole workload c's first block would hit too: 4 of 10.
    assert dashboard["ideal_hit_rate_workload"] == 4 / 10
    assert dashboard["meta"] == {
        "workers": WORKERS,
        "num_workers": 2,
        "num_requests": 3,
        "seed": 5,
    }
    cache_aware = dashboard["strategies"]["cache_aware"]
    assert (cache_aware["hit_rate"], cache_aware["ideal_hit_rate"]) == (3 / 8, 3 / 8)
    assert cache_aware["hit_rate_of_ideal"] == 1.0
    assert (cache_aware["completed"], cache_aware["rejected"], cache_aware["failed"]) == (2, 1, 0)
    assert cache_aware["ttft_ms"]["mean"] == 20.0
    assert cache_aware["per_worker"]["worker-1"]["rejected"] == 1
    round_robin = dashboard["strategies"]["round_robin"]
    assert (round_robin["hit_rate"], round_robin["hit_rate_of_ideal"]) == (0.0, 0.0)
    assert list(dashboard["strategies"]) == ["cache_aware", "round_robin"]


def test_a_strategy_that_served_fewer_requests_gets_its_own_bound(workload, results_by_strategy):
    a, b, c = workload
    results_by_strategy["least_loaded"] = [
        result(a, "least_loaded", "worker-0"),
        result(b, "least_loaded", "worker-1", status=RequestStatus.FAILED),
        result(c, "least_loaded", "worker-1", status=RequestStatus.REJECTED),
    ]
    dashboard = build_dashboard(results_by_strategy, workload, WORKERS)
    assert dashboard["ideal_hit_rate"] == 3 / 8
    assert dashboard["strategies"]["least_loaded"]["ideal_hit_rate"] == 0.0


def test_write_run_and_load_back(tmp_path, workload, results_by_strategy):
    dashboard = build_dashboard(results_by_strategy, workload, WORKERS)
    path = write_run(tmp_path / "out", dashboard, results_by_strategy)
    assert path == tmp_path / "out" / DASHBOARD_FILE
    assert orjson.loads(path.read_bytes()) == dashboard
    lines = (tmp_path / "out" / "results_cache_aware.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["request_id"] for line in lines] == ["a", "b", "c"]
    assert (
        load_results(tmp_path / "out" / "results_round_robin.jsonl")
        == (results_by_strategy["round_robin"])
    )
    loaded_dashboard, loaded_results = load_run(tmp_path / "out")
    assert loaded_dashboard == dashboard
    assert loaded_results == results_by_strategy


def test_load_results_names_the_bad_line(tmp_path):
    path = tmp_path / "results_x.jsonl"
    path.write_text('{"request_id": "a"}\n')
    with pytest.raises(ValueError, match=r"results_x\.jsonl:1: not a request result"):
        load_results(path)


def test_table_has_one_row_per_strategy_with_hit_rate_and_ideal(workload, results_by_strategy):
    table = format_table(build_dashboard(results_by_strategy, workload, WORKERS))
    header, rule, cache_aware, round_robin, note = table.splitlines()
    assert set(rule) == {"-", " "}
    assert header.split()[:4] == ["strategy", "hit", "rate", "ideal"]
    assert cache_aware.split()[:3] == ["cache_aware", "37.5%", "37.5%"]
    assert round_robin.split()[:3] == ["round_robin", "0.0%", "37.5%"]
    assert "2/1/0" in cache_aware.split()
    assert note.startswith("times in simulated ms")


def test_table_reads_seconds_past_ten_and_counts_with_separators() -> None:
    summary = {
        "hit_rate": 0.5,
        "ideal_hit_rate": 0.6,
        "ttft_ms": {"mean": 558_623.4, "p50": 9_999.0, "p99": 12_345.0},
        "e2e_ms": {"mean": 85.25, "p99": 10_000.0},
        "completed": 12_031,
        "rejected": 1_200,
        "failed": 0,
        "imbalance": {"max_over_mean": 1.5},
    }
    table = format_table({"strategies": {"cache_aware": summary}})
    row = table.splitlines()[2]
    assert "558.6 s" in row and "9,999" in row and "12.3 s" in row
    assert "85.2" in row and "10.0 s" in row
    assert "12,031/1,200/0" in row


def test_the_run_summary_reads_seconds_past_ten_and_counts_with_separators() -> None:
    summary = {
        "run_id": "r1",
        "strategy": "cache_aware",
        "sent": 12_033,
        "completed": 12_031,
        "rejected": 0,
        "failed": 2,
        "hit_rate": 0.337,
        "ttft_ms": {"mean": 558_623.0, "p50": 185.0, "p90": 9_500.0, "p99": 985_000.0},
        "e2e_ms": {"mean": 12.25, "p50": None, "p99": 10_000.0},
        "per_worker": {"worker-0": {"requests": 6_016}, "worker-1": {"requests": 6_015}},
    }
    text = format_summary(summary)
    assert "sent 12,033  completed 12,031  rejected 0  failed 2  hit rate 33.7%" in text
    assert "TTFT  mean 558.6 s  p50 185 ms  p90 9,500 ms  p99 985.0 s" in text
    assert "e2e   mean 12.2 ms  p50 -  p99 10.0 s" in text
    assert "worker-0 6,016, worker-1 6,015" in text

"""SLO arithmetic: one TPOT (vLLM's), attainment, goodput, the highest rate sustained."""

from __future__ import annotations

import dataclasses

import pytest

from kvqueue.errors import ConfigError
from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.latency import tpot_ms
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.dashboard import build_dashboard
from kvqueue.report.slo import Slo, highest_rate_sustained, meets_slo, slo_summary
from kvqueue.report.sweep_cell import cell_metrics
from kvqueue.report.sweep_spec import Cell
from kvqueue.sim.simulation import simulate
from kvqueue.workloads.synthetic import make_workload


def done(
    ttft_ms: float,
    decode_tokens: int = 11,
    decode_ms: float = 150.0,
    arrival_ms: float = 0.0,
    request_id: str = "r",
) -> RequestResult:
    return RequestResult(
        request_id=request_id,
        run_id="run",
        worker="worker-0",
        strategy="round_robin",
        status=RequestStatus.COMPLETED,
        arrival_ms=arrival_ms,
        start_ms=arrival_ms,
        finish_ms=arrival_ms + ttft_ms + decode_ms,
        ttft_ms=ttft_ms,
        decode_ms=decode_ms,
        e2e_ms=ttft_ms + decode_ms,
        decode_tokens=decode_tokens,
        tpot_ms=tpot_ms(ttft_ms, ttft_ms + decode_ms, decode_tokens),
    )


def rejected(request_id: str = "x") -> RequestResult:
    return RequestResult(request_id, "run", "worker-0", "round_robin", RequestStatus.REJECTED)


def test_tpot_is_the_time_after_the_first_token_over_the_tokens_after_it() -> None:
    # vLLM: (latency - ttft) / (output_len - 1): 150 ms over 10 tokens after the first.
    assert tpot_ms(40.0, 190.0, 11) == 15.0


def test_a_one_token_answer_has_no_tpot_and_never_breaks_the_tpot_objective() -> None:
    assert tpot_ms(40.0, 55.0, 1) is None and tpot_ms(40.0, 40.0, 0) is None
    assert meets_slo(done(40.0, decode_tokens=1, decode_ms=15.0), Slo(100.0, 1.0))


@pytest.mark.parametrize(
    "engine", [EngineConfig("sequential", "seed"), EngineConfig("batched", "calibrated")]
)
def test_every_engine_records_tpot_as_vllm_defines_it(engine: EngineConfig) -> None:
    results = simulate(make_workload("shared-prefix-tiny", seed=3), "round_robin", 2, engine=engine)
    timed = [r for r in results if r.decode_tokens > 1]
    assert timed and all(r.status == RequestStatus.COMPLETED for r in results)
    for r in timed:
        assert r.tpot_ms == pytest.approx((r.e2e_ms - r.ttft_ms) / (r.decode_tokens - 1))


def test_reports_read_the_engines_tpot_and_never_compute_another() -> None:
    # A TPOT unlike (e2e - TTFT) / (n - 1): whatever reports show must be this field.
    results = [dataclasses.replace(done(50.0, request_id=f"r{i}"), tpot_ms=7.0) for i in range(3)]
    dashboard = build_dashboard({"round_robin": results}, [], ["worker-0"])
    assert dashboard["strategies"]["round_robin"]["tpot_ms"]["p99"] == 7.0
    record = cell_metrics(Cell("round_robin", 1, 1.0), results, Slo(100.0, 10.0))
    assert record["tpot_ms"]["mean"] == 7.0 and set(record["tpot_quantiles"]) == {7.0}
    assert record["attainment"] == 1.0  # 7 ms meets a 10 ms objective; 15 ms would not


def test_a_request_meets_the_slo_only_within_both_objectives_and_completed() -> None:
    slo = Slo(ttft_ms=100.0, tpot_ms=20.0)
    assert meets_slo(done(100.0), slo)  # TTFT on the limit, TPOT 15
    assert not meets_slo(done(100.5), slo)
    assert not meets_slo(done(50.0, decode_tokens=6, decode_ms=150.0), slo)  # TPOT 30
    assert not meets_slo(rejected(), slo)


def test_attainment_counts_every_request_sent_and_goodput_spans_the_makespan() -> None:
    slo = Slo(ttft_ms=100.0, tpot_ms=20.0)
    results = [
        done(50.0, arrival_ms=0.0, request_id="a"),  # meets; finishes at 200
        done(500.0, arrival_ms=1000.0, request_id="b"),  # TTFT too long; finishes at 1,650
        done(60.0, arrival_ms=1800.0, request_id="c"),  # meets; finishes at 2,010
        rejected("d"),
    ]
    summary = slo_summary(results, slo)
    assert summary["num_meeting_slo"] == 2
    assert summary["attainment"] == 2 / 4
    assert summary["goodput_rps"] == pytest.approx(2 / 2.010)


def test_slo_values_are_checked_and_named() -> None:
    with pytest.raises(ConfigError, match="ttft_ms must be a positive number of ms, got -1"):
        Slo(ttft_ms=-1.0, tpot_ms=10.0)
    with pytest.raises(ConfigError, match=r"attainment must be in \(0, 1\], got 1.5"):
        Slo(ttft_ms=1.0, tpot_ms=1.0, attainment=1.5)


def test_the_highest_rate_sustained_stops_at_the_first_rate_that_misses() -> None:
    # 6 req/s misses; 8 happens to meet it again (a short run's luck) but does not count.
    tested = [(8.0, 0.95, False), (2.0, 1.0, False), (4.0, 0.97, False), (6.0, 0.8, False)]
    rate = highest_rate_sustained(tested, 0.9)
    assert (rate.rate_rps, rate.bounded, rate.limited_by) == (4.0, True, "slo")
    assert (rate.lowest_tested_rps, rate.highest_tested_rps) == (2.0, 8.0)


def test_an_overloaded_rate_is_never_sustained_however_well_it_did() -> None:
    rate = highest_rate_sustained([(2.0, 1.0, False), (4.0, 1.0, True)], 0.9)
    assert (rate.rate_rps, rate.limited_by) == (2.0, "capacity")


def test_every_rate_met_is_an_unbounded_limit_and_none_met_is_none() -> None:
    every = highest_rate_sustained([(1.0, 1.0, False), (3.0, 0.91, False)], 0.9)
    assert (every.rate_rps, every.bounded) == (3.0, False)
    none = highest_rate_sustained([(1.0, 0.5, False), (3.0, None, False)], 0.9)
    assert (none.rate_rps, none.bounded) == (None, True)

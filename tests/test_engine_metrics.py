"""Engine metrics on hand-made engine statistics: weighted ITL percentiles, KV usage over time,
mean batch size; and the dashboard carrying them for simulated runs of either engine."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvqueue.gpu.engine_stats import EngineStats
from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.presets import get_preset
from kvqueue.report.comparison import compare
from kvqueue.report.dashboard import format_engine_table
from kvqueue.report.engine_metrics import (
    inter_token_gaps,
    sequential_stats,
    summarize_engines,
    weighted_stats,
)
from kvqueue.sim.simulation import simulate_run
from kvqueue.workloads.arrivals import retime
from kvqueue.workloads.synthetic import make_workload


def test_weighted_percentiles_count_each_token_once():
    stats = weighted_stats(np.array([30.0, 10.0, 20.0]), np.array([8.0, 1.0, 1.0]))
    assert stats == {"mean": 27.0, "p50": 30.0, "p90": 30.0, "p99": 30.0}
    assert weighted_stats(np.array([]), np.array([]))["p99"] is None


def test_a_gap_series_expands_to_one_value_per_step_each_weighted_by_the_batch():
    stats = EngineStats()
    stats.record_gap(50.0)  # a stall behind a long prefill
    stats.record_gap_series(first_ms=10.0, growth_ms=1.0, count=3, weight=2)
    values, weights = inter_token_gaps(stats)
    assert values.tolist() == [50.0, 10.0, 11.0, 12.0]
    assert weights.tolist() == [1.0, 2.0, 2.0, 2.0]


def test_engine_summary_of_two_workers():
    busy = EngineStats()
    busy.record_steps(num_steps=4, batch_size=3, duration_ms=40.0)
    busy.record_gap_series(10.0, 0.0, 4, 3)
    busy.record_kv_usage(0.0, 0.5)
    busy.record_kv_usage(10.0, 0.5)  # unchanged: dropped
    busy.record_kv_usage(50.0, 0.0)
    busy.num_preemptions = 2
    idle = EngineStats()
    idle.record_kv_usage(100.0, 0.0)  # the run ends at 100 ms
    summary = summarize_engines({"worker-1": idle, "worker-0": busy})
    assert summary is not None
    assert (summary["num_steps"], summary["mean_batch_size"], summary["preemptions"]) == (4, 3, 2)
    assert summary["busy_fraction"] == pytest.approx(40.0 / 200.0)
    assert summary["itl_ms"]["p50"] == 10.0
    # worker-0 holds 50% for 50 of 100 ms, worker-1 nothing: a quarter, on average.
    assert summary["kv_usage"]["mean"] == pytest.approx(0.125)
    assert summary["kv_usage"]["max"] == 0.5
    timeline = summary["kv_usage"]["timeline"]
    assert list(timeline["per_worker"]) == ["worker-0", "worker-1"]
    assert timeline["per_worker"]["worker-0"][0] == 0.5 and timeline["t_ms"][-1] == 100.0
    assert summarize_engines({}) is None


@pytest.mark.parametrize("engine", ["sequential", "batched"])
def test_simulated_dashboards_carry_engine_metrics_beside_the_existing_fields(engine):
    requests = retime(make_workload("shared-prefix-tiny", seed=4), "poisson", 30.0, seed=4)
    dashboard = compare(
        requests,
        ["cache_aware"],
        num_workers=2,
        preset=get_preset("llama-2-13b@a100-80gb"),
        engine=EngineConfig(engine, "calibrated"),
    )
    assert dashboard["meta"]["engine"] == engine
    assert dashboard["meta"]["latency_profile"] == "calibrated"
    summary = dashboard["strategies"]["cache_aware"]
    for key in ("hit_rate", "ttft_ms", "e2e_ms", "throughput_rps", "output_tokens_per_s"):
        assert summary[key] is not None
    assert summary["tpot_ms"]["mean"] > 0
    metrics = summary["engine"]
    if engine == "sequential":
        assert metrics["mean_batch_size"] == 1.0  # one request per step, always
    else:
        assert metrics["mean_batch_size"] > 1.0
        assert dashboard["meta"]["max_num_batched_tokens"] == 2048
    assert 0 < metrics["kv_usage"]["max"] <= 1
    assert metrics["itl_ms"]["p99"] >= metrics["itl_ms"]["p50"] > 0
    assert "cache_aware" in (format_engine_table(dashboard) or "")


def test_a_live_runs_engine_statistics_rebuilt_from_results_are_what_the_simulator_records():
    # Live workers run the sequential engine and report results only; one request at a time,
    # the results say every step and every block pinned, so the rebuild must match exactly.
    requests = retime(make_workload("shared-prefix-tiny", seed=5), "poisson", 20.0, seed=5)
    run = simulate_run(requests, "cache_aware", num_workers=2)
    rebuilt = summarize_engines(sequential_stats(run.results))
    recorded = summarize_engines(run.engine_stats)
    assert rebuilt is not None and recorded is not None
    assert rebuilt["kv_usage"] == recorded["kv_usage"] and recorded["kv_usage"]["max"] > 0
    for key in ("num_steps", "mean_batch_size", "busy_fraction", "preemptions"):
        assert rebuilt[key] == pytest.approx(recorded[key]), key
    assert rebuilt["itl_ms"]["p50"] is None  # per-step gaps are not in the results


RECORDINGS = st.lists(
    st.one_of(
        st.tuples(st.just("steps"), st.integers(1, 3), st.integers(1, 8), st.floats(0, 50)),
        st.tuples(st.just("gap"), st.floats(0, 50), st.integers(0, 4)),
        st.tuples(
            st.just("series"),
            st.floats(0, 50),
            st.floats(0, 1),
            st.integers(0, 5),
            st.integers(0, 4),
        ),
        st.tuples(st.just("kv"), st.integers(0, 3), st.sampled_from([0.0, 0.25, 0.5])),
        st.tuples(st.just("preempt"), st.integers(0, 2)),
    ),
    max_size=40,
)


def record(stats: EngineStats, recording: tuple, clock: list[float]) -> None:
    kind, *args = recording
    if kind == "steps":
        stats.record_steps(*args)
    elif kind == "gap":
        stats.record_gap(*args)
    elif kind == "series":
        stats.record_gap_series(*args)
    elif kind == "kv":
        clock[0] += args[0]  # times never decrease
        stats.record_kv_usage(clock[0], args[1])
    else:
        stats.num_preemptions += args[0]


@given(recordings=RECORDINGS, cuts=st.sets(st.integers(0, 40)))
def test_a_live_workers_reports_merged_equal_the_stats_recorded_in_one_piece(recordings, cuts):
    whole, clock = EngineStats(), [0.0]
    for recording in recordings:
        record(whole, recording, clock)
    parts, part, clock = [], EngineStats(), [0.0]
    for i, recording in enumerate(recordings):
        if i in cuts:  # reported: the worker starts a fresh part
            parts.append(orjson.loads(orjson.dumps(part.to_wire())))
            part = EngineStats()
        record(part, recording, clock)
    parts.append(orjson.loads(orjson.dumps(part.to_wire())))

    merged = EngineStats.merge(parts)
    assert merged.busy_ms == pytest.approx(whole.busy_ms)  # summed in another order
    merged.busy_ms = whole.busy_ms
    assert merged == whole

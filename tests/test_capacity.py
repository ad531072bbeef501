"""Capacity and overload: busy time, saturating bursts, and the verdict on real runs of both
engines."""

from __future__ import annotations

import math

import numpy as np
import pytest

import kvqueue.report.comparison as comparison_module
from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.capacity import (
    BOUNDED,
    ESTIMATED,
    MEASURED,
    SATURATION_DEPTH,
    LoadVerdict,
    busy_ms,
    busy_time_bound_rps,
    capacity_from_busy_time,
    offered_rate_rps,
    overload_line,
    run_capacity_rps,
    saturate,
    saturated_throughput_rps,
)
from kvqueue.report.comparison import simulate_comparison
from kvqueue.report.dashboard import build_dashboard, format_table, load_verdicts
from kvqueue.report.metrics import ideal_hit_rate
from kvqueue.report.run_report import run_conclusion
from kvqueue.report.units import format_rate
from kvqueue.sim.parallel import run_strategies
from kvqueue.sim.simulation import simulate, worker_names
from kvqueue.workloads.arrivals import retime
from kvqueue.workloads.rekey import isolated, repeated
from kvqueue.workloads.synthetic import make_workload

BATCHED = EngineConfig("batched", "calibrated")


def bursts(num_workers: int, engine: EngineConfig | None = None):  # type: ignore[no-untyped-def]
    """A `saturate` burst runner: each strategy on `num_workers` fresh simulated GPUs."""
    return lambda burst, names: run_strategies(burst, names, num_workers, engine=engine)


def span(worker: str, start: float, finish: float) -> RequestResult:
    return RequestResult(
        f"{worker}-{start}", "run", worker, "s", RequestStatus.COMPLETED,
        start_ms=start, finish_ms=finish,
    )  # fmt: skip


def test_busy_time_is_the_union_of_a_workers_service_spans() -> None:
    results = [
        span("worker-0", 0, 100),
        span("worker-0", 50, 120),  # overlaps: counted once
        span("worker-0", 200, 250),  # after a gap: the gap is idle
        span("worker-1", 10, 20),
    ]
    assert busy_ms(results) == {"worker-0": 170.0, "worker-1": 10.0}


def test_no_capacity_without_completed_work() -> None:
    assert capacity_from_busy_time(0, 100.0, 2) is None
    assert capacity_from_busy_time(5, 0.0, 2) is None
    assert saturated_throughput_rps([]) is None


def test_on_the_sequential_engine_the_estimate_is_workers_over_mean_service_time() -> None:
    requests = retime(make_workload("no-sharing", 48, seed=1), "poisson", 2.0, seed=1)
    results = simulate(requests, "round_robin", 3)
    service = [r.prefill_ms + r.decode_ms for r in results]
    assert run_capacity_rps(results, 3) == pytest.approx(3 * 1000 / np.mean(service))


def test_a_saturating_run_measures_what_the_busy_time_estimates() -> None:
    requests = make_workload("no-sharing", 96, seed=2)
    light = simulate(retime(requests, "poisson", 1.0, seed=2), "round_robin", 4)
    burst = simulate(retime(requests, "asap"), "round_robin", 4)
    measured = saturated_throughput_rps(burst)
    # The burst ends with workers draining one by one, so it measures a little less.
    assert measured == pytest.approx(run_capacity_rps(light, 4), rel=0.05)
    assert measured <= run_capacity_rps(burst, 4)


def test_the_offered_rate_is_the_stated_one_else_read_from_the_arrivals() -> None:
    assert offered_rate_rps([0.0, 10.0], nominal_rps=4.0) == 4.0
    assert offered_rate_rps([0.0, 500.0, 1000.0, 2000.0]) == 1.5
    assert math.isinf(offered_rate_rps([0.0, 0.0, 0.0]))
    assert offered_rate_rps([5.0]) == 0.0


def test_a_verdict_says_overload_queueing_and_the_rate_the_cluster_takes() -> None:
    over = LoadVerdict(12.0, 8.0, MEASURED, num_requests=100, num_workers=4)
    assert over.overloaded and over.load == 1.5
    assert over.line() == (
        "overload: 12 req/s offered, more than the cluster can take (about 8 req/s, measured): "
        "queueing, not caching, dominates these latencies"
    )
    under = LoadVerdict(6.0, 8.0, MEASURED, 100, 4)
    assert not under.overloaded and under.load == 0.75


def test_a_burst_is_overloaded_when_more_requests_than_workers_arrive_at_once() -> None:
    burst = LoadVerdict(math.inf, 7.5, ESTIMATED, num_requests=64, num_workers=4)
    assert burst.overloaded and burst.load is None
    assert burst.line().startswith("overload: all 64 requests arrive at once")
    assert "the cluster can take about 7.5 req/s, estimated" in burst.line()
    assert burst.to_dict()["offered_rps"] is None and burst.to_dict()["burst"]
    assert not LoadVerdict(math.inf, 7.5, ESTIMATED, num_requests=4, num_workers=4).overloaded


def test_one_overload_line_gives_the_range_of_capacities() -> None:
    verdicts = [
        LoadVerdict(10.0, 6.0, ESTIMATED, 64, 4),
        LoadVerdict(10.0, 7.25, ESTIMATED, 64, 4),
        LoadVerdict(10.0, 12.0, ESTIMATED, 64, 4),  # not overloaded: not in the range
    ]
    line = overload_line(verdicts)
    assert line is not None and "about 6–7.25 req/s depending on the strategy" in line
    assert overload_line(verdicts[2:]) is None


@pytest.mark.parametrize(("utilization", "overloaded"), [(0.5, False), (2.0, True)])
def test_a_simulated_run_is_marked_overloaded_exactly_when_offered_more_than_it_takes(
    utilization: float, overloaded: bool
) -> None:
    requests = make_workload("no-sharing", 64, seed=3)
    probe = simulate(retime(requests, "poisson", 1.0, seed=3), "round_robin", 2)
    rate = utilization * run_capacity_rps(probe, 2)
    timed = retime(requests, "poisson", rate, seed=3)
    results = {"round_robin": simulate(timed, "round_robin", 2)}
    meta = {"arrivals": "poisson", "rate_rps": rate, "arrival_scale": 1.0}
    dashboard = build_dashboard(results, timed, worker_names(2), meta)
    verdict = load_verdicts(dashboard)["round_robin"]
    assert verdict.overloaded is overloaded
    assert verdict.offered_rps == rate
    table = format_table(dashboard)
    assert ("overload:" in table) is overloaded
    assert ("!" in table.splitlines()[2]) is overloaded
    conclusion = run_conclusion(dashboard)[-1]
    if overloaded:
        assert conclusion.startswith(f"Overload: {format_rate(rate)} req/s offered")
    else:
        assert conclusion.startswith(f"No run was overloaded (offered load {utilization:.2f}")


def test_repeated_copies_keep_the_workloads_sharing_and_share_nothing_with_each_other() -> None:
    workload = make_workload("shared-prefix-tiny", seed=4)
    copies = repeated(workload, 3)
    assert len(copies) == 3 * len(workload) and copies[: len(workload)] == workload
    assert len({r.request_id for r in copies}) == len(copies)
    assert ideal_hit_rate(copies) == ideal_hit_rate(workload) > 0.5
    assert ideal_hit_rate(isolated(workload)) == 0.0


def test_one_burst_of_a_small_workload_understates_a_batching_engines_capacity() -> None:
    workload = make_workload("shared-prefix-small", seed=0)
    (once,) = run_strategies(retime(workload, "asap"), ["round_robin"], 4, engine=BATCHED).values()
    (deep,) = saturate(workload, ["round_robin"], 4, bursts(4, BATCHED)).values()
    assert deep.copies > 1 and deep.saturated and deep.depth >= SATURATION_DEPTH
    # 16 requests per GPU run as one batch: the GPUs idle through ramp-up and drain.
    assert deep.capacity_rps > 1.3 * saturated_throughput_rps(once.results)
    twice = retime(repeated(workload, 2 * deep.copies), "asap")
    (run,) = run_strategies(twice, ["round_robin"], 4, engine=BATCHED).values()
    assert saturated_throughput_rps(run.results) == pytest.approx(deep.capacity_rps, rel=0.05)


def test_on_the_sequential_engine_one_burst_of_a_workload_is_deep_enough() -> None:
    workload = make_workload("no-sharing", 48, seed=1)
    (found,) = saturate(workload, ["round_robin"], 3, bursts(3)).values()
    assert (found.copies, found.depth, found.saturated) == (1, 16.0, True)


def test_a_batching_engines_busy_time_estimates_nothing() -> None:
    requests = retime(make_workload("no-sharing", 16, seed=1), "poisson", 2.0, seed=1)
    results = simulate(requests, "round_robin", 2, engine=BATCHED)
    assert run_capacity_rps(results, 2, "sequential") is not None
    assert run_capacity_rps(results, 2, "batched") is None


def test_a_burst_each_gpu_runs_at_once_does_not_overload_a_batching_engine() -> None:
    assert not LoadVerdict(math.inf, 50.0, MEASURED, 64, 4, concurrency=30.0).overloaded
    assert LoadVerdict(math.inf, 50.0, MEASURED, 160, 4, concurrency=30.0).overloaded


@pytest.mark.parametrize(("fraction", "overloaded"), [(0.6, False), (1.5, True)])
def test_a_batched_simulation_is_judged_against_its_measured_capacity(
    fraction: float, overloaded: bool
) -> None:
    workload = make_workload("shared-prefix-small", seed=0)
    (found,) = saturate(workload, ["round_robin"], 4, bursts(4, BATCHED)).values()
    rate = fraction * found.capacity_rps
    timed = retime(workload, "poisson", rate, seed=0)
    meta = {"arrivals": "poisson", "rate_rps": rate}
    dashboard = simulate_comparison(timed, ["round_robin"], 4, engine=BATCHED, meta=meta).dashboard
    verdict = load_verdicts(dashboard)["round_robin"]
    assert (verdict.basis, verdict.capacity_rps) == (MEASURED, found.capacity_rps)
    assert verdict.overloaded is overloaded and verdict.load == pytest.approx(fraction)
    assert dashboard["meta"]["capacity"]["round_robin"]["copies"] == found.copies
    assert "measured by a saturating burst" in format_table(dashboard)


def test_a_batched_run_offered_less_than_its_busy_time_bound_is_settled_without_a_burst(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batching GPU completes at least as many requests per busy second when given more at
    once, so a run offered below that bound is not overloaded: no burst is run for it."""
    workload = make_workload("shared-prefix-small", seed=0)
    (found,) = saturate(workload, ["round_robin"], 4, bursts(4, BATCHED)).values()
    # Lightly loaded, a GPU is busy with one or two requests at a time: the bound is near
    # workers / service time, well under what batching takes.
    rate = 0.05 * found.capacity_rps
    timed = retime(workload, "poisson", rate, seed=0)
    simulated: list[int] = []

    def counting(requests, names, num_workers, **options):  # type: ignore[no-untyped-def]
        simulated.append(len(requests))
        return run_strategies(requests, names, num_workers, **options)

    monkeypatch.setattr(comparison_module, "run_strategies", counting)
    meta = {"arrivals": "poisson", "rate_rps": rate}
    dashboard = simulate_comparison(timed, ["round_robin"], 4, engine=BATCHED, meta=meta).dashboard

    assert simulated == [len(timed)]  # the run itself, no burst
    verdict = load_verdicts(dashboard)["round_robin"]
    (run,) = run_strategies(timed, ["round_robin"], 4, engine=BATCHED).values()
    bound = busy_time_bound_rps(run.results, 4)
    assert (verdict.basis, verdict.capacity_rps) == (BOUNDED, bound)
    assert rate < bound < found.capacity_rps  # a lower bound, above what was offered
    assert not verdict.overloaded and verdict.load == pytest.approx(rate / bound)
    assert dashboard["meta"]["capacity"]["round_robin"]["basis"] == BOUNDED
    assert "at least the busy-time figure" in format_table(dashboard)


def test_a_burst_workloads_own_run_is_its_saturation_first_try() -> None:
    workload = retime(make_workload("shared-prefix-small", seed=0), "asap")
    runs = run_strategies(workload, ["round_robin", "cache_aware"], 4, engine=BATCHED)
    sizes: list[int] = []

    def runner(burst, names):  # type: ignore[no-untyped-def]
        sizes.append(len(burst))
        return run_strategies(burst, names, 4, engine=BATCHED)

    reused = saturate(workload, ["round_robin", "cache_aware"], 4, runner, first=runs)
    again = saturate(workload, ["round_robin", "cache_aware"], 4, bursts(4, BATCHED))

    assert len(workload) not in sizes  # the first try was not simulated again
    for name in ("round_robin", "cache_aware"):
        assert reused[name].to_dict() == again[name].to_dict()


def test_a_live_batched_runs_dashboard_is_judged_by_its_own_busy_time_bound() -> None:
    """Nothing measures a live batching cluster's capacity: its dashboard takes the bound its
    run settles (offered below it: not overloaded), and leaves a burst's capacity unknown."""
    rate = 0.5
    timed = retime(make_workload("no-sharing", 16, seed=1), "poisson", rate, seed=1)
    results = simulate(timed, "round_robin", 2, engine=BATCHED)
    meta = {"engine": "batched", "arrivals": "poisson", "rate_rps": rate}

    dashboard = build_dashboard({"round_robin": results}, timed, worker_names(2), meta)

    verdict = load_verdicts(dashboard)["round_robin"]
    bound = busy_time_bound_rps(results, 2)
    assert rate < bound
    assert (verdict.basis, verdict.capacity_rps) == (BOUNDED, bound)
    assert not verdict.overloaded and verdict.load == pytest.approx(rate / bound)

    burst = retime(timed, "asap")
    burst_results = simulate(burst, "round_robin", 2, engine=BATCHED)
    at_once = build_dashboard(
        {"round_robin": burst_results}, burst, worker_names(2), {"engine": "batched"}
    )
    assert load_verdicts(at_once)["round_robin"].capacity_rps is None

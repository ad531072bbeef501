"""Parity: the live pipeline and the virtual-time simulator tell the same story.

The same workload, seed and deterministic strategy, run live (real Redis, real `rq worker`
processes, in slow motion at time scale 2) and simulated, must send every request to the
same worker with the same hit blocks, and agree on the latency metrics within 5%.

Where they can differ, and how this test stays clear of it: live latencies include RQ's
per-job dispatch overhead (a few milliseconds of wall time, half that in simulated time here;
the simulator has none), so means are compared within 5% or within `RQ_OVERHEAD_ALLOWANCE_MS`
where they are only a few ms; and a live router reading the cluster at the very moment a
worker finishes may see its load before or after the decrement. The workload's arrivals are
spaced so that no arrival falls within `MARGIN_MS` of a simulated finish (checked below), so
both routers see the same loads.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from live_support import PARITY_DB, connect_or_fail, real_redis_url, start_cluster

from kvqueue.config import Settings
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.live.run import run_live
from kvqueue.sim.simulation import simulate
from kvqueue.workloads.synthetic import make_workload

pytestmark = [pytest.mark.redis, pytest.mark.slow]

PREFIX = "kvq-parity:"
NUM_WORKERS = 2
ARRIVAL_GAP_MS = 595.0
MARGIN_MS = 70.0
TIME_SCALE = 2.0  # slow motion: RQ's wall-clock overhead shrinks in simulated time
TOLERANCE = 0.05
# RQ's dispatch of a job (dequeue to start) costs a few ms of wall time, which the simulator
# does not model: latencies of a few ms (an idle worker's queue wait, a TTFT of one cached
# prefill) are compared with this absolute allowance instead, in simulated ms.
RQ_OVERHEAD_ALLOWANCE_MS = 5.0


def parity_workload() -> list[Request]:
    """16 requests in 4 groups, about one second of service each, one every 595 ms."""
    requests = make_workload("shared-prefix-tiny", seed=3, output_len=60)
    return [
        Request(r.request_id, r.num_prompt_tokens, r.block_hashes, r.max_tokens, i * ARRIVAL_GAP_MS)
        for i, r in enumerate(requests)
    ]


@pytest.fixture(scope="module")
def live_url(real_redis_base_url: str) -> Iterator[str]:
    url = real_redis_url(real_redis_base_url, PARITY_DB)
    client = connect_or_fail(url)
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def run_both(url: str, strategy: str) -> tuple[list[RequestResult], list[RequestResult]]:
    requests = parity_workload()
    simulated = simulate(requests, strategy, NUM_WORKERS)
    finishes = [r.finish_ms for r in simulated]
    closest = min(abs(r.arrival_ms - f) for r in requests for f in finishes)
    assert closest >= MARGIN_MS, f"workload too close to a race: {closest:.0f} ms"

    client = connect_or_fail(url)
    client.flushdb()
    cluster = start_cluster(url, PREFIX, NUM_WORKERS)
    try:
        settings = Settings(
            redis_url=url, key_prefix=PREFIX, strategy=strategy, time_scale=TIME_SCALE
        )
        live = run_live(client, settings, requests, progress=False, timeout_s=120).results
    finally:
        cluster.stop()
        client.close()
    order = {r.request_id: i for i, r in enumerate(requests)}
    return simulated, sorted(live, key=lambda r: order[r.request_id])


def mean_gap_within_tolerance(live: list[float], simulated: list[float]) -> tuple[bool, str]:
    """Means agree within 5%, or within the RQ dispatch allowance where latencies are tiny."""
    live_mean, sim_mean = float(np.mean(live)), float(np.mean(simulated))
    gap = abs(live_mean - sim_mean)
    allowed = max(TOLERANCE * sim_mean, RQ_OVERHEAD_ALLOWANCE_MS)
    return gap <= allowed, f"live {live_mean:.1f} ms vs simulated {sim_mean:.1f} ms"


@pytest.mark.parametrize("strategy", ["cache_aware", "round_robin"])
def test_live_and_simulated_runs_route_hit_and_time_the_same(live_url: str, strategy: str) -> None:
    simulated, live = run_both(live_url, strategy)

    assert [r.status for r in live] == [RequestStatus.COMPLETED] * len(simulated)
    assert [(r.request_id, r.worker) for r in live] == [(r.request_id, r.worker) for r in simulated]
    assert [r.hit_blocks for r in live] == [r.hit_blocks for r in simulated]
    assert [r.prefill_ms for r in live] == [r.prefill_ms for r in simulated]
    assert [r.decode_ms for r in live] == [r.decode_ms for r in simulated]
    for field in ("queue_wait_ms", "ttft_ms", "e2e_ms"):
        ok, detail = mean_gap_within_tolerance(
            [getattr(r, field) for r in live], [getattr(r, field) for r in simulated]
        )
        assert ok, f"mean {field}: {detail}"
    ok, detail = mean_gap_within_tolerance(
        [float(np.percentile([r.e2e_ms for r in live], 90))],
        [float(np.percentile([r.e2e_ms for r in simulated], 90))],
    )
    assert ok, f"p90 e2e_ms: {detail}"

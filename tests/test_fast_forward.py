"""Fast-forward against single-stepping: the batched engine jumps over decode runs in closed
form; on random workloads it must give the same results and the same per-token times.

Tolerance: times agree to a relative 1e-9 (absolute 1e-6 ms). A run's step boundaries are
``T0 + s·d0 + δ·s(s−1)/2`` where single steps add their durations one by one, so the two
differ only by floating-point rounding; everything else (routing, hits, preemptions,
evictions, batch sizes, token counts) must be identical.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.hashing import hash_token_blocks
from kvqueue.gpu.presets import get_preset
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult
from kvqueue.sim.simulation import Simulation

REL, ABS = 1e-9, 1e-6
TIME_FIELDS = ("arrival_ms", "start_ms", "finish_ms", "queue_wait_ms", "prefill_ms",
               "decode_ms", "ttft_ms", "e2e_ms", "tpot_ms")  # fmt: skip


def random_workload(seed: int, num_requests: int) -> list[Request]:
    """Requests sharing a few prefixes, mixed lengths and outputs, Poisson-ish arrivals."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(50_000) for _ in range(rng.choice((16, 48, 96)))] for _ in range(3)]
    requests, now = [], 0.0
    for i in range(num_requests):
        prefix = rng.choice(prefixes) if rng.random() < 0.7 else []
        tokens = prefix + [rng.randrange(50_000) for _ in range(rng.randrange(1, 120))]
        now += rng.expovariate(1 / 40.0) if rng.random() < 0.8 else 0.0
        requests.append(
            Request(
                f"r{i}",
                len(tokens),
                tuple(hash_token_blocks(tokens)),
                max_tokens=rng.choice((0, 1, 2, 5, 17, 40, 90)),
                arrival_ms=round(now, 3),
            )
        )
    return requests


def run(requests, strategy, num_blocks, latency, fast_forward, tokens=256, seqs=8):
    times: dict[str, list[float]] = {}
    engine = EngineConfig("batched", latency, tokens, seqs, fast_forward=fast_forward)
    preset = get_preset("llama-2-13b@a100-80gb", num_blocks=num_blocks)
    simulation = Simulation(strategy, 2, preset, engine=engine, token_times=times)
    results = simulation.run(requests)
    return results, times, simulation.engine_stats()


def assert_same_result(a: RequestResult, b: RequestResult) -> None:
    for name, value in a.to_dict().items():
        other = b.to_dict()[name]
        if name in TIME_FIELDS and value is not None and other is not None:
            assert math.isclose(value, other, rel_tol=REL, abs_tol=ABS), (a.request_id, name)
        else:
            assert value == other, (a.request_id, name, value, other)


def assert_equivalent(requests, strategy, num_blocks, latency):
    fast, fast_times, fast_stats = run(requests, strategy, num_blocks, latency, True)
    slow, slow_times, slow_stats = run(requests, strategy, num_blocks, latency, False)
    for a, b in zip(fast, slow, strict=True):
        assert_same_result(a, b)
    assert fast_times.keys() == slow_times.keys()
    for request_id, times in slow_times.items():
        assert len(fast_times[request_id]) == len(times), request_id
        for x, y in zip(fast_times[request_id], times, strict=True):
            assert math.isclose(x, y, rel_tol=REL, abs_tol=ABS), request_id
    for worker, stats in slow_stats.items():
        other = fast_stats[worker]
        assert (other.num_steps, other.num_scheduled, other.num_preemptions) == (
            stats.num_steps,
            stats.num_scheduled,
            stats.num_preemptions,
        )
        assert math.isclose(other.busy_ms, stats.busy_ms, rel_tol=REL)
    return fast, fast_stats


@pytest.mark.parametrize("latency", ["seed", "calibrated"])
@pytest.mark.parametrize("strategy", ["cache_aware", "round_robin"])
def test_fast_forward_gives_single_stepping_results_on_a_tight_cache(strategy, latency):
    # 40 blocks across 8-request batches: evictions and preemptions happen all the time.
    requests = random_workload(seed=11, num_requests=60)
    results, stats = assert_equivalent(requests, strategy, 40, latency)
    assert sum(r.preemptions for r in results) > 0  # the case is not trivial
    assert sum(r.evictions for r in results) > 0
    assert any(s.gap_series for s in stats.values())  # decode runs were jumped over


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(12, 200),
    latency=st.sampled_from(["seed", "calibrated"]),
)
def test_fast_forward_matches_single_stepping_on_random_workloads(seed, num_blocks, latency):
    assert_equivalent(random_workload(seed, 30), "cache_aware", num_blocks, latency)

"""The engines' load signals in `RouterView`: what the router sees at each decision is what the
engine holds at that instant — the same with fast-forward as with single steps."""

from __future__ import annotations

import math
import random

import pytest

from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.hashing import hash_token_blocks
from kvqueue.gpu.presets import get_preset
from kvqueue.gpu.request import Request
from kvqueue.routing.state import InMemoryRouterState
from kvqueue.routing.view import WorkerLoad
from kvqueue.sim.simulation import Simulation


def views_seen(simulation: Simulation, requests: list[Request]) -> list[dict[str, WorkerLoad]]:
    """The loads the router read at each decision, in arrival order."""
    seen = []
    route = simulation.router.route

    def spying_route(request: Request):
        seen.append(dict(simulation.state.view(request, take_ticket=False).loads))
        return route(request)

    simulation.router.route = spying_route  # type: ignore[method-assign]
    simulation.run(requests)
    return seen


def request(i: int, tokens: int, outputs: int, arrival_ms: float) -> Request:
    ids = [i * 7919 + t for t in range(tokens)]
    return Request(f"r{i}", tokens, tuple(hash_token_blocks(ids)), outputs, arrival_ms)


def test_one_worker_s_signals_at_each_arrival():
    preset = get_preset("llama-2-13b@a100-80gb", num_blocks=40)
    engine = EngineConfig("batched", "seed", max_num_batched_tokens=64, max_num_seqs=2)
    # 48-token prompts, 10 outputs: prefill step 5 + 7.5 = 12.5 ms, then 15 ms decode steps.
    requests = [request(i, 48, 10, arrival) for i, arrival in enumerate((0.0, 1.0, 2.0, 40.0))]
    loads = [
        v["worker-0"]
        for v in views_seen(Simulation("round_robin", 1, preset, engine=engine), requests)
    ]
    assert (loads[0].num_running, loads[0].num_waiting, loads[0].engine_kv_usage) == (0, 0, 0.0)
    # r0 is prefilling (admitted at 0, its 48 tokens scheduled): running, 3 blocks pinned.
    assert (loads[1].num_running, loads[1].num_waiting) == (1, 0)
    assert loads[1].engine_kv_usage == 3 / 40
    assert loads[1].num_queued_prefill_tokens == 0
    # r1 waits for the step boundary at 12.5 ms: its 48 prompt tokens are queued.
    assert (loads[2].num_running, loads[2].num_waiting) == (1, 1)
    assert loads[2].num_queued_prefill_tokens == 48
    # At 40 ms r0 and r1 decode, r2 waits for a sequence slot (max 2 running).
    assert (loads[3].num_running, loads[3].num_waiting) == (2, 1)
    assert loads[3].num_queued_prefill_tokens == 48
    assert loads[3].engine_kv_usage == 8 / 40  # 4 blocks each: 48 + up to 16 outputs


def test_the_sequential_engine_exports_the_same_signals():
    requests = [request(i, 48, 10, arrival) for i, arrival in enumerate((0.0, 1.0))]
    loads = [v["worker-0"] for v in views_seen(Simulation("round_robin", 1), requests)]
    assert (loads[1].num_running, loads[1].num_waiting) == (1, 0)
    assert loads[1].num_queued_prefill_tokens == 0
    assert loads[1].engine_kv_usage == pytest.approx(4 / 924)  # 3 prompt + 1 output block


@pytest.mark.parametrize("latency", ["seed", "calibrated"])
def test_fast_forward_shows_the_router_what_single_steps_would(latency):
    rng = random.Random(3)
    requests, now = [], 0.0
    for i in range(80):
        now += rng.expovariate(1 / 30.0)
        requests.append(request(i, rng.randrange(16, 200), rng.choice((3, 30, 120)), now))
    preset = get_preset("llama-2-13b@a100-80gb", num_blocks=60)
    seen = {}
    for fast_forward in (True, False):
        engine = EngineConfig("batched", latency, 256, 8, fast_forward=fast_forward)
        seen[fast_forward] = views_seen(
            Simulation("least_loaded", 3, preset, engine=engine), requests
        )
    # Equal, but for the float rounding of times (fast-forward sums its steps in closed form).
    for fast, slow in zip(seen[True], seen[False], strict=True):
        for worker, load in slow.items():
            for field in WorkerLoad.__slots__:
                a, b = getattr(fast[worker], field), getattr(load, field)
                if isinstance(b, float) and isinstance(a, float):
                    assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9), field
                else:
                    assert a == b, field
    assert any(load.num_running > 2 for view in seen[True] for load in view.values())


def test_a_state_without_an_engine_leaves_the_signals_at_their_defaults(make_request):
    state = InMemoryRouterState(["worker-0"])
    load = state.view(make_request(32), take_ticket=False).load("worker-0")
    assert (load.num_running, load.num_waiting, load.engine_kv_usage) == (0, 0, 0.0)
    assert load.num_queued_prefill_tokens == 0

"""Several strategies over the same requests, each on fresh state, serially or forked."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any

from kvqueue.errors import ConfigError
from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.oracle import DecodeLengthOracle
from kvqueue.gpu.presets import Preset, get_preset
from kvqueue.gpu.request import Request
from kvqueue.routing.policies.base import parse_strategy
from kvqueue.sim.simulation import (
    DEFAULT_PENDING_TTL_MS,
    DEFAULT_RUN_ID,
    ProgressCallback,
    SimulationRun,
    simulate_run,
)


def check_strategies(strategies: Sequence[str]) -> None:
    """Raise `ConfigError` for an empty list, a duplicate, an unknown strategy name or index
    mode (``name`` or ``name:index``)."""
    if not strategies:
        raise ConfigError("no strategies given")
    if len(set(strategies)) != len(strategies):
        raise ConfigError(f"duplicate strategy in {list(strategies)}")
    for spec in strategies:
        parse_strategy(spec)  # an unknown name or mode raises, listing the valid ones


def default_jobs(num_strategies: int) -> int:
    """One process per strategy, up to twice the CPUs (1 where fork is unavailable).

    Oversubscribing on purpose: three strategies time-sharing two cores finish in about
    half their total CPU time, two of them back to back on one core take two thirds.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(num_strategies, 2 * (os.cpu_count() or 1)))


def run_strategies(
    requests: Sequence[Request],
    strategies: Sequence[str],
    num_workers: int,
    preset: Preset | None = None,
    latency: LatencyModel | None = None,
    oracle: DecodeLengthOracle | None = None,
    run_id: str = DEFAULT_RUN_ID,
    pending_ttl_ms: float = DEFAULT_PENDING_TTL_MS,
    progress: ProgressCallback | None = None,
    jobs: int = 1,
    engine: EngineConfig | None = None,
    index_mode: str | None = None,
) -> dict[str, SimulationRun]:
    """`simulate_run` once per strategy, each on fresh workers, caches and router state.

    Every strategy sees the same requests; the result maps each strategy (in the given
    order) to its run: results and engine statistics. Strategies and the engine are
    validated before anything runs. `progress(n)` is called as requests end, over all
    strategies. `index_mode` applies to every strategy that does not name its own (else each
    reads its upstream's default). With ``jobs > 1`` strategies run in that
    many forked processes (they share nothing, so the results are identical to a serial
    run); where fork is unavailable they run serially.
    """
    check_strategies(strategies)
    preset = preset or get_preset()
    engine = engine or EngineConfig()
    engine.check(preset)
    run_kwargs: dict[str, Any] = {
        "num_workers": num_workers,
        "preset": preset,
        "latency": latency,
        "oracle": oracle,
        "run_id": run_id,
        "pending_ttl_ms": pending_ttl_ms,
        "engine": engine,
        "index_mode": index_mode,
    }
    jobs = min(jobs, len(strategies))
    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return {
            name: simulate_run(requests, name, progress=progress, **run_kwargs)
            for name in strategies
        }
    return _run_forked(requests, strategies, run_kwargs, progress, jobs)


# State handed to forked children by inheritance (fork copies it; nothing is pickled but the
# strategy name going in and the results coming out). Set only while `_run_forked` runs.
_FORK_STATE: dict[str, Any] | None = None
_PROGRESS_POLL_S = 0.2


def _simulate_in_child(position: int, strategy: str) -> SimulationRun:
    state = _FORK_STATE
    assert state is not None, "_simulate_in_child runs only in a child forked by _run_forked"
    counter = state["counters"][position]

    def tick(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    return simulate_run(state["requests"], strategy, progress=tick, **state["kwargs"])


def _run_forked(
    requests: Sequence[Request],
    strategies: Sequence[str],
    run_kwargs: dict[str, Any],
    progress: ProgressCallback | None,
    jobs: int,
) -> dict[str, SimulationRun]:
    """`simulate_run(requests, strategy, **run_kwargs)` per strategy, in `jobs` forked processes."""
    global _FORK_STATE
    context = multiprocessing.get_context("fork")
    counters = [context.Value("q", 0) for _ in strategies]
    _FORK_STATE = {"requests": requests, "counters": counters, "kwargs": run_kwargs}
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = [
                pool.submit(_simulate_in_child, i, name) for i, name in enumerate(strategies)
            ]
            reported = 0
            pending = set(futures)
            while pending:
                _, pending = wait(pending, timeout=_PROGRESS_POLL_S, return_when=FIRST_EXCEPTION)
                if progress is not None:
                    done = sum(c.value for c in counters)
                    if done > reported:
                        progress(done - reported)
                        reported = done
                failed = [f for f in futures if f.done() and f.exception() is not None]
                if failed:
                    pool.shutdown(cancel_futures=True)
                    raise failed[0].exception()  # type: ignore[misc]
            return {name: f.result() for name, f in zip(strategies, futures, strict=True)}
    finally:
        _FORK_STATE = None

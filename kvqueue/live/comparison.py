"""The live strategy comparison: the same requests through the real pipeline once per strategy.

For each strategy, in order:

1. every key under the prefix but the results streams and run metadata
   (``<prefix>results:*``, ``<prefix>run:*``) is deleted (`clear_routing_state`: the prefix
   tree, loads, cache usage, learned statistics, round-robin counter, live workers, events),
   so no run inherits another's routing state, and `analysis/dashboard.py --run-id` still
   works afterwards;
2. a fresh `LocalCluster` of N real ``rq worker -w workers.KVWorker`` processes starts, so
   every cache starts empty (a worker announces ``cleared`` when it starts);
3. `run_live` sends the requests (same ids, tokens, hashes and arrival times for every
   strategy) and waits for every result;
4. the cluster stops, any of the run's jobs still queued (an interrupted run) are deleted,
   and the routing keys are cleared again.

Invariants: every process a comparison starts is stopped before it returns or raises
(KeyboardInterrupt and SIGTERM included, see `graceful_signals`); nothing outside the key
prefix and the run's own RQ jobs is ever deleted — never FLUSHDB. On a user's Redis
(`check_redis_is_free`) the comparison refuses to start when kvqueue workers are live under
the prefix, an RQ worker listens on a ``worker-<i>`` queue it needs, or such a queue already
holds jobs: its workers would steal or be fed someone else's jobs.

What a comparison deletes and when it refuses to start: `kvqueue.live.hygiene`. Its
dashboard and plots: `kvqueue.report.comparison`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from kvqueue.config import Settings
from kvqueue.gpu.engine_stats import EngineStats
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult
from kvqueue.keys import worker_name
from kvqueue.live.cluster import LocalCluster
from kvqueue.live.embedded import EmbeddedRedis
from kvqueue.live.hygiene import check_redis_is_free, clear_routing_state, drop_queued_jobs
from kvqueue.live.producer import new_run_id
from kvqueue.live.run import run_live
from kvqueue.live.signals import shielded

Status = Callable[[str], None]


def _quiet(message: str) -> None:
    del message


@contextlib.contextmanager
def comparison_redis(redis_url: str | None, status: Status = _quiet) -> Iterator[tuple[str, str]]:
    """Yield ``(url, description)`` of the Redis to compare on.

    With `redis_url` None an `EmbeddedRedis` is started and stopped on exit (whatever
    happens); otherwise the URL is used as is and nothing is started.
    """
    if redis_url:
        yield redis_url, "REDIS_URL"
        return
    server = EmbeddedRedis()
    status(f"starting an embedded redis-server ({server.binary})")
    server.start()
    try:
        yield server.url, f"embedded redis-server ({server.binary})"
    finally:
        with shielded():
            server.stop()


@dataclass(frozen=True, slots=True)
class StrategyRun:
    strategy: str
    run_id: str
    results: list[RequestResult]
    wall_s: float
    engine_stats: dict[str, EngineStats] = field(default_factory=dict)


@dataclass(slots=True)
class Comparison:
    """The runs of one comparison, in strategy order, all over the same `workers`."""

    workers: list[str]
    runs: list[StrategyRun] = field(default_factory=list)

    @property
    def results_by_strategy(self) -> dict[str, list[RequestResult]]:
        return {run.strategy: run.results for run in self.runs}

    @property
    def engine_stats_by_strategy(self) -> dict[str, dict[str, EngineStats]]:
        return {run.strategy: run.engine_stats for run in self.runs}


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment that gives the workers the producer's GPU preset, engine and overrides."""
    env = {
        "KVQ_PRESET": settings.preset,
        "KVQ_ENGINE": settings.engine,
        "KVQ_LATENCY": settings.latency_profile,
    }
    if settings.num_blocks is not None:
        env["KVQ_NUM_BLOCKS"] = str(settings.num_blocks)
    if settings.max_context_tokens is not None:
        env["KVQ_MAX_CONTEXT"] = str(settings.max_context_tokens)
    if settings.max_num_batched_tokens is not None:
        env["KVQ_MAX_NUM_BATCHED_TOKENS"] = str(settings.max_num_batched_tokens)
    if settings.max_num_seqs is not None:
        env["KVQ_MAX_NUM_SEQS"] = str(settings.max_num_seqs)
    return env


def run_comparison(
    redis_url: str,
    settings: Settings,
    requests: Sequence[Request],
    strategies: Sequence[str],
    num_workers: int,
    meta: Mapping[str, Any] | None = None,
    check_free: bool = True,
    progress: bool = True,
    log_dir: Path | None = None,
    timeout_s: float = 600.0,
    status: Status = _quiet,
) -> Comparison:
    """Run `requests` once per strategy on fresh workers (module docstring); the runs' results.

    `settings` gives the prefix, time scale and GPU preset (passed to the workers by
    environment). With `check_free`, `check_redis_is_free` runs first. Every worker process
    is stopped before this returns or raises.
    """
    if not strategies:
        raise ValueError("no strategies to compare")
    if num_workers < 1:
        raise ValueError(f"need at least one worker, got {num_workers}")
    client = redis.Redis.from_url(redis_url)
    prefix = settings.key_prefix
    comparison = Comparison(workers=[worker_name(i) for i in range(num_workers)])
    if check_free:
        check_redis_is_free(client, prefix, comparison.workers, settings.heartbeat_ttl_s)
    base_id = new_run_id()
    for position, strategy in enumerate(strategies, start=1):
        run_id = f"{base_id}-{strategy.replace(':', '-')}"  # job ids: no ':' (``llmd:approximate``)
        label = f"[{position}/{len(strategies)}] {strategy}"
        clear_routing_state(client, prefix)
        cluster = LocalCluster(
            redis_url, num_workers, env=worker_env(settings), prefix=prefix, log_dir=log_dir
        )
        started = time.perf_counter()
        try:
            status(f"{label}: starting {num_workers} KV workers (rq worker processes)")
            cluster.start()
            status(f"{label}: sending {len(requests):,} requests (run {run_id})")
            live = run_live(
                client,
                settings,
                requests,
                strategy,
                run_id,
                wait=True,
                meta=dict(meta or {}),
                progress=progress,
                timeout_s=timeout_s,
            )
        finally:
            with shielded():
                cluster.stop()
                # Best effort: on a terminal's Ctrl-C an embedded redis-server (in our process
                # group) may already be gone; the workers are stopped whatever happens.
                with contextlib.suppress(redis.RedisError):
                    drop_queued_jobs(client, run_id, cluster.workers)
                    clear_routing_state(client, prefix)
        wall = time.perf_counter() - started
        comparison.runs.append(StrategyRun(strategy, run_id, live.results, wall, live.engine_stats))
        done = sum(r.status.value == "completed" for r in live.results)
        status(f"{label}: {done:,}/{len(requests):,} completed in {wall:.1f} s")
    return comparison


def comparison_meta(
    settings: Settings,
    workload_meta: Mapping[str, Any],
    workload_args: Mapping[str, Any],
    redis_description: str,
) -> dict[str, Any]:
    """Run metadata of a live comparison: the workload and everything that shaped the GPUs."""
    preset = settings.gpu_preset()
    return {
        **workload_meta,
        "mode": "live",
        "workload_args": dict(workload_args),
        "preset": preset.name,
        "num_blocks": preset.num_blocks,
        "max_context_tokens": preset.max_context_tokens,
        "time_scale": settings.time_scale,
        **settings.engine_config().describe(preset),
        "latency": {
            "prefill_base_ms": settings.prefill_base_ms,
            "prefill_per_block_ms": settings.prefill_per_block_ms,
            "decode_per_token_ms": settings.decode_per_token_ms,
        },
        "hash_seed": settings.hash_seed,
        "decode_model": settings.decode_model,
        "key_prefix": settings.key_prefix,
        "redis": redis_description,
    }

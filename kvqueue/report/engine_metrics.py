"""Engine-level metrics of one run (one strategy): what the workers' engines did, step by step.

From each worker's `kvqueue.gpu.engine_stats.EngineStats`, over all workers of the run. The
simulator records them, and so do live batched workers (`kvqueue.live.engine_log`); a live
run of sequential workers has its stats rebuilt from its results (`sequential_stats`: one
request at a time, so a worker's steps and KV usage follow from each result — the request's
blocks pinned from start to finish — but not its per-step token gaps, so it has no ITL):

- **mean batch size** = requests scheduled summed over steps / steps (a step is one forward
  pass; the sequential engine's steps hold one request each);
- **steps**, **preemptions** (counted by the engines), **busy fraction** = Σ step time /
  (workers × span), span = the last recorded time;
- **ITL** (inter-token latency) mean, p50, p90, p99 over every output token after a
  request's first, pooled over requests: each token counts once (weighted percentiles,
  inverted-CDF method: the smallest gap with at least that share of tokens at or below it);
- **KV usage over time**: per worker the fraction of KV blocks pinned by running requests
  (evictable cached blocks count as free, vLLM's ``kv_cache_usage_perc``), a step function
  of time; its time-weighted mean and maximum over workers and the span, and a timeline on
  `TIMELINE_POINTS` evenly spaced times (the value in force at each) per worker and averaged.

Every value is a plain int, float, list or dict, ready for JSON; with no stats, None.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from kvqueue.gpu.engine_stats import EngineStats
from kvqueue.gpu.hashing import BLOCK_SIZE
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.metrics import PERCENTILES, ratio

TIMELINE_POINTS = 200


def weighted_stats(values: np.ndarray, weights: np.ndarray) -> dict[str, float | None]:
    """``{mean, p50, p90, p99}`` of `values` weighted by `weights` (inverted-CDF percentiles)."""
    total = float(weights.sum()) if weights.size else 0.0
    if not total:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    order = np.argsort(values, kind="stable")
    values, weights = values[order], weights[order]
    cumulative = np.cumsum(weights)
    stats: dict[str, float | None] = {"mean": float(np.dot(values, weights) / total)}
    for p in PERCENTILES:
        index = int(np.searchsorted(cumulative, p / 100.0 * total, side="left"))
        stats[f"p{p}"] = float(values[min(index, values.size - 1)])
    return stats


def inter_token_gaps(stats: EngineStats) -> tuple[np.ndarray, np.ndarray]:
    """Every recorded gap value and its weight (series expanded, one value per step)."""
    values = [np.asarray(stats.gap_values, dtype=float)]
    weights = [np.asarray(stats.gap_weights, dtype=float)]
    for first, growth, count, weight in stats.gap_series:
        values.append(first + growth * np.arange(count, dtype=float))
        weights.append(np.full(count, float(weight)))
    return np.concatenate(values), np.concatenate(weights)


def _usage_at(samples: list[tuple[float, float]], times: np.ndarray) -> np.ndarray:
    """The step function of `samples` at `times` (0 before the first sample)."""
    if not samples:
        return np.zeros_like(times)
    at = np.asarray([t for t, _ in samples])
    usage = np.concatenate([[0.0], [u for _, u in samples]])
    return usage[np.searchsorted(at, times, side="right")]


def _time_weighted_mean(samples: list[tuple[float, float]], end: float) -> float:
    if not samples or end <= 0:
        return 0.0
    at = np.asarray([t for t, _ in samples] + [end])
    usage = np.asarray([u for _, u in samples])
    spans = np.clip(np.diff(at), 0.0, None)
    return float(np.dot(usage, spans) / end)


def sequential_stats(results: Iterable[RequestResult]) -> dict[str, EngineStats]:
    """Per worker, the `EngineStats` a sequential engine recorded serving `results` (module
    docstring): a prefill step and a step per output token, at batch 1, busy for the
    request's service time; KV usage = the request's blocks (prompt and output, ⌈tokens /
    16⌉) over the cache's from its start to its finish, 0 between requests."""
    by_worker: dict[str, list[RequestResult]] = {}
    for r in results:
        if r.status == RequestStatus.COMPLETED and r.worker and r.cache_capacity_blocks:
            by_worker.setdefault(r.worker, []).append(r)
    stats: dict[str, EngineStats] = {}
    for worker, served in by_worker.items():
        recorded = stats[worker] = EngineStats()
        for r in sorted(served, key=lambda r: r.start_ms):
            recorded.record_steps(1 + r.decode_tokens, 1, r.prefill_ms + r.decode_ms)
            blocks = math.ceil((r.num_prompt_tokens + r.decode_tokens) / BLOCK_SIZE)
            recorded.record_kv_usage(r.start_ms, blocks / r.cache_capacity_blocks)
            recorded.record_kv_usage(r.finish_ms, 0.0)
    return stats


def summarize_engines(stats_by_worker: Mapping[str, EngineStats]) -> dict[str, Any] | None:
    """The run's engine metrics (module docstring); None without stats."""
    if not stats_by_worker:
        return None
    workers = sorted(stats_by_worker)
    stats = [stats_by_worker[w] for w in workers]
    steps = sum(s.num_steps for s in stats)
    span = max([t for s in stats for t, _ in s.kv_usage[-1:]] or [0.0])
    gaps = [inter_token_gaps(s) for s in stats]
    values = np.concatenate([v for v, _ in gaps])
    weights = np.concatenate([w for _, w in gaps])
    times = np.linspace(0.0, span, TIMELINE_POINTS) if span > 0 else np.zeros(1)
    per_worker = {w: _usage_at(s.kv_usage, times) for w, s in zip(workers, stats, strict=True)}
    means = [_time_weighted_mean(s.kv_usage, span) for s in stats]
    return {
        "num_steps": steps,
        "mean_batch_size": ratio(sum(s.num_scheduled for s in stats), steps),
        "preemptions": sum(s.num_preemptions for s in stats),
        "busy_fraction": ratio(sum(s.busy_ms for s in stats), span * len(stats)),
        "itl_ms": weighted_stats(values, weights),
        "kv_usage": {
            "mean": float(np.mean(means)),
            "max": max((u for s in stats for _, u in s.kv_usage), default=0.0),
            "timeline": {
                "t_ms": [float(t) for t in times],
                "mean": [float(u) for u in np.mean(list(per_worker.values()), axis=0)],
                "per_worker": {w: [float(u) for u in v] for w, v in per_worker.items()},
            },
        },
    }

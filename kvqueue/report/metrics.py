"""Aggregate metrics of one run (one strategy) from its per-request results.

Definitions (times in simulated milliseconds):

- **hit rate** (block-weighted) = Σ hit_blocks / Σ num_blocks over completed requests;
  **token hit rate** = Σ hit tokens (16 × hit_blocks) / Σ prompt tokens over completed
  requests — lower than the block rate because partial last blocks never hit.
- **latency stats** of queue wait, prefill, decode, TTFT and end-to-end: mean, p50, p90, p99
  (``numpy.percentile``, linear interpolation) over completed requests; **TPOT** (time per
  output token, (e2e − TTFT) / (output tokens − 1) as the engines record it in
  `RequestResult.tpot_ms`) the same over the completed requests that have one.
- **makespan** = last `finish_ms` − first `arrival_ms` over completed requests;
  **throughput** = completed requests per second of makespan (and output tokens per second).
- **per worker**: completed requests, their prompt tokens, blocks and hit blocks, output
  tokens, and rejected/failed counts. Every worker in `workers` appears, idle ones with zeros.
- **imbalance** of completed requests per worker over `workers` ∪ workers seen in the results:
  max / mean and coefficient of variation (population std / mean).
- counts: completed, rejected, failed, evictions and preemptions (Σ over all results),
  decode sources.

A ratio or statistic with nothing to measure (no completed requests, no blocks, zero makespan,
no workers) is ``None``; counts are 0. Every value is a plain int, float, str, None, list or
dict, ready for JSON.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus

PERCENTILES = (50, 90, 99)
LATENCY_FIELDS = ("queue_wait_ms", "prefill_ms", "decode_ms", "ttft_ms", "e2e_ms")


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, or None when the denominator is 0."""
    return numerator / denominator if denominator else None


def latency_stats(values: Sequence[float]) -> dict[str, float | None]:
    """``{mean, p50, p90, p99}`` of `values`; all None when there are none."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    array = np.asarray(values, dtype=float)
    points = np.percentile(array, PERCENTILES)
    return {
        "mean": float(array.mean()),
        **{f"p{p}": float(v) for p, v in zip(PERCENTILES, points, strict=True)},
    }


def completed(results: Iterable[RequestResult]) -> list[RequestResult]:
    return [r for r in results if r.status == RequestStatus.COMPLETED]


def hit_rates(done: Sequence[RequestResult]) -> dict[str, float | None]:
    """Block- and token-weighted hit rates of completed results."""
    return {
        "hit_rate": ratio(sum(r.hit_blocks for r in done), sum(r.num_blocks for r in done)),
        "token_hit_rate": ratio(
            sum(r.hit_tokens for r in done), sum(r.num_prompt_tokens for r in done)
        ),
    }


def makespan_ms(done: Sequence[RequestResult]) -> float:
    """Last finish − first arrival of completed results (0 when there are none)."""
    if not done:
        return 0.0
    return max(r.finish_ms for r in done) - min(r.arrival_ms for r in done)


def throughput(done: Sequence[RequestResult]) -> dict[str, float | None]:
    span_s = makespan_ms(done) / 1000.0
    return {
        "makespan_ms": makespan_ms(done),
        "throughput_rps": ratio(len(done), span_s),
        "output_tokens_per_s": ratio(sum(r.decode_tokens for r in done), span_s),
    }


def _empty_worker() -> dict[str, int]:
    return {
        "requests": 0,
        "prompt_tokens": 0,
        "num_blocks": 0,
        "hit_blocks": 0,
        "decode_tokens": 0,
        "rejected": 0,
        "failed": 0,
    }


def per_worker(
    results: Iterable[RequestResult], workers: Iterable[str] = ()
) -> dict[str, dict[str, int]]:
    """Per-worker totals (completed requests' load, plus rejected/failed counts), sorted by name.

    Results with an empty `worker` (never routed) are left out.
    """
    table = {w: _empty_worker() for w in workers}
    for r in results:
        if not r.worker:
            continue
        row = table.setdefault(r.worker, _empty_worker())
        if r.status == RequestStatus.COMPLETED:
            row["requests"] += 1
            row["prompt_tokens"] += r.num_prompt_tokens
            row["num_blocks"] += r.num_blocks
            row["hit_blocks"] += r.hit_blocks
            row["decode_tokens"] += r.decode_tokens
        else:
            row[r.status.value] += 1
    return dict(sorted(table.items()))


def imbalance(counts: Sequence[int]) -> dict[str, float | None]:
    """max/mean and CV (population std / mean) of per-worker counts; None if undefined."""
    if not counts or not any(counts):
        return {"max_over_mean": None, "cv": None}
    array = np.asarray(counts, dtype=float)
    mean = float(array.mean())
    return {"max_over_mean": float(array.max()) / mean, "cv": float(array.std()) / mean}


def status_counts(results: Sequence[RequestResult]) -> dict[str, int]:
    counts = Counter(r.status for r in results)
    return {status.value: counts.get(status, 0) for status in RequestStatus}


def summarize(results: Sequence[RequestResult], workers: Iterable[str] | None = None) -> dict:
    """The run's aggregates as a JSON-ready dict (definitions in the module docstring).

    Keys: num_results, completed, rejected, failed, hit_rate, token_hit_rate, hit_blocks,
    num_blocks, prompt_tokens, queue_wait_ms, prefill_ms, decode_ms, ttft_ms, e2e_ms, tpot_ms
    (each {mean, p50, p90, p99}), makespan_ms, throughput_rps, output_tokens_per_s, evictions,
    preemptions, decode_sources, per_worker, imbalance. An empty `results` gives zero counts,
    None ratios.
    """
    done = completed(results)
    workers_table = per_worker(results, workers or ())
    summary: dict[str, Any] = {"num_results": len(results), **status_counts(results)}
    summary.update(hit_rates(done))
    summary["hit_blocks"] = sum(r.hit_blocks for r in done)
    summary["num_blocks"] = sum(r.num_blocks for r in done)
    summary["prompt_tokens"] = sum(r.num_prompt_tokens for r in done)
    for name in LATENCY_FIELDS:
        summary[name] = latency_stats([getattr(r, name) for r in done])
    summary.update(throughput(done))
    summary["tpot_ms"] = latency_stats([r.tpot_ms for r in done if r.tpot_ms is not None])
    summary["evictions"] = sum(r.evictions for r in results)
    summary["preemptions"] = sum(r.preemptions for r in results)
    summary["decode_sources"] = dict(sorted(Counter(r.decode_source for r in done).items()))
    summary["per_worker"] = workers_table
    summary["imbalance"] = imbalance([row["requests"] for row in workers_table.values()])
    return summary


def ideal_hit_rate(requests: Iterable[Request]) -> float | None:
    """Block hit rate of one infinite cache shared by all workers, in arrival order.

    Requests are taken by `arrival_ms` (ties in list order); a block hits if any earlier
    request had it. With chained hashes "seen before" means "same block at the same position
    after the same prefix", and the hits of a request form a leading run. None if no blocks.
    """
    seen: set[bytes] = set()
    hits = total = 0
    for request in sorted(requests, key=lambda r: r.arrival_ms):
        num_seen = len(seen)
        seen.update(request.block_hashes)  # one pass in C; the growth is the new blocks
        num_blocks = len(request.block_hashes)
        hits += num_blocks - (len(seen) - num_seen)
        total += num_blocks
    return ratio(hits, total)

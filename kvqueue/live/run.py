"""One live run: send a workload through the pipeline and (optionally) wait for every result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.gpu.engine_stats import EngineStats
from kvqueue.gpu.presets import get_preset
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.live.engine_log import read_engine_stats
from kvqueue.live.producer import Producer, SentRun
from kvqueue.live.recovery import RecoveryStats
from kvqueue.live.runs import read_results
from kvqueue.live.waiting import wait_for_results
from kvqueue.progress import progress_reporter
from kvqueue.workloads.fit_advice import unfit_warning
from kvqueue.workloads.traces import fits_report


@dataclass(frozen=True, slots=True)
class LiveRun:
    """A run as sent, and (when waited for) its results: one per request of the run, and
    what the workers' engines recorded of it (batched workers; {} otherwise)."""

    sent: SentRun
    workers: list[str]
    results: list[RequestResult]
    recovery: RecoveryStats = field(default_factory=RecoveryStats)
    engine_stats: dict[str, EngineStats] = field(default_factory=dict)


def run_live(
    client: redis.Redis,
    settings: Settings,
    requests: Sequence[Request],
    strategy: str | None = None,
    run_id: str | None = None,
    wait: bool = True,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    timeout_s: float = 600.0,
) -> LiveRun:
    """Send `requests`; with `wait`, block until each has a result (failed ones included)."""
    producer = Producer(client, settings, strategy, run_id)
    workers = producer.require_workers()
    producer.start_run(requests, meta)  # before any progress bar: a refusal is one line
    label = producer.strategy
    with progress_reporter(len(requests), f"{label} sent", progress) as advance:
        sent = producer.send(requests, meta, on_sent=lambda: advance(1))
    if not wait:
        return LiveRun(sent, workers, [], producer.recovery.stats)
    with progress_reporter(len(requests), f"{label} done", progress) as advance:
        reported = [0]

        def on_progress(num_done: int) -> None:
            advance(num_done - reported[0])
            reported[0] = num_done

        wait_for_results(
            client,
            sent.run_id,
            sent.job_ids,
            settings.key_prefix,
            timeout_s=timeout_s,
            on_progress=on_progress,
            recovery=producer.recovery,
            run_ttl_s=settings.run_ttl_s,
            strategy=sent.strategy,
        )
    results, _ = read_results(client, sent.run_id, settings.key_prefix)
    return LiveRun(
        sent,
        workers,
        _one_each(results, requests, sent),
        producer.recovery.stats,
        read_engine_stats(client, sent.run_id, settings.key_prefix),
    )


def _one_each(
    results: list[RequestResult], requests: Sequence[Request], sent: SentRun
) -> list[RequestResult]:
    """Exactly one result per request of the run, in request order: the first in the stream,
    or a `failed` one if the stream has none (e.g. Redis lost it)."""
    seen: dict[str, RequestResult] = {}
    for result in results:
        seen.setdefault(result.request_id, result)
    return [
        seen.get(r.request_id)
        or RequestResult(
            r.request_id,
            sent.run_id,
            "",
            sent.strategy,
            RequestStatus.FAILED,
            "no result recorded in Redis",
        )
        for r in requests
    ]


def fit_warning(
    client: redis.Redis, settings: Settings, requests: Sequence[Request], workers: Sequence[str]
) -> str | None:
    """A warning naming the requests the live workers' GPUs can never serve, or None.

    Uses the smallest capacity and context the workers registered (`kvq:worker:<w>:info`);
    those requests are still part of the run and end as `rejected` results with the reason.
    """
    infos = [client.hgetall(keys.worker_info(w, settings.key_prefix)) for w in workers]
    limits = [
        (int(info[b"capacity_blocks"]), int(info[b"max_context_tokens"]), info[b"preset"].decode())
        for info in infos
        if b"capacity_blocks" in info and b"max_context_tokens" in info
    ]
    if not limits:
        return None
    num_blocks, max_context, preset = min(limits)
    fit = fits_report(requests, max_context, num_blocks)
    return unfit_warning(fit, get_preset(preset, num_blocks, max_context), requests)

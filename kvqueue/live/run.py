"""One live run: send a workload through the pipeline and (optionally) wait for every result."""

from __future__ import annotations

import logging
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
from kvqueue.live.caches import reset_caches as clear_worker_caches
from kvqueue.live.caches import warm_blocks, warm_cache_warning
from kvqueue.live.connection import check_access
from kvqueue.live.engine_log import read_engine_stats
from kvqueue.live.producer import Producer, SentRun
from kvqueue.live.recovery import RecoveryStats
from kvqueue.live.runs import read_results
from kvqueue.live.waiting import wait_for_results
from kvqueue.progress import progress_reporter
from kvqueue.workloads.fit_advice import unfit_warning
from kvqueue.workloads.traces import fits_report

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LiveRun:
    """A run as sent, and (when waited for) its results: one per request of the run, and
    what the workers' engines recorded of it (batched workers; {} otherwise)."""

    sent: SentRun
    workers: list[str]
    results: list[RequestResult]
    recovery: RecoveryStats = field(default_factory=RecoveryStats)
    engine_stats: dict[str, EngineStats] = field(default_factory=dict)
    warm_blocks: dict[str, int] = field(default_factory=dict)  # cached per worker at the start


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
    reset_caches: bool = False,
) -> LiveRun:
    """Send `requests`; with `wait`, block until each has a result (failed ones included).

    With `reset_caches` every live worker first empties its cache and announces `cleared`
    (`kvqueue.live.caches`); without it a run that starts on warm caches logs a warning
    naming how many blocks they hold. The run's metadata records both
    (``cached_blocks_at_start``, ``caches_reset``).
    """
    producer = Producer(client, settings, strategy, run_id)
    workers = producer.require_workers()
    if reset_caches:
        check_access(client, settings.redis_url, settings.key_prefix)  # before any write
        cleared = clear_worker_caches(client, workers, timeout_s)
        log.info(
            "cleared %s cached blocks on %d workers", f"{sum(cleared.values()):,}", len(workers)
        )
    warm = warm_blocks(client, workers, settings.key_prefix)
    meta = {
        **(meta or {}),
        "cached_blocks_at_start": sum(warm.values()),
        "caches_reset": reset_caches,
    }
    producer.start_run(requests, meta)  # before any progress bar: a refusal is one line
    warning = warm_cache_warning(warm, producer.run_id)
    if warning:
        log.warning(warning)
    label = producer.strategy
    with progress_reporter(len(requests), f"{label} sent", progress) as advance:
        sent = producer.send(requests, meta, on_sent=lambda: advance(1))
    if not wait:
        return LiveRun(sent, workers, [], producer.recovery.stats, warm_blocks=warm)
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
        warm,
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

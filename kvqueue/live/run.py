"""One live run: send a workload through the pipeline and (optionally) wait for every result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from tqdm import tqdm

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.metrics import summarize
from kvqueue.producer import Producer, SentRun
from kvqueue.request import Request
from kvqueue.results import RequestResult
from kvqueue.runs import read_results, wait_for_results
from kvqueue.traces import fits_report


@dataclass(frozen=True, slots=True)
class LiveRun:
    sent: SentRun
    workers: list[str]
    results: list[RequestResult]

    def summary(self) -> dict[str, Any]:
        return {"run_id": self.sent.run_id, "strategy": self.sent.strategy} | summarize(
            self.results, self.workers
        )


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
    label = f"{producer.strategy:>14}"
    with tqdm(total=len(requests), desc=f"{label} sent", disable=not progress, leave=False) as bar:
        sent = producer.send(requests, meta, on_sent=lambda: bar.update(1))
    if not wait:
        return LiveRun(sent, workers, [])
    with tqdm(total=len(requests), desc=f"{label} done", disable=not progress, leave=False) as bar:
        wait_for_results(
            client,
            sent.run_id,
            sent.job_ids,
            settings.key_prefix,
            timeout_s=timeout_s,
            on_progress=lambda n: bar.update(n - bar.n),
        )
    results, _ = read_results(client, sent.run_id, settings.key_prefix)
    return LiveRun(sent, workers, _dedupe(results))


def _dedupe(results: list[RequestResult]) -> list[RequestResult]:
    seen: dict[str, RequestResult] = {}
    for result in results:
        seen.setdefault(result.request_id, result)
    return list(seen.values())


def format_summary(summary: dict[str, Any]) -> str:
    """A short terminal table of one run."""

    def ms(stats: dict[str, Any], key: str) -> str:
        value = stats.get(key)
        return "-" if value is None else f"{value:,.0f}"

    hit = summary.get("hit_rate")
    ttft = summary["ttft_ms"]
    e2e = summary["e2e_ms"]
    lines = [
        f"run {summary['run_id']}  strategy {summary['strategy']}",
        f"  completed {summary['completed']}  rejected {summary['rejected']}  "
        f"failed {summary['failed']}  hit rate {'-' if hit is None else f'{hit:.1%}'}",
        f"  TTFT ms  mean {ms(ttft, 'mean')}  p50 {ms(ttft, 'p50')}  p90 {ms(ttft, 'p90')}  "
        f"p99 {ms(ttft, 'p99')}",
        f"  e2e ms   mean {ms(e2e, 'mean')}  p50 {ms(e2e, 'p50')}  p99 {ms(e2e, 'p99')}",
        "  per worker: "
        + ", ".join(f"{w} {row['requests']}" for w, row in summary["per_worker"].items()),
    ]
    return "\n".join(lines)


def fit_warning(
    client: redis.Redis, settings: Settings, requests: Sequence[Request], workers: Sequence[str]
) -> str | None:
    """A warning naming the requests the live workers' GPUs can never serve, or None.

    Uses the smallest capacity and context the workers registered (`kvq:worker:<w>:info`);
    those requests are still sent and end as `rejected` results with the reason.
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
    if not fit.num_unfit:
        return None
    examples = "; ".join(f"{rid}: {reason}" for rid, reason in fit.examples[:2])
    return (
        f"{fit.num_unfit:,} of {fit.num_requests:,} requests cannot fit {preset} "
        f"({num_blocks:,} blocks, {max_context:,}-token context) and will end as rejected; "
        f"e.g. {examples}"
    )

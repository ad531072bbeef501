"""The summary of one live run, as `producer/send.py` prints it (a table or one JSON object)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from kvqueue.gpu.results import RequestStatus
from kvqueue.live.run import LiveRun
from kvqueue.report.engine_metrics import sequential_stats, summarize_engines
from kvqueue.report.metrics import summarize
from kvqueue.report.units import format_count, format_duration, format_share

NUM_REASONS = 3


def run_summary(run: LiveRun) -> dict[str, Any]:
    """Run id, strategy, `sent`, `summarize` of the run's results over its workers, what the
    engines did (`summarize_engines`: batched workers record it; a sequential worker's is
    rebuilt from its results, `sequential_stats`) and what recovery did.
    ``sent == completed + rejected + failed`` (one result per request)."""
    failures = Counter(r.reason for r in run.results if r.status is RequestStatus.FAILED)
    return (
        {"run_id": run.sent.run_id, "strategy": run.sent.strategy, "sent": len(run.results)}
        | summarize(run.results, run.workers)
        | {
            "engine": summarize_engines(run.engine_stats or sequential_stats(run.results)),
            "failure_reasons": dict(failures.most_common(NUM_REASONS)),
            "rerouted": run.recovery.rerouted,
            "dead_workers": list(run.recovery.dead_workers),
        }
    )


def format_summary(summary: dict[str, Any]) -> str:
    """A short terminal table of one run."""

    def ms(stats: dict[str, Any], key: str) -> str:
        return format_duration(stats.get(key))

    hit = summary.get("hit_rate")
    ttft = summary["ttft_ms"]
    e2e = summary["e2e_ms"]
    lines = [
        f"run {summary['run_id']}  strategy {summary['strategy']}",
        f"  sent {format_count(summary['sent'])}  completed {format_count(summary['completed'])}  "
        f"rejected {format_count(summary['rejected'])}  failed {format_count(summary['failed'])}  "
        f"hit rate {format_share(hit)}",
        f"  TTFT  mean {ms(ttft, 'mean')}  p50 {ms(ttft, 'p50')}  p90 {ms(ttft, 'p90')}  "
        f"p99 {ms(ttft, 'p99')}",
        f"  e2e   mean {ms(e2e, 'mean')}  p50 {ms(e2e, 'p50')}  p99 {ms(e2e, 'p99')}",
        "  per worker: "
        + ", ".join(
            f"{w} {format_count(row['requests'])}" for w, row in summary["per_worker"].items()
        ),
    ]
    engine = summary.get("engine")
    if engine:
        itl = engine["itl_ms"]
        batch = engine["mean_batch_size"]
        lines.append(
            f"  engine   mean batch {'-' if batch is None else f'{batch:.2f}'}  steps "
            f"{engine['num_steps']:,}  preemptions {engine['preemptions']}  ITL ms mean "
            f"{ms(itl, 'mean')}  p99 {ms(itl, 'p99')}"
        )
    if summary.get("dead_workers"):
        lines.append(
            f"  dead workers: {', '.join(summary['dead_workers'])}  "
            f"rerouted {format_count(summary['rerouted'])}"
        )
    for reason, count in summary.get("failure_reasons", {}).items():
        lines.append(f"  failed ×{count}: {reason}")
    return "\n".join(lines)

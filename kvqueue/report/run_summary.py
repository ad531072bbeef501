"""The summary of one live run, as `producer/send.py` prints it (a table or one JSON object)."""

from __future__ import annotations

from typing import Any

from kvqueue.live.run import LiveRun
from kvqueue.report.metrics import summarize
from kvqueue.report.units import format_count, format_duration, format_share


def run_summary(run: LiveRun) -> dict[str, Any]:
    """Run id, strategy and `summarize` of the run's results over its workers."""
    return {"run_id": run.sent.run_id, "strategy": run.sent.strategy} | summarize(
        run.results, run.workers
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
        f"  completed {format_count(summary['completed'])}  rejected "
        f"{format_count(summary['rejected'])}  failed {format_count(summary['failed'])}  "
        f"hit rate {format_share(hit)}",
        f"  TTFT  mean {ms(ttft, 'mean')}  p50 {ms(ttft, 'p50')}  p90 {ms(ttft, 'p90')}  "
        f"p99 {ms(ttft, 'p99')}",
        f"  e2e   mean {ms(e2e, 'mean')}  p50 {ms(e2e, 'p50')}  p99 {ms(e2e, 'p99')}",
        "  per worker: "
        + ", ".join(
            f"{w} {format_count(row['requests'])}" for w, row in summary["per_worker"].items()
        ),
    ]
    return "\n".join(lines)

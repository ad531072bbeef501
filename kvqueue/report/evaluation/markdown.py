"""The evaluation's markdown report: the workloads table, one table per workload, a verdict.

The markdown keeps whatever stands between the discussion markers of an existing file, so a
written analysis survives regeneration; everything else is generated.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from pathlib import Path

from kvqueue.gpu.latency import LatencyModel
from kvqueue.report.evaluation.figure import plot_p99_vs_hit
from kvqueue.report.evaluation.rows import PolicyRow, WorkloadReport
from kvqueue.report.evaluation.suite import COMMAND, FIGURE_SUFFIX, HIGHLIGHT, NUM_WORKERS
from kvqueue.routing.policies import POLICIES, policy_names

DISCUSSION_START = "<!-- discussion:start -->"
DISCUSSION_END = "<!-- discussion:end -->"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _s(value_ms: float | None) -> str:
    if value_ms is None:
        return "–"
    seconds = value_ms / 1000.0
    return f"{seconds:.2f}" if seconds < 10 else f"{seconds:,.1f}"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _best(rows: Sequence[PolicyRow], field: str, highest: bool = False) -> set[str]:
    values = [getattr(r, field) for r in rows if getattr(r, field) is not None]
    if not values:
        return set()
    target = max(values) if highest else min(values)
    return {r.policy for r in rows if getattr(r, field) is not None and
            math.isclose(getattr(r, field), target, rel_tol=1e-9)}  # fmt: skip


TABLE_HEADER = (
    "| policy | hit rate | TTFT mean (s) | TTFT p90 (s) | TTFT p99 (s) | e2e mean (s) "
    "| imbalance | ideal hit rate | matched, lost |\n"
    "|---|--:|--:|--:|--:|--:|--:|--:|--:|"
)


def workload_table(report: WorkloadReport) -> str:
    """The workload's table; the best value of each TTFT column and the top hit rate in bold."""
    bold = {
        "hit_rate": _best(report.rows, "hit_rate", highest=True),
        "ttft_mean_ms": _best(report.rows, "ttft_mean_ms"),
        "ttft_p90_ms": _best(report.rows, "ttft_p90_ms"),
        "ttft_p99_ms": _best(report.rows, "ttft_p99_ms"),
        "e2e_mean_ms": _best(report.rows, "e2e_mean_ms"),
    }

    def cell(row: PolicyRow, field: str, text: str) -> str:
        return f"**{text}**" if row.policy in bold.get(field, ()) else text

    lines = [TABLE_HEADER]
    for r in report.rows:
        name = f"**{r.policy}**" if r.policy == HIGHLIGHT else r.policy
        lines.append(
            f"| {name} | {cell(r, 'hit_rate', _pct(r.hit_rate))} "
            f"| {cell(r, 'ttft_mean_ms', _s(r.ttft_mean_ms))} "
            f"| {cell(r, 'ttft_p90_ms', _s(r.ttft_p90_ms))} "
            f"| {cell(r, 'ttft_p99_ms', _s(r.ttft_p99_ms))} "
            f"| {cell(r, 'e2e_mean_ms', _s(r.e2e_mean_ms))} "
            f"| {_x(r.imbalance)} | {_pct(r.ideal_hit_rate)} | {_pct(r.lost_match)} |"
        )
    return "\n".join(lines)


def verdict(report: WorkloadReport, policy: str = HIGHLIGHT) -> str:
    """Where `policy` ranks on mean and p99 TTFT, against the best other policy."""
    mine = next((r for r in report.rows if r.policy == policy), None)
    others = [r for r in report.rows if r.policy != policy]
    if mine is None or not others:
        return ""
    parts = []
    for field, label in (("ttft_mean_ms", "mean TTFT"), ("ttft_p99_ms", "p99 TTFT")):
        best = min(others, key=lambda r: getattr(r, field) or math.inf)
        own, theirs = getattr(mine, field), getattr(best, field)
        if own is None or theirs is None:
            continue
        change = (own - theirs) / theirs if theirs else 0.0
        if math.isclose(own, theirs, rel_tol=1e-3):
            parts.append(f"tied best {label} with {best.policy}")
        elif own < theirs:
            parts.append(f"best {label} ({_signed(change)} vs next best, {best.policy})")
        else:
            rank = 1 + sum(getattr(r, field) < own for r in others if getattr(r, field))
            parts.append(f"{label} #{rank}, {_signed(change)} vs {best.policy}")
    return f"`{policy}`: " + "; ".join(parts) + "."


def _signed(change: float) -> str:
    return f"{100 * change:+.1f}%"


def policy_parameters() -> str:
    """Each policy's constructor defaults and the first line of its docstring."""
    lines = ["| policy | parameters (defaults) | rule |", "|---|---|---|"]
    for name in policy_names():
        cls = POLICIES[name]
        params = [
            f"`{p.name}={p.default!r}`"
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.default is not inspect.Parameter.empty
            and p.name != "latency"
        ]  # fmt: skip
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        lines.append(f"| `{name}` | {', '.join(params) or '–'} | {doc} |")
    return "\n".join(lines)


def workloads_table(reports: Sequence[WorkloadReport]) -> str:
    lines = [
        "| workload | requests | preset (blocks) | cold service S | utilization "
        "| rate (req/s) | trace stretch | ideal hit rate |",
        "|---|--:|---|--:|--:|--:|--:|--:|",
    ]
    for r in reports:
        stretch = "–" if r.arrival_scale is None else f"×{r.arrival_scale:.2f}"
        lines.append(
            f"| {r.key} | {r.num_requests:,} | {r.preset} ({r.num_blocks:,}) "
            f"| {r.cold_service_ms / 1000:.2f} s | {100 * r.utilization:.0f}% "
            f"| {r.rate_rps:.3f} | {stretch} | {_pct(r.ideal_hit_rate)} |"
        )
    return "\n".join(lines)


def render_markdown(
    reports: Sequence[WorkloadReport],
    figure_name: str,
    latency: LatencyModel,
    discussion: str,
    wall_s: float,
    jobs: int,
) -> str:
    out = [
        "# Routing policies side by side",
        "",
        "```",
        COMMAND,
        "```",
        "",
        "Generated by the command above (also `python analysis/policies.py`; logic in "
        "`kvqueue/report/evaluation/`): every registered policy on every workload of the suite, "
        f"in the virtual-time simulator, {NUM_WORKERS} workers, fresh caches per run, fixed "
        f"seeds. Latency model: prefill = {latency.prefill_base_ms:g} + "
        f"{latency.prefill_per_block_ms:g} ms × blocks computed, decode = "
        f"{latency.decode_per_token_ms:g} ms × output tokens, one request at a time per worker. "
        f"This run took {wall_s:.0f} s on {jobs} process{'es' if jobs > 1 else ''}.",
        "",
        "## Workloads and how hard they arrive",
        "",
        "Load is set against the *cold* mean service time `S` (every block computed, the "
        "declared output decoded): capacity = workers / S, rate = utilization × capacity. "
        "So 110% overloads a cluster that caches nothing, and every cache hit is headroom. "
        "Synthetic workloads arrive as a seeded Poisson process at that rate; traces keep "
        "their own arrival pattern, stretched by (trace rate / target rate). The ideal hit "
        "rate is that of one infinite cache shared by all workers, an upper bound.",
        "",
        workloads_table(reports),
        "",
        "## Results",
        "",
        "Times in simulated seconds; best of each column in bold. *imbalance* = max / mean "
        "completed requests per worker. *matched, lost* = share of the blocks the index "
        "matched at routing that were no longer cached when the request started (evicted "
        "while it queued, or a pending mark whose producer had not run).",
        "",
    ]
    for r in reports:
        out += [f"### {r.title}", "", r.source + ".", "", workload_table(r), "", verdict(r), ""]
    out += [
        "## p99 TTFT against hit rate",
        "",
        f"![p99 TTFT against hit rate, one panel per workload]({figure_name})",
        "",
        "## Policies and their parameters",
        "",
        policy_parameters(),
        "",
        "## Discussion",
        "",
        DISCUSSION_START,
        discussion.strip("\n"),
        DISCUSSION_END,
        "",
    ]
    return "\n".join(out)


def existing_discussion(path: Path) -> str:
    """The text between the discussion markers of an earlier report, or a stub."""
    if path.exists():
        text = path.read_text(encoding="utf-8")
        start, end = text.find(DISCUSSION_START), text.find(DISCUSSION_END)
        if 0 <= start < end:
            return text[start + len(DISCUSSION_START) : end].strip("\n")
    return "_No discussion yet: write it here; regeneration keeps it._"


def write_report(
    reports: Sequence[WorkloadReport],
    out: Path,
    latency: LatencyModel,
    wall_s: float,
    jobs: int,
) -> tuple[Path, Path]:
    """Write the markdown and its figure (``<stem>_p99_vs_hit.png`` beside it)."""
    figure = out.with_name(out.stem + FIGURE_SUFFIX)
    plot_p99_vs_hit(reports, figure)
    text = render_markdown(reports, figure.name, latency, existing_discussion(out), wall_s, jobs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out, figure

"""The evaluation's markdown report: per engine model, the workloads table, one table per
workload and a verdict; across engines, where the conclusions change.

The markdown keeps whatever stands between each pair of discussion markers of an existing
file (`DISCUSSIONS`), so a written analysis survives regeneration; everything else is
generated.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from pathlib import Path

from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.latency import LatencyModel
from kvqueue.report.evaluation.figure import plot_p99_vs_hit
from kvqueue.report.evaluation.index_modes import index_section
from kvqueue.report.evaluation.rows import EngineRun, PolicyRow, WorkloadReport
from kvqueue.report.evaluation.suite import (
    COMMAND,
    HIGHLIGHT,
    NUM_WORKERS,
    engine_title,
    figure_suffix,
)
from kvqueue.routing.policies import POLICIES, policy_names

DISCUSSION_START = "<!-- discussion:start -->"
DISCUSSION_END = "<!-- discussion:end -->"
ENGINES_DISCUSSION = "engines"  # the written comparison of the engine models
INDEX_DISCUSSION = "index"  # what the precise vs approximate tables show
UPSTREAM_DISCUSSION = "upstream"  # per policy: what matches its upstream, what cannot
DISCUSSIONS = ("", ENGINES_DISCUSSION, INDEX_DISCUSSION, UPSTREAM_DISCUSSION)  # "": the main one


def markers(name: str = "") -> tuple[str, str]:
    """The start and end markers of a named discussion block ("" is the main one)."""
    if not name:
        return DISCUSSION_START, DISCUSSION_END
    return f"<!-- discussion-{name}:start -->", f"<!-- discussion-{name}:end -->"


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
    "| policy | index | hit rate | TTFT mean (s) | TTFT p90 (s) | TTFT p99 (s) | e2e mean (s) "
    "| imbalance | ideal hit rate | matched, lost |\n"
    "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"
)
TPOT_TABLE_HEADER = (
    "| policy | index | hit rate | TTFT mean (s) | TTFT p90 (s) | TTFT p99 (s) | e2e mean (s) "
    "| TPOT p99 (ms) | imbalance | ideal hit rate | matched, lost |\n"
    "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
)


def _ms(value_ms: float | None) -> str:
    return "–" if value_ms is None else f"{value_ms:,.1f}"


def workload_table(report: WorkloadReport, with_tpot: bool = False) -> str:
    """The workload's table; the best value of each TTFT column and the top hit rate in bold.
    `with_tpot` adds the p99 time per output token (it varies only under batching)."""
    bold = {
        "hit_rate": _best(report.rows, "hit_rate", highest=True),
        "ttft_mean_ms": _best(report.rows, "ttft_mean_ms"),
        "ttft_p90_ms": _best(report.rows, "ttft_p90_ms"),
        "ttft_p99_ms": _best(report.rows, "ttft_p99_ms"),
        "e2e_mean_ms": _best(report.rows, "e2e_mean_ms"),
        "tpot_p99_ms": _best(report.rows, "tpot_p99_ms"),
    }

    def cell(row: PolicyRow, field: str, text: str) -> str:
        return f"**{text}**" if row.policy in bold.get(field, ()) else text

    lines = [TPOT_TABLE_HEADER if with_tpot else TABLE_HEADER]
    for r in report.rows:
        name = f"**{r.policy}**" if r.policy == HIGHLIGHT else r.policy
        tpot = f"| {cell(r, 'tpot_p99_ms', _ms(r.tpot_p99_ms))} " if with_tpot else ""
        lines.append(
            f"| {name} | {r.index_mode} | {cell(r, 'hit_rate', _pct(r.hit_rate))} "
            f"| {cell(r, 'ttft_mean_ms', _s(r.ttft_mean_ms))} "
            f"| {cell(r, 'ttft_p90_ms', _s(r.ttft_p90_ms))} "
            f"| {cell(r, 'ttft_p99_ms', _s(r.ttft_p99_ms))} "
            f"| {cell(r, 'e2e_mean_ms', _s(r.e2e_mean_ms))} "
            f"{tpot}| {_x(r.imbalance)} | {_pct(r.ideal_hit_rate)} | {_pct(r.lost_match)} |"
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
            and p.name not in ("latency", "engine")
        ]  # fmt: skip
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        lines.append(f"| `{name}` | {', '.join(params) or '–'} | {doc} |")
    return "\n".join(lines)


def workloads_table(reports: Sequence[WorkloadReport], batched: bool = False) -> str:
    """How hard each workload arrives: from the cold service time (sequential) or the measured
    cold capacity (batched)."""
    basis = "cold capacity (req/s)" if batched else "cold service S"
    lines = [
        f"| workload | requests | preset (blocks) | {basis} | utilization "
        "| rate (req/s) | trace stretch | ideal hit rate |",
        "|---|--:|---|--:|--:|--:|--:|--:|",
    ]
    for r in reports:
        stretch = "–" if r.arrival_scale is None else f"×{r.arrival_scale:.2f}"
        if batched or r.cold_service_ms is None:
            basis_cell = f"{r.capacity_rps:.3f}"
        else:
            basis_cell = f"{r.cold_service_ms / 1000:.2f} s"
        lines.append(
            f"| {r.key} | {r.num_requests:,} | {r.preset} ({r.num_blocks:,}) "
            f"| {basis_cell} | {100 * r.utilization:.0f}% "
            f"| {r.rate_rps:.3f} | {stretch} | {_pct(r.ideal_hit_rate)} |"
        )
    return "\n".join(lines)


def _engine_description(engine: EngineConfig, latency: LatencyModel) -> str:
    if not engine.is_batched and engine.latency == "seed":
        return (
            f"one request at a time per worker, FIFO; prefill = {latency.prefill_base_ms:g} + "
            f"{latency.prefill_per_block_ms:g} ms × blocks computed, decode = "
            f"{latency.decode_per_token_ms:g} ms × output tokens (the seed's model, the default)"
        )
    if not engine.is_batched:
        return "one request at a time per worker, each step priced by the preset's calibrated model"
    return (
        "continuous batching with vLLM's scheduler (chunked prefill, prefix hits at admission, "
        "preemption; `vllm serve` defaults: 2,048 batched tokens and 256 sequences per step, "
        "8,192 and 1,024 on an H100), every step priced by the preset's "
        f"{engine.latency} step model (`docs/latency.md`)"
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _load_note(engine: EngineConfig) -> str:
    if engine.is_batched:
        return (
            "A batched engine has no service time of its own, so load is set against its "
            "*measured* cold capacity: the workload's requests, made to share nothing (each "
            "one's block hashes re-keyed), all arriving at once on the 4 workers under round "
            "robin; capacity = completed requests / makespan, rate = utilization × capacity. "
            "Synthetic workloads arrive as a seeded Poisson process at that rate; traces keep "
            "their own arrival pattern, stretched by (trace rate / target rate)."
        )
    return (
        "Load is set against the *cold* mean service time `S` (every block computed, the "
        "declared output decoded): capacity = workers / S, rate = utilization × capacity. "
        "So 110% overloads a cluster that caches nothing, and every cache hit is headroom. "
        "Synthetic workloads arrive as a seeded Poisson process at that rate; traces keep "
        "their own arrival pattern, stretched by (trace rate / target rate). The ideal hit "
        "rate is that of one infinite cache shared by all workers, an upper bound."
    )


def _best_policy(report: WorkloadReport, field: str) -> str:
    best = _best(report.rows, field)
    return ", ".join(sorted(best)) if best else "–"


def _rank(report: WorkloadReport, policy: str, field: str) -> str:
    values = sorted(getattr(r, field) for r in report.rows if getattr(r, field) is not None)
    mine = next((getattr(r, field) for r in report.rows if r.policy == policy), None)
    if mine is None or not values:
        return "–"
    return f"#{1 + sum(v < mine and not math.isclose(v, mine, rel_tol=1e-9) for v in values)}"


def _ratio(report: WorkloadReport, field: str, over: str = "round_robin") -> str:
    rows = {r.policy: getattr(r, field) for r in report.rows}
    mine, theirs = rows.get("cache_aware"), rows.get(over)
    if not mine or not theirs:
        return "–"
    return f"{mine / theirs:.2f}"


def conclusions_table(runs: Sequence[EngineRun]) -> str:
    """Per workload, side by side for every engine model: the best mean and p99 TTFT, where
    `HIGHLIGHT` ranks on mean TTFT, and cache_aware's mean TTFT over round_robin's."""
    keys = [r.key for r in runs[0].reports]
    by_engine = [{r.key: r for r in run.reports} for run in runs]
    names = [f"{run.engine.engine}/{run.engine.latency}" for run in runs]
    header = ["workload"]
    for label in ("best mean TTFT", "best p99 TTFT", f"{HIGHLIGHT} (mean)", "cache_aware ÷ rr"):
        header += [f"{label}: {name}" for name in names]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for key in keys:
        reports = [reports.get(key) for reports in by_engine]
        if any(r is None for r in reports):
            continue
        cells = [key]
        cells += [_best_policy(r, "ttft_mean_ms") for r in reports]  # type: ignore[arg-type]
        cells += [_best_policy(r, "ttft_p99_ms") for r in reports]  # type: ignore[arg-type]
        cells += [_rank(r, HIGHLIGHT, "ttft_mean_ms") for r in reports]  # type: ignore[arg-type]
        cells += [_ratio(r, "ttft_mean_ms") for r in reports]  # type: ignore[arg-type]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _engine_section(run: EngineRun, latency: LatencyModel, jobs: int) -> list[str]:
    title = engine_title(run.engine)
    figure = f"policies{figure_suffix(run.engine)}"
    batched = run.engine.is_batched
    out = [
        f"## {title}",
        "",
        f"{_sentence(_engine_description(run.engine, latency))}. This part took "
        f"{run.wall_s:.0f} s on {jobs} process{'es' if jobs > 1 else ''}.",
        "",
        "### Workloads and how hard they arrive",
        "",
        _load_note(run.engine),
        "",
        workloads_table(run.reports, batched),
        "",
        "### Results",
        "",
        "Times in simulated seconds; best of each column in bold. *imbalance* = max / mean "
        "completed requests per worker. *matched, lost* = share of the blocks the index "
        "matched at routing that were no longer cached when the request started (evicted "
        "while it queued, or a pending mark whose producer had not run)."
        + (" *TPOT* = time per output token after the first." if batched else ""),
        "",
    ]
    for r in run.reports:
        out += [
            f"#### {r.title}",
            "",
            r.source + ".",
            "",
            workload_table(r, with_tpot=batched),
            "",
            verdict(r),
            "",
        ]
    out += [
        "### p99 TTFT against hit rate",
        "",
        f"![p99 TTFT against hit rate, one panel per workload ({title})]({figure})",
        "",
    ]
    return out


def _discussion(discussions: dict[str, str], name: str) -> list[str]:
    start, end = markers(name)
    return [start, discussions.get(name, _STUB).strip("\n"), end]


_STUB = "_No discussion yet: write it here; regeneration keeps it._"


def render_markdown(
    runs: Sequence[EngineRun],
    latency: LatencyModel,
    discussions: dict[str, str],
    jobs: int,
) -> str:
    """The whole report (module docstring); `discussions` maps a block name to its text."""
    engines = ", ".join(f"**{engine_title(run.engine).lower()}**" for run in runs)
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
        f"seeds, under each engine model: {engines}. The whole run took "
        f"{sum(run.wall_s for run in runs):.0f} s on {jobs} process{'es' if jobs > 1 else ''}.",
        "",
    ]
    if len(runs) > 1:
        out += [
            "## Where conclusions change",
            "",
            "Per workload and engine model: the policies with the best mean and p99 TTFT, "
            f"where `{HIGHLIGHT}` ranks on mean TTFT, and `cache_aware`'s mean TTFT divided by "
            "`round_robin`'s (below 1: affinity helps).",
            "",
            conclusions_table(runs),
            "",
            *_discussion(discussions, ENGINES_DISCUSSION),
            "",
        ]
    out += [*index_section(runs), *_discussion(discussions, INDEX_DISCUSSION), ""]
    out += [
        "## Each policy against its upstream",
        "",
        *_discussion(discussions, UPSTREAM_DISCUSSION),
        "",
    ]
    for run in runs:
        out += _engine_section(run, latency, jobs)
    out += [
        "## Policies and their parameters",
        "",
        policy_parameters(),
        "",
        "## Discussion",
        "",
        *_discussion(discussions, ""),
        "",
    ]
    return "\n".join(out)


def existing_discussions(path: Path) -> dict[str, str]:
    """The text between each pair of discussion markers of an earlier report."""
    found: dict[str, str] = {}
    if not path.exists():
        return found
    text = path.read_text(encoding="utf-8")
    for name in DISCUSSIONS:
        start_marker, end_marker = markers(name)
        start, end = text.find(start_marker), text.find(end_marker)
        if 0 <= start < end:
            found[name] = text[start + len(start_marker) : end].strip("\n")
    return found


def write_report(
    runs: Sequence[EngineRun], out: Path, latency: LatencyModel, jobs: int
) -> tuple[Path, list[Path]]:
    """Write the markdown and one figure per engine (``<stem><suffix>`` beside it)."""
    figures = []
    for run in runs:
        figure = out.with_name(out.stem + figure_suffix(run.engine))
        plot_p99_vs_hit(run.reports, figure, engine_title(run.engine))
        figures.append(figure)
    text = render_markdown(runs, latency, existing_discussions(out), jobs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out, figures

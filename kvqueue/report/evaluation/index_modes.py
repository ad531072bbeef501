"""The report's comparison of the two indexes: which index each policy reads, how its
approximate one forgets, and, per engine and workload, the policies run on both."""

from __future__ import annotations

from collections.abc import Sequence

from kvqueue.report.evaluation.rows import EngineRun, PolicyRow, WorkloadReport
from kvqueue.routing.policies import POLICIES, policy_names
from kvqueue.routing.policies.base import approximate_rules, default_index_mode


def index_rules_table() -> str:
    """Per policy: the index it reads by default and its approximate index's rules."""
    lines = [
        "| policy | default index | approximate index forgets by | rules from |",
        "|---|---|---|---|",
    ]
    for name in policy_names():
        cls = POLICIES[name]
        rules = approximate_rules(cls)
        lines.append(
            f"| `{name}` | {default_index_mode(cls)} | {rules.describe()} | `{rules.source}` |"
        )
    return "\n".join(lines)


def _pair(report: WorkloadReport) -> dict[str, dict[str, PolicyRow]]:
    """{policy name: {index mode: row}} for the policies run on both indexes. A variant that
    names its `precise_counterpart` (`llmd_fixed_lru`) pairs with that policy's precise row."""
    by_name: dict[str, dict[str, PolicyRow]] = {}
    for row in report.rows:
        by_name.setdefault(row.policy_name, {})[row.index_mode] = row
    pairs = {}
    for name, modes in by_name.items():
        counterpart = getattr(POLICIES.get(name), "precise_counterpart", None)
        if counterpart is not None and "approximate" in modes:
            precise = by_name.get(counterpart, {}).get("precise")
            if precise is not None:
                pairs[name] = {"precise": precise, "approximate": modes["approximate"]}
        elif len(modes) == 2:
            pairs[name] = modes
    return pairs


def _s(ms: float | None) -> str:
    return "–" if ms is None else f"{ms / 1000:.2f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def comparison_table(reports: Sequence[WorkloadReport]) -> str:
    """Per workload and policy run on both indexes: precise / approximate side by side."""
    lines = [
        "| workload | policy | hit rate | TTFT mean (s) | TTFT p90 (s) | TTFT p99 (s) "
        "| matched, lost | lower p90 |",
        "|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for report in reports:
        for name, modes in _pair(report).items():
            p, a = modes["precise"], modes["approximate"]
            if p.ttft_p90_ms is None or a.ttft_p90_ms is None:
                better = "–"
            elif p.ttft_p90_ms == a.ttft_p90_ms:
                better = "tie"
            else:
                better = "precise" if p.ttft_p90_ms < a.ttft_p90_ms else "approximate"
            lines.append(
                f"| {report.key} | `{name}` "
                f"| {_pct(p.hit_rate)} / {_pct(a.hit_rate)} "
                f"| {_s(p.ttft_mean_ms)} / {_s(a.ttft_mean_ms)} "
                f"| {_s(p.ttft_p90_ms)} / {_s(a.ttft_p90_ms)} "
                f"| {_s(p.ttft_p99_ms)} / {_s(a.ttft_p99_ms)} "
                f"| {_pct(p.lost_match)} / {_pct(a.lost_match)} | {better} |"
            )
    return "\n".join(lines)


def index_section(runs: Sequence[EngineRun]) -> list[str]:
    """The "Precise vs approximate" section (generated part)."""
    out = [
        "## Precise vs approximate",
        "",
        "A *precise* index follows the workers' cache events (plus the router's 30 s pending "
        "marks for requests routed and not yet stored); an *approximate* one records what the "
        "router itself routed and forgets it only by its own rules — it never hears that a "
        "GPU evicted a block (`kvqueue/routing/approximate.py`). Each policy reads its "
        "upstream's default; `--index precise|approximate` (or `policy:index`) overrides:",
        "",
        index_rules_table(),
        "",
        "Each cell below is *precise / approximate*; *matched, lost* is the share of the "
        "blocks the index promised at routing that were not cached when the request started.",
        "",
    ]
    for run in runs:
        out += [
            f"### {run.engine.engine.capitalize()} engine, {run.engine.latency} latency",
            "",
            comparison_table(run.reports),
            "",
        ]
    return out

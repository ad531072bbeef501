"""A sweep's answer in plain words: which policy to deploy, and what it saves.

`recommendation(result)` reads only the sweep result (`kvqueue.report.sweep.sweep_result`)
and returns a few sentences, the most important first:

1. the policy that sustains the highest rate within the SLO on the first cluster size,
   against the baseline (``round_robin`` when swept, else the first policy): "on this
   workload, `predictive` sustains 2.1× round_robin's rate within the SLO";
2. with a target rate, the GPUs each needs for it: "cache-aware routing saves N GPUs at R
   req/s";
3. how many cells were overloaded, and the rate the cluster takes.

A limit that was never reached (every rate tested met the SLO) is stated as "at least".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvqueue.report.units import format_count, format_rate

BASELINE = "round_robin"


def baseline_of(strategies: Sequence[str]) -> str:
    return BASELINE if BASELINE in strategies else strategies[0]


def _rate_text(row: Mapping[str, Any]) -> str:
    rate = format_rate(row["rate_rps"])
    return f"{rate} req/s" if row["bounded"] else f"at least {rate} req/s"


def _ratio(value: float) -> str:
    """``2.1×``, ``1.15×``: two decimals without trailing zeros."""
    return f"{value:.2f}".rstrip("0").rstrip(".") + "×"


def _headline(result: Mapping[str, Any]) -> str:
    meta = result["meta"]
    strategies = meta["strategies"]
    workers = meta["workers"][0]
    rows = {r["strategy"]: r for r in result["sustained"] if r["num_workers"] == workers}
    baseline = baseline_of(strategies)
    where = (
        f"on {meta.get('workload', 'this workload')} with {workers} × {meta['preset']} "
        f"({meta['engine']} engine, {meta['latency_profile']} latency)"
    )
    met = [s for s in strategies if rows[s]["rate_rps"] is not None]
    if not met:
        lowest = format_rate(min(r["lowest_tested_rps"] for r in rows.values()))
        return (
            f"No policy meets the SLO {where}, even at the lowest rate tested ({lowest} req/s): "
            "loosen the SLO, add GPUs or test lower rates."
        )
    best = max(met, key=lambda s: (rows[s]["rate_rps"], -strategies.index(s)))
    best_row, base_row = rows[best], rows[baseline]
    if base_row["rate_rps"] is None:
        return (
            f"{where[0].upper()}{where[1:]}, {best} sustains {_rate_text(best_row)} within the "
            f"SLO; {baseline} misses it even at {format_rate(base_row['lowest_tested_rps'])} "
            "req/s."
        )
    if best == baseline or best_row["rate_rps"] <= base_row["rate_rps"]:
        return (
            f"{where[0].upper()}{where[1:]}, no policy sustains more than {baseline}'s "
            f"{_rate_text(base_row)} within the SLO at the rates tested: cache-aware routing "
            "does not raise capacity here."
        )
    ratio = best_row["rate_rps"] / base_row["rate_rps"]
    at_least = "" if best_row["bounded"] else "at least "
    return (
        f"{where[0].upper()}{where[1:]}, {best} sustains {at_least}{_ratio(ratio)} {baseline}'s "
        f"rate within the SLO: {_rate_text(best_row)} against {_rate_text(base_row)}."
    )


def _gpus_line(result: Mapping[str, Any]) -> str | None:
    fewest = result.get("fewest_gpus")
    if not fewest:
        return None
    strategies = result["meta"]["strategies"]
    rate = format_rate(fewest["target_rate_rps"])
    most = max(fewest["workers_tested"])
    needs = fewest["by_strategy"]
    meeting = [s for s in strategies if needs[s] is not None]
    if not meeting:
        return f"No policy meets the SLO at {rate} req/s with up to {most} GPUs tested."
    best = min(meeting, key=lambda s: (needs[s], strategies.index(s)))
    baseline = baseline_of(strategies)
    if needs[baseline] is None:
        return (
            f"At {rate} req/s, {best} needs {needs[best]} GPUs; {baseline} misses the SLO with "
            f"up to {most} GPUs tested."
        )
    saved = needs[baseline] - needs[best]
    if saved <= 0:
        return (
            f"At {rate} req/s, {baseline} needs {needs[baseline]} GPUs and no policy needs "
            "fewer: cache-aware routing saves no GPUs at this rate."
        )
    return (
        f"At {rate} req/s, {best} needs {needs[best]} GPUs and {baseline} {needs[baseline]}: "
        f"cache-aware routing saves {saved} GPU{'s' if saved > 1 else ''}."
    )


def overload_summary(result: Mapping[str, Any]) -> str | None:
    """One line: how many cells were overloaded and what the first cluster size takes."""
    cells = result["cells"]
    over = [c for c in cells if c["overloaded"]]
    if not over:
        return None
    workers = result["meta"]["workers"][0]
    takes = sorted(
        c["measured_rps"]
        for c in result["capacity"]
        if c["num_workers"] == workers and c["measured_rps"]
    )
    span = (
        f"{format_rate(takes[0])}–{format_rate(takes[-1])}"
        if takes and takes[0] != takes[-1]
        else format_rate(takes[0] if takes else None)
    )
    return (
        f"{format_count(len(over))} of {format_count(len(cells))} cells offered more than the "
        "cluster can take (marked overload): there queueing, not caching, decides latency; "
        f"{workers} GPUs take about {span} req/s (measured, depending on the policy)."
    )


def recommendation(result: Mapping[str, Any]) -> list[str]:
    """The sentences of the module docstring, most important first."""
    lines = [_headline(result)]
    for line in (_gpus_line(result), overload_summary(result)):
        if line:
            lines.append(line)
    return lines

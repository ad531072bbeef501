"""The policy evaluation suite: every registered policy on a fixed set of workloads, simulated.

    kvqueue evaluate            # or: python analysis/policies.py

writes ``docs/policies.md`` (one table per workload) and ``docs/policies_p99_vs_hit.png``.

**Arrival rates.** A workload's load is set from its *cold* mean service time — every block
computed, nothing hit — under the latency model, with each request's declared output length
(all suite workloads declare one):

    S_cold = mean over requests of (prefill_base + prefill_per_block × num_blocks
                                    + decode_per_token × max_tokens)
    capacity = num_workers / S_cold          (requests per second; one request at a time)
    rate     = utilization × capacity

So "110%" overloads a cluster that caches nothing; cache hits are headroom a policy earns.
Synthetic workloads get Poisson arrivals at that rate (seeded); traces keep their own arrival
pattern, stretched by ``arrival_scale = natural rate / rate`` (natural rate = (n − 1) / span).

**Determinism.** Every workload is built from fixed seeds, every policy runs on fresh caches
and router state, so a rerun writes the same numbers. Runs are spread over `jobs` processes.

The markdown keeps whatever stands between the discussion markers of an existing file, so a
written analysis survives regeneration; everything else is generated.
"""

from __future__ import annotations

import functools
import inspect
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kvqueue.arrivals import retime
from kvqueue.latency import LatencyModel
from kvqueue.metrics import ideal_hit_rate, summarize
from kvqueue.oracle import FallbackOracle
from kvqueue.policies import POLICIES, policy_names
from kvqueue.presets import DEFAULT_PRESET, get_preset
from kvqueue.request import Request
from kvqueue.results import RequestStatus
from kvqueue.simulator import Simulation, worker_names
from kvqueue.traces import read_azure, read_mooncake
from kvqueue.workloads import make_workload

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
MOONCAKE_FILE = "mooncake_fast25_synthetic_trace.jsonl"
AZURE_FILE = "azure2023_AzureLLMInferenceTrace_conv.csv"
DEFAULT_OUT = REPO_ROOT / "docs" / "policies.md"
FIGURE_SUFFIX = "_p99_vs_hit.png"
COMMAND = "kvqueue evaluate"
NUM_WORKERS = 4
TRACE_PRESET = "qwen2.5-7b@h100-80gb"  # 67,114 blocks (1.07M tokens), 131k context
MOONCAKE_REQUESTS = 1_500  # the trace's last ones: see `mooncake_tail`
AZURE_REQUESTS = 2_000  # the trace's first ones
SEED = 0
DISCUSSION_START = "<!-- discussion:start -->"
DISCUSSION_END = "<!-- discussion:end -->"
HIGHLIGHT = "predictive"


@dataclass(frozen=True, slots=True)
class SuiteWorkload:
    """One workload of the suite: how its requests are made and how hard they arrive."""

    key: str
    title: str
    source: str  # for the report: what the requests are
    build: Callable[[], list[Request]]  # requests with arrival 0 (synthetic) or trace times
    utilization: float
    arrivals: str  # "poisson" or "trace"
    preset: str = DEFAULT_PRESET
    num_workers: int = NUM_WORKERS


@dataclass(frozen=True, slots=True)
class PolicyRow:
    """One policy on one workload: the table row, from the run's `summarize`."""

    policy: str
    hit_rate: float | None
    ttft_mean_ms: float | None
    ttft_p90_ms: float | None
    ttft_p99_ms: float | None
    e2e_mean_ms: float | None
    imbalance: float | None
    ideal_hit_rate: float | None
    lost_match: float | None  # blocks matched at routing but not hit at service, / matched
    completed: int
    rejected: int
    wall_s: float


@dataclass(frozen=True, slots=True)
class WorkloadReport:
    key: str
    title: str
    source: str
    preset: str
    num_blocks: int
    num_workers: int
    num_requests: int
    utilization: float
    cold_service_ms: float
    rate_rps: float
    arrival_scale: float | None
    ideal_hit_rate: float | None
    rows: tuple[PolicyRow, ...]


# -- the workloads -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _read_mooncake(path: Path) -> tuple[Request, ...]:
    return tuple(read_mooncake(path))


def mooncake_tail(path: Path, num_requests: int) -> list[Request]:
    """The last `num_requests` requests of a Mooncake trace, arrivals relative to the first.

    The trace's opening stretch is its warm-up, where its shared prefixes first appear (its
    first 1,500 requests have an ideal hit rate of 24%, its last 1,500 of 70%, the whole
    trace 65%); the tail is the steady state the paper describes, at a tenth of the run time.
    """
    requests = _read_mooncake(path)[-num_requests:]
    start = min((r.arrival_ms for r in requests), default=0.0)
    return [replace(r, arrival_ms=r.arrival_ms - start) for r in requests]


def default_suite(
    data_dir: Path = DEFAULT_DATA_DIR,
    mooncake_requests: int = MOONCAKE_REQUESTS,
    azure_requests: int = AZURE_REQUESTS,
    size: float = 1.0,
) -> list[SuiteWorkload]:
    """The fixed suite. `size` < 1 shrinks the synthetic workloads (for smoke runs only)."""

    def n(count: int) -> int:
        return max(8, round(count * size))

    def shared_prefix() -> list[Request]:
        return make_workload("shared-prefix", n(1024), seed=SEED)

    suite = [
        SuiteWorkload(
            f"shared-prefix-{round(100 * u)}",
            f"Shared prefix, {round(100 * u)}% load",
            "SGLang's generated-shared-prefix defaults: 64 groups × 16 prompts, 2,048-token "
            "system prompt + 128-token question, 256 output tokens",
            shared_prefix,
            u,
            "poisson",
        )
        for u in (0.5, 0.8, 1.1)
    ]
    suite += [
        SuiteWorkload(
            "multi-turn",
            "Multi-turn chat, 80% load",
            "64 conversations × 8 turns (64-token user turns, 128-token answers; turn k's "
            "prompt is turn k−1's plus its answer), turn-major order",
            lambda: make_workload("multi-turn", n(512), seed=SEED, num_conversations=64, turns=8),
            0.8,
            "poisson",
        ),
        SuiteWorkload(
            "no-sharing",
            "No sharing, 80% load",
            "1,024 random 576-token prompts, 32 output tokens, no two sharing a block",
            lambda: make_workload("no-sharing", n(1024), seed=SEED),
            0.8,
            "poisson",
        ),
    ]
    mooncake = data_dir / MOONCAKE_FILE
    if mooncake.exists():
        suite += [
            SuiteWorkload(
                f"mooncake-{round(100 * u)}",
                f"Mooncake trace, {round(100 * u)}% load",
                f"the last {mooncake_requests:,} requests of {MOONCAKE_FILE} (hash ids expanded "
                "to 16-token blocks), trace arrival pattern",
                lambda: mooncake_tail(mooncake, mooncake_requests),
                u,
                "trace",
                TRACE_PRESET,
            )
            for u in (0.7, 1.1)
        ]
    azure = data_dir / AZURE_FILE
    if azure.exists():
        suite.append(
            SuiteWorkload(
                "azure-conv",
                "Azure conversation trace, 80% load",
                f"the first {azure_requests:,} requests of {AZURE_FILE} (lengths only: no "
                "prefix sharing), trace arrival pattern",
                lambda: read_azure(azure, limit=azure_requests),
                0.8,
                "trace",
                TRACE_PRESET,
            )
        )
    return suite


# -- arrival rates -------------------------------------------------------------------------------
def cold_service_ms(
    requests: Sequence[Request], latency: LatencyModel, oracle: FallbackOracle | None = None
) -> float:
    """Mean service time with nothing cached: prefill of every block plus the decode."""
    oracle = oracle or FallbackOracle()
    if not requests:
        raise ValueError("no requests to time")
    total = sum(latency.service_ms(r.num_blocks, oracle.decode_length(r)[0]) for r in requests)
    return total / len(requests)


def arrival_rate(
    requests: Sequence[Request], utilization: float, num_workers: int, latency: LatencyModel
) -> float:
    """Requests per second that keep `num_workers` cold workers `utilization` busy."""
    if utilization <= 0:
        raise ValueError(f"utilization must be positive, got {utilization}")
    return utilization * num_workers * 1000.0 / cold_service_ms(requests, latency)


def natural_rate(requests: Sequence[Request]) -> float:
    """A trace's own request rate: (n − 1) / (last arrival − first arrival), per second."""
    times = sorted(r.arrival_ms for r in requests)
    span = times[-1] - times[0] if times else 0.0
    if len(times) < 2 or span <= 0:
        raise ValueError("a trace needs two distinct arrival times to have a rate")
    return (len(times) - 1) * 1000.0 / span


def timed(
    workload: SuiteWorkload, requests: Sequence[Request], latency: LatencyModel
) -> tuple[list[Request], float, float | None]:
    """The workload's requests with their arrivals, the rate, and the trace's stretch."""
    rate = arrival_rate(requests, workload.utilization, workload.num_workers, latency)
    if workload.arrivals == "poisson":
        return retime(requests, "poisson", rate, SEED), rate, None
    scale = natural_rate(requests) / rate
    return retime(requests, "trace", None, SEED, scale), rate, scale


# -- running -------------------------------------------------------------------------------------
# Filled by `evaluate` before it forks, so worker processes inherit the built requests.
_WORKLOADS: dict[str, tuple[SuiteWorkload, list[Request]]] = {}


def run_policy(
    workload: SuiteWorkload, requests: Sequence[Request], policy: str, latency: LatencyModel
) -> PolicyRow:
    """Simulate one policy on one workload's timed requests (fresh state) and summarize it."""
    clock = time.perf_counter()
    simulation = Simulation(policy, workload.num_workers, get_preset(workload.preset), latency)
    matched: dict[str, int] = {}
    route = simulation.router.route

    def recording_route(request: Request):  # the match the router saw, for `lost_match`
        decision = route(request)
        matched[request.request_id] = decision.matched_blocks
        return decision

    simulation.router.route = recording_route  # type: ignore[method-assign]
    results = simulation.run(requests)
    summary = summarize(results, worker_names(workload.num_workers))
    done = [r for r in results if r.status == RequestStatus.COMPLETED]
    done_ids = {r.request_id for r in done}
    total_matched = sum(matched[r.request_id] for r in done)
    lost = sum(max(0, matched[r.request_id] - r.hit_blocks) for r in done)
    ttft, e2e = summary["ttft_ms"], summary["e2e_ms"]
    return PolicyRow(
        policy=policy,
        hit_rate=summary["hit_rate"],
        ttft_mean_ms=ttft["mean"],
        ttft_p90_ms=ttft["p90"],
        ttft_p99_ms=ttft["p99"],
        e2e_mean_ms=e2e["mean"],
        imbalance=summary["imbalance"]["max_over_mean"],
        ideal_hit_rate=ideal_hit_rate(r for r in requests if r.request_id in done_ids),
        lost_match=lost / total_matched if total_matched else None,
        completed=summary["completed"],
        rejected=summary["rejected"],
        wall_s=time.perf_counter() - clock,
    )


def _task(args: tuple[str, str, LatencyModel]) -> tuple[str, PolicyRow]:
    key, policy, latency = args
    workload, requests = _WORKLOADS[key]
    return key, run_policy(workload, requests, policy, latency)


def evaluate(
    suite: Sequence[SuiteWorkload],
    policies: Sequence[str] | None = None,
    latency: LatencyModel | None = None,
    jobs: int = 1,
    log: Callable[[str], None] | None = None,
) -> list[WorkloadReport]:
    """Run every policy on every workload; one report per workload, in suite order.

    Runs go to `jobs` processes (1: in this process), biggest workloads first.
    """
    latency = latency or LatencyModel()
    policies = list(policies or policy_names())
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; valid: {', '.join(policy_names())}")
    say = log or (lambda _: None)
    shapes: dict[str, tuple[list[Request], float, float | None]] = {}
    _WORKLOADS.clear()
    for workload in suite:
        say(f"building {workload.key}")
        shapes[workload.key] = timed(workload, workload.build(), latency)
        _WORKLOADS[workload.key] = (workload, shapes[workload.key][0])
    size = {w.key: sum(r.num_blocks for r in shapes[w.key][0]) for w in suite}
    tasks = [(w.key, p, latency) for w in suite for p in policies]
    tasks.sort(key=lambda t: -size[t[0]])
    rows: dict[str, dict[str, PolicyRow]] = {w.key: {} for w in suite}
    started = time.perf_counter()
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            outcomes: Iterable[tuple[str, PolicyRow]] = pool.imap_unordered(_task, tasks)
            for done, (key, row) in enumerate(outcomes, start=1):
                rows[key][row.policy] = row
                say(_progress(done, len(tasks), key, row, started))
    else:
        for done, task in enumerate(tasks, start=1):
            key, row = _task(task)
            rows[key][row.policy] = row
            say(_progress(done, len(tasks), key, row, started))
    reports = []
    for w in suite:
        requests, rate, scale = shapes[w.key]
        preset = get_preset(w.preset)
        reports.append(
            WorkloadReport(
                key=w.key,
                title=w.title,
                source=w.source,
                preset=preset.name,
                num_blocks=preset.num_blocks,
                num_workers=w.num_workers,
                num_requests=len(requests),
                utilization=w.utilization,
                cold_service_ms=cold_service_ms(requests, latency),
                rate_rps=rate,
                arrival_scale=scale,
                ideal_hit_rate=_served_ideal(requests, [rows[w.key][p] for p in policies]),
                rows=tuple(rows[w.key][p] for p in policies),
            )
        )
    return reports


def _served_ideal(requests: Sequence[Request], rows: Sequence[PolicyRow]) -> float | None:
    """The ideal over the requests the runs served (every policy completes the same ones; a
    request the preset can never serve is rejected by all)."""
    ideals = {row.ideal_hit_rate for row in rows}
    return ideals.pop() if len(ideals) == 1 else ideal_hit_rate(requests)


def _progress(done: int, total: int, key: str, row: PolicyRow, started: float) -> str:
    return (
        f"[{done:>3}/{total}] {time.perf_counter() - started:6.1f} s  {key:<18} "
        f"{row.policy:<13} {row.wall_s:5.1f} s"
    )


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


# -- the report ----------------------------------------------------------------------------------
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
        "`kvqueue/evaluation.py`): every registered policy on every workload of the suite, "
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


def plot_p99_vs_hit(reports: Sequence[WorkloadReport], path: Path) -> None:
    """One panel per workload: a point per policy at (hit rate, p99 TTFT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = [row.policy for row in reports[0].rows] if reports else []
    markers = "osD^v<>PXh*"
    cmap = plt.get_cmap("tab10")
    style = {
        p: {"marker": markers[i % len(markers)], "color": cmap(i % 10)}
        for i, p in enumerate(policies)
    }
    if HIGHLIGHT in style:
        style[HIGHLIGHT] = {"marker": "*", "color": "black"}
    ncols = 3
    nrows = max(1, math.ceil(len(reports) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, report in zip(axes.flat, reports, strict=False):
        for row in report.rows:
            if row.hit_rate is None or row.ttft_p99_ms is None:
                continue
            ax.scatter(
                100 * row.hit_rate,
                row.ttft_p99_ms / 1000,
                s=110 if row.policy == HIGHLIGHT else 45,
                label=row.policy,
                zorder=3,
                **style[row.policy],
            )
        if report.ideal_hit_rate is not None:
            ax.axvline(100 * report.ideal_hit_rate, color="grey", ls="--", lw=0.8)
        hits = [100 * r.hit_rate for r in report.rows if r.hit_rate is not None]
        hits.append(100 * (report.ideal_hit_rate or 0.0))
        low, high = min(hits), max(hits)
        pad = max(2.0, 0.08 * (high - low), (10.0 - (high - low)) / 2)
        ax.set_xlim(max(-1.0, low - pad), min(101.0, high + pad))
        ax.set_title(report.title, fontsize=10)
        ax.set_xlabel("block hit rate (%)  · dashed: ideal")
        ax.set_ylabel("p99 TTFT (s)")
        ax.margins(y=0.12)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(reports) :]:
        ax.axis("off")
    handles = [
        plt.Line2D([], [], ls="", markersize=9 if p == HIGHLIGHT else 7, label=p, **style[p])
        for p in policies
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(policies), 9), frameon=False)
    fig.suptitle("p99 TTFT against hit rate (lower right is better)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def run_suite(
    out: Path = DEFAULT_OUT,
    data_dir: Path = DEFAULT_DATA_DIR,
    policies: Sequence[str] | None = None,
    workloads: Sequence[str] | None = None,
    jobs: int | None = None,
    size: float = 1.0,
    mooncake_requests: int = MOONCAKE_REQUESTS,
    azure_requests: int = AZURE_REQUESTS,
    quiet: bool = False,
) -> tuple[Path, Path]:
    """Build the suite, run it, write the report; the one call behind both entry points."""
    suite = default_suite(data_dir, mooncake_requests, azure_requests, size)
    if workloads:
        known = {w.key for w in suite}
        missing = [k for k in workloads if k not in known]
        if missing:
            raise ValueError(f"unknown workloads {missing}; valid: {', '.join(sorted(known))}")
        suite = [w for w in suite if w.key in workloads]
    jobs = jobs or default_jobs()
    latency = LatencyModel()

    def log(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    skipped = [f for f in (MOONCAKE_FILE, AZURE_FILE) if not (data_dir / f).exists()]
    if skipped:
        log(f"traces not found in {data_dir}, left out: {', '.join(skipped)}")
    started = time.perf_counter()
    reports = evaluate(suite, policies, latency, jobs, log)
    return write_report(reports, out, latency, time.perf_counter() - started, jobs)

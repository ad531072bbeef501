"""The dashboard of a strategy comparison: one dict, its files on disk, and a terminal table.

The same shape for simulated and live runs, so analysis scripts and plots read either::

    {
      "ideal_hit_rate": x,               # infinite shared cache, over the served requests
      "ideal_hit_rate_workload": x,      # the same over every request of the workload
      "meta": {...},                     # workload, preset, workers, seed, ...
      "strategies": {name: {             # kvqueue.report.metrics.summarize(...) plus:
          "ideal_hit_rate": x,           #   the bound for *this* strategy's hit_rate
          "hit_rate_of_ideal": x,        #   hit_rate / ideal_hit_rate
          "load": {...},                 #   offered rate against capacity (below)
          "engine": {...} | None,        #   kvqueue.report.engine_metrics (simulated runs
                                         #   and live batched workers' engine logs)
          ...}}
    }

``load`` is `kvqueue.report.capacity.LoadVerdict.to_dict()`: the offered rate (the Poisson
rate of the metadata, else from the arrival times; None for a burst), the capacity — measured
by a saturating burst where the caller measured one (`kvqueue simulate` does on the batched
engine), else estimated from the strategy's own busy time on the sequential engine, else, on a
batching engine, bounded below by its busy time when the run offered less than that bound
(a live batched run), else unknown (`kvqueue.report.capacity`) — their ratio and whether the
run was overloaded.

The ideal hit rate is an upper bound on every strategy's block hit rate: a worker only holds
blocks stored by requests that arrived before (its queue is FIFO), and one infinite cache
shared by everyone holds all of those. The bound is computed over the same requests as the
strategy's `hit_rate` (its completed ones: a rejected request is never cached and never
counted), so ``hit_rate <= ideal_hit_rate`` holds exactly. In the simulator every strategy
completes the same requests, so the per-strategy value equals the top-level one.

On disk (`write_run`): ``dashboard_results.json`` and one ``results_<strategy>.jsonl`` per
strategy, one `RequestResult.to_dict()` per line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from kvqueue.gpu.engine_stats import EngineStats
from kvqueue.gpu.engines import DEFAULT_ENGINE
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.capacity import (
    BOUNDED,
    ESTIMATED,
    MEASURED,
    Capacity,
    LoadVerdict,
    offered_rate_rps,
    overload_line,
    run_capacity_rps,
    settle_from_run,
)
from kvqueue.report.engine_metrics import sequential_stats, summarize_engines
from kvqueue.report.metrics import ideal_hit_rate, ratio, summarize
from kvqueue.report.table import Table
from kvqueue.report.units import format_count, format_ms, format_share

DASHBOARD_FILE = "dashboard_results.json"
RESULTS_FILE_TEMPLATE = "results_{strategy}.jsonl"


def _completed_ids(results: Sequence[RequestResult]) -> set[str]:
    return {r.request_id for r in results if r.status == RequestStatus.COMPLETED}


def _ideal_over(requests: Sequence[Request], request_ids: set[str]) -> float | None:
    return ideal_hit_rate(r for r in requests if r.request_id in request_ids)


def build_dashboard(
    results_by_strategy: Mapping[str, Sequence[RequestResult]],
    requests: Sequence[Request],
    workers: Sequence[str],
    meta: Mapping[str, Any] | None = None,
    engine_stats: Mapping[str, Mapping[str, EngineStats]] | None = None,
    capacity: Mapping[str, Capacity] | None = None,
) -> dict[str, Any]:
    """Summaries of every strategy next to the ideal hit rate (shape in the module docstring).

    `requests` is the workload every strategy ran (for the ideal); `workers` lists every
    worker, so idle ones show up with zeros. Strategies keep the mapping's order.
    `engine_stats` maps a strategy to its workers' `EngineStats` (None where not recorded);
    `capacity` a strategy to its saturating burst, where measured, or to the bound its own
    run settles its verdict with (`kvqueue.report.capacity.settle_from_run`).
    """
    served: set[str] = set()
    for results in results_by_strategy.values():
        served |= _completed_ids(results)
    ideal = _ideal_over(requests, served)
    offered = offered_rate_rps([r.arrival_ms for r in requests], nominal_rate_rps(meta or {}))
    engine = str((meta or {}).get("engine") or DEFAULT_ENGINE)
    strategies: dict[str, Any] = {}
    for name, results in results_by_strategy.items():
        summary = summarize(list(results), workers)
        summary["load"] = _verdict(
            results, (capacity or {}).get(name), offered, len(requests), len(workers), engine
        ).to_dict()
        own = _completed_ids(results)
        own_ideal = ideal if own == served else _ideal_over(requests, own)
        summary["ideal_hit_rate"] = own_ideal
        hit_rate = summary.get("hit_rate")
        summary["hit_rate_of_ideal"] = (
            ratio(hit_rate, own_ideal) if hit_rate is not None and own_ideal is not None else None
        )
        recorded = (engine_stats or {}).get(name)
        if not recorded and engine == "sequential":
            recorded = sequential_stats(results)  # a live run: rebuilt from its results
        summary["engine"] = summarize_engines(recorded or {})
        strategies[name] = summary
    info: dict[str, Any] = {
        "workers": list(workers),
        "num_workers": len(workers),
        "num_requests": len(requests),
    }
    info.update(meta or {})
    every_id = {r.request_id for r in requests}
    return {
        "ideal_hit_rate": ideal,
        "ideal_hit_rate_workload": ideal if served == every_id else ideal_hit_rate(requests),
        "meta": info,
        "strategies": strategies,
    }


def _verdict(
    results: Sequence[RequestResult],
    capacity: Capacity | None,
    offered_rps: float,
    num_requests: int,
    num_workers: int,
    engine: str,
) -> LoadVerdict:
    """The run against its measured capacity or bound, else its busy-time estimate (module
    docstring). A batching run given no capacity (a live one: nothing measured it) is judged
    by the bound its own run settles when it can (`settle_from_run`), else left unknown."""
    if capacity is None and engine != "sequential":
        capacity = settle_from_run(results, num_workers, offered_rps)
    if capacity is not None:
        return capacity.verdict(offered_rps, num_requests, num_workers)
    estimate = run_capacity_rps(results, num_workers, engine)
    return LoadVerdict(offered_rps, estimate, ESTIMATED, num_requests, num_workers)


def nominal_rate_rps(meta: Mapping[str, Any]) -> float | None:
    """The offered rate a run's metadata states: its Poisson rate over its arrival scale."""
    rate, scale = meta.get("rate_rps"), meta.get("arrival_scale") or 1.0
    if meta.get("arrivals") != "poisson" or not rate or not scale:
        return None
    return rate / scale


def load_verdicts(dashboard: Mapping[str, Any]) -> dict[str, LoadVerdict]:
    """Each strategy's `LoadVerdict`, rebuilt from its ``load`` entry (absent: left out)."""
    meta = dashboard.get("meta") or {}
    verdicts = {}
    for name, summary in dashboard["strategies"].items():
        load = summary.get("load")
        if not load:
            continue
        offered = math.inf if load["burst"] else (load["offered_rps"] or 0.0)
        verdicts[name] = LoadVerdict(
            offered,
            load["capacity_rps"],
            load["capacity_basis"],
            int(meta.get("num_requests") or summary.get("num_results") or 0),
            int(meta.get("num_workers") or len(summary.get("per_worker") or ())),
            load.get("concurrency", 1.0),
        )
    return verdicts


def results_path(out_dir: str | Path, strategy: str) -> Path:
    return Path(out_dir) / RESULTS_FILE_TEMPLATE.format(strategy=strategy)


def write_run(
    out_dir: str | Path,
    dashboard: Mapping[str, Any],
    results_by_strategy: Mapping[str, Sequence[RequestResult]],
) -> Path:
    """Write ``dashboard_results.json`` and ``results_<strategy>.jsonl`` under `out_dir`.

    Creates `out_dir` if needed and overwrites earlier files of the same names. Returns the
    dashboard file's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dashboard_file = out / DASHBOARD_FILE
    dashboard_file.write_bytes(
        orjson.dumps(dashboard, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    )
    for strategy, results in results_by_strategy.items():
        with open(results_path(out, strategy), "wb") as handle:
            for result in results:
                handle.write(orjson.dumps(result.to_dict(), option=orjson.OPT_APPEND_NEWLINE))
    return dashboard_file


def load_results(path: str | Path) -> list[RequestResult]:
    """The results of one ``results_<strategy>.jsonl`` file, in file order.

    A malformed line raises ValueError naming the file and line.
    """
    results: list[RequestResult] = []
    with open(path, "rb") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                results.append(RequestResult.from_dict(orjson.loads(line)))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: not a request result ({exc})") from None
    return results


def load_dashboard(out_dir: str | Path) -> dict[str, Any]:
    """``dashboard_results.json`` of a run directory."""
    return orjson.loads((Path(out_dir) / DASHBOARD_FILE).read_bytes())


def load_run(out_dir: str | Path) -> tuple[dict[str, Any], dict[str, list[RequestResult]]]:
    """The dashboard of a run directory and the results of each of its strategies."""
    dashboard = load_dashboard(out_dir)
    results = {name: load_results(results_path(out_dir, name)) for name in dashboard["strategies"]}
    return dashboard, results


# -- terminal table ------------------------------------------------------------------------
def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _load(verdict: LoadVerdict | None) -> str:
    if verdict is None:
        return "-"
    text = "burst" if verdict.burst else _times(verdict.load)
    return f"{text} !" if verdict.overloaded else text


TABLE_COLUMNS = (
    ("strategy", "<"),
    ("hit rate", ">"),
    ("ideal", ">"),
    ("TTFT mean", ">"),
    ("TTFT p50", ">"),
    ("TTFT p99", ">"),
    ("e2e mean", ">"),
    ("e2e p99", ">"),
    ("done/rej/fail", ">"),
    ("imbalance", ">"),
    ("load", ">"),
)
TABLE_NOTE = (
    "times in simulated ms (s where marked); imbalance = max/mean completed requests per "
    "worker; load = offered rate / capacity {basis} (! overloaded)"
)
CAPACITY_BASIS = {
    MEASURED: "measured by a saturating burst",
    ESTIMATED: "estimated from busy time",
    BOUNDED: "at least the busy-time figure (load at most this)",
}


def dashboard_table(dashboard: Mapping[str, Any]) -> Table:
    """One row per strategy: hit rate next to the ideal, TTFT and end-to-end, counts, load
    imbalance and offered load; overloaded rows marked, and the overload line as a note."""
    verdicts = load_verdicts(dashboard)
    rows: list[tuple[str, ...]] = []
    for name, s in dashboard["strategies"].items():
        ttft, e2e = s.get("ttft_ms") or {}, s.get("e2e_ms") or {}
        counts = (s.get("completed", 0), s.get("rejected", 0), s.get("failed", 0))
        rows.append(
            (
                name,
                format_share(s.get("hit_rate")),
                format_share(s.get("ideal_hit_rate", dashboard.get("ideal_hit_rate"))),
                format_ms(ttft.get("mean")),
                format_ms(ttft.get("p50")),
                format_ms(ttft.get("p99")),
                format_ms(e2e.get("mean")),
                format_ms(e2e.get("p99")),
                "/".join(format_count(c) for c in counts),
                _times((s.get("imbalance") or {}).get("max_over_mean")),
                _load(verdicts.get(name)),
            )
        )
    marked = frozenset(
        i
        for i, name in enumerate(dashboard["strategies"])
        if name in verdicts and verdicts[name].overloaded
    )
    overload = overload_line(list(verdicts.values()))
    bases = sorted({CAPACITY_BASIS[v.basis] for v in verdicts.values() if v.capacity_rps})
    basis = " or ".join(bases) or "unknown"
    notes = (TABLE_NOTE.format(basis=basis), *([overload] if overload else []))
    return Table("Strategies", TABLE_COLUMNS, tuple(rows), notes, marked)


def format_table(dashboard: Mapping[str, Any]) -> str:
    """`dashboard_table` as text for a terminal."""
    return dashboard_table(dashboard).text()


ENGINE_COLUMNS = (
    ("strategy", "<"),
    ("TPOT mean", ">"),
    ("TPOT p99", ">"),
    ("ITL p99", ">"),
    ("out tok/s", ">"),
    ("batch", ">"),
    ("preempted", ">"),
    ("KV used", ">"),
    ("KV max", ">"),
)
ENGINE_NOTE = "TPOT, ITL in simulated ms; batch = requests per step; KV used = time-weighted mean"


def engine_table(dashboard: Mapping[str, Any]) -> Table | None:
    """One row per strategy of what the engines did (None when no strategy recorded any):
    TPOT and ITL in ms, output tokens per second, mean batch size, preemptions, and KV usage
    (time-weighted mean and maximum, evictable cached blocks counted as free)."""
    rows: list[tuple[str, ...]] = []
    for name, s in dashboard["strategies"].items():
        engine = s.get("engine")
        if not engine:
            continue
        tpot, itl, kv = s.get("tpot_ms") or {}, engine["itl_ms"], engine["kv_usage"]
        rows.append(
            (
                name,
                format_ms(tpot.get("mean")),
                format_ms(tpot.get("p99")),
                format_ms(itl.get("p99")),
                format_count(s.get("output_tokens_per_s")),
                _times(engine["mean_batch_size"]),
                format_count(engine["preemptions"]),
                format_share(kv["mean"]),
                format_share(kv["max"]),
            )
        )
    if not rows:
        return None
    return Table("Engines", ENGINE_COLUMNS, tuple(rows), (ENGINE_NOTE,))


def format_engine_table(dashboard: Mapping[str, Any]) -> str | None:
    """`engine_table` as text for a terminal (None when there is none)."""
    table = engine_table(dashboard)
    return None if table is None else table.text()

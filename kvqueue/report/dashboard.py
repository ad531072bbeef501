"""The dashboard of a strategy comparison: one dict, its files on disk, and a terminal table.

The same shape for simulated and live runs, so analysis scripts and plots read either::

    {
      "ideal_hit_rate": x,               # infinite shared cache, over the served requests
      "ideal_hit_rate_workload": x,      # the same over every request of the workload
      "meta": {...},                     # workload, preset, workers, seed, ...
      "strategies": {name: {             # kvqueue.report.metrics.summarize(...) plus:
          "ideal_hit_rate": x,           #   the bound for *this* strategy's hit_rate
          "hit_rate_of_ideal": x,        #   hit_rate / ideal_hit_rate
          "engine": {...} | None,        #   kvqueue.report.engine_metrics (simulated runs)
          ...}}
    }

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

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from kvqueue.gpu.engine_stats import EngineStats
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.engine_metrics import summarize_engines
from kvqueue.report.metrics import ideal_hit_rate, ratio, summarize

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
) -> dict[str, Any]:
    """Summaries of every strategy next to the ideal hit rate (shape in the module docstring).

    `requests` is the workload every strategy ran (for the ideal); `workers` lists every
    worker, so idle ones show up with zeros. Strategies keep the mapping's order.
    `engine_stats` maps a strategy to its workers' `EngineStats` (None where not recorded).
    """
    served: set[str] = set()
    for results in results_by_strategy.values():
        served |= _completed_ids(results)
    ideal = _ideal_over(requests, served)
    strategies: dict[str, Any] = {}
    for name, results in results_by_strategy.items():
        summary = summarize(list(results), workers)
        own = _completed_ids(results)
        own_ideal = ideal if own == served else _ideal_over(requests, own)
        summary["ideal_hit_rate"] = own_ideal
        hit_rate = summary.get("hit_rate")
        summary["hit_rate_of_ideal"] = (
            ratio(hit_rate, own_ideal) if hit_rate is not None and own_ideal is not None else None
        )
        summary["engine"] = summarize_engines((engine_stats or {}).get(name) or {})
        strategies[name] = summary
    info: dict[str, Any] = {
        "workers": list(workers),
        "num_workers": len(workers),
        "num_requests": len(requests),
    }
    info.update(meta or {})
    return {
        "ideal_hit_rate": ideal,
        "ideal_hit_rate_workload": ideal_hit_rate(requests),
        "meta": info,
        "strategies": strategies,
    }


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
def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}%"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


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
)


def format_table(dashboard: Mapping[str, Any]) -> str:
    """One row per strategy: hit rate next to the ideal, TTFT and end-to-end in ms, counts,
    and load imbalance (max/mean completed requests per worker)."""
    rows: list[tuple[str, ...]] = []
    for name, s in dashboard["strategies"].items():
        ttft, e2e = s.get("ttft_ms") or {}, s.get("e2e_ms") or {}
        rows.append(
            (
                name,
                _rate(s.get("hit_rate")),
                _rate(s.get("ideal_hit_rate", dashboard.get("ideal_hit_rate"))),
                _ms(ttft.get("mean")),
                _ms(ttft.get("p50")),
                _ms(ttft.get("p99")),
                _ms(e2e.get("mean")),
                _ms(e2e.get("p99")),
                f"{s.get('completed', 0)}/{s.get('rejected', 0)}/{s.get('failed', 0)}",
                _times((s.get("imbalance") or {}).get("max_over_mean")),
            )
        )
    return _render(
        TABLE_COLUMNS,
        rows,
        "times in simulated ms; imbalance = max/mean completed requests per worker",
    )


def _render(
    columns: Sequence[tuple[str, str]], rows: Sequence[tuple[str, ...]], footer: str
) -> str:
    """A plain-text table: headers, a rule, the rows (aligned per column), a footer line."""
    headers = tuple(title for title, _ in columns)
    widths = [max(len(row[i]) for row in (headers, *rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            f"{cell:{align}{width}}"
            for cell, (_, align), width in zip(cells, columns, widths, strict=True)
        )

    lines = [line(headers), "  ".join("-" * w for w in widths)]
    lines += [line(row) for row in rows]
    lines.append(footer)
    return "\n".join(lines)


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


def format_engine_table(dashboard: Mapping[str, Any]) -> str | None:
    """One row per strategy of what the engines did (None when no strategy recorded any):
    TPOT and ITL in ms, output tokens per second, mean batch size, preemptions, and KV usage
    (time-weighted mean and maximum, evictable cached blocks counted as free)."""
    rows: list[tuple[str, ...]] = []
    for name, s in dashboard["strategies"].items():
        engine = s.get("engine")
        if not engine:
            continue
        tpot, itl, kv = s.get("tpot_ms") or {}, engine["itl_ms"], engine["kv_usage"]
        tokens_per_s = s.get("output_tokens_per_s")
        rows.append(
            (
                name,
                _ms(tpot.get("mean")),
                _ms(tpot.get("p99")),
                _ms(itl.get("p99")),
                "-" if tokens_per_s is None else f"{tokens_per_s:,.0f}",
                _times(engine["mean_batch_size"]),
                f"{engine['preemptions']:,}",
                _rate(kv["mean"]),
                _rate(kv["max"]),
            )
        )
    if not rows:
        return None
    return _render(
        ENGINE_COLUMNS,
        rows,
        "TPOT, ITL in simulated ms; batch = requests per step; KV used = time-weighted mean",
    )

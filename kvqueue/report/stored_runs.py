"""Dashboards of runs already in Redis, read back by run id.

The ideal hit rate needs the requests: they are rebuilt from the run metadata
(`kvqueue.workloads.recorded`) and checked against the results (every result's request id
must exist with the same block count); if they cannot be rebuilt or do not match, the ideal
is None and a note says why — never a wrong number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from kvqueue import keys
from kvqueue.errors import KVQueueError
from kvqueue.gpu.engine_stats import EngineStats
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult
from kvqueue.live.engine_log import read_engine_stats
from kvqueue.live.runs import read_results, read_run_meta
from kvqueue.report.dashboard import build_dashboard
from kvqueue.workloads.recorded import rebuild_requests


def check_requests_match(
    requests: Sequence[Request], results: Sequence[RequestResult]
) -> str | None:
    """None if every result's request exists in `requests` with the same block count."""
    blocks = {r.request_id: r.num_blocks for r in requests}
    for result in results:
        expected = blocks.get(result.request_id)
        if expected is None:
            return f"request {result.request_id!r} of the results is not in the rebuilt workload"
        if result.num_blocks and result.num_blocks != expected:
            return (
                f"request {result.request_id!r} has {result.num_blocks} blocks in the results "
                f"but {expected} in the rebuilt workload"
            )
    return None


@dataclass(frozen=True, slots=True)
class LoadedRuns:
    dashboard: dict[str, Any]
    results_by_strategy: dict[str, list[RequestResult]]
    notes: list[str]


def dashboard_from_runs(
    client: redis.Redis,
    run_ids: Sequence[str],
    prefix: str = keys.DEFAULT_PREFIX,
    requests: Sequence[Request] | None = None,
    hash_seed: str = "kvqueue",
    tokenizer: str | None = None,
) -> LoadedRuns:
    """The dashboard of runs already in Redis, keyed by strategy (``strategy@run`` if repeated).

    `requests` (the workload every run ran) gives the ideal hit rate; without it they are
    rebuilt from each run's metadata (module docstring). Runs of different workloads get a
    per-strategy ideal and a top-level ideal of None. Unknown run ids raise `KVQueueError`.
    """
    if not run_ids:
        raise ValueError("no run ids given")
    notes: list[str] = []
    metas: dict[str, dict[str, Any]] = {}
    results: dict[str, list[RequestResult]] = {}
    engines: dict[str, dict[str, EngineStats]] = {}
    names: dict[str, str] = {}
    for run_id in run_ids:
        meta = read_run_meta(client, run_id, prefix)
        run_results, _ = read_results(client, run_id, prefix)
        if not meta and not run_results:
            raise KVQueueError(
                f"run {run_id!r} not found under prefix {prefix!r} (no {keys.run(run_id, prefix)} "
                f"and no {keys.results(run_id, prefix)}); check REDIS_URL and KVQ_PREFIX"
            )
        seen: dict[str, RequestResult] = {}
        for result in run_results:
            seen.setdefault(result.request_id, result)
        strategy = str(meta.get("strategy") or (run_results[0].strategy if run_results else "?"))
        name = strategy if strategy not in results else f"{strategy}@{run_id}"
        names[run_id] = name
        metas[run_id] = meta
        results[name] = list(seen.values())
        engines[name] = read_engine_stats(client, run_id, prefix)
        if meta.get("num_requests") and len(seen) < int(meta["num_requests"]):
            notes.append(
                f"run {run_id}: {len(seen)} of {meta['num_requests']} results so far "
                "(still running, or results lost)"
            )
    workers: dict[str, None] = {}
    for meta in metas.values():
        for worker in meta.get("workers") or []:
            workers.setdefault(str(worker))
    for run_results in results.values():
        for result in run_results:
            if result.worker:
                workers.setdefault(result.worker)
    worker_list = list(workers)
    first = metas[run_ids[0]]
    info = {k: v for k, v in first.items() if k not in ("strategy", "started_at")}
    info["run_ids"] = {names[r]: r for r in run_ids}

    def workload_of(run_id: str) -> tuple[list[Request] | None, str]:
        if requests is not None:
            return list(requests), ""
        return rebuild_requests(metas[run_id], hash_seed, tokenizer)

    def identity(meta: Mapping[str, Any]) -> str:
        picked = meta.get("workload_args") or {
            k: meta.get(k) for k in ("workload", "num_requests", "rate_rps", "seed")
        }
        return repr(sorted(picked.items())) + repr(meta.get("hash_seed"))

    same_workload = requests is not None or len({identity(m) for m in metas.values()}) == 1
    if same_workload:
        workload, why = workload_of(run_ids[0])
        problem = why or check_requests_match(
            workload or [], [r for rs in results.values() for r in rs]
        )
        if problem:
            notes.append(f"ideal hit rate unavailable: {problem}")
            workload = None
        dashboard = build_dashboard(results, workload or [], worker_list, info, engines)
        if workload is None:
            _blank_ideal(dashboard)
        return LoadedRuns(dashboard, results, notes)

    notes.append("the runs ran different workloads: the ideal hit rate is per strategy only")
    merged: dict[str, Any] = {}
    for run_id in run_ids:
        name = names[run_id]
        workload, why = workload_of(run_id)
        problem = why or check_requests_match(workload or [], results[name])
        if problem:
            notes.append(f"{name}: ideal hit rate unavailable: {problem}")
            workload = None
        one = build_dashboard({name: results[name]}, workload or [], worker_list, info, engines)
        if workload is None:
            _blank_ideal(one)
        merged[name] = one["strategies"][name]
    info["num_requests"] = None
    return LoadedRuns(
        {
            "ideal_hit_rate": None,
            "ideal_hit_rate_workload": None,
            "meta": {"workers": worker_list, "num_workers": len(worker_list), **info},
            "strategies": merged,
        },
        results,
        notes,
    )


def _blank_ideal(dashboard: dict[str, Any]) -> None:
    dashboard["ideal_hit_rate"] = None
    dashboard["ideal_hit_rate_workload"] = None
    for summary in dashboard["strategies"].values():
        summary["ideal_hit_rate"] = None
        summary["hit_rate_of_ideal"] = None

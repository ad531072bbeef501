"""The live strategy comparison: the same requests through the real pipeline once per strategy.

For each strategy, in order:

1. every key under the prefix but the results streams and run metadata
   (``<prefix>results:*``, ``<prefix>run:*``) is deleted (`clear_routing_state`: the prefix
   tree, loads, cache usage, learned statistics, round-robin counter, live workers, events),
   so no run inherits another's routing state, and `analysis/dashboard.py --run-id` still
   works afterwards;
2. a fresh `LocalCluster` of N real ``rq worker -w workers.KVWorker`` processes starts, so
   every cache starts empty (a worker announces ``cleared`` when it starts);
3. `run_live` sends the requests (same ids, tokens, hashes and arrival times for every
   strategy) and waits for every result;
4. the cluster stops, any of the run's jobs still queued (an interrupted run) are deleted,
   and the routing keys are cleared again.

Invariants: every process a comparison starts is stopped before it returns or raises
(KeyboardInterrupt and SIGTERM included, see `graceful_signals`); nothing outside the key
prefix and the run's own RQ jobs is ever deleted — never FLUSHDB. On a user's Redis
(`check_redis_is_free`) the comparison refuses to start when kvqueue workers are live under
the prefix, an RQ worker listens on a ``worker-<i>`` queue it needs, or such a queue already
holds jobs: its workers would steal or be fed someone else's jobs.

The ideal hit rate of a run read back from Redis (`dashboard_from_runs`) needs the requests.
They are **rebuilt from the run metadata**: `comparison_meta` stores every workload flag
(``workload_args``, trace and prompt paths made absolute) and the hash seed; runs sent by
``producer/send.py`` store the synthetic workload's name, size, seed and arrivals, which rebuild
it too. The rebuilt requests are checked against the results (every result's request id
must exist with the same block count); if they cannot be rebuilt or do not match, the ideal
is None and a note says why — never a wrong number.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.cluster import LocalCluster
from kvqueue.config import Settings
from kvqueue.dashboard import build_dashboard, results_path, write_run
from kvqueue.embedded import EmbeddedRedis
from kvqueue.errors import KVQueueError
from kvqueue.keys import worker_name
from kvqueue.live import run_live
from kvqueue.producer import new_run_id
from kvqueue.request import Request
from kvqueue.results import RequestResult
from kvqueue.runs import read_results, read_run_meta
from kvqueue.workload_options import build_requests
from kvqueue.workloads import WORKLOADS

Status = Callable[[str], None]

WORKLOAD_ARG_NAMES = (
    "workload",
    "prompts",
    "trace",
    "num_requests",
    "limit",
    "length_scale",
    "arrival_scale",
    "rate",
    "seed",
)


def _quiet(message: str) -> None:
    del message


# -- Redis hygiene ----------------------------------------------------------------------------
def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def kept_key_prefixes(prefix: str) -> tuple[str, ...]:
    """Key prefixes `clear_routing_state` keeps: results streams and run metadata."""
    return (keys.results("", prefix), keys.run("", prefix))


def clear_routing_state(client: redis.Redis, prefix: str) -> int:
    """Delete every key under `prefix` except results and run metadata; returns how many.

    That is the prefix tree, per-worker sets and info, loads and backlog estimates, cache
    usage, learned statistics, the round-robin counter, live workers and the event stream —
    whatever routing state kvqueue keeps now or later, so no run inherits another's. Keys
    outside `prefix` (RQ's included) are never touched.
    """
    kept = kept_key_prefixes(prefix)
    doomed = [
        name
        for name in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000)
        if not name.decode(errors="replace").startswith(kept)
    ]
    deleted = 0
    for start in range(0, len(doomed), 500):
        deleted += client.delete(*doomed[start : start + 500])
    return deleted


def live_worker_names(client: redis.Redis, prefix: str, heartbeat_ttl_s: float) -> list[str]:
    """kvqueue workers that heartbeat under `prefix` within the TTL."""
    cutoff = int(time.time() * 1000 - heartbeat_ttl_s * 1000)
    return [m.decode() for m in client.zrangebyscore(keys.workers(prefix), cutoff, "+inf")]


def check_redis_is_free(
    client: redis.Redis, prefix: str, workers: Sequence[str], heartbeat_ttl_s: float = 15.0
) -> None:
    """Raise `KVQueueError` if running our own workers there would collide with someone's.

    Checks: live kvqueue workers under `prefix`; RQ workers listening on, or jobs waiting in,
    the queues of `workers` (RQ queue names are not prefixed, so another prefix does not
    isolate them — use another Redis database for that).
    """
    live = live_worker_names(client, prefix, heartbeat_ttl_s)
    if live:
        raise KVQueueError(
            f"{len(live)} kvqueue worker(s) are live under prefix {prefix!r} ({', '.join(live)}); "
            "the comparison starts its own: stop them or set another KVQ_PREFIX and Redis db"
        )
    for worker in workers:
        queue = Queue(keys.queue_name(worker), connection=client, serializer=JSONSerializer)
        listeners = Worker.all(connection=client, queue=queue)
        if listeners:
            raise KVQueueError(
                f"RQ worker {listeners[0].name} already listens on queue {queue.name!r}; the "
                "comparison starts its own workers there: stop it, or use another Redis db "
                "(e.g. REDIS_URL=redis://host:6379/3)"
            )
        if queue.count:
            raise KVQueueError(
                f"RQ queue {queue.name!r} already holds {queue.count} job(s) (an interrupted "
                f"run?); the comparison's workers would serve them: empty it with `rq empty "
                f"{queue.name} --url <REDIS_URL>` or use another Redis db"
            )


def drop_queued_jobs(client: redis.Redis, run_id: str, workers: Sequence[str]) -> int:
    """Delete the run's jobs still waiting in the queues of `workers`; returns how many.

    Only ids of the producer's form ``kvq-<run_id>-<position>`` are touched.
    """
    mark = f"kvq-{run_id}-"
    dropped = 0
    for worker in workers:
        queue = Queue(keys.queue_name(worker), connection=client, serializer=JSONSerializer)
        for job_id in queue.get_job_ids():
            if job_id.startswith(mark):
                queue.remove(job_id)
                client.delete(Job.key_for(job_id))
                dropped += 1
    return dropped


# -- processes and signals --------------------------------------------------------------------
@contextlib.contextmanager
def graceful_signals() -> Iterator[None]:
    """SIGTERM raises SystemExit (like Ctrl-C raises KeyboardInterrupt), so `finally` blocks
    that stop child processes run on either; the previous handler is restored on exit."""

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while stopping children, so a second Ctrl-C cannot orphan them.

    Bounded: `LocalCluster.stop` kills what has not exited within its timeout.
    """
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def comparison_redis(redis_url: str | None, status: Status = _quiet) -> Iterator[tuple[str, str]]:
    """Yield ``(url, description)`` of the Redis to compare on.

    With `redis_url` None an `EmbeddedRedis` is started and stopped on exit (whatever
    happens); otherwise the URL is used as is and nothing is started.
    """
    if redis_url:
        yield redis_url, "REDIS_URL"
        return
    server = EmbeddedRedis()
    status(f"starting an embedded redis-server ({server.binary})")
    server.start()
    try:
        yield server.url, f"embedded redis-server ({server.binary})"
    finally:
        with shielded():
            server.stop()


# -- one comparison ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StrategyRun:
    strategy: str
    run_id: str
    results: list[RequestResult]
    wall_s: float


@dataclass(slots=True)
class Comparison:
    """The runs of one comparison, in strategy order, all over the same `workers`."""

    workers: list[str]
    runs: list[StrategyRun] = field(default_factory=list)

    @property
    def results_by_strategy(self) -> dict[str, list[RequestResult]]:
        return {run.strategy: run.results for run in self.runs}


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment that gives the workers the producer's GPU preset and overrides."""
    env = {"KVQ_PRESET": settings.preset}
    if settings.num_blocks is not None:
        env["KVQ_NUM_BLOCKS"] = str(settings.num_blocks)
    if settings.max_context_tokens is not None:
        env["KVQ_MAX_CONTEXT"] = str(settings.max_context_tokens)
    return env


def run_comparison(
    redis_url: str,
    settings: Settings,
    requests: Sequence[Request],
    strategies: Sequence[str],
    num_workers: int,
    meta: Mapping[str, Any] | None = None,
    check_free: bool = True,
    progress: bool = True,
    log_dir: Path | None = None,
    timeout_s: float = 600.0,
    status: Status = _quiet,
) -> Comparison:
    """Run `requests` once per strategy on fresh workers (module docstring); the runs' results.

    `settings` gives the prefix, time scale and GPU preset (passed to the workers by
    environment). With `check_free`, `check_redis_is_free` runs first. Every worker process
    is stopped before this returns or raises.
    """
    if not strategies:
        raise ValueError("no strategies to compare")
    if num_workers < 1:
        raise ValueError(f"need at least one worker, got {num_workers}")
    client = redis.Redis.from_url(redis_url)
    prefix = settings.key_prefix
    comparison = Comparison(workers=[worker_name(i) for i in range(num_workers)])
    if check_free:
        check_redis_is_free(client, prefix, comparison.workers, settings.heartbeat_ttl_s)
    base_id = new_run_id()
    for position, strategy in enumerate(strategies, start=1):
        run_id = f"{base_id}-{strategy}"
        label = f"[{position}/{len(strategies)}] {strategy}"
        clear_routing_state(client, prefix)
        cluster = LocalCluster(
            redis_url, num_workers, env=worker_env(settings), prefix=prefix, log_dir=log_dir
        )
        started = time.perf_counter()
        try:
            status(f"{label}: starting {num_workers} KV workers (rq worker processes)")
            cluster.start()
            status(f"{label}: sending {len(requests):,} requests (run {run_id})")
            live = run_live(
                client,
                settings,
                requests,
                strategy,
                run_id,
                wait=True,
                meta=dict(meta or {}),
                progress=progress,
                timeout_s=timeout_s,
            )
        finally:
            with shielded():
                cluster.stop()
                # Best effort: on a terminal's Ctrl-C an embedded redis-server (in our process
                # group) may already be gone; the workers are stopped whatever happens.
                with contextlib.suppress(redis.RedisError):
                    drop_queued_jobs(client, run_id, cluster.workers)
                    clear_routing_state(client, prefix)
        wall = time.perf_counter() - started
        comparison.runs.append(StrategyRun(strategy, run_id, live.results, wall))
        done = sum(r.status.value == "completed" for r in live.results)
        status(f"{label}: {done:,}/{len(requests):,} completed in {wall:.1f} s")
    return comparison


def workload_args_meta(args: argparse.Namespace) -> dict[str, Any]:
    """The workload flags of `args` as JSON values (paths absolute), for run metadata."""
    values: dict[str, Any] = {}
    for name in WORKLOAD_ARG_NAMES:
        value = getattr(args, name, None)
        values[name] = str(Path(value).resolve()) if isinstance(value, Path) else value
    if values["workload"] is None and values["prompts"] is None and values["trace"] is None:
        values["workload"] = getattr(args, "default_workload", None)
    return values


def comparison_meta(
    settings: Settings,
    workload_meta: Mapping[str, Any],
    workload_args: Mapping[str, Any],
    redis_description: str,
) -> dict[str, Any]:
    """Run metadata of a live comparison: the workload and everything that shaped the GPUs."""
    preset = settings.gpu_preset()
    return {
        **workload_meta,
        "mode": "live",
        "workload_args": dict(workload_args),
        "preset": preset.name,
        "num_blocks": preset.num_blocks,
        "max_context_tokens": preset.max_context_tokens,
        "time_scale": settings.time_scale,
        "latency": {
            "prefill_base_ms": settings.prefill_base_ms,
            "prefill_per_block_ms": settings.prefill_per_block_ms,
            "decode_per_token_ms": settings.decode_per_token_ms,
        },
        "hash_seed": settings.hash_seed,
        "decode_model": settings.decode_model,
        "key_prefix": settings.key_prefix,
        "redis": redis_description,
    }


@dataclass(frozen=True, slots=True)
class ComparisonOutput:
    dashboard: dict[str, Any]
    dashboard_path: Path
    results_paths: list[Path]
    plot_paths: list[Path]


def write_comparison(
    out_dir: str | Path,
    comparison: Comparison,
    requests: Sequence[Request],
    meta: Mapping[str, Any] | None = None,
    plots: bool = True,
) -> ComparisonOutput:
    """Dashboard (`build_dashboard`), results files (`write_run`) and PNGs under `out_dir`."""
    info = dict(meta or {})
    info["run_ids"] = {run.strategy: run.run_id for run in comparison.runs}
    info["wall_s"] = {run.strategy: round(run.wall_s, 3) for run in comparison.runs}
    results = comparison.results_by_strategy
    dashboard = build_dashboard(results, requests, comparison.workers, info)
    dashboard_path = write_run(out_dir, dashboard, results)
    results_paths = [results_path(out_dir, name) for name in results]
    plot_paths: list[Path] = []
    if plots:
        from kvqueue.plots import write_plots  # matplotlib: only imported when plotting

        plot_paths = write_plots(out_dir, dashboard, results)
    return ComparisonOutput(dashboard, dashboard_path, results_paths, plot_paths)


# -- runs read back from Redis ----------------------------------------------------------------
def _namespace_from_meta(meta: Mapping[str, Any]) -> argparse.Namespace | None:
    """Workload flags that rebuild a run's requests, or None when the metadata cannot.

    ``workload_args`` (written by `comparison_meta`) holds every flag; otherwise only a
    synthetic workload named in the metadata (as producer/send.py records it) is rebuilt.
    """
    stored = meta.get("workload_args")
    if isinstance(stored, Mapping):
        values = {name: stored.get(name) for name in WORKLOAD_ARG_NAMES}
    elif meta.get("workload") in WORKLOADS:  # traces and prompt files are named, not located
        values = dict.fromkeys(WORKLOAD_ARG_NAMES)
        values.update(
            workload=meta["workload"],
            num_requests=meta.get("num_requests"),
            rate=meta.get("rate_rps"),
            arrival_scale=meta.get("arrival_scale"),
            length_scale=meta.get("length_scale"),
            seed=meta.get("seed"),
        )
    else:
        return None
    for name, default in (("length_scale", 1.0), ("arrival_scale", 1.0), ("seed", 0)):
        if values[name] is None:
            values[name] = default
    for name in ("prompts", "trace"):
        if values[name] is not None:
            values[name] = Path(values[name])
    return argparse.Namespace(**values, default_workload=None)


def rebuild_requests(
    meta: Mapping[str, Any], hash_seed: str, tokenizer: str | None = None
) -> tuple[list[Request] | None, str]:
    """The requests of a run from its metadata, or (None, why not)."""
    args = _namespace_from_meta(meta)
    if args is None:
        return None, (
            f"run metadata names workload {meta.get('workload')!r} but not where to read it; "
            "pass the same --trace/--prompts flags to rebuild it"
        )
    seed = str(meta.get("hash_seed") or hash_seed)
    try:
        requests, _ = build_requests(args, seed, tokenizer)
    except (KVQueueError, ValueError, OSError) as exc:
        return None, f"cannot rebuild the workload from the run metadata: {exc}"
    return requests, ""


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
        dashboard = build_dashboard(results, workload or [], worker_list, info)
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
        one = build_dashboard({name: results[name]}, workload or [], worker_list, info)
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


def print_err(message: str) -> None:
    """A status line on stderr (stdout stays clean for tables and JSON)."""
    print(message, file=sys.stderr, flush=True)

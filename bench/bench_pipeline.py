"""Live-pipeline overhead per request and requests/s, against a no-op RQ baseline.

For each worker count in ``--workers`` (default 1, 2, 4, 8) a fresh `LocalCluster` of real
``rq worker -w workers.KVWorker`` processes serves a synthetic workload sent by `run_live`
(as fast as possible, strategy ``--strategy``), at ``KVQ_TIME_SCALE=0`` — no emulated sleep,
so everything measured is pipeline cost — and once more at ``--scale`` (default 0.01) with
``--scaled-workers`` workers.

Definitions (N requests, W workers, time scale s, wall clock):

- ``wall``: from just before `run_live` to the Redis timestamp of the last result appended to
  the run's results stream (not `run_live`'s return, which polls every 0.2 s);
- ``req/s`` = N / wall;
- ``overhead/req`` = (wall × W − Σ simulated service × s) / N, simulated service = prefill +
  decode ms of each completed request. It is the worker time per request *not* spent in the
  emulated sleep: the pipeline's cost if the workers were busy the whole run, an upper bound
  when they were not (a slow producer or an idle worker counts as overhead). At s = 0 it is
  wall × W / N;
- ``in-job p50``: median of RQ's ``ended_at − started_at`` minus the request's sleep
  (service × s): kvqueue's own work inside the job (decode, allocate, events, result);
- ``cycle p50``: median, over consecutive jobs of one worker where the second was already
  queued when the first ended, of ``started_at(next) − started_at(prev)`` minus prev's sleep:
  the whole per-job cost of a busy worker (RQ's dequeue and bookkeeping plus kvqueue's work);
- ``sent``: seconds until the producer had enqueued the last request (RQ ``enqueued_at``);
- ``worker CPU/req``: the CPU time (user + system, ``/proc/<pid>/stat``) of every worker
  process over the run, ÷ N: the worker time a request costs whatever else shares the cores;
  ``producer CPU/req``: this process's CPU time over `run_live` (routing, enqueueing and
  waiting for the results), ÷ N; ``redis CPU/req``: redis-server's (``INFO cpu``), ÷ N.

Then Redis memory per queued request: ``--memory-workers`` (default 2) workers registered
without processes (nothing is dequeued), the workload sent by the `Producer`, and
``INFO memory``'s ``used_memory`` before and after, ÷ N, split by key family with ``MEMORY
USAGE`` (each family's keys summed, ÷ N): everything a request leaves in Redis while it
waits in its queue.

Baseline, measured in this process first: N trivial no-op jobs (``os.getpid``) enqueued one
by one on a queue with RQ's JSON serializer, then served by an in-process `SimpleWorker`
(``work(burst=True)``) with the JSON serializer; wall = from the call to the last job's RQ
``ended_at`` (the worker's teardown excluded), W = 1, s = 0, same columns. ``× baseline`` =
the row's req/s ÷ the baseline's jobs/s.

Usage::

    python bench/bench_pipeline.py [--num-requests 400] [--workers 1,2,4,8] [--scale 0.01]
        [--redis-url redis://127.0.0.1:6379/11] [--plot PATH] [--quick]

With ``--plot`` the time-scale-0 rows are drawn as requests/s against workers (PNG).

The db of ``--redis-url`` is flushed before each measurement and at the end.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

import redis
from bench_args import parse_args, positive_ints
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.live.cluster import LocalCluster
from kvqueue.live.connection import connect, redact
from kvqueue.live.producer import Producer, job_id_for
from kvqueue.live.run import run_live
from kvqueue.report.run_summary import run_summary
from kvqueue.routing.membership import RedisMembership
from kvqueue.workloads.synthetic import WORKLOADS, make_workload

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"
BENCH_PREFIX = keys.DEFAULT_PREFIX  # the db is dedicated: real key sizes
BASELINE_QUEUE = "bench-noop"
QUICK = {"num_requests": 40, "workers": "1", "scaled_workers": 0}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc/<pid>/stat counts CPU time in these


@dataclass(frozen=True, slots=True)
class JobTimes:
    worker: str
    enqueued: float  # epoch seconds
    started: float
    ended: float
    sleep_s: float  # the emulated sleep inside the job (service × scale)


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    num_workers: int
    scale: float
    num_requests: int
    num_completed: int
    wall_s: float
    sent_s: float | None
    service_sleep_s: float  # Σ simulated service × scale
    in_job_ms: float
    cycle_ms: float | None
    hit_rate: float | None
    worker_cpu_s: float | None = None  # Σ over the worker processes
    producer_cpu_s: float | None = None
    redis_cpu_s: float | None = None

    @property
    def rate(self) -> float:
        return self.num_requests / self.wall_s

    @property
    def overhead_ms(self) -> float:
        return (self.wall_s * self.num_workers - self.service_sleep_s) / self.num_requests * 1e3


def cpu_ms_per_request(cpu_s: float | None, num_requests: int) -> str:
    return "-" if cpu_s is None else f"{cpu_s / num_requests * 1e3:.2f}"


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux ``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def redis_cpu_s(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def epoch(moment: datetime | None) -> float:
    assert moment is not None, "RQ did not record a job time"
    return moment.timestamp()


def job_times(client: redis.Redis, job_ids: Sequence[str], sleeps: Sequence[float]) -> list:
    jobs = Job.fetch_many(list(job_ids), connection=client, serializer=JSONSerializer)
    times = []
    for job, sleep_s in zip(jobs, sleeps, strict=True):
        if job is None or job.started_at is None or job.ended_at is None:
            continue  # expired or never run: left out of the medians
        times.append(
            JobTimes(
                job.worker_name or job.origin,
                epoch(job.enqueued_at),
                epoch(job.started_at),
                epoch(job.ended_at),
                sleep_s,
            )
        )
    return times


def in_job_ms(times: Sequence[JobTimes]) -> float:
    return statistics.median((t.ended - t.started - t.sleep_s) * 1e3 for t in times)


def cycle_ms(times: Sequence[JobTimes]) -> float | None:
    """Median start-to-start gap minus the first job's sleep, over busy back-to-back pairs."""
    by_worker: dict[str, list[JobTimes]] = {}
    for t in times:
        by_worker.setdefault(t.worker, []).append(t)
    gaps = []
    for worker_times in by_worker.values():
        worker_times.sort(key=lambda t: t.started)
        for prev, nxt in itertools.pairwise(worker_times):
            if nxt.enqueued <= prev.ended:  # the next job was waiting: the worker was busy
                gaps.append((nxt.started - prev.started - prev.sleep_s) * 1e3)
    return statistics.median(gaps) if gaps else None


def last_result_s(client: redis.Redis, run_id: str) -> float:
    """Redis server time (epoch s) at which the run's last result was appended."""
    entries = client.xrevrange(keys.results(run_id, BENCH_PREFIX), count=1)
    if not entries:
        raise RuntimeError(f"run {run_id} has no results")
    return int(entries[0][0].decode().split("-")[0]) / 1e3


def measure_baseline(client: redis.Redis, num_jobs: int) -> Row:
    """N no-op jobs through an in-process SimpleWorker, JSON serializer (see the docstring)."""
    client.flushdb()
    queue = Queue(BASELINE_QUEUE, connection=client, serializer=JSONSerializer)
    job_ids = [queue.enqueue_call("os.getpid", result_ttl=3600).id for _ in range(num_jobs)]
    worker = SimpleWorker([queue], connection=client, serializer=JSONSerializer)
    server_cpu = redis_cpu_s(client)
    own_cpu = time.process_time()
    started = time.time()
    worker.work(burst=True, logging_level="WARNING")
    own_cpu = time.process_time() - own_cpu
    server_cpu = redis_cpu_s(client) - server_cpu
    times = job_times(client, job_ids, [0.0] * num_jobs)
    # Up to the last job's end: RQ's burst teardown (joining its pubsub thread, up to 1 s)
    # is not per-job cost.
    wall = max(t.ended for t in times) - started
    return Row(
        "rq SimpleWorker no-op (baseline)",
        1,
        0.0,
        num_jobs,
        len(times),
        wall,
        None,
        0.0,
        in_job_ms(times),
        cycle_ms(times),
        None,
        own_cpu,  # the in-process worker's (its burst teardown included)
        None,
        server_cpu,
    )


def measure_pipeline(
    client: redis.Redis,
    redis_url: str,
    requests: Sequence[Request],
    num_workers: int,
    scale: float,
    strategy: str,
) -> Row:
    client.flushdb()
    env = {"KVQ_TIME_SCALE": repr(scale)}
    settings = Settings.from_env(
        redis_url=redis_url, key_prefix=BENCH_PREFIX, time_scale=scale, strategy=strategy
    )
    with LocalCluster(redis_url, num_workers, env=env, prefix=BENCH_PREFIX) as cluster:
        pids = [cluster.pid(w) for w in cluster.workers]
        workers_cpu = sum(process_cpu_s(pid) for pid in pids)
        server_cpu = redis_cpu_s(client)
        own_cpu = time.process_time()
        started = time.time()
        run = run_live(client, settings, requests, strategy, progress=False, timeout_s=600)
        own_cpu = time.process_time() - own_cpu
        workers_cpu = sum(process_cpu_s(pid) for pid in pids) - workers_cpu
        server_cpu = redis_cpu_s(client) - server_cpu
        wall = last_result_s(client, run.sent.run_id) - started
        by_request = {r.request_id: r for r in run.results}
        order = list(run.sent.job_ids)
        sleeps = [_service_ms(by_request.get(r)) * scale / 1e3 for r in order]
        times = job_times(client, [run.sent.job_ids[r] for r in order], sleeps)
    summary = run_summary(run)
    return Row(
        f"kvqueue, {strategy}",
        num_workers,
        scale,
        len(requests),
        summary["completed"],
        wall,
        max(t.enqueued for t in times) - started if times else None,
        sum(sleeps),
        in_job_ms(times),
        cycle_ms(times),
        summary["hit_rate"],
        workers_cpu,
        own_cpu,
        server_cpu,
    )


def queued_memory(
    client: redis.Redis,
    redis_url: str,
    requests: Sequence[Request],
    num_workers: int,
    strategy: str,
) -> list[str]:
    """Bytes per queued request, by key family (see the module docstring)."""
    client.flushdb()
    settings = Settings.from_env(
        redis_url=redis_url, key_prefix=BENCH_PREFIX, time_scale=0.0, strategy=strategy
    )
    membership = RedisMembership(client, BENCH_PREFIX)
    capacity = settings.gpu_preset().num_blocks
    workers = [keys.worker_name(i) for i in range(num_workers)]
    for worker in workers:
        membership.register(worker, capacity)
    producer = Producer(client, settings, strategy, run_id="memory")
    producer.start_run(requests)
    before = client.info("memory")["used_memory"]
    producer.send(requests)
    after = client.info("memory")["used_memory"]
    families = {
        "RQ job hashes (rq:job:<id>)": "rq:job:*",
        "RQ queues (rq:queue:<worker>)": "rq:queue:*",
        "load records (kvq:worker:<w>:jobs)": keys.worker_jobs("*", BENCH_PREFIX),
        "pending marks (kvq:n:<hash>)": keys.node_pattern(BENCH_PREFIX),
    }
    n = len(requests)
    seen: set[bytes] = set()
    header = f"{'key family':<40} {'bytes/request':>13}"
    lines = [
        f"Redis memory per queued request: {n:,} requests sent to {num_workers} registered "
        "workers that dequeue nothing",
        "",
        header,
        "-" * len(header),
    ]
    for family, pattern in families.items():
        names = list(client.scan_iter(match=pattern, count=1000))
        seen.update(names)
        size = sum(client.memory_usage(name, samples=0) or 0 for name in names)
        lines.append(f"{family:<40} {size / n:>13,.0f}")
    rest = [name for name in client.scan_iter(count=1000) if name not in seen]
    size = sum(client.memory_usage(name, samples=0) or 0 for name in rest)
    lines.append(f"{'every other key (run, load, workers)':<40} {size / n:>13,.0f}")
    lines.append(f"{'INFO used_memory, after − before':<40} {(after - before) / n:>13,.0f}")
    job = client.hget(f"rq:job:{job_id_for('memory', 0)}", "data") or b""
    lines.append(f"\nRQ job data of the first request: {len(job):,} bytes (JSON, zlib-compressed)")
    return lines


def plot(rows: Sequence[Row], baseline: Row, path: Path, title: str) -> None:
    """Requests/s against workers at time scale 0, the no-op baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((r.num_workers, r.rate) for r in rows if r.scale == 0)
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.plot([w for w, _ in points], [v for _, v in points], marker="o", label="kvqueue pipeline")
    ax.axhline(baseline.rate, color="grey", linestyle="--", label="RQ no-op job, 1 worker")
    ax.set_xscale("log", base=2)
    ax.set_xticks([w for w, _ in points], [str(w) for w, _ in points])
    ax.set_xlabel("KV workers (time scale 0)")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _service_ms(result: RequestResult | None) -> float:
    if result is None or result.status is not RequestStatus.COMPLETED:
        return 0.0
    return result.prefill_ms + result.decode_ms


def print_table(rows: Sequence[Row], baseline: Row) -> None:
    header = (
        f"{'pipeline':<34} {'W':>2} {'scale':>5} {'done':>5} {'hit':>5} {'sent s':>6} "
        f"{'wall s':>6} {'req/s':>6} {'× baseline':>10} {'overhead/req ms':>15} "
        f"{'in-job p50 ms':>13} {'cycle p50 ms':>12} {'worker CPU/req ms':>17} "
        f"{'producer CPU/req ms':>19} {'redis CPU/req ms':>16}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        hit = "-" if row.hit_rate is None else f"{row.hit_rate:.0%}"
        sent = "-" if row.sent_s is None else f"{row.sent_s:.2f}"
        cycle = "-" if row.cycle_ms is None else f"{row.cycle_ms:.2f}"
        print(
            f"{row.name:<34} {row.num_workers:>2} {row.scale:>5g} {row.num_completed:>5} "
            f"{hit:>5} {sent:>6} {row.wall_s:>6.2f} {row.rate:>6.0f} "
            f"{row.rate / baseline.rate:>9.2f}x {row.overhead_ms:>15.2f} "
            f"{row.in_job_ms:>13.2f} {cycle:>12} "
            f"{cpu_ms_per_request(row.worker_cpu_s, row.num_requests):>17} "
            f"{cpu_ms_per_request(row.producer_cpu_s, row.num_requests):>19} "
            f"{cpu_ms_per_request(row.redis_cpu_s, row.num_requests):>16}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=400, help="requests per run")
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts at time scale 0")
    parser.add_argument("--scale", type=float, default=0.01, help="nonzero time scale run")
    parser.add_argument("--scaled-workers", type=int, default=2, help="workers at --scale")
    parser.add_argument(
        "--workload",
        default="shared-prefix-small",
        help=f"synthetic workload: {', '.join(sorted(WORKLOADS))}",
    )
    parser.add_argument("--strategy", default="cache_aware", help="routing strategy")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="its db is flushed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory-workers", type=int, default=2, help="workers the memory run registers"
    )
    parser.add_argument("--plot", type=Path, help="write requests/s against workers (PNG)")
    args = parse_args(parser, argv, QUICK)
    if args.num_requests <= 0:
        parser.error(f"--num-requests must be positive, got {args.num_requests}")
    worker_counts = positive_ints(parser, "workers", args.workers)
    if args.memory_workers < 1:
        parser.error(f"--memory-workers must be positive, got {args.memory_workers}")
    if args.scale < 0 or args.scaled_workers < 0:
        parser.error("--scale and --scaled-workers must be >= 0 (0 workers skips that run)")
    if args.workload not in WORKLOADS:
        parser.error(f"unknown workload {args.workload!r}; valid: {', '.join(sorted(WORKLOADS))}")
    logging.basicConfig(level=logging.WARNING)

    client = connect(args.redis_url)
    requests = make_workload(args.workload, num_requests=args.num_requests, seed=args.seed)
    load_before = os.getloadavg()[0]
    try:
        baseline = measure_baseline(client, args.num_requests)
        rows = [baseline]
        for num_workers in worker_counts:
            rows.append(
                measure_pipeline(client, args.redis_url, requests, num_workers, 0.0, args.strategy)
            )
        if args.scale > 0 and args.scaled_workers > 0:
            rows.append(
                measure_pipeline(
                    client, args.redis_url, requests, args.scaled_workers, args.scale, args.strategy
                )
            )
        memory = queued_memory(client, args.redis_url, requests, args.memory_workers, args.strategy)
    finally:
        client.flushdb()

    mean_blocks = statistics.fmean(r.num_blocks for r in requests)
    print(
        f"workload {args.workload}: {len(requests)} requests, {mean_blocks:.0f} blocks each "
        f"on average; redis {client.info('server')['redis_version']} at "
        f"{redact(args.redis_url)}; {os.cpu_count()} cores; load average before "
        f"{load_before:.2f}, after {os.getloadavg()[0]:.2f}\n"
    )
    print_table(rows, baseline)
    print(
        "\noverhead/req = (wall × W − Σ service × scale) / N; in-job and cycle exclude the "
        "emulated sleep (definitions in the module docstring)"
    )
    print("\n" + "\n".join(memory))
    if args.plot:
        title = (
            f"{args.workload}, {len(requests)} requests, {args.strategy}; "
            f"{os.cpu_count()} cores, load average {load_before:.1f}"
        )
        plot(rows[1:], baseline, args.plot, title)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

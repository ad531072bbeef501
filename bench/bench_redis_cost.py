"""Redis server CPU per routed request and per router decision: what one Redis can serve.

One redis-server is single-threaded, so the rate it sustains is bounded by the CPU time it
spends per request. This script measures that time on a redis-server of its own (started
here, so nothing else runs on it; or ``--redis-url`` to a server you dedicate to it), from
the server's own accounting: ``INFO cpu`` (``used_cpu_user + used_cpu_sys`` of the whole
process) and ``INFO commandstats`` (microseconds and calls per command), read before and
after each phase:

- ``rq no-op (baseline)``: N no-op jobs (``os.getpid``) enqueued with RQ's JSON serializer
  and served by an in-process `SimpleWorker` — RQ's own bookkeeping per job;
- ``pipeline``: N requests of ``--workload`` sent by `run_live` through a fresh
  `LocalCluster` of W real ``rq worker -w workers.KVWorker`` processes at time scale 0
  (routing, enqueue, RQ's bookkeeping, cache events, results, load records): everything
  the cluster asks of Redis per request;
- ``router decisions``: N `Router.route` calls (``--strategy``) on the same requests over
  the tree the pipeline run left, with W live workers — the read of one decision alone.

Columns: ``server CPU ms/item`` = Δ(used_cpu) / N; ``net bytes/item`` =
Δ(total_net_input_bytes + total_net_output_bytes) / N, what crossed the server's sockets;
``items/s per core`` = 1,000 / server CPU ms per item — the rate at which one Redis would be
saturated by this work alone; ``÷ baseline`` = server CPU per item over the no-op job's.
The heaviest commands of the pipeline follow the table, by commandstats' execution µs
(``exec`` and ``evalsha`` include the commands they run, which are also counted on their own
lines: the list ranks, it does not add up).

Usage::

    python bench/bench_redis_cost.py [--num-requests 400] [--workers 2,4]
        [--workload shared-prefix-small] [--strategy cache_aware] [--redis-url URL] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

import redis
from bench_args import parse_args, positive_ints
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.live.cluster import LocalCluster
from kvqueue.live.connection import connect, redact
from kvqueue.live.embedded import EmbeddedRedis
from kvqueue.live.run import run_live
from kvqueue.routing.policies.base import make_policy
from kvqueue.routing.router import Router
from kvqueue.routing.state import RedisRouterState
from kvqueue.workloads.synthetic import WORKLOADS, make_workload

BENCH_PREFIX = keys.DEFAULT_PREFIX
BASELINE_QUEUE = "bench-noop"
QUICK = {"num_requests": 40, "workers": "1"}
TOP_COMMANDS = 6


@dataclass(frozen=True, slots=True)
class ServerStats:
    """The server's CPU seconds and per-command (calls, µs) at one moment."""

    cpu_s: float
    net_bytes: int
    commands: dict[str, tuple[int, int]]


@dataclass(frozen=True, slots=True)
class Cost:
    name: str
    num_workers: int
    num_items: int
    cpu_s: float
    net_bytes: int
    commands: dict[str, tuple[int, int]]  # command -> (Δcalls, Δusec)

    @property
    def cpu_ms_per_item(self) -> float:
        return self.cpu_s * 1e3 / self.num_items

    @property
    def net_bytes_per_item(self) -> float:
        return self.net_bytes / self.num_items


def server_stats(client: redis.Redis) -> ServerStats:
    cpu = client.info("cpu")
    stats = client.info("stats")
    commands = {
        name.removeprefix("cmdstat_"): (int(stat["calls"]), int(stat["usec"]))
        for name, stat in client.info("commandstats").items()
    }
    return ServerStats(
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        int(stats["total_net_input_bytes"]) + int(stats["total_net_output_bytes"]),
        commands,
    )


def measure(
    client: redis.Redis, name: str, num_workers: int, num_items: int, work: Callable[[], None]
) -> Cost:
    """Run `work` between two reads of the server's stats; their difference per item."""
    before = server_stats(client)
    work()
    after = server_stats(client)
    commands = {}
    for command, (calls, usec) in after.commands.items():
        calls0, usec0 = before.commands.get(command, (0, 0))
        if calls > calls0:
            commands[command] = (calls - calls0, usec - usec0)
    return Cost(
        name,
        num_workers,
        num_items,
        after.cpu_s - before.cpu_s,
        after.net_bytes - before.net_bytes,
        commands,
    )


def baseline(client: redis.Redis, num_jobs: int) -> Cost:
    client.flushdb()
    queue = Queue(BASELINE_QUEUE, connection=client, serializer=JSONSerializer)

    def work() -> None:
        for _ in range(num_jobs):
            queue.enqueue_call("os.getpid", result_ttl=3600)
        SimpleWorker([queue], connection=client, serializer=JSONSerializer).work(
            burst=True, logging_level="WARNING"
        )

    return measure(client, "rq no-op (baseline)", 1, num_jobs, work)


def pipeline_and_router(
    client: redis.Redis, redis_url: str, requests: Sequence, num_workers: int, strategy: str
) -> tuple[Cost, Cost]:
    client.flushdb()
    settings = Settings.from_env(
        redis_url=redis_url, key_prefix=BENCH_PREFIX, time_scale=0.0, strategy=strategy
    )
    with LocalCluster(redis_url, num_workers, env={"KVQ_TIME_SCALE": "0"}, prefix=BENCH_PREFIX):

        def send() -> None:
            run = run_live(client, settings, requests, strategy, progress=False, timeout_s=600)
            if len(run.results) != len(requests):
                raise RuntimeError(f"{len(requests) - len(run.results)} requests without a result")

        pipeline = measure(client, "pipeline", num_workers, len(requests), send)
        state = RedisRouterState(client, BENCH_PREFIX, heartbeat_ttl_s=settings.heartbeat_ttl_s)
        router = Router(state, make_policy(strategy))

        def decide() -> None:
            for request in requests:
                router.route(request)

        decisions = measure(client, "router decisions", num_workers, len(requests), decide)
    return pipeline, decisions


def print_table(rows: Sequence[Cost], base: Cost) -> None:
    header = (
        f"{'phase':<22} {'W':>2} {'items':>5} {'server CPU ms/item':>18} "
        f"{'net bytes/item':>14} {'items/s per core':>16} {'÷ baseline':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.name:<22} {row.num_workers:>2} {row.num_items:>5} "
            f"{row.cpu_ms_per_item:>18.3f} {row.net_bytes_per_item:>14,.0f} "
            f"{1e3 / row.cpu_ms_per_item:>16,.0f} "
            f"{row.cpu_ms_per_item / base.cpu_ms_per_item:>9.2f}x"
        )


def print_heaviest(cost: Cost) -> None:
    heaviest = sorted(cost.commands.items(), key=lambda item: -item[1][1])[:TOP_COMMANDS]
    parts = [
        f"{command} {calls / cost.num_items:.1f} calls {usec / cost.num_items:.0f} µs"
        for command, (calls, usec) in heaviest
    ]
    print(f"heaviest commands per request, pipeline W={cost.num_workers}: " + "; ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=400, help="requests per phase")
    parser.add_argument("--workers", default="2,4", help="worker counts of the pipeline runs")
    parser.add_argument(
        "--workload",
        default="shared-prefix-small",
        help=f"synthetic workload: {', '.join(sorted(WORKLOADS))}",
    )
    parser.add_argument("--strategy", default="cache_aware", help="routing strategy")
    parser.add_argument(
        "--redis-url", default=None, help="a dedicated server (its db is flushed); default: own"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser, argv, QUICK)
    if args.num_requests <= 0:
        parser.error(f"--num-requests must be positive, got {args.num_requests}")
    worker_counts = positive_ints(parser, "workers", args.workers)
    if args.workload not in WORKLOADS:
        parser.error(f"unknown workload {args.workload!r}; valid: {', '.join(sorted(WORKLOADS))}")
    logging.basicConfig(level=logging.WARNING)

    requests = make_workload(args.workload, num_requests=args.num_requests, seed=args.seed)
    server = None if args.redis_url else EmbeddedRedis().start()
    redis_url = args.redis_url or server.url
    load_before = os.getloadavg()[0]
    try:
        client = connect(redis_url)
        base = baseline(client, args.num_requests)
        rows = [base]
        pipelines = []
        for num_workers in worker_counts:
            pipeline, decisions = pipeline_and_router(
                client, redis_url, requests, num_workers, args.strategy
            )
            pipelines.append(pipeline)
            rows += [pipeline, decisions]
        version = client.info("server")["redis_version"]
        client.flushdb()
    finally:
        if server is not None:
            server.stop()

    mean_blocks = sum(r.num_blocks for r in requests) / len(requests)
    print(
        f"workload {args.workload}: {len(requests)} requests, {mean_blocks:.0f} blocks each on "
        f"average, {args.strategy}; redis {version} at {redact(redis_url)} "
        f"({'its own' if server else 'given'}); {os.cpu_count()} cores; load average before "
        f"{load_before:.2f}, after {os.getloadavg()[0]:.2f}\n"
    )
    print_table(rows, base)
    print()
    for pipeline in pipelines:
        print_heaviest(pipeline)
    print(
        "\nserver CPU = Δ(used_cpu_user + used_cpu_sys) of redis-server; items/s per core = "
        "1,000 / server CPU ms per item (definitions in the module docstring)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Faults of the live pipeline, injected and measured: what ends how, and how fast.

Every scenario runs on a redis-server of this process's own (`EmbeddedRedis`: it can be taken
down) with real ``rq worker -w workers.KVWorker`` processes (`LocalCluster`), the producer in
process (`Producer` + `wait_for_results`, what ``send.py --wait`` runs). Requests are
576-token prompts of ``no-sharing`` decoding 200 tokens: 3,095 simulated ms, 155 ms of wall
time at ``--scale 0.05``. Heartbeats expire after ``--heartbeat-ttl`` seconds.

Columns: ``sent``, ``completed``, ``rejected``, ``failed`` (``sent`` = the three, always),
``rerouted`` (queued requests the producer moved off a dead worker), ``detect s`` (from the
fault to the producer claiming the dead worker), ``reported s`` (from the fault to the last
request's result), and what else was seen.

Then Redis memory: bytes a request leaves behind after its run (by key family, with when each
expires), and bytes per entry of the cache-event stream (as the default workload writes it,
and at its largest: a 512-block prompt's `stored` event), times the cap.

Usage::

    python bench/bench_faults.py [--scale 0.05] [--heartbeat-ttl 3] [--requests 60]
        [--scenarios kill,kill-spread,...] [--memory-requests 1000] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

import orjson
import redis
from bench_args import parse_args

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.gpu.events import BlocksStored, encode_event
from kvqueue.gpu.hashing import hash_token_blocks
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.live.cluster import LocalCluster
from kvqueue.live.embedded import EmbeddedRedis
from kvqueue.live.jobs import SNAPSHOT_FUNCTION
from kvqueue.live.producer import Producer
from kvqueue.live.run import run_live
from kvqueue.live.waiting import wait_for_results
from kvqueue.routing.membership import RedisMembership
from kvqueue.routing.redis_index import RedisIndex
from kvqueue.workloads.synthetic import make_workload

PREFIX = keys.DEFAULT_PREFIX
OUTPUT_TOKENS = 200
QUICK = {"scenarios": "kill,plain-rq", "heartbeat_ttl": 1.0, "requests": 12, "memory_requests": 40}


@dataclass(frozen=True, slots=True)
class Row:
    scenario: str
    results: list[RequestResult]
    rerouted: int = 0
    detect_s: float | None = None
    reported_s: float | None = None
    seen: str = ""


@dataclass
class Bench:
    server: EmbeddedRedis
    client: redis.Redis
    scale: float
    heartbeat_ttl_s: float
    num_requests: int
    log_dir: Path | None = None

    def settings(self, **overrides: object) -> Settings:
        values = {
            "redis_url": self.server.url,
            "key_prefix": PREFIX,
            "time_scale": self.scale,
            "heartbeat_ttl_s": self.heartbeat_ttl_s,
            "strategy": "round_robin",
        }
        return Settings(**(values | overrides))

    def cluster(self, num_workers: int, **env: str) -> LocalCluster:
        self.client.flushdb()
        worker_env = {"KVQ_HEARTBEAT_TTL": str(self.heartbeat_ttl_s), **env}
        cluster = LocalCluster(self.server.url, num_workers, env=worker_env, prefix=PREFIX,
                               log_dir=self.log_dir)  # fmt: skip
        return cluster.start()


def long_requests(count: int, spacing_ms: float = 0.0) -> list[Request]:
    return [
        replace(r, max_tokens=OUTPUT_TOKENS, arrival_ms=i * spacing_ms)
        for i, r in enumerate(make_workload("no-sharing", count))
    ]


def wait_until(condition: Callable[[], object], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout_s} s")
        time.sleep(0.002)


def serving(client: redis.Redis, worker: str) -> bool:
    records = client.hvals(keys.worker_jobs(worker, PREFIX))
    return any(orjson.loads(r).get("started") for r in records)


def last_result_at(client: redis.Redis, run_id: str) -> float:
    """Epoch seconds of the run's last result (its stream id)."""
    ((entry_id, _),) = client.xrevrange(keys.results(run_id, PREFIX), count=1)
    return int(entry_id.decode().split("-")[0]) / 1000.0


# -- scenarios -------------------------------------------------------------------------------------
def kill_mid_run(bench: Bench, spacing_ms: float) -> Row:
    """SIGKILL worker-1 of 3: while serving (all sent at once), or 1 s in (spread arrivals)."""
    cluster = bench.cluster(3)
    run_id = "kill-spread" if spacing_ms else "kill-at-once"
    producer = Producer(bench.client, bench.settings(), run_id=run_id)
    killed: list[float] = []

    def kill(after_s: float) -> None:
        if not killed and time.time() - started >= after_s:
            cluster.kill("worker-1")
            killed.append(time.time())

    started = time.time()
    try:
        count = bench.num_requests
        if spacing_ms:
            sent = producer.send(long_requests(count, spacing_ms), on_sent=lambda: kill(1.0))
        else:
            sent = producer.send(long_requests(count))
            wait_until(lambda: serving(bench.client, "worker-1"))
            kill(0.0)
        results = wait_for_results(bench.client, run_id, sent.job_ids, PREFIX, timeout_s=120,
                                   recovery=producer.recovery)  # fmt: skip
    finally:
        cluster.stop()
    stats = producer.recovery.stats
    how = "one request every 100 ms" if spacing_ms else "all sent at once"
    return Row(
        f"SIGKILL 1 of 3 workers ({how})",
        results,
        stats.rerouted,
        stats.detected_at["worker-1"] - killed[0],
        last_result_at(bench.client, run_id) - killed[0],
        f"send.py --wait would exit {1 if any_failed(results) else 0}",
    )


def rq_fails_the_jobs(bench: Bench) -> Row:
    """A plain `rq worker` (pickle, forking) takes a KV worker's queue by mistake."""
    bench.client.flushdb()
    settings = bench.settings(heartbeat_ttl_s=60.0)
    RedisMembership(bench.client, PREFIX).register("worker-0", 924)
    producer = Producer(bench.client, settings, run_id="plain-rq")
    sent = producer.send(make_workload("shared-prefix-tiny"))
    command = [sys.executable, "-c", "import sys; from rq.cli import main; sys.exit(main())",
               "worker", "--burst", "--url", bench.server.url, "worker-0"]  # fmt: skip
    fault = time.time()
    subprocess.run(command, capture_output=True, check=True, timeout=120)
    results = wait_for_results(bench.client, "plain-rq", sent.job_ids, PREFIX, timeout_s=60)
    reasons = Counter(r.reason.split(":")[1].strip() for r in results if r.reason)
    return Row(
        "a plain `rq worker` takes worker-0's queue",
        results,
        reported_s=last_result_at(bench.client, "plain-rq") - fault,
        seen=f"reason: RQ failed its job: {next(iter(reasons), '')}",
    )


def restart_under_the_same_name(bench: Bench) -> Row:
    cluster = bench.cluster(2)
    producer = Producer(bench.client, bench.settings(), run_id="restart")
    try:
        sent = producer.send(long_requests(max(6, bench.num_requests // 3)))
        wait_until(lambda: serving(bench.client, "worker-1"))
        fault = time.time()
        cluster.kill("worker-1")
        cluster.restart("worker-1")
        results = wait_for_results(bench.client, "restart", sent.job_ids, PREFIX, timeout_s=120,
                                   recovery=producer.recovery)  # fmt: skip
        loads = bench.client.hgetall(keys.load(PREFIX))
    finally:
        cluster.stop()
    served = Counter(r.worker for r in results if r.status is RequestStatus.COMPLETED)
    return Row(
        "worker-1 SIGKILLed and restarted at once",
        results,
        producer.recovery.stats.rerouted,
        reported_s=last_result_at(bench.client, "restart") - fault,
        seen=f"served after: {dict(sorted(served.items()))}; load counters "
        f"{ {k.decode(): int(v) for k, v in loads.items()} }",
    )


def redis_outage(bench: Bench, keep_data: bool) -> Row:
    """Redis down 2 s while every worker is busy (data kept), or restarted empty."""
    cluster = bench.cluster(3, KVQ_HEARTBEAT_TTL="15")
    settings = bench.settings(heartbeat_ttl_s=15.0, strategy="cache_aware")
    run_id = "outage" if keep_data else "emptied"
    producer = Producer(bench.client, settings, run_id=run_id)
    try:
        workload = (
            long_requests(max(6, bench.num_requests // 2))
            if keep_data
            else make_workload("shared-prefix-small")
        )
        sent = producer.send(workload)
        wait_until(lambda: all(serving(bench.client, w) for w in cluster.workers))
        fault = time.time()
        bench.server.restart(keep_data=keep_data, down_s=2.0 if keep_data else 0.0)
        if keep_data:
            results = wait_for_results(bench.client, run_id, sent.job_ids, PREFIX, timeout_s=120)
            seen = ""
        else:
            live = RedisMembership(bench.client, PREFIX)
            wait_until(lambda: len(live.live_workers(15.0)) == 3)
            announced = time.time() - fault
            visible_now = visible_share(bench, cluster)
            nxt = run_live(bench.client, settings, make_workload("shared-prefix-small", seed=1),
                           run_id="after", progress=False)  # fmt: skip
            results = nxt.results
            seen = (
                f"caches re-announced {announced:.1f} s after; the tree shows {visible_now:.0%} "
                f"of the cached blocks then, {visible_share(bench, cluster):.0%} after the next run"
            )
        alive = len(cluster.running())
    finally:
        cluster.stop()
    reported = last_result_at(bench.client, run_id) - fault if keep_data else None
    return Row(
        "Redis down 2 s, data kept" if keep_data else "Redis restarted empty: the next run",
        results,
        reported_s=reported,
        seen=f"workers alive: {alive}/3; {seen}".rstrip("; "),
    )


def visible_share(bench: Bench, cluster: LocalCluster) -> float:
    """Share of the workers' cached blocks (asked of the processes) the tree shows."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    cached = 0
    visible = 0
    for worker in cluster.workers:
        job = Queue(worker, connection=bench.client, serializer=JSONSerializer).enqueue(
            SNAPSHOT_FUNCTION
        )
        wait_until(lambda j=job: j.get_status(refresh=True) == "finished")
        hashes = job.return_value(refresh=True)["cached"]
        held = RedisIndex(bench.client, PREFIX).cached_by(worker)
        cached += len(hashes)
        visible += len(set(hashes) & {h.hex() for h in held})
    return visible / cached if cached else 1.0


def overload_with_a_timeout(bench: Bench) -> Row:
    cluster = bench.cluster(2)
    producer = Producer(bench.client, bench.settings(), run_id="overload")
    try:
        start = time.time()
        sent = producer.send(make_workload("no-sharing", 1000))
        results = wait_for_results(bench.client, "overload", sent.job_ids, PREFIX, timeout_s=5,
                                   recovery=producer.recovery)  # fmt: skip
        ended = time.time() - start
    finally:
        cluster.stop()
    return Row(
        "1,000 requests at once into 2 workers, 5 s timeout",
        results,
        reported_s=ended,
        seen="reported s: from the first request sent; the others failed: "
        + ", ".join(sorted({r.reason.split(" (")[0] for r in results if r.reason})),
    )


SCENARIOS: dict[str, Callable[[Bench], Row]] = {
    "kill": lambda b: kill_mid_run(b, 0.0),
    "kill-spread": lambda b: kill_mid_run(b, 2000.0),
    "plain-rq": rq_fails_the_jobs,
    "restart": restart_under_the_same_name,
    "redis-down": lambda b: redis_outage(b, keep_data=True),
    "redis-empty": lambda b: redis_outage(b, keep_data=False),
    "overload": overload_with_a_timeout,
}


def any_failed(results: Sequence[RequestResult]) -> bool:
    return any(r.status is RequestStatus.FAILED for r in results)


# -- memory ----------------------------------------------------------------------------------------
def memory(bench: Bench, num_requests: int) -> list[str]:
    """Bytes per request left in Redis after a run, by key family, and the event stream's."""
    cluster = bench.cluster(2)
    try:
        run = run_live(bench.client, bench.settings(time_scale=0.0, strategy="cache_aware"),
                       make_workload("shared-prefix-small", num_requests), run_id="memory",
                       progress=False)  # fmt: skip
    finally:
        cluster.stop()
    families = {
        "results stream (kvq:results:<run>)": [keys.results("memory", PREFIX)],
        "reported set (kvq:run:<run>:reported)": [keys.run_reported("memory", PREFIX)],
        "run metadata (kvq:run:<run>)": [keys.run("memory", PREFIX)],
        "RQ job hashes (rq:job:<id>)": list(bench.client.scan_iter(match="rq:job:kvq-memory-*")),
        "RQ results (rq:results:<id>)": list(
            bench.client.scan_iter(match="rq:results:kvq-memory-*")
        ),
    }
    expiry = {
        "results stream (kvq:results:<run>)": "KVQ_RUN_TTL after the run's last result",
        "reported set (kvq:run:<run>:reported)": "KVQ_RUN_TTL after the run's last result",
        "run metadata (kvq:run:<run>)": "KVQ_RUN_TTL after the run's last result",
        "RQ job hashes (rq:job:<id>)": "10 min after the job ends (RQ result_ttl)",
        "RQ results (rq:results:<id>)": "10 min after the job ends (RQ result_ttl)",
    }
    header = f"{'key family':<40} {'bytes/request':>13}  expires"
    lines = [f"{len(run.results):,} requests of shared-prefix-small, 2 workers", "", header]
    lines.append("-" * len(header))
    total = 0
    for family, names in families.items():
        size = sum(bench.client.memory_usage(name, samples=0) or 0 for name in names)
        total += size
        lines.append(f"{family:<40} {size / len(run.results):>13,.0f}  {expiry[family]}")
    lines.append(f"{'total':<40} {total / len(run.results):>13,.0f}")
    events = keys.events(PREFIX)
    per_entry = (bench.client.memory_usage(events, samples=0) or 0) / bench.client.xlen(events)
    # The largest entry kvqueue writes: a miss of an 8k-token prompt stores 512 blocks at once.
    bench.client.delete("bench:events")
    hashes = hash_token_blocks(list(range(512 * 16)))
    payload = encode_event(BlocksStored(tuple(hashes), None))
    for _ in range(200):
        bench.client.xadd("bench:events", {"worker": "worker-0", "event": payload})
    largest = (bench.client.memory_usage("bench:events", samples=0) or 0) / 200
    cap = Settings().events_maxlen
    lines += [
        "",
        f"cache-event stream: {per_entry:,.0f} bytes/entry for this workload "
        f"({per_entry * cap / 1e6:,.1f} MB at the {cap:,}-entry cap); a 512-block `stored` "
        f"entry takes {largest:,.0f} bytes ({largest * cap / 1e6:,.0f} MB at the cap)",
    ]
    return lines


# -- output ----------------------------------------------------------------------------------------
def table(rows: Sequence[Row]) -> list[str]:
    header = (
        f"{'scenario':<50} {'sent':>5} {'done':>5} {'rej':>4} {'fail':>5} {'rerouted':>8} "
        f"{'detect s':>8} {'reported s':>10}  seen"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        counts = Counter(r.status for r in row.results)
        detect = "-" if row.detect_s is None else f"{row.detect_s:.1f}"
        reported = "-" if row.reported_s is None else f"{row.reported_s:.1f}"
        lines.append(
            f"{row.scenario:<50} {len(row.results):>5,} "
            f"{counts[RequestStatus.COMPLETED]:>5,} {counts[RequestStatus.REJECTED]:>4,} "
            f"{counts[RequestStatus.FAILED]:>5,} {row.rerouted:>8,} {detect:>8} {reported:>10}  "
            f"{row.seen}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.05, help="wall s per simulated s")
    parser.add_argument("--heartbeat-ttl", type=float, default=3.0, help="seconds")
    parser.add_argument("--requests", type=int, default=60, help="requests of the kill runs")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    parser.add_argument("--memory-requests", type=int, default=1000, help="0 skips memory")
    parser.add_argument("--log-dir", type=Path, help="keep the workers' logs here")
    args = parse_args(parser, argv, QUICK)
    if args.requests < 6:
        parser.error(f"--requests must be at least 6, got {args.requests}")
    chosen = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; valid: {', '.join(SCENARIOS)}")
    logging.basicConfig(level=logging.ERROR)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with EmbeddedRedis() as server:
        bench = Bench(server, redis.Redis.from_url(server.url), args.scale, args.heartbeat_ttl,
                      args.requests, args.log_dir)  # fmt: skip
        rows = []
        for name in chosen:
            rows.append(SCENARIOS[name](bench))
            print(f"{name}: done", file=sys.stderr)
        print(f"time scale {args.scale:g}, heartbeat TTL {args.heartbeat_ttl:g} s")
        print("\n".join(table(rows)))
        if args.memory_requests > 0:
            print()
            print("\n".join(memory(bench, args.memory_requests)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers for the tests that use the real Redis and real `rq worker` processes.

Each such module gets a Redis db of its own on the test server (conftest's
`real_redis_base_url`: ``KVQ_TEST_REDIS_URL``, else 127.0.0.1:6379, else an embedded
redis-server), so that test runs going on at the same time — other modules, the conftest
`redis_url` fixture flushing db 15, the demo tests on db 8, the benchmarks on db 11,
their smoke tests on db 12 and the distributed sweep's queue on db 5 — never wipe each
other's keys. The live modules need a whole db because RQ's queue names (``worker-0``)
cannot carry a key prefix; the index
and router modules share one db and use a unique key prefix per test instead.

Like conftest's `redis_url`, nothing here skips: an unreachable Redis FAILS the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import pytest
import redis
from rq import Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.gpu.events import CacheEvent, decode_event
from kvqueue.live.cluster import LocalCluster
from kvqueue.live.jobs import SNAPSHOT_FUNCTION
from kvqueue.routing.inspect import read_tree

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

RELIABILITY_DB = 5  # test_recovery, test_security, test_run_outcomes: flushed before every test
INDEX_DB = 9  # test_index, test_router: a unique key prefix per test, never flushed
E2E_DB = 10  # test_pipeline_e2e: flushed before every cluster
FAULTS_DB = 7  # test_faults: flushed before every test
PARITY_DB = 6  # test_parity: flushed before every cluster
BENCH_DB = 12  # test_bench_smoke: the benchmark scripts flush it
SWEEP_DB = 5  # test_sweep_distributed: the kvq-sim queue, flushed around every test


def real_redis_url(base_url: str, db: int) -> str:
    """The test server's URL (`real_redis_base_url`) with its database number set to `db`."""
    parts = urlsplit(base_url)
    if parts.scheme == "unix":
        query = dict(parse_qsl(parts.query)) | {"db": str(db)}
        return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


def flushed_database(base_url: str, db: int) -> Iterator[tuple[str, redis.Redis]]:
    """For a fixture: database `db` of the test server and a client, the database emptied
    before and after the test. FAILS the test if Redis does not answer."""
    url = real_redis_url(base_url, db)
    client = connect_or_fail(url)
    client.flushdb()
    try:
        yield url, client
    finally:
        client.flushdb()
        client.close()


def connect_or_fail(url: str) -> redis.Redis:
    """A client of `url`; FAILS the calling test (never skips) if Redis does not answer."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=30)
    unreachable: redis.RedisError | None = None
    try:
        client.ping()
    except redis.RedisError as exc:
        unreachable = exc
    if unreachable is not None:
        client.close()
        pytest.fail(
            f"real Redis required at {url} (set KVQ_TEST_REDIS_URL) but it is not "
            f"reachable: {unreachable}",
            pytrace=False,
        )
    return client


def unique_prefix(tag: str) -> str:
    return f"kvqtest:{tag}:{uuid.uuid4().hex[:8]}:"


def delete_matching(client: redis.Redis, pattern: str) -> None:
    batch = list(client.scan_iter(match=pattern, count=1000))
    for start in range(0, len(batch), 500):
        client.delete(*batch[start : start + 500])


def now_ms() -> int:
    return int(time.time() * 1000)


def register_workers(
    client: redis.Redis, prefix: str, workers: Iterable[str], age_s: float = 0.0
) -> None:
    """Put `workers` in the live set with a heartbeat `age_s` seconds old."""
    client.zadd(keys.workers(prefix), {w: now_ms() - int(age_s * 1000) for w in workers})


# -- live clusters ---------------------------------------------------------------------------------
def start_cluster(
    url: str,
    prefix: str,
    num_workers: int = 2,
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
) -> LocalCluster:
    """Real `rq worker -w workers.KVWorker worker-<i>` processes."""
    return LocalCluster(url, num_workers, env=env, prefix=prefix, log_dir=log_dir).start(
        timeout_s=30
    )


def rq_queue_keys(client: redis.Redis) -> list[str]:
    """Every RQ queue list that exists (an enqueued, not yet taken job keeps one alive)."""
    return sorted(k.decode() for k in client.scan_iter(match="rq:queue:*"))


def load_hashes(
    client: redis.Redis, prefix: str, workers: Iterable[str]
) -> dict[str, dict[str, float]]:
    """The router's outstanding load of `workers` (0 when absent), by kind:
    {"requests"|"tokens"|"work_ms": {worker: value}}."""
    named = {
        "requests": keys.load(prefix),
        "tokens": keys.load_tokens(prefix),
        "work_ms": keys.load_work(prefix),
    }
    workers = list(workers)
    loads = {}
    for name, key in named.items():
        values = client.hmget(key, workers)
        loads[name] = {
            w: float(v) if v is not None else 0.0 for w, v in zip(workers, values, strict=True)
        }
    return loads


def dump_tree(client: redis.Redis, prefix: str) -> dict[str, dict[str, str]]:
    """Every prefix-tree node in Redis as its readers see it (`kvqueue.routing.inspect`):
    {block hash hex: {``w:<worker>``: "1" per storing worker, ``p:<worker>``: expiry}}.
    Fields of retired slots are left out, and so are nodes holding nothing else."""
    tree = {}
    for node in read_tree(client, prefix):
        fields = {f"w:{w}": "1" for w in node.stored_by}
        fields.update({f"p:{w}": str(expires) for w, expires in node.pending.items()})
        if fields:
            tree[node.block_hash.hex()] = fields
    return tree


def tree_holders(tree: Mapping[str, Mapping[str, str]]) -> dict[str, set[str]]:
    """{worker: hashes whose node has a ``w:<worker>`` field} (stored, not pending)."""
    held: dict[str, set[str]] = {}
    for block_hex, fields in tree.items():
        for field in fields:
            if field.startswith("w:"):
                held.setdefault(field[2:], set()).add(block_hex)
    return held


def events_by_worker(client: redis.Redis, prefix: str) -> dict[str, list[CacheEvent]]:
    """The cache-event stream, decoded and split per worker, in stream order."""
    split: dict[str, list[CacheEvent]] = {}
    for _, fields in client.xrange(keys.events(prefix)):
        split.setdefault(fields[b"worker"].decode(), []).append(decode_event(fields[b"event"]))
    return split


def cache_snapshot(client: redis.Redis, worker: str, timeout_s: float = 20.0) -> dict:
    """Ask the worker process itself for its cached hashes (`kvqueue.live.worker.cache_snapshot`,
    queued behind every request before it, answered from the process's own memory)."""
    queue = Queue(keys.queue_name(worker), connection=client, serializer=JSONSerializer)
    job = queue.enqueue(SNAPSHOT_FUNCTION, result_ttl=600)
    deadline = time.monotonic() + timeout_s
    while True:
        status = job.get_status(refresh=True)
        if status == JobStatus.FINISHED:
            return job.return_value(refresh=True)
        if status == JobStatus.FAILED or time.monotonic() > deadline:
            result = job.latest_result()
            raise AssertionError(
                f"cache snapshot of {worker} {status}: {result.exc_string if result else ''}"
            )
        time.sleep(0.02)


def wait_for_stream_length(
    client: redis.Redis, stream: str, length: int, timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while client.xlen(stream) < length:
        if time.monotonic() > deadline:
            raise AssertionError(f"{stream} has {client.xlen(stream)} entries, want {length}")
        time.sleep(0.01)


# -- fault injection -------------------------------------------------------------------------------
# A fault test marked with this runs once per engine of the live worker (conftest's `worker_env`).
EVERY_ENGINE = pytest.mark.parametrize("worker_env", ["sequential", "batched"], indirect=True)
FAULT_PREFIX = "kvqlab:"
FAULT_TIME_SCALE = 0.05  # 20× faster than real time
FAULT_HEARTBEAT_TTL_S = 2.0  # deaths are seen within 2 s (+ the reaper's 0.5 s)
SEND_PY = str(REPO_ROOT / "producer" / "send.py")


@dataclass
class Lab:
    """A Redis db of one's own, KV workers to start in it (with the engine's environment),
    and the producer, in process or as `producer/send.py`. Every cluster is stopped at the end.
    """

    url: str
    client: redis.Redis
    log_dir: Path
    worker_env: dict[str, str]
    prefix: str = FAULT_PREFIX
    heartbeat_ttl_s: float = FAULT_HEARTBEAT_TTL_S
    clusters: list[LocalCluster] = dataclass_field(default_factory=list)

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": self.url,
            "key_prefix": self.prefix,
            "time_scale": FAULT_TIME_SCALE,
            "heartbeat_ttl_s": self.heartbeat_ttl_s,
            "strategy": "round_robin",
        }
        return Settings(**(values | overrides))

    def cluster(self, num_workers: int = 3, **env: str) -> LocalCluster:
        worker_env = {"KVQ_HEARTBEAT_TTL": str(self.heartbeat_ttl_s), **self.worker_env, **env}
        cluster = LocalCluster(
            self.url, num_workers, env=worker_env, prefix=self.prefix, log_dir=self.log_dir
        )
        self.clusters.append(cluster)
        return cluster.start(timeout_s=30)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a `send.py` run against this lab."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KVQ_", "RQ_"))}
        env.pop("ROUTING_STRATEGY", None)
        return env | {
            "REDIS_URL": self.url,
            "KVQ_PREFIX": self.prefix,
            "KVQ_HEARTBEAT_TTL": str(self.heartbeat_ttl_s),
            "KVQ_TIME_SCALE": str(FAULT_TIME_SCALE),
            **extra,
        }

    def send_py(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, SEND_PY, *args],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def start_send_py(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, SEND_PY, *args],
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> None:
        for cluster in self.clusters:
            cluster.stop()


def write_trace(path: Path, num_requests: int, output_tokens: int, spacing_ms: float = 0.0) -> Path:
    """A Mooncake trace of `num_requests` unrelated 512-token prompts, `spacing_ms` apart
    (simulated), each decoding `output_tokens`: long, equal requests a test can time."""
    lines = [
        orjson.dumps(
            {
                "timestamp": int(i * spacing_ms),
                "input_length": 512,
                "output_length": output_tokens,
                "hash_ids": [1000 + i],
            }
        ).decode()
        for i in range(num_requests)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_until(condition: Callable[[], Any], timeout_s: float = 30.0, what: str = "") -> Any:
    """Poll `condition` until it returns something truthy; FAIL after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what or condition}")
        time.sleep(0.005)


def job_records(client: redis.Redis, prefix: str, worker: str) -> dict[str, dict[str, Any]]:
    """A worker's outstanding load records: {job id: record}."""
    raw = client.hgetall(keys.worker_jobs(worker, prefix))
    return {k.decode(): orjson.loads(v) for k, v in raw.items()}


def serving(client: redis.Redis, prefix: str, worker: str) -> bool:
    """The worker has a request in service right now (a started load record)."""
    return any(r.get("started") for r in job_records(client, prefix, worker).values())

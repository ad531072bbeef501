"""End to end: the real Redis, two real `rq worker -w workers.KVWorker` processes, the producer.

Nothing is mocked. Every strategy runs on a fresh cluster (fresh processes, flushed db) so no
run inherits another's cache. Emulated time runs 100× faster than real (time scale 0.01).

How a worker's *actual* cache is read from outside its process: kvqueue's job function
`cache_snapshot` is enqueued on the worker's own RQ queue like any request, so it runs inside the
KV worker process after every request before it, and returns the hashes its `BlockCache` holds. That
answer involves no Redis state, so comparing it with the tree in Redis is a real check of
"the tree follows the caches" — the worker's block set and a replay of the event stream are
compared too, but they are written by the same MULTI/EXEC as the tree and cannot catch a
worker that forgot to publish an eviction.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import redis
from live_support import (
    E2E_DB,
    REPO_ROOT,
    cache_snapshot,
    connect_or_fail,
    dump_tree,
    events_by_worker,
    load_hashes,
    real_redis_url,
    start_cluster,
    tree_holders,
    wait_for_stream_length,
)

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.gpu.events import BlocksStored, CacheEvent, replay
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.live.cluster import LocalCluster
from kvqueue.live.producer import Producer
from kvqueue.live.run import LiveRun, run_live
from kvqueue.live.runs import read_results
from kvqueue.routing.redis_index import RedisIndex
from kvqueue.workloads.synthetic import SHARED_PREFIX_PRESETS, make_workload

pytestmark = [pytest.mark.slow, pytest.mark.redis]

PREFIX = "kvqe2e:"
TIME_SCALE = 0.01
WORKERS = ["worker-0", "worker-1"]
TINY = SHARED_PREFIX_PRESETS["shared-prefix-tiny"]
SYSTEM_BLOCKS = TINY["system_prompt_len"] // 16  # 16 blocks shared by each group
REQUEST_BLOCKS = (TINY["system_prompt_len"] + TINY["question_len"]) // 16  # 18
NUM_TINY = TINY["num_groups"] * TINY["prompts_per_group"]  # 16


@dataclass
class Live:
    url: str
    client: redis.Redis
    log_dir: Path

    def settings(self, strategy: str, time_scale: float = TIME_SCALE) -> Settings:
        return Settings(
            redis_url=self.url, key_prefix=PREFIX, strategy=strategy, time_scale=time_scale
        )

    @contextmanager
    def fresh_cluster(self, env: Mapping[str, str] | None = None) -> Iterator[LocalCluster]:
        self.client.flushdb()
        cluster = start_cluster(self.url, PREFIX, len(WORKERS), env, self.log_dir)
        try:
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="module")
def live(real_redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    url = real_redis_url(real_redis_base_url, E2E_DB)
    client = connect_or_fail(url)
    try:
        yield Live(url, client, tmp_path_factory.mktemp("worker-logs"))
    finally:
        client.flushdb()
        client.close()


def group_of(result_or_request: RequestResult | Request) -> str:
    return result_or_request.request_id.split("-")[1]  # sp-g003-p001 -> g003


@dataclass
class StrategyRun:
    """One strategy's run of shared-prefix-tiny on a fresh cluster, and Redis right after."""

    requests: list[Request]
    run: LiveRun
    stream_length: int
    queue_lengths: dict[str, int]
    loads: dict[str, dict[str, float]]

    @property
    def results(self) -> list[RequestResult]:
        return self.run.results

    def worker_of(self) -> dict[str, str]:
        return {r.request_id: r.worker for r in self.results}

    def hit_blocks(self) -> int:
        return sum(r.hit_blocks for r in self.results)

    def hit_rate(self) -> float:
        return self.hit_blocks() / sum(r.num_blocks for r in self.results)


@pytest.fixture(scope="module")
def strategy_run(live: Live) -> Callable[[str], StrategyRun]:
    """Runs each strategy once (on first use), each on a cluster of its own."""
    done: dict[str, StrategyRun] = {}

    def get(strategy: str) -> StrategyRun:
        if strategy not in done:
            requests = make_workload("shared-prefix-tiny", seed=0)
            with live.fresh_cluster():
                run = run_live(
                    live.client, live.settings(strategy), requests, progress=False, timeout_s=60
                )
                done[strategy] = StrategyRun(
                    requests=requests,
                    run=run,
                    stream_length=live.client.xlen(keys.results(run.sent.run_id, PREFIX)),
                    queue_lengths={w: live.client.llen(f"rq:queue:{w}") for w in WORKERS},
                    loads=load_hashes(live.client, PREFIX, WORKERS),
                )
        return done[strategy]

    return get


# -- every strategy --------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["cache_aware", "round_robin", "least_loaded"])
def test_every_request_ends_with_exactly_one_result_in_redis(
    strategy_run: Callable[[str], StrategyRun], strategy: str
) -> None:
    run = strategy_run(strategy)

    assert sorted(r.request_id for r in run.results) == sorted(r.request_id for r in run.requests)
    assert run.stream_length == NUM_TINY
    assert Counter(r.status for r in run.results) == {RequestStatus.COMPLETED: NUM_TINY}
    assert {r.worker for r in run.results} == set(WORKERS)
    assert {(r.strategy, r.run_id) for r in run.results} == {(strategy, run.run.sent.run_id)}
    for result in run.results:
        assert result.num_blocks == REQUEST_BLOCKS
        assert result.decode_tokens == TINY["output_len"]
        assert result.ttft_ms == pytest.approx(result.queue_wait_ms + result.prefill_ms)
        assert result.e2e_ms == pytest.approx(result.ttft_ms + result.decode_ms)
    # Nothing left behind: queues drained, every worker's outstanding load back to zero.
    assert run.queue_lengths == dict.fromkeys(WORKERS, 0)
    assert run.loads["requests"] == dict.fromkeys(WORKERS, 0)
    assert run.loads["tokens"] == dict.fromkeys(WORKERS, 0)
    assert run.loads["work_ms"] == pytest.approx(dict.fromkeys(WORKERS, 0.0), abs=1e-6)


# -- cache_aware -----------------------------------------------------------------------------------
def test_cache_aware_sends_each_shared_prefix_to_one_worker(
    strategy_run: Callable[[str], StrategyRun],
) -> None:
    run = strategy_run("cache_aware")

    workers_by_group: dict[str, set[str]] = {}
    for result in run.results:
        workers_by_group.setdefault(group_of(result), set()).add(result.worker)
    assert len(workers_by_group) == TINY["num_groups"]
    assert all(len(workers) == 1 for workers in workers_by_group.values()), workers_by_group
    # The groups are spread over both workers, not piled onto one.
    assert Counter(next(iter(w)) for w in workers_by_group.values()) == dict.fromkeys(WORKERS, 2)
    # Only each group's first request computes its system prompt; every other one hits it all.
    first_of_group = TINY["num_groups"]
    assert Counter(r.hit_blocks for r in run.results) == {
        0: first_of_group,
        SYSTEM_BLOCKS: NUM_TINY - first_of_group,
    }


def test_cache_aware_hit_rate_is_clearly_higher_than_round_robin(
    strategy_run: Callable[[str], StrategyRun],
) -> None:
    cache_aware, round_robin = strategy_run("cache_aware"), strategy_run("round_robin")

    assert cache_aware.requests == round_robin.requests  # the same workload, same seed
    # Round robin pays the system prompt once per (group, worker) pair it spreads a group over.
    pairs = Counter((group_of(r), r.worker) for r in round_robin.results)
    assert round_robin.hit_blocks() == sum((n - 1) * SYSTEM_BLOCKS for n in pairs.values())
    assert cache_aware.hit_rate() == pytest.approx(12 * 16 / 288)
    assert cache_aware.hit_rate() >= round_robin.hit_rate() + 0.15, (
        f"cache_aware {cache_aware.hit_rate():.3f} vs round_robin {round_robin.hit_rate():.3f}"
    )


# -- round_robin -----------------------------------------------------------------------------------
def test_round_robin_alternates_between_the_workers_evenly(
    strategy_run: Callable[[str], StrategyRun],
) -> None:
    run = strategy_run("round_robin")
    worker_of = run.worker_of()

    assert Counter(worker_of.values()) == dict.fromkeys(WORKERS, NUM_TINY // 2)
    # The shared ticket starts at 1 on a fresh Redis: request i goes to worker i mod 2.
    assert [worker_of[r.request_id] for r in run.requests] == [
        WORKERS[i % 2] for i in range(NUM_TINY)
    ]


# -- least_loaded ----------------------------------------------------------------------------------
def test_least_loaded_sends_work_away_from_the_busy_worker(live: Live, make_request) -> None:
    client = live.client
    settings = live.settings("least_loaded", time_scale=0.1)
    with live.fresh_cluster():
        # 1,000 output tokens: 15 s simulated, 1.5 s of real time at scale 0.1.
        heavy = make_request(64, request_id="heavy", max_tokens=1000)
        Producer(client, settings, run_id="heavy").send([heavy])
        light_workers = []
        for i in range(3):
            assert client.xlen(keys.results("heavy", PREFIX)) == 0, "heavy ended too soon"
            loads = load_hashes(client, PREFIX, WORKERS)["requests"]
            assert loads == {"worker-0": 1, "worker-1": 0}
            run_id = f"light-{i}"
            light = make_request(32, request_id=run_id, max_tokens=1)
            Producer(client, settings, run_id=run_id).send([light])
            wait_for_stream_length(client, keys.results(run_id, PREFIX), 1, timeout_s=10)
            (result,), _ = read_results(client, run_id, PREFIX)
            light_workers.append(result.worker)
        wait_for_stream_length(client, keys.results("heavy", PREFIX), 1, timeout_s=30)
        (heavy_result,), _ = read_results(client, "heavy", PREFIX)
        loads_after = load_hashes(client, PREFIX, WORKERS)

    assert heavy_result.worker == "worker-0"
    assert heavy_result.decode_ms == 15_000
    assert light_workers == ["worker-1"] * 3
    assert loads_after["requests"] == dict.fromkeys(WORKERS, 0)
    assert loads_after["tokens"] == dict.fromkeys(WORKERS, 0)


# -- the tree follows the caches -------------------------------------------------------------------
def test_tree_equals_the_union_of_the_workers_real_caches_after_evictions(live: Live) -> None:
    client = live.client
    requests = make_workload("shared-prefix-small", seed=1)  # 64 × 36 blocks, 8 groups
    results: list[RequestResult] = []
    with live.fresh_cluster(env={"KVQ_NUM_BLOCKS": "64"}):
        for strategy in ("cache_aware", "round_robin"):  # two runs: more churn for one cluster
            run = run_live(client, live.settings(strategy), requests, progress=False, timeout_s=60)
            results += run.results
        snapshots = {w: cache_snapshot(client, w) for w in WORKERS}
        tree = dump_tree(client, PREFIX)
        events = events_by_worker(client, PREFIX)
        index = RedisIndex(client, PREFIX)
        block_sets = {w: {h.hex() for h in index.cached_by(w)} for w in WORKERS}

    assert Counter(r.status for r in results) == {RequestStatus.COMPLETED: 2 * len(requests)}
    cached = {w: set(s["cached"]) for w, s in snapshots.items()}
    for worker in WORKERS:
        evictions = sum(r.evictions for r in results if r.worker == worker)
        assert evictions > 0 and snapshots[worker]["num_evictions"] == evictions
        assert snapshots[worker]["capacity_blocks"] == 64
        assert 0 < len(cached[worker]) <= 64
    holders = tree_holders(tree)
    assert set(tree) == cached["worker-0"] | cached["worker-1"]
    for worker in WORKERS:
        assert holders.get(worker, set()) == cached[worker]
        assert block_sets[worker] == cached[worker]
        assert {h.hex() for h in replay(events[worker])} == cached[worker]
        # Prefix-closed, as the router's search needs: a worker holds every parent (the
        # parents as its stored events named them).
        parents = stored_parents(events[worker])
        for block_hex in cached[worker]:
            parent = parents[block_hex]
            assert parent == "" or parent in cached[worker]


def stored_parents(events: list[CacheEvent]) -> dict[str, str]:
    """{block hex: its parent's hex, '' for a first block}, from stored events."""
    parents = {}
    for event in events:
        if isinstance(event, BlocksStored):
            previous = event.parent_hash.hex() if event.parent_hash is not None else ""
            for block_hash in event.block_hashes:
                parents[block_hash.hex()] = previous
                previous = block_hash.hex()
    return parents


# -- the command line ------------------------------------------------------------------------------
def test_send_py_wait_json_prints_the_run_summary(live: Live) -> None:
    env = {
        **os.environ,
        "REDIS_URL": live.url,
        "KVQ_PREFIX": PREFIX,
        "KVQ_TIME_SCALE": str(TIME_SCALE),
    }
    command = [sys.executable, str(REPO_ROOT / "producer" / "send.py")]
    command += ["--workload", "shared-prefix-tiny", "--strategy", "cache_aware", "--wait", "--json"]
    with live.fresh_cluster():
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    summary = orjson.loads(done.stdout)
    assert (summary["completed"], summary["rejected"], summary["failed"]) == (NUM_TINY, 0, 0)
    assert summary["strategy"] == "cache_aware"
    assert summary["hit_rate"] == pytest.approx(12 * 16 / 288)  # fresh workers, as above
    assert set(summary["per_worker"]) == set(WORKERS)
    assert sum(row["requests"] for row in summary["per_worker"].values()) == NUM_TINY


def test_a_prompts_run_keeps_its_file_path_so_the_dashboard_knows_the_ideal(
    live: Live, tmp_path: Path
) -> None:
    """send.py given a prompts file by a relative path; dashboard.py run from elsewhere later
    still rebuilds the requests (the run stores the absolute path), so the ideal is known."""
    shutil.copy(REPO_ROOT / "examples" / "prompts.jsonl", tmp_path / "prompts.jsonl")
    env = {**os.environ, "REDIS_URL": live.url, "KVQ_PREFIX": PREFIX,
           "KVQ_TIME_SCALE": str(TIME_SCALE)}  # fmt: skip
    send = [sys.executable, str(REPO_ROOT / "producer" / "send.py"), "--prompts", "prompts.jsonl",
            "--strategy", "cache_aware", "--wait", "--json"]  # fmt: skip
    with live.fresh_cluster():
        sent = subprocess.run(
            send, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
    assert sent.returncode == 0, sent.stderr
    run_id = orjson.loads(sent.stdout)["run_id"]
    dashboard = [sys.executable, str(REPO_ROOT / "analysis" / "dashboard.py"), "--run-id", run_id,
                 "--out", str(tmp_path / "dash"), "--json"]  # fmt: skip
    done = subprocess.run(dashboard, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = orjson.loads(done.stdout)
    ideal = result["ideal_hit_rate"]
    assert isinstance(ideal, float) and ideal > 0.5  # two shared system prompts, 8 uses each
    assert result["strategies"]["cache_aware"]["hit_rate"] <= ideal
    assert "cannot rebuild" not in done.stderr

"""Workers that die, restart or stop, and a Redis that goes away: the cluster heals.

Real redis-server, real `rq worker -w workers.KVWorker` processes, killed with real signals,
each scenario once per engine (the `worker_env` fixture): a sequential worker serves one
request at a time, a batched one holds several in service (admitted: they fail with it) and
more taken from its queue but not admitted yet (those move on like queued ones). Heartbeats
expire after 2 s here (`FAULT_HEARTBEAT_TTL_S`), emulated time runs 20× faster than real time.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from live_support import (
    EVERY_ENGINE,
    Lab,
    cache_snapshot,
    connect_or_fail,
    dump_tree,
    load_hashes,
    serving,
    tree_holders,
    wait_until,
    write_trace,
)

from kvqueue import keys
from kvqueue.gpu.results import RequestStatus
from kvqueue.live.embedded import EmbeddedRedis
from kvqueue.live.producer import Producer
from kvqueue.live.recovery import Recovery
from kvqueue.live.run import run_live
from kvqueue.live.runs import read_results
from kvqueue.live.waiting import wait_for_results
from kvqueue.workloads.synthetic import make_workload
from kvqueue.workloads.traces import read_mooncake

pytestmark = [pytest.mark.slow, pytest.mark.redis, EVERY_ENGINE]

WORKERS = ["worker-0", "worker-1", "worker-2"]
# 512-token prompts decoding 200 tokens: 3,085 simulated ms, 154 ms of wall time each.
OUTPUT_TOKENS = 200


def statuses(results) -> Counter:
    return Counter(r.status for r in results)


def outstanding(lab: Lab, workers: list[str]) -> int:
    """Jobs routed to `workers` that have not ended (their load records)."""
    return sum(lab.client.hlen(keys.worker_jobs(w, lab.prefix)) for w in workers)


def assert_no_load_left(lab: Lab, workers: list[str]) -> None:
    loads = load_hashes(lab.client, lab.prefix, workers)
    assert loads["requests"] == dict.fromkeys(workers, 0)
    assert loads["tokens"] == dict.fromkeys(workers, 0)
    for worker in workers:
        assert lab.client.hlen(keys.worker_jobs(worker, lab.prefix)) == 0


# -- a worker dies ---------------------------------------------------------------------------------
def test_killing_one_of_three_workers_mid_run_still_gives_every_request_one_result(
    lab: Lab, worker_env: dict[str, str], tmp_path: Path
) -> None:
    """All 30 requests sent at once; worker-1 is SIGKILLed while serving its first one."""
    trace = write_trace(tmp_path / "trace.jsonl", 30, OUTPUT_TOKENS)
    cluster = lab.cluster(3)
    sending = lab.start_send_py("--trace", str(trace), "--strategy", "round_robin",
                                "--wait", "--json", "--timeout", "60")  # fmt: skip
    wait_until(lambda: serving(lab.client, lab.prefix, "worker-1"), what="worker-1 serving")
    cluster.kill("worker-1")
    stdout, stderr = sending.communicate(timeout=60)

    assert sending.returncode == 1, stderr  # something failed: the requests in service
    summary = orjson.loads(stdout)
    assert summary["sent"] == 30
    assert summary["sent"] == summary["completed"] + summary["rejected"] + summary["failed"]
    # What worker-1 had in service failed with it (one request, or a batched worker's batch);
    # the rest of its 10 (queued, or taken but not admitted) went to the others.
    failed = summary["failed"]
    assert summary["failure_reasons"] == {
        "worker worker-1 died (no heartbeat for 2 s) while serving it": failed
    }
    assert failed == 1 if worker_env["KVQ_ENGINE"] == "sequential" else 1 <= failed <= 10
    assert summary["completed"] == 30 - failed
    assert summary["rerouted"] == 10 - failed
    assert summary["dead_workers"] == ["worker-1"]
    assert summary["per_worker"]["worker-1"]["requests"] == 0
    results, _ = read_results(lab.client, summary["run_id"], lab.prefix)
    assert len(results) == len({r.request_id for r in results}) == 30  # one each, in Redis
    assert_no_load_left(lab, ["worker-0", "worker-2"])
    assert lab.client.zscore(keys.workers(lab.prefix), "worker-1") is None
    assert tree_holders(dump_tree(lab.client, lab.prefix)).get("worker-1") is None


def test_requests_routed_to_a_worker_before_its_death_is_noticed_are_rerouted(
    lab: Lab, tmp_path: Path
) -> None:
    """Spread arrivals: for one heartbeat TTL after the kill the router still sends there."""
    # One request every 2,000 simulated ms (100 ms of wall time), 36 in all: 3.6 s.
    trace = write_trace(tmp_path / "trace.jsonl", 36, 40, spacing_ms=2000)
    cluster = lab.cluster(3)
    settings = lab.settings()
    killed = []

    def kill_after_a_while() -> None:
        if not killed and time.monotonic() > started + 0.5:
            cluster.kill("worker-1")
            killed.append(time.time())

    started = time.monotonic()
    producer = Producer(lab.client, settings, "round_robin", "spread")
    sent = producer.send(read_mooncake(trace), on_sent=kill_after_a_while)
    results = wait_for_results(
        lab.client, "spread", sent.job_ids, lab.prefix, timeout_s=60, recovery=producer.recovery
    )

    assert len(results) == 36
    counts = statuses(results)
    assert counts[RequestStatus.COMPLETED] + counts[RequestStatus.FAILED] == 36
    assert counts[RequestStatus.FAILED] <= 1  # only a request in service at the kill fails
    assert producer.recovery.stats.dead_workers == ["worker-1"]
    # About a third of the requests sent in the 2.5 s before the death was noticed went to
    # worker-1; they were taken back from its queue and served by the others.
    assert producer.recovery.stats.rerouted >= 3
    assert_no_load_left(lab, ["worker-0", "worker-2"])


# -- a worker restarts, or stops -------------------------------------------------------------------
def test_a_worker_restarted_under_its_name_fails_the_request_in_service_and_serves_the_queued(
    lab: Lab, worker_env: dict[str, str], tmp_path: Path
) -> None:
    lab.heartbeat_ttl_s = 10.0  # the restart comes long before any reaper: registration acts
    cluster = lab.cluster(2)
    requests = read_mooncake(write_trace(tmp_path / "trace.jsonl", 12, OUTPUT_TOKENS))
    producer = Producer(lab.client, lab.settings(), "round_robin", "restart")
    sent = producer.send(requests)  # 6 each
    wait_until(lambda: serving(lab.client, lab.prefix, "worker-1"), what="worker-1 serving")
    cluster.kill("worker-1")
    cluster.restart("worker-1")
    results = wait_for_results(lab.client, "restart", sent.job_ids, lab.prefix, timeout_s=60)

    failed = [r for r in results if r.status is RequestStatus.FAILED]
    assert {(r.worker, r.reason) for r in failed} == {
        (
            "worker-1",
            "worker worker-1 (generation 1) stopped while serving it; the name is now generation 2",
        )
    }
    assert len(failed) == 1 if worker_env["KVQ_ENGINE"] == "sequential" else len(failed) >= 1
    # The requests still queued (or taken, not admitted) were the new process's own: counted,
    # served, released.
    assert Counter(r.worker for r in results if r.status is RequestStatus.COMPLETED) == {
        "worker-0": 6,
        "worker-1": 6 - len(failed),
    }
    assert_no_load_left(lab, ["worker-0", "worker-1"])
    info = lab.client.hgetall(keys.worker_info("worker-1", lab.prefix))
    assert (info[b"generation"], info[b"pid"]) == (b"2", str(cluster.pid("worker-1")).encode())


def test_after_its_producer_gave_up_a_restarted_worker_serves_none_of_the_run_and_counts_true(
    lab: Lab, tmp_path: Path
) -> None:
    lab.heartbeat_ttl_s = 10.0
    cluster = lab.cluster(3)
    requests = read_mooncake(write_trace(tmp_path / "trace.jsonl", 30, OUTPUT_TOKENS))
    producer = Producer(lab.client, lab.settings(), "round_robin", "abandoned")
    sent = producer.send(requests)
    wait_until(lambda: serving(lab.client, lab.prefix, "worker-1"), what="worker-1 serving")
    cluster.kill("worker-1")
    # The producer stops waiting: what has no result now fails, queued jobs are withdrawn.
    abandoned = wait_for_results(lab.client, "abandoned", sent.job_ids, lab.prefix, timeout_s=0.05)
    reported = lab.client.xlen(keys.results("abandoned", lab.prefix))
    cluster.restart("worker-1")
    wait_until(
        lambda: (
            load_hashes(lab.client, lab.prefix, WORKERS)["requests"] == dict.fromkeys(WORKERS, 0)
        ),
        what="the requests in service to end",
    )

    assert len(abandoned) == 30
    assert statuses(abandoned)[RequestStatus.FAILED] >= 20
    assert {r.reason.split(" (")[0] for r in abandoned if r.status is RequestStatus.FAILED} == {
        "no result within 0.05 s"
    }
    assert lab.client.xlen(keys.results("abandoned", lab.prefix)) == reported == 30
    assert_no_load_left(lab, WORKERS)
    assert lab.client.llen("rq:queue:worker-1") == 0
    # The next run starts from true counters: least_loaded spreads 12 equal requests, sent
    # faster than one is served, evenly.
    run = run_live(
        lab.client,
        lab.settings(strategy="least_loaded"),
        read_mooncake(write_trace(tmp_path / "next.jsonl", 12, OUTPUT_TOKENS)),
        progress=False,
        timeout_s=60,
    )
    assert statuses(run.results) == {RequestStatus.COMPLETED: 12}
    assert Counter(r.worker for r in run.results) == dict.fromkeys(WORKERS, 4)


def test_a_stopping_worker_hands_its_queued_requests_to_the_others(
    lab: Lab, worker_env: dict[str, str], tmp_path: Path
) -> None:
    # A batched worker runs 2 requests at most here, so that some of its 6 wait.
    cluster = lab.cluster(2, KVQ_MAX_NUM_SEQS="2")
    requests = read_mooncake(write_trace(tmp_path / "trace.jsonl", 12, OUTPUT_TOKENS))
    producer = Producer(lab.client, lab.settings(), "round_robin", "handover")
    sent = producer.send(requests)
    wait_until(lambda: serving(lab.client, lab.prefix, "worker-1"), what="worker-1 serving")
    cluster.kill("worker-1", signal.SIGTERM)  # RQ's warm shutdown: finish the job, then stop
    results = wait_for_results(lab.client, "handover", sent.job_ids, lab.prefix, timeout_s=60)

    assert statuses(results) == {RequestStatus.COMPLETED: 12}
    # What it had in service it finished; the rest of its 6 went to worker-0.
    served = Counter(r.worker for r in results)["worker-1"]
    assert served == 1 if worker_env["KVQ_ENGINE"] == "sequential" else 1 <= served <= 2
    assert Counter(r.worker for r in results) == {"worker-0": 12 - served, "worker-1": served}
    assert lab.client.zscore(keys.workers(lab.prefix), "worker-1") is None
    assert_no_load_left(lab, ["worker-0", "worker-1"])


# -- Redis goes away -------------------------------------------------------------------------------
@pytest.fixture
def own_redis(tmp_path: Path, worker_env: dict[str, str]) -> Iterator[tuple[EmbeddedRedis, Lab]]:
    """A redis-server of the test's own, which it may take down: never the shared test Redis."""
    server = EmbeddedRedis().start()
    client = connect_or_fail(server.url)
    lab = Lab(server.url, client, tmp_path / "worker-logs", worker_env, heartbeat_ttl_s=10.0)
    try:
        yield server, lab
    finally:
        lab.stop()
        client.close()
        server.stop()


def test_workers_ride_out_a_redis_outage_and_publish_what_they_owe(
    own_redis: tuple[EmbeddedRedis, Lab], tmp_path: Path
) -> None:
    server, lab = own_redis
    cluster = lab.cluster(3)
    trace = write_trace(tmp_path / "trace.jsonl", 30, OUTPUT_TOKENS)
    sending = lab.start_send_py("--trace", str(trace), "--run-id", "outage", "--wait", "--json")
    wait_until(
        lambda: (
            outstanding(lab, WORKERS) == 30
            and all(serving(lab.client, lab.prefix, w) for w in WORKERS)
        ),
        what="all 30 sent and every worker serving",
    )
    server.restart(keep_data=True, down_s=2.0)
    stdout, stderr = sending.communicate(timeout=60)
    client = redis.Redis.from_url(server.url)
    wait_until(lambda: client.xlen(keys.results("outage", lab.prefix)) == 30, what="30 results")

    # The producer: one line, a non-zero exit, and where to find the run.
    assert sending.returncode == 3
    assert stdout == ""
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert stderr.startswith(f"send.py: lost Redis at {server.url} during run outage")
    # The workers: alive, and every request they held finished and was published.
    assert cluster.running() == WORKERS
    results, _ = read_results(client, "outage", lab.prefix)
    assert statuses(results) == {RequestStatus.COMPLETED: 30}
    assert_no_load_left(lab, WORKERS)


def test_after_redis_restarts_empty_workers_announce_their_caches_and_the_tree_follows_them(
    own_redis: tuple[EmbeddedRedis, Lab],
) -> None:
    server, lab = own_redis
    cluster = lab.cluster(2)
    workers = ["worker-0", "worker-1"]
    producer = Producer(lab.client, lab.settings(strategy="cache_aware"), run_id="before")
    producer.send(make_workload("shared-prefix-tiny", seed=1))
    wait_until(lambda: lab.client.xlen(keys.results("before", lab.prefix)) >= 4, what="results")
    server.restart(keep_data=False)  # mid-run: the run, the tree, the queues, all gone
    client = redis.Redis.from_url(server.url)
    wait_until(
        lambda: set(Recovery(client, lab.settings()).membership.live_workers(10.0)) == set(workers),
        what="both workers registered again",
    )
    run = run_live(
        client,
        lab.settings(strategy="cache_aware"),
        make_workload("shared-prefix-tiny", seed=2),
        progress=False,
        timeout_s=60,
    )
    cached = {w: set(cache_snapshot(client, w)["cached"]) for w in workers}
    tree = dump_tree(client, lab.prefix)

    assert cluster.running() == workers
    assert statuses(run.results) == {RequestStatus.COMPLETED: 16}
    # Blocks cached before the restart are known again, with those of the run after it.
    assert all(len(cached[w]) > 0 for w in workers)
    assert set(tree) == cached["worker-0"] | cached["worker-1"]
    holders = tree_holders(tree)
    for worker in workers:
        assert holders[worker] == cached[worker]


def test_a_second_process_under_a_workers_name_takes_over_and_the_first_one_stops(
    lab: Lab,
) -> None:
    first = lab.cluster(1)
    old_pid = first.pid("worker-0")
    second = lab.cluster(1)  # the same name, worker-0: a newer generation
    wait_until(lambda: first.running() == [], what="the first process to stop")
    run = run_live(lab.client, lab.settings(), make_workload("shared-prefix-tiny", 4),
                   progress=False)  # fmt: skip

    info = lab.client.hgetall(keys.worker_info("worker-0", lab.prefix))
    assert (info[b"generation"], info[b"pid"]) == (b"2", str(second.pid("worker-0")).encode())
    assert second.pid("worker-0") != old_pid
    assert statuses(run.results) == {RequestStatus.COMPLETED: 4}
    assert_no_load_left(lab, ["worker-0"])

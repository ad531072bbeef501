"""The batched engine in live KV workers: real `rq worker` processes with ``KVQ_ENGINE=batched``.

As a user runs it (`producer/send.py`, `analysis/dashboard.py`): every request completes, in
batches, and the dashboard says so. RQ's view stays true while many jobs are in service at
once; the engines' load signals reach the router's view; a Redis that forgot kvqueue's scripts
costs nothing. (The fault scenarios run for this engine in test_recovery.py, the parity with
the simulator in test_parity.py.)
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import orjson
import pytest
from live_support import REPO_ROOT, Lab, wait_until, write_trace
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.gpu.results import RequestStatus
from kvqueue.live.producer import Producer
from kvqueue.live.waiting import wait_for_results
from kvqueue.routing.state import RedisRouterState
from kvqueue.workloads.synthetic import make_workload
from kvqueue.workloads.traces import read_mooncake

pytestmark = [
    pytest.mark.slow,
    pytest.mark.redis,
    pytest.mark.parametrize("worker_env", ["batched"], indirect=True),
]

WORKERS = ["worker-0", "worker-1"]


def test_two_batched_workers_complete_every_request_in_batches_the_dashboard_shows(
    lab: Lab, tmp_path: Path
) -> None:
    lab.cluster(2)
    done = lab.send_py("--workload", "shared-prefix-small", "--wait", "--json")

    assert done.returncode == 0, done.stderr
    summary = orjson.loads(done.stdout)
    assert (summary["sent"], summary["completed"], summary["failed"]) == (64, 64, 0)
    assert summary["engine"]["mean_batch_size"] > 1
    assert summary["tpot_ms"]["mean"] > 0
    dashboard = subprocess.run(
        [sys.executable, str(REPO_ROOT / "analysis" / "dashboard.py"),
         "--run-id", summary["run_id"], "--out", str(tmp_path / "dash"), "--json"],
        env=lab.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dashboard.returncode == 0, dashboard.stderr
    stored = orjson.loads(dashboard.stdout)
    # The run recorded the engine its workers registered: the dashboard knows they batch.
    meta = stored["meta"]
    assert (meta["engine"], meta["latency_profile"]) == ("batched", "seed")
    assert (meta["max_num_batched_tokens"], meta["max_num_seqs"]) == (2048, 256)
    engine = stored["strategies"]["cache_aware"]["engine"]
    assert engine == summary["engine"]
    assert engine["mean_batch_size"] > 1 and engine["num_steps"] > 0
    assert "ITL p99" in dashboard.stderr  # the engine table under the strategies'


def test_rq_counts_each_admitted_job_started_and_ends_it_finished(lab: Lab, tmp_path: Path) -> None:
    """Eight long requests at once on one worker: RQ sees them in service together."""
    lab.cluster(1)
    requests = read_mooncake(write_trace(tmp_path / "trace.jsonl", 8, 200))
    # 3 s of simulated decode at half speed: time to ask `rq info` meanwhile.
    producer = Producer(lab.client, lab.settings(time_scale=0.5), "round_robin", "rq-view")
    sent = producer.send(requests)
    started = StartedJobRegistry("worker-0", connection=lab.client)
    in_service = wait_until(lambda: started.get_job_ids() if started.count > 1 else None,
                            what="several jobs started at once")  # fmt: skip
    statuses = {Job.fetch(j, connection=lab.client, serializer=JSONSerializer).get_status()
                for j in in_service}  # fmt: skip
    info = subprocess.run(
        [str(Path(sys.executable).parent / "rq"), "info", "--url", lab.url, "worker-0"],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    results = wait_for_results(lab.client, "rq-view", sent.job_ids, lab.prefix, timeout_s=60)

    assert statuses == {JobStatus.STARTED}
    assert "executing" in info and "busy" in info
    assert {r.status for r in results} == {RequestStatus.COMPLETED}
    assert started.count == 0
    finished = FinishedJobRegistry("worker-0", connection=lab.client)
    assert sorted(finished.get_job_ids()) == sorted(sent.job_ids.values())
    for job_id in sent.job_ids.values():
        job = Job.fetch(job_id, connection=lab.client, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FINISHED
        assert job.return_value() == {"status": "completed", "worker": "worker-0"}
    queue = Queue("worker-0", connection=lab.client)
    assert lab.client.llen(queue.intermediate_queue_key) == 0


def test_the_router_sees_a_busy_workers_engine_signals_and_an_idle_ones(
    lab: Lab, tmp_path: Path
) -> None:
    lab.cluster(2)
    state = RedisRouterState(lab.client, lab.prefix, lab.heartbeat_ttl_s)
    probe = make_workload("shared-prefix-tiny", 1)[0]
    requests = read_mooncake(write_trace(tmp_path / "trace.jsonl", 6, 200))
    producer = Producer(lab.client, lab.settings(), "round_robin", "signals")
    sent = producer.send(requests)
    busy = wait_until(
        lambda: (
            [state.view(probe, take_ticket=False).load(w) for w in WORKERS]
            if any(state.view(probe, take_ticket=False).load(w).num_running > 1 for w in WORKERS)
            else None
        ),
        what="a worker reporting a batch",
    )
    wait_for_results(lab.client, "signals", sent.job_ids, lab.prefix, timeout_s=60)
    idle = [state.view(probe, take_ticket=False).load(w) for w in WORKERS]

    assert max(load.num_running for load in busy) > 1
    assert all(0 < load.engine_kv_usage < 1 for load in busy if load.num_running)
    assert [(load.num_running, load.num_waiting, load.engine_kv_usage) for load in idle] == [
        (0, 0, 0.0),
        (0, 0, 0.0),
    ]


def test_redis_forgetting_kvqueues_scripts_mid_run_costs_no_request(
    lab: Lab, tmp_path: Path
) -> None:
    """SCRIPT FLUSH while the workers serve, as a Redis restarted with its data: a worker,
    which does not ask Redis before every round trip whether its scripts are loaded, loads
    them and sends the round trip again (every command in it is safe to repeat)."""
    lab.cluster(2)
    requests = read_mooncake(write_trace(tmp_path / "trace.jsonl", 24, 600))
    producer = Producer(lab.client, lab.settings(), "round_robin", "flushed")
    flushing = threading.Event()
    flushes = []

    def flush_scripts() -> None:  # as often as a worker's heartbeat can bear (it retries once)
        while not flushing.wait(0.04):
            lab.client.script_flush()
            flushes.append(1)

    sent = producer.send(requests)  # the producer's own pipelines are not under test here
    flusher = threading.Thread(target=flush_scripts, daemon=True)
    flusher.start()
    try:
        results = wait_for_results(lab.client, "flushed", sent.job_ids, lab.prefix, timeout_s=60)
    finally:
        flushing.set()
        flusher.join()

    assert len(flushes) >= 5
    reasons = Counter(r.reason for r in results if r.status is not RequestStatus.COMPLETED)
    assert Counter(r.status for r in results) == {RequestStatus.COMPLETED: 24}, reasons
    entries = lab.client.xrange(keys.results("flushed", lab.prefix))
    ids = Counter(orjson.loads(fields[b"result"])["request_id"] for _, fields in entries)
    assert len(ids) == 24 and set(ids.values()) == {1}
    for worker in WORKERS:
        assert lab.client.llen(f"rq:queue:{worker}:intermediate") == 0
        assert lab.client.hlen(keys.worker_jobs(worker, lab.prefix)) == 0

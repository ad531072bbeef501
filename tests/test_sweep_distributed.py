"""`kvqueue sweep --distributed`: cells as RQ jobs, run by real ``rq worker kvq-sim`` processes.

The workers are plain RQ workers (the default, forking one) started exactly as the docs say,
on database `SWEEP_DB` of the test server, which this module owns and flushes around each test:
RQ's queue names carry no key prefix.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from live_support import REPO_ROOT, SWEEP_DB, flushed_database
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from kvqueue.report.sweep_distributed import SIM_QUEUE

pytestmark = [pytest.mark.slow, pytest.mark.redis]

SWEEP_ARGS = [
    "--workload", "shared-prefix-small", "--rates", "30,60,90",
    "--strategies", "round_robin,cache_aware,predictive", "--slo-ttft", "2000", "--json",
]  # fmt: skip
ANSWERS = ("capacity", "cells", "sustained", "fewest_gpus", "recommendation")


@pytest.fixture
def sim_redis(real_redis_base_url: str) -> Iterator[tuple[str, redis.Redis]]:
    yield from flushed_database(real_redis_base_url, SWEEP_DB)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def rq_worker(url: str, log: Path, json_serializer: bool = True) -> subprocess.Popen:
    """``rq worker --url URL --serializer rq.serializers.JSONSerializer kvq-sim``, as documented."""
    serializer = ["--serializer", "rq.serializers.JSONSerializer"] if json_serializer else []
    command = [
        sys.executable, "-c", "import sys; from rq.cli import main; sys.exit(main())",
        "worker", "--url", url, *serializer, SIM_QUEUE,
    ]  # fmt: skip
    with open(log, "ab") as handle:
        return subprocess.Popen(
            command,
            env=child_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_listening(client: redis.Redis, count: int, timeout_s: float = 30.0) -> None:
    queue = Queue(SIM_QUEUE, connection=client, serializer=JSONSerializer)
    deadline = time.monotonic() + timeout_s
    while len(Worker.all(connection=client, queue=queue)) < count:
        assert time.monotonic() < deadline, f"{count} rq workers not listening on {SIM_QUEUE}"
        time.sleep(0.1)


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_sweep(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvqueue", "sweep", *args],
        cwd=cwd,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def sweep_keys_left(client: redis.Redis) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match="rq:*kvq-sweep-*"))


def test_two_rq_workers_give_the_numbers_of_a_local_sweep(
    tmp_path: Path, sim_redis: tuple[str, redis.Redis]
) -> None:
    url, client = sim_redis
    local = run_sweep([*SWEEP_ARGS, "--out", "local"], tmp_path)
    assert local.returncode == 0, local.stderr
    workers = [rq_worker(url, tmp_path / f"sim-{i}.log") for i in range(2)]
    try:
        wait_listening(client, 2)
        remote = run_sweep(
            [*SWEEP_ARGS, "--distributed", "--out", "remote"], tmp_path, REDIS_URL=url
        )
        assert remote.returncode == 0, remote.stderr
        ran = [w.successful_job_count for w in Worker.all(connection=client)]
    finally:
        stop(workers)
    ours, theirs = orjson.loads(local.stdout), orjson.loads(remote.stdout)
    for key in ANSWERS:
        assert theirs[key] == ours[key], key
    assert [r["rate_rps"] for r in theirs["sustained"]] == [
        r["rate_rps"] for r in ours["sustained"]
    ]
    assert theirs["meta"]["execution"] == f"distributed: RQ jobs on queue {SIM_QUEUE!r}"
    assert len(ran) == 2 and all(n > 0 for n in ran), f"jobs per worker: {ran}"
    assert sum(ran) == 3 + 9  # a saturating cell per policy, then 3 policies × 3 rates
    assert sweep_keys_left(client) == []
    assert (tmp_path / "remote" / "report.html").stat().st_size > 0


def test_without_a_worker_on_the_queue_the_sweep_says_how_to_start_one(
    tmp_path: Path, sim_redis: tuple[str, redis.Redis]
) -> None:
    url, client = sim_redis
    done = run_sweep([*SWEEP_ARGS, "--distributed", "--out", "x"], tmp_path, REDIS_URL=url)
    assert done.returncode == 2
    assert (
        "no rq worker listens on queue 'kvq-sim'; start one or more with: rq worker --url "
        '"$REDIS_URL" --serializer rq.serializers.JSONSerializer kvq-sim'
    ) in done.stderr
    assert sweep_keys_left(client) == []


def test_a_worker_left_on_pickle_cannot_read_the_jobs_and_the_sweep_says_so(
    tmp_path: Path, sim_redis: tuple[str, redis.Redis]
) -> None:
    url, client = sim_redis
    worker = rq_worker(url, tmp_path / "pickle.log", json_serializer=False)
    try:
        wait_listening(client, 1)
        done = run_sweep([*SWEEP_ARGS, "--distributed", "--out", "x"], tmp_path, REDIS_URL=url)
    finally:
        stop([worker])
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "failed on queue 'kvq-sim': a worker could not read the job" in last
    assert "--serializer rq.serializers.JSONSerializer" in last
    assert "Traceback" not in done.stderr
    assert Queue(SIM_QUEUE, connection=client).count == 0

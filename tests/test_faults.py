"""Bad input and faults: each one a clear error, and nothing lost or left half-sent.

Runs `producer/send.py` as a subprocess where the exit status and stderr are the behaviour,
real `rq worker` processes where a worker is involved, and the real Redis throughout.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_support import (
    FAULTS_DB,
    REPO_ROOT,
    Lab,
    cache_snapshot,
    connect_or_fail,
    dump_tree,
    load_hashes,
    real_redis_url,
    register_workers,
    rq_queue_keys,
    start_cluster,
)
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from kvqueue.config import Settings
from kvqueue.gpu.results import RequestStatus
from kvqueue.live.connection import RedisUnavailable, connect
from kvqueue.live.producer import Producer
from kvqueue.live.run import run_live
from kvqueue.live.runs import read_results
from kvqueue.live.waiting import wait_for_results
from kvqueue.live.worker import FORKED_WORKER_MESSAGE
from kvqueue.report.run_summary import run_summary
from kvqueue.routing.policies.base import policy_names

PREFIX = "kvqfault:"


class Faults(Lab):
    """A `Lab` on the faults db, under this module's prefix."""

    def assert_nothing_sent(self) -> None:
        assert rq_queue_keys(self.client) == []
        assert not self.client.exists("rq:queues")
        assert list(self.client.scan_iter(match=f"{PREFIX}results:*")) == []
        assert list(self.client.scan_iter(match=f"{PREFIX}run:*")) == []


@pytest.fixture
def faults(real_redis_base_url: str, tmp_path: Path) -> Iterator[Faults]:
    url = real_redis_url(real_redis_base_url, FAULTS_DB)
    client = connect_or_fail(url)
    client.flushdb()
    try:
        yield Faults(url, client, tmp_path / "worker-logs", {}, prefix=PREFIX)
    finally:
        client.flushdb()
        client.close()


# -- unknown strategy ------------------------------------------------------------------------------
@pytest.mark.redis
@pytest.mark.parametrize("via", ["flag", "env"])
def test_unknown_strategy_makes_send_py_exit_non_zero_listing_the_valid_names(
    faults: Faults, via: str
) -> None:
    register_workers(faults.client, PREFIX, ["worker-0"])  # a live worker is not the problem
    args = ["--workload", "shared-prefix-tiny", "--wait"]
    if via == "flag":
        done = faults.send_py(*args, "--strategy", "warp_drive")
    else:
        done = faults.send_py(*args, ROUTING_STRATEGY="warp_drive")

    assert done.returncode == 2
    assert "unknown routing strategy 'warp_drive'" in done.stderr
    for name in policy_names():
        assert name in done.stderr
    assert done.stdout == ""
    faults.assert_nothing_sent()


# -- no live workers -------------------------------------------------------------------------------
@pytest.mark.redis
@pytest.mark.parametrize("registered", ["nobody", "stale-heartbeat"])
def test_without_live_workers_nothing_is_enqueued_and_the_error_says_how_to_start_one(
    faults: Faults, registered: str
) -> None:
    if registered == "stale-heartbeat":
        register_workers(faults.client, PREFIX, ["worker-0", "worker-1"], age_s=120)

    done = faults.send_py("--workload", "shared-prefix-tiny", "--wait", "--json")

    assert done.returncode == 2
    assert "no live KV workers" in done.stderr
    assert "rq worker -w workers.KVWorker worker-0" in done.stderr
    assert faults.url in done.stderr
    assert done.stdout == ""
    faults.assert_nothing_sent()


# -- requests that can never be served -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.redis
def test_prompts_over_the_context_or_the_cache_are_rejected_with_the_reason_and_the_run_goes_on(
    faults: Faults, make_request
) -> None:
    requests = [
        make_request(64, request_id="ok-0", max_tokens=4),
        make_request(5000, request_id="over-context", max_tokens=4),
        make_request(64, request_id="ok-1", max_tokens=4),
        make_request(70 * 16, request_id="over-cache", max_tokens=4),  # 70 blocks, 1,120 tokens
        make_request(64, request_id="ok-2", max_tokens=4),
        make_request(64, request_id="ok-3", max_tokens=4),
    ]
    settings = Settings(
        redis_url=faults.url,
        key_prefix=PREFIX,
        strategy="round_robin",
        time_scale=0.01,
        pending_ttl_s=0.3,
    )
    workers = ["worker-0", "worker-1"]
    cluster = start_cluster(faults.url, PREFIX, 2, {"KVQ_NUM_BLOCKS": "64"}, faults.log_dir)
    try:
        run = run_live(faults.client, settings, requests, progress=False, timeout_s=60)
        tree = dump_tree(faults.client, PREFIX)
        cached = {w: set(cache_snapshot(faults.client, w)["cached"]) for w in workers}
    finally:
        cluster.stop()

    by_id = {r.request_id: r for r in run.results}
    # The producer rejects what no worker's GPU can serve, before routing it: the others
    # alternate between the workers as if the rejected ones were not there.
    assert {i: (r.status, r.worker) for i, r in by_id.items()} == {
        "ok-0": (RequestStatus.COMPLETED, "worker-0"),
        "over-context": (RequestStatus.REJECTED, ""),
        "ok-1": (RequestStatus.COMPLETED, "worker-1"),
        "over-cache": (RequestStatus.REJECTED, ""),
        "ok-2": (RequestStatus.COMPLETED, "worker-0"),
        "ok-3": (RequestStatus.COMPLETED, "worker-1"),
    }
    assert by_id["over-context"].reason == (
        "prompt of 5,000 tokens + 4 output tokens exceeds the 4,096-token context of "
        "llama-2-13b@a100-40gb"
    )
    assert by_id["over-cache"].reason == "request needs 71 KV blocks; the cache holds 64"
    summary = run_summary(run)
    assert (summary["sent"], summary["completed"], summary["rejected"], summary["failed"]) == (
        6,
        4,
        2,
        0,
    )
    loads = load_hashes(faults.client, PREFIX, workers)
    assert loads["requests"] == loads["tokens"] == dict.fromkeys(workers, 0)
    # Rejected requests were never routed: no pending mark, no node of theirs.
    assert set(tree) == cached["worker-0"] | cached["worker-1"]


# -- Redis unreachable -----------------------------------------------------------------------------
@pytest.mark.redis
def test_unreachable_redis_is_named_with_its_password_redacted(faults: Faults) -> None:
    url = "redis://:hunter2-secret@127.0.0.1:1/0"

    done = faults.send_py("--workload", "shared-prefix-tiny", REDIS_URL=url)

    assert done.returncode == 2
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@127.0.0.1:1/0", "redis://:***@127.0.0.1:1/0"),
        ("redis://alice:hunter2@127.0.0.1:1/3", "redis://alice:***@127.0.0.1:1/3"),
        ("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/0"),
    ],
)
def test_connect_error_shows_the_url_without_the_password(url: str, shown: str) -> None:
    with pytest.raises(RedisUnavailable) as caught:
        connect(url)

    assert f"cannot reach Redis at {shown}" in str(caught.value)
    assert "hunter2" not in str(caught.value)


# -- malformed prompts file ------------------------------------------------------------------------
@pytest.mark.redis
@pytest.mark.parametrize(
    ("lines", "bad_line", "complaint"),
    [
        (['{"prompt": "fine"}', '{"prompt": "cut off', '{"prompt": "x"}'], 2, "invalid JSON"),
        (['{"prompt": "fine"}', "", '{"text": "no prompt key"}'], 3, "'prompt' must be a string"),
        (['{"prompt": "a", "max_tokens": -3}'], 1, "max_tokens"),
        (["", "   ", "\t"], 1, "no prompts in the file"),
    ],
    ids=["invalid-json", "missing-prompt", "negative-max-tokens", "only-blank-lines"],
)
def test_malformed_prompts_file_error_names_the_file_and_line(
    faults: Faults,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    lines: list[str],
    bad_line: int,
    complaint: str,
) -> None:
    from producer import send

    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    register_workers(faults.client, PREFIX, ["worker-0"])
    for name, value in faults.env().items():
        monkeypatch.setenv(name, value)

    # In process: the tokenizer takes seconds to load, once per process.
    status = send.main(["--prompts", str(path), "--wait"])

    assert status == 2
    stderr = capsys.readouterr().err
    assert f"{path}:{bad_line}:" in stderr
    assert complaint in stderr
    faults.assert_nothing_sent()


# -- a job outside a KV worker ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.parametrize("worker_class", ["rq.Worker", "rq.SimpleWorker"])
def test_a_job_run_outside_a_kv_worker_fails_at_once_naming_the_kv_worker_class(
    faults: Faults, make_request, worker_class: str
) -> None:
    register_workers(faults.client, PREFIX, ["worker-0"])  # so the producer sends
    settings = Settings(redis_url=faults.url, key_prefix=PREFIX, strategy="round_robin")
    # 1,000 output tokens: 15 s of emulated decode at time scale 1, had it been simulated.
    request = make_request(64, request_id="r-0", max_tokens=1000)
    sent = Producer(faults.client, settings, run_id="forked").send([request])
    assert load_hashes(faults.client, PREFIX, ["worker-0"])["requests"] == {"worker-0": 1}

    command = [sys.executable, "-c", "import sys; from rq.cli import main; sys.exit(main())"]
    command += ["worker", "--burst", "--url", faults.url, "-w", worker_class]
    command += ["--serializer", "rq.serializers.JSONSerializer", "worker-0"]
    env = faults.env(PYTHONPATH=str(REPO_ROOT))
    subprocess.run(command, env=env, capture_output=True, timeout=60, check=True)

    results = wait_for_results(faults.client, "forked", sent.job_ids, PREFIX, timeout_s=10)
    stream, _ = read_results(faults.client, "forked", PREFIX)
    assert [(r.request_id, r.status) for r in stream] == [("r-0", RequestStatus.FAILED)]
    assert results == stream
    expected = FORKED_WORKER_MESSAGE.format(queue="worker-0")
    assert stream[0].reason == expected
    assert "`rq worker -w workers.KVWorker worker-0`" in expected
    job = Job.fetch(sent.job_ids["r-0"], connection=faults.client, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED
    assert "-w workers.KVWorker" in job.latest_result().exc_string
    assert (job.ended_at - job.started_at).total_seconds() < 1.0  # at once: nothing emulated
    loads = load_hashes(faults.client, PREFIX, ["worker-0"])
    assert loads == {
        "requests": {"worker-0": 0},
        "tokens": {"worker-0": 0},
        "work_ms": {"worker-0": 0},
    }


# -- a worker misconfigured -----------------------------------------------------------------------
@pytest.mark.redis
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KVQ_ENGINE": "vllm"}, "unknown engine 'vllm'; valid: sequential, batched"),
        (
            {"KVQ_ENGINE": "batched", "KVQ_MAX_NUM_SEQS": "4096"},
            "max_num_seqs (4,096) exceeds max_num_batched_tokens (2,048)",
        ),
    ],
    ids=["unknown-engine", "batched-limits"],
)
def test_a_kv_worker_with_a_bad_engine_setting_refuses_to_start_and_registers_nothing(
    faults: Faults, env: dict[str, str], message: str
) -> None:
    command = [sys.executable, "-c", "import sys; from rq.cli import main; sys.exit(main())"]
    command += ["worker", "--burst", "--url", faults.url, "-w", "workers.KVWorker", "worker-0"]
    completed = subprocess.run(command, env=faults.env(PYTHONPATH=str(REPO_ROOT), **env),
                               capture_output=True, text=True, timeout=60)  # fmt: skip
    assert completed.returncode != 0
    assert message in completed.stderr + completed.stdout
    assert faults.client.keys("*") == []  # neither RQ nor kvqueue saw a worker

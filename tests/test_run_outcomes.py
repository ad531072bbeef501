"""Every request sent ends with exactly one result, and `send.py` says so in its exit status.

`sent = completed + rejected + failed`, always: also when RQ fails a job, when the producer's
wait times out, when a request can never be served, or when a second producer reuses a run
id. Redis memory stays bounded: run data expires, the event stream is capped. Real Redis,
real `rq worker` processes, `producer/send.py` as a subprocess where its exit status matters.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest
from live_support import REPO_ROOT, Lab, load_hashes, wait_until, write_trace

from kvqueue import keys
from kvqueue.gpu.results import RequestStatus
from kvqueue.live.runs import read_results
from kvqueue.routing.membership import RedisMembership

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def plain_rq_worker(lab: Lab, queue: str) -> subprocess.CompletedProcess[bytes]:
    """RQ's own worker in burst mode, as someone might start it by mistake: pickle, forks."""
    command = [sys.executable, "-c", "import sys; from rq.cli import main; sys.exit(main())"]
    command += ["worker", "--burst", queue]
    env = lab.env(RQ_REDIS_URL=lab.url, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(command, env=env, capture_output=True, timeout=60, check=True)


def test_jobs_rq_fails_end_as_failed_results_with_rqs_error(lab: Lab) -> None:
    lab.heartbeat_ttl_s = 30.0  # the registered worker-0 stays live without heartbeating
    RedisMembership(lab.client, lab.prefix).register("worker-0", 924)
    sending = lab.start_send_py("--workload", "shared-prefix-tiny", "--wait", "--json",
                                "--timeout", "30")  # fmt: skip
    wait_until(lambda: lab.client.llen("rq:queue:worker-0") == 16, what="16 queued jobs")
    plain_rq_worker(lab, "worker-0")  # cannot read the JSON jobs: DeserializationError
    stdout, stderr = sending.communicate(timeout=60)

    assert sending.returncode == 1, stderr
    summary = orjson.loads(stdout)
    assert (summary["sent"], summary["completed"], summary["failed"]) == (16, 0, 16)
    (reason,) = summary["failure_reasons"]
    assert reason.startswith("RQ failed its job: rq.exceptions.DeserializationError")
    results, _ = read_results(lab.client, summary["run_id"], lab.prefix)
    assert len(results) == 16


def test_a_wait_that_times_out_reports_every_missing_request_as_failed_and_withdraws_it(
    lab: Lab,
) -> None:
    lab.cluster(2, KVQ_RUN_TTL="60")
    done = lab.send_py("--workload", "no-sharing", "--num-requests", "200", "--wait", "--json",
                       "--timeout", "1", KVQ_RUN_TTL="60")  # fmt: skip

    assert done.returncode == 1, done.stderr
    summary = orjson.loads(done.stdout)
    assert summary["sent"] == 200
    assert summary["completed"] + summary["failed"] == 200
    assert 0 < summary["completed"] < 200
    assert {reason.split(" (")[0] for reason in summary["failure_reasons"]} == {
        "no result within 1 s"
    }
    run_id = summary["run_id"]
    # Withdrawn: nothing of the run is served after the producer gave up, no load stays.
    workers = ["worker-0", "worker-1"]
    wait_until(
        lambda: (
            load_hashes(lab.client, lab.prefix, workers)["requests"] == dict.fromkeys(workers, 0)
        ),
        what="the requests in service to end",
    )
    assert [lab.client.llen(f"rq:queue:{w}") for w in workers] == [0, 0]
    assert lab.client.xlen(keys.results(run_id, lab.prefix)) == 200
    # The run's data expires (KVQ_RUN_TTL=60 s), whatever the producer does next.
    for key in (keys.run(run_id, lab.prefix), keys.results(run_id, lab.prefix),
                keys.run_reported(run_id, lab.prefix)):  # fmt: skip
        assert 0 < lab.client.pttl(key) <= 60_000, key


def test_a_request_over_every_workers_context_is_rejected_before_anything_is_written(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from producer import send

    lab.cluster(1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "a short question"}\n'
        '{"prompt": "write forever", "max_tokens": 1e26}\n'
        '{"prompt": "another short question"}\n'
    )
    for name, value in lab.env().items():
        monkeypatch.setenv(name, value)

    status = send.main(["--prompts", str(prompts), "--wait", "--json", "--run-id", "huge"])

    captured = capsys.readouterr()
    assert status == 0, captured.err  # rejected is an outcome, not a failure
    summary = orjson.loads(captured.out)
    assert (summary["sent"], summary["completed"], summary["rejected"]) == (3, 2, 1)
    results, _ = read_results(lab.client, "huge", lab.prefix)
    (rejected,) = [r for r in results if r.status is RequestStatus.REJECTED]
    assert rejected.request_id == "prompt-2"
    assert rejected.worker == ""  # never routed: no job, no pending mark, no load
    assert rejected.reason.startswith("prompt of ")
    assert rejected.reason.endswith(
        " output tokens exceeds the 4,096-token context of llama-2-13b@a100-40gb"
    )
    assert "Traceback" not in captured.err
    assert len(results) == 3
    assert load_hashes(lab.client, lab.prefix, ["worker-0"])["work_ms"] == {"worker-0": 0.0}
    assert lab.client.hget(keys.output_stats(lab.prefix), "routed") == b"2"


def test_a_second_producer_with_the_same_run_id_is_refused_and_writes_nothing(lab: Lab) -> None:
    lab.cluster(2)
    first = lab.send_py("--workload", "shared-prefix-tiny", "--run-id", "mine", "--wait")
    queued_jobs = len(list(lab.client.scan_iter(match="rq:job:*")))

    second = lab.send_py("--workload", "shared-prefix-tiny", "--run-id", "mine", "--wait",
                         "--strategy", "least_loaded")  # fmt: skip

    assert first.returncode == 0, first.stderr
    assert second.returncode == 2
    assert second.stdout == ""
    assert second.stderr.startswith("send.py: run id 'mine' is already in use under prefix")
    assert second.stderr.count("\n") == 1
    results, _ = read_results(lab.client, "mine", lab.prefix)
    assert len(results) == 16
    assert {r.strategy for r in results} == {"cache_aware"}
    assert len(list(lab.client.scan_iter(match="rq:job:*"))) == queued_jobs


def test_max_outstanding_makes_the_producer_wait_instead_of_queueing(
    lab: Lab, tmp_path: Path
) -> None:
    lab.cluster(2)
    trace = write_trace(tmp_path / "trace.jsonl", 16, 40)
    workers = ["worker-0", "worker-1"]
    peak = {w: 0 for w in workers}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            for worker in workers:
                peak[worker] = max(
                    peak[worker], lab.client.hlen(keys.worker_jobs(worker, lab.prefix))
                )

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        done = lab.send_py("--trace", str(trace), "--max-outstanding", "2", "--wait", "--json")
    finally:
        sampling.set()
        sampler.join()

    assert done.returncode == 0, done.stderr
    summary = orjson.loads(done.stdout)
    assert (summary["sent"], summary["completed"]) == (16, 16)
    # One in service and one waiting per worker, never more.
    assert peak == {"worker-0": 2, "worker-1": 2}


def test_the_cache_event_stream_is_capped(lab: Lab) -> None:
    lab.cluster(1, KVQ_EVENTS_MAXLEN="50")
    done = lab.send_py("--workload", "no-sharing", "--num-requests", "300", "--wait",
                       KVQ_TIME_SCALE="0")  # fmt: skip

    assert done.returncode == 0, done.stderr
    # Trimmed in whole stream nodes (100 entries by default): a bound, not an exact length.
    assert lab.client.xlen(keys.events(lab.prefix)) < 50 + 100

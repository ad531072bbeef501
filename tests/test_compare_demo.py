"""`kvqueue demo`, `analysis/dashboard.py` and the Redis hygiene of the live comparison.

The demo tests run the real thing as a newcomer would — ``python -m kvqueue demo --small`` in
a subprocess, real ``rq worker`` processes — once on an embedded redis-server (what a fresh
machine gets) and once on the real Redis of ``KVQ_TEST_REDIS_URL``. Every process the demo
starts inherits a marker environment variable, so "nothing is left behind" is checked by
scanning /proc for it, Ctrl-C included.

The real-Redis tests use database `DEMO_DB` of the test server (conftest's
`real_redis_base_url`: ``KVQ_TEST_REDIS_URL``, the local Redis, else an embedded one), owned
by this module and flushed around each test: RQ's queue names (``worker-0``) carry no key
prefix, so sharing a database with other live tests would mix their jobs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import orjson
import pytest
import redis
from live_support import flushed_database
from rq import Queue
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.commands.demo import apply_demo_defaults
from kvqueue.commands.strategy_flags import parse_strategies
from kvqueue.errors import KVQueueError
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.live.hygiene import check_redis_is_free, clear_routing_state, drop_queued_jobs
from kvqueue.report.dashboard import DASHBOARD_FILE
from kvqueue.report.html import REPORT_FILE
from kvqueue.report.metrics import ideal_hit_rate
from kvqueue.report.plots import PLOT_FILES
from kvqueue.workloads.recorded import rebuild_requests
from kvqueue.workloads.synthetic import make_workload

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_CMD = (sys.executable, str(REPO_ROOT / "analysis" / "dashboard.py"))
DEMO_DB = 8
STRATEGY_KEYS = ("hit_rate", "ttft_ms", "e2e_ms", "completed", "rejected", "failed", "per_worker")
PERCENTILE_KEYS = ("mean", "p50", "p90", "p99")


# -- helpers ----------------------------------------------------------------------------------
@pytest.fixture
def demo_redis(real_redis_base_url: str) -> Iterator[tuple[str, redis.Redis]]:
    """Database `DEMO_DB` of the test server, flushed before and after. FAILS if unreachable."""
    yield from flushed_database(real_redis_base_url, DEMO_DB)


def child_env(marker: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "KVQ_PREFIX")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["KVQ_TEST_MARKER"] = marker
    env.update(extra)
    return env


def processes_with_marker(marker: str) -> list[str]:
    """Command lines of live processes whose environment holds our marker."""
    needle = f"KVQ_TEST_MARKER={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().split(") ", 1)[1][:1]
                if state != "Z":
                    found.append(f"{entry.name}: {cmdline}")
        except OSError:  # gone, or not ours to read
            continue
    return found


def assert_nothing_left(marker: str) -> None:
    deadline = time.monotonic() + 5
    while (left := processes_with_marker(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"


def run_demo(args: list[str], env: dict[str, str], timeout: float = 110) -> tuple[dict, str]:
    """The demo's dashboard (its --json stdout) and its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "kvqueue", "demo", "--small", "--json", "--timeout", "60", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return orjson.loads(done.stdout), done.stderr


def assert_comparison_json(dashboard: dict, strategies: list[str]) -> None:
    assert list(dashboard["strategies"]) == strategies
    assert isinstance(dashboard["ideal_hit_rate"], float)
    for name, summary in dashboard["strategies"].items():
        for key in STRATEGY_KEYS:
            assert key in summary, f"{name} lacks {key}"
        assert summary["completed"] == dashboard["meta"]["num_requests"], name
        assert isinstance(summary["hit_rate"], float), name
        assert summary["hit_rate"] <= dashboard["ideal_hit_rate"] + 1e-12, name
        for stats in ("ttft_ms", "e2e_ms"):
            for key in PERCENTILE_KEYS:
                value = summary[stats][key]
                assert isinstance(value, float) and value > 0, f"{name} {stats} {key}={value}"
            assert summary[stats]["p50"] <= summary[stats]["p90"] <= summary[stats]["p99"]
    # Shared prefixes exist, so affinity must beat rotation on hits (not necessarily TTFT).
    rates = {name: s["hit_rate"] for name, s in dashboard["strategies"].items()}
    assert rates["cache_aware"] > rates["round_robin"], rates


# -- the demo, end to end ---------------------------------------------------------------------
@pytest.mark.slow
def test_demo_small_on_embedded_redis(tmp_path: Path) -> None:
    """What a newcomer gets: no REDIS_URL, an embedded redis-server, three strategies."""
    marker = uuid.uuid4().hex
    out = tmp_path / "demo"
    dashboard, stderr = run_demo(["--out", str(out)], child_env(marker))
    assert_comparison_json(dashboard, ["cache_aware", "round_robin", "least_loaded"])
    assert dashboard["meta"]["mode"] == "live"
    assert dashboard["meta"]["redis"].startswith("embedded redis-server")
    assert dashboard["meta"]["arrivals"] == "poisson"
    assert orjson.loads((out / DASHBOARD_FILE).read_bytes()) == dashboard
    for name in (*PLOT_FILES, REPORT_FILE, "results_cache_aware.jsonl"):
        assert (out / name).stat().st_size > 0, name
    # Live workers report results only; their engines' work is rebuilt from them.
    for name, summary in dashboard["strategies"].items():
        assert summary["engine"]["kv_usage"]["max"] > 0, name
        assert summary["tpot_ms"]["p50"] > 0, name
        assert summary["load"]["capacity_basis"] == "estimated", name
    assert "<h2>Engines</h2>" in (out / REPORT_FILE).read_text()
    # Progress during each strategy's run, as whole lines in a log (stderr is not a terminal).
    for strategy in dashboard["strategies"]:
        assert f"{strategy} done: 32/32 (100%)" in stderr.splitlines(), strategy
    assert "\r" not in stderr
    assert_nothing_left(marker)


@pytest.mark.slow
@pytest.mark.redis
def test_demo_small_on_redis_url_then_dashboard_by_run_id(
    tmp_path: Path, demo_redis: tuple[str, redis.Redis]
) -> None:
    """With REDIS_URL: only the prefix's routing keys are cleared, the runs stay readable,
    and `analysis/dashboard.py --run-id` rebuilds the same dashboard from Redis."""
    url, client = demo_redis
    prefix = f"kvqtest-{uuid.uuid4().hex[:8]}:"
    client.set("someone:else", "keep me")
    client.set("kvq:node:abcd", "another prefix: keep me")
    marker = uuid.uuid4().hex
    env = child_env(marker, REDIS_URL=url, KVQ_PREFIX=prefix)
    strategies = ["cache_aware", "round_robin"]
    dashboard, _ = run_demo(
        ["--strategies", ",".join(strategies), "--out", str(tmp_path / "demo")], env
    )
    assert_comparison_json(dashboard, strategies)
    assert_nothing_left(marker)

    assert client.get("someone:else") == b"keep me"
    assert client.get("kvq:node:abcd") == b"another prefix: keep me"
    left = sorted(k.decode() for k in client.scan_iter(match=f"{prefix}*"))
    assert left and all(k.startswith((f"{prefix}results:", f"{prefix}run:")) for k in left), left
    for worker in dashboard["meta"]["workers"]:
        assert Queue(worker, connection=client, serializer=JSONSerializer).count == 0

    run_ids = dashboard["meta"]["run_ids"]
    out = tmp_path / "from-redis"
    done = subprocess.run(
        [*DASHBOARD_CMD, "--out", str(out)]
        + [arg for run_id in run_ids.values() for arg in ("--run-id", run_id)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "cache_aware" in done.stdout  # the table
    assert "<strategy>" not in done.stdout
    for name in strategies:
        assert f"{out / f'results_{name}.jsonl'}" in done.stdout
    rebuilt = orjson.loads((out / DASHBOARD_FILE).read_bytes())
    assert rebuilt["ideal_hit_rate"] == pytest.approx(dashboard["ideal_hit_rate"])
    for name in strategies:
        ours, theirs = rebuilt["strategies"][name], dashboard["strategies"][name]
        for key in ("hit_rate", "completed", "rejected", "failed", "per_worker"):
            assert ours[key] == theirs[key], (name, key)
        assert ours["ttft_ms"] == pytest.approx(theirs["ttft_ms"])
        assert (out / f"results_{name}.jsonl").is_file()


@pytest.mark.slow
def test_demo_interrupted_by_ctrl_c_stops_everything(tmp_path: Path) -> None:
    """SIGINT to the demo's whole process group (a terminal's Ctrl-C) mid-run: exit 130,
    and no redis-server or rq worker it started survives."""
    marker = uuid.uuid4().hex
    process = subprocess.Popen(
        [sys.executable, "-m", "kvqueue", "demo", "--out", str(tmp_path / "demo")],
        cwd=REPO_ROOT,
        env=child_env(marker),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        seen = []
        assert process.stderr is not None
        for line in process.stderr:
            seen.append(line)
            if "sending" in line:
                break
        else:
            pytest.fail("the demo ended before sending: " + "".join(seen))
        time.sleep(1.0)
        assert processes_with_marker(marker), "the demo should have children by now"
        os.killpg(process.pid, signal.SIGINT)
        rest = process.stderr.read()
        assert process.wait(timeout=30) == 130, "".join(seen) + rest
        assert "interrupted" in rest
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert_nothing_left(marker)


# -- analysis/dashboard.py on hand-written runs -----------------------------------------------
@pytest.mark.redis
def test_dashboard_entry_point_on_a_send_py_run(
    tmp_path: Path, demo_redis: tuple[str, redis.Redis]
) -> None:
    """A run as producer/send.py leaves it (meta without workload_args): the requests are
    rebuilt from the workload name, size and seed, so the ideal hit rate is exact."""
    url, client = demo_redis
    prefix = "kvqdash:"
    requests = make_workload("shared-prefix-tiny", seed=3)
    run_id = "run-send"
    meta = {
        "strategy": "round_robin",
        "workers": ["worker-0", "worker-1"],
        "workload": "shared-prefix-tiny",
        "num_requests": len(requests),
        "arrivals": "asap",
        "rate_rps": None,
        "arrival_scale": 1.0,
        "length_scale": 1.0,
        "seed": 3,
    }
    client.hset(keys.run(run_id, prefix), mapping={k: orjson.dumps(v) for k, v in meta.items()})
    for i, request in enumerate(requests):
        result = RequestResult(
            request_id=request.request_id,
            run_id=run_id,
            worker=f"worker-{i % 2}",
            strategy="round_robin",
            status=RequestStatus.COMPLETED,
            queue_wait_ms=float(i),
            prefill_ms=10.0,
            ttft_ms=10.0 + i,
            e2e_ms=100.0 + i,
            num_prompt_tokens=request.num_prompt_tokens,
            num_blocks=request.num_blocks,
            hit_blocks=0,
        )
        client.xadd(keys.results(run_id, prefix), {"result": orjson.dumps(result.to_dict())})
    done = subprocess.run(
        [*DASHBOARD_CMD, "--run-id", run_id, "--out", str(tmp_path), "--json"],
        env=child_env("none", REDIS_URL=url, KVQ_PREFIX=prefix),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    dashboard = orjson.loads(done.stdout)
    assert dashboard == orjson.loads((tmp_path / DASHBOARD_FILE).read_bytes())
    assert dashboard["ideal_hit_rate"] == pytest.approx(ideal_hit_rate(requests))
    summary = dashboard["strategies"]["round_robin"]
    for key in STRATEGY_KEYS:
        assert key in summary
    assert set(summary["ttft_ms"]) >= set(PERCENTILE_KEYS)
    assert summary["completed"] == len(requests) and summary["hit_rate"] == 0.0
    assert summary["per_worker"]["worker-0"]["requests"] == len(requests) // 2

    missing = subprocess.run(
        [*DASHBOARD_CMD, "--run-id", "nope", "--out", str(tmp_path / "x")],
        env=child_env("none", REDIS_URL=url, KVQ_PREFIX=prefix),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "not found" in missing.stderr


# -- units: Redis hygiene and options ---------------------------------------------------------
@pytest.fixture
def fake() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def test_clear_routing_state_keeps_results_runs_and_other_prefixes(
    fake: fakeredis.FakeRedis,
) -> None:
    prefix = "kvq[1]:"  # glob characters in the prefix are matched literally
    doomed = [
        keys.node(bytes.fromhex("ab"), prefix),
        keys.load(prefix),
        keys.workers(prefix),
        f"{prefix}new",
    ]
    kept = [keys.results("r1", prefix), keys.run("r1", prefix), "kvq1:node:ab", "other"]
    for name in doomed + kept:
        fake.set(name, 1)
    assert clear_routing_state(fake, prefix) == len(doomed)
    assert sorted(k.decode() for k in fake.keys("*")) == sorted(kept)


def test_check_redis_is_free_refuses_live_workers_and_queued_jobs(
    fake: fakeredis.FakeRedis,
) -> None:
    check_redis_is_free(fake, "kvq:", ["worker-0", "worker-1"])
    fake.zadd(keys.workers("kvq:"), {"worker-0": int(time.time() * 1000)})
    with pytest.raises(KVQueueError, match="live under prefix"):
        check_redis_is_free(fake, "kvq:", ["worker-0"])
    check_redis_is_free(fake, "other:", ["worker-0"])
    queue = Queue("worker-1", connection=fake, serializer=JSONSerializer)
    queue.enqueue_call("builtins.print", args=("x",), job_id="someone-1")
    with pytest.raises(KVQueueError, match="already holds 1 job"):
        check_redis_is_free(fake, "other:", ["worker-0", "worker-1"])


def test_drop_queued_jobs_only_drops_the_runs_own(fake: fakeredis.FakeRedis) -> None:
    queue = Queue("worker-0", connection=fake, serializer=JSONSerializer)
    for job_id in ("kvq-run-a-0", "kvq-run-a-1", "kvq-run-ab-0", "someone-else"):
        queue.enqueue_call("builtins.print", args=("x",), job_id=job_id)
    assert drop_queued_jobs(fake, "run-a", ["worker-0", "worker-1"]) == 2
    assert queue.get_job_ids() == ["kvq-run-ab-0", "someone-else"]


def test_rebuild_requests_from_trace_meta_needs_the_path() -> None:
    requests, why = rebuild_requests({"workload": "trace:t.jsonl", "num_requests": 3}, "kvqueue")
    assert requests is None and "--trace" in why


def test_demo_defaults_and_small_size() -> None:
    from argparse import ArgumentParser

    from kvqueue.commands.demo import configure

    parser = ArgumentParser()
    configure(parser)
    args = parser.parse_args([])
    apply_demo_defaults(args)
    assert (args.workload, args.num_requests, args.workers) == ("shared-prefix-medium", 128, 4)
    assert args.rate == 4.0 and args.time_scale == 0.5 and args.out == Path("kvqueue-demo")
    small = parser.parse_args(["--small", "--workers", "3"])
    apply_demo_defaults(small)
    assert (small.workload, small.num_requests, small.workers) == ("shared-prefix-small", 32, 3)
    assert small.rate == 3.0 and small.time_scale == 0.1
    trace = parser.parse_args(["--trace", "t.jsonl"])
    apply_demo_defaults(trace)
    assert trace.rate is None and trace.num_requests is None  # a trace keeps its timestamps


def test_parse_strategies_gives_the_index_to_the_strategies_naming_none() -> None:
    assert parse_strategies("llmd, dynamo:precise", "approximate") == [
        "llmd:approximate",
        "dynamo:precise",
    ]
    assert parse_strategies("llmd,llmd:approximate") == ["llmd", "llmd:approximate"]
    with pytest.raises(ValueError, match="precise, approximate"):
        parse_strategies("llmd:exact")
    with pytest.raises(ValueError, match="twice"):
        parse_strategies("llmd,llmd:approximate", "approximate")


def test_parse_strategies_names_the_valid_ones() -> None:
    assert parse_strategies("cache_aware, round_robin") == ["cache_aware", "round_robin"]
    with pytest.raises(ValueError, match=r"valid: .*round_robin"):
        parse_strategies("cache_aware,nope")
    with pytest.raises(ValueError, match="twice"):
        parse_strategies("round_robin,round_robin")


@pytest.mark.slow
def test_demo_with_the_batched_engine_runs_batched_workers_and_reports_their_batches(
    tmp_path: Path,
) -> None:
    marker = uuid.uuid4().hex
    strategies = ["cache_aware", "round_robin"]
    args = ["--out", str(tmp_path), "--engine", "batched", "--latency", "calibrated"]
    dashboard, stderr = run_demo([*args, "--strategies", ",".join(strategies)], child_env(marker))

    assert_comparison_json(dashboard, strategies)
    assert "ITL p99" in stderr  # the engines' table under the strategies'
    meta = dashboard["meta"]
    assert (meta["engine"], meta["latency_profile"]) == ("batched", "calibrated")
    for name, summary in dashboard["strategies"].items():
        engine = summary["engine"]
        assert engine is not None and engine["mean_batch_size"] > 1, name
        assert summary["tpot_ms"]["mean"] > 0, name
    assert_nothing_left(marker)

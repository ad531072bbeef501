"""Smoke tests of the benchmarks: each script in bench/ runs with ``--quick``.

They measure nothing and assert nothing about time: a script that crashes, or stops printing
its table, fails here instead of on the next person who runs it. Each runs as its own
process, as a user would (``python bench/<script> --quick``); the Redis ones get database
`BENCH_DB` of the test server (the scripts flush it), and the simulator one a small random
Mooncake-format trace, since the real traces are not in the repository.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from live_support import BENCH_DB, REPO_ROOT, real_redis_url
from mooncake_support import random_mooncake_records, write_mooncake_trace

pytestmark = pytest.mark.smoke

BENCH_DIR = REPO_ROOT / "bench"
TIMEOUT_S = 300
SMOKE_TESTED = {
    "bench_core.py",
    "bench_simulator.py",
    "bench_sim_growth.py",
    "bench_router.py",
    "bench_pipeline.py",
    "bench_faults.py",
    "bench_live_batched.py",
    "bench_redis_cost.py",
}


def run_quick(script: str, *args: str) -> str:
    """Run ``bench/<script> --quick ARGS``; its stdout, after checking it exited 0."""
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / script), "--quick", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, f"{script} --quick exited {done.returncode}:\n{done.stderr}"
    return done.stdout


def assert_table(stdout: str, *columns: str) -> None:
    """A header line naming `columns` in order, a rule of dashes under it, then a row."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines[:-2]):
        words = line.split()
        if words[: len(columns)] == list(columns):
            assert set(lines[i + 1]) == {"-"}, f"no rule under the header {line!r}"
            assert lines[i + 2].strip(), f"no row under the header {line!r}"
            return
    raise AssertionError(f"no table header starting {' '.join(columns)!r} in:\n{stdout}")


def test_bench_core_quick_prints_its_table() -> None:
    stdout = run_quick("bench_core.py")
    assert_table(stdout, "benchmark", "items", "best", "s", "rate/s", "vs", "baseline")
    assert "index: InMemoryIndex" in stdout


def test_bench_simulator_quick_prints_both_tables(tmp_path: Path) -> None:
    records = random_mooncake_records(random.Random(0), 60)
    trace = write_mooncake_trace(tmp_path / "trace.jsonl", records)

    stdout = run_quick("bench_simulator.py", "--trace", str(trace))

    assert_table(stdout, "trace", "expansion", "seconds", "req/s", "blocks/s")
    assert_table(stdout, "step", "seconds", "req/s", "×", "baseline", "hit", "rate")
    assert "60 requests" in stdout


def test_bench_sim_growth_quick_prints_its_table_and_plots(tmp_path: Path) -> None:
    records = random_mooncake_records(random.Random(1), 120)
    trace = write_mooncake_trace(tmp_path / "trace.jsonl", records)
    png = tmp_path / "growth.png"

    stdout = run_quick("bench_sim_growth.py", "--trace", str(trace), "--plot", str(png))

    assert_table(stdout, "sweep", "engine", "requests", "prompt", "tok", "blocks", "seconds")
    assert "batched/calibrated" in stdout and "sequential/seed" in stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.redis
def test_bench_router_quick_prints_its_table(real_redis_base_url: str) -> None:
    url = real_redis_url(real_redis_base_url, BENCH_DB)

    stdout = run_quick("bench_router.py", "--redis-url", url)

    assert_table(stdout, "blocks", "tokens", "method", "longest", "p50", "ms", "p99", "ms")


@pytest.mark.redis
@pytest.mark.slow
def test_bench_pipeline_quick_prints_its_table(real_redis_base_url: str) -> None:
    url = real_redis_url(real_redis_base_url, BENCH_DB)

    stdout = run_quick("bench_pipeline.py", "--redis-url", url)

    assert_table(stdout, "pipeline", "W", "scale", "done", "hit")
    assert "kvqueue, cache_aware" in stdout


@pytest.mark.slow
def test_bench_faults_quick_prints_its_tables() -> None:
    stdout = run_quick("bench_faults.py")  # a redis-server of its own: it takes it down

    assert_table(stdout, "scenario", "sent", "done", "rej", "fail", "rerouted")
    assert_table(stdout, "key", "family", "bytes/request", "expires")
    assert "SIGKILL 1 of 3 workers" in stdout


@pytest.mark.redis
@pytest.mark.slow
def test_bench_live_batched_quick_prints_its_table(real_redis_base_url: str) -> None:
    url = real_redis_url(real_redis_base_url, BENCH_DB)

    stdout = run_quick("bench_live_batched.py", "--redis-url", url)

    assert_table(stdout, "scale", "W", "done", "steps", "wall", "s", "sleep", "%")
    assert "batched workers" in stdout


@pytest.mark.slow
def test_bench_redis_cost_quick_prints_its_table() -> None:
    stdout = run_quick("bench_redis_cost.py")  # a redis-server of its own: it reads its stats

    assert_table(stdout, "phase", "W", "items", "server", "CPU", "ms/item")
    assert "router decisions" in stdout and "heaviest commands per request" in stdout


def test_every_bench_script_has_a_smoke_test() -> None:
    scripts = {p.name for p in BENCH_DIR.glob("*.py")} - {"bench_args.py"}
    assert scripts == SMOKE_TESTED, "a new bench script needs its --quick test here"

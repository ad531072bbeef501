"""A local cluster of KV workers: N `rq worker -w workers.KVWorker worker-<i>` processes.

Used by the demo, the comparison script, the benchmarks and the end-to-end tests. Each
worker is a real RQ worker process; `stop()` ends every process it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import redis

from kvqueue import keys
from kvqueue.errors import KVQueueError
from kvqueue.keys import worker_name

REPO_ROOT = Path(__file__).resolve().parents[1]


def rq_worker_command(redis_url: str, queue: str) -> list[str]:
    return [
        sys.executable, "-c", "import sys; from rq.cli import main; sys.exit(main())",
        "worker", "-w", "workers.KVWorker", "--url", redis_url,
        "--serializer", "rq.serializers.JSONSerializer",
        "--disable-job-desc-logging", "--quiet", queue,
    ]  # fmt: skip


class LocalCluster:
    """Start, wait for and stop N KV worker processes against one Redis."""

    def __init__(
        self,
        redis_url: str,
        num_workers: int,
        env: Mapping[str, str] | None = None,
        prefix: str = keys.DEFAULT_PREFIX,
        log_dir: Path | None = None,
    ) -> None:
        if num_workers <= 0:
            raise ValueError(f"num_workers must be positive, got {num_workers}")
        self.redis_url = redis_url
        self.num_workers = num_workers
        self.prefix = prefix
        self.workers = [worker_name(i) for i in range(num_workers)]
        self.env = {**os.environ, **(env or {}), "REDIS_URL": redis_url, "KVQ_PREFIX": prefix}
        # `workers` and `kvqueue` import from this checkout even when not pip-installed.
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), self.env.get("PYTHONPATH", "")) if p
        )
        self.log_dir = log_dir
        self._processes: list[subprocess.Popen] = []

    def start(self, timeout_s: float = 60.0) -> LocalCluster:
        for worker in self.workers:
            log = subprocess.DEVNULL
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                log = open(self.log_dir / f"{worker}.log", "ab")  # noqa: SIM115
            self._processes.append(
                subprocess.Popen(
                    rq_worker_command(self.redis_url, worker),
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        self.wait_live(timeout_s)
        return self

    def wait_live(self, timeout_s: float) -> None:
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout_s
        while True:
            live = {m.decode() for m in client.zrange(keys.workers(self.prefix), 0, -1)}
            if set(self.workers) <= live:
                return
            dead = [
                w
                for w, p in zip(self.workers, self._processes, strict=True)
                if p.poll() is not None
            ]
            if dead or time.monotonic() > deadline:
                self.stop()
                why = f"exited early: {dead}" if dead else f"not live after {timeout_s:.0f} s"
                raise KVQueueError(f"KV workers failed to start ({why})")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in self._processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._processes = []

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

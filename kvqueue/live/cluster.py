"""A local cluster of KV workers: N `rq worker -w workers.KVWorker worker-<i>` processes.

Used by the demo, the comparison script, the benchmarks and the end-to-end tests. Each
worker is a real RQ worker process; `stop()` ends every process it started. The Redis URL
reaches them by environment (`RQ_REDIS_URL`, which rq's CLI reads, and `REDIS_URL`), never
on the command line, where `ps` would show its password.
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

REPO_ROOT = Path(__file__).resolve().parents[2]  # kvqueue/live/cluster.py -> the checkout


def rq_worker_command(queue: str) -> list[str]:
    """The command of one KV worker; Redis comes from its environment (`worker_env`)."""
    return [
        sys.executable, "-c", "import sys; from rq.cli import main; sys.exit(main())",
        "worker", "-w", "workers.KVWorker",
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
        self.env = {
            **os.environ,
            **(env or {}),
            "REDIS_URL": redis_url,
            "RQ_REDIS_URL": redis_url,
            "KVQ_PREFIX": prefix,
        }
        # `workers` and `kvqueue` import from this checkout even when not pip-installed.
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), self.env.get("PYTHONPATH", "")) if p
        )
        self.log_dir = log_dir
        self._processes: dict[str, subprocess.Popen] = {}

    def start(self, timeout_s: float = 60.0) -> LocalCluster:
        for worker in self.workers:
            self._spawn(worker)
        self.wait_live(timeout_s)
        return self

    def _spawn(self, worker: str) -> None:
        log = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.log_dir / f"{worker}.log", "ab")  # noqa: SIM115
        self._processes[worker] = subprocess.Popen(
            rq_worker_command(worker),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_live(self, timeout_s: float, workers: list[str] | None = None) -> None:
        """Until each worker's own process (by pid) has registered and heartbeats."""
        workers = list(self._processes) if workers is None else workers
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                live = {m.decode() for m in client.zrange(keys.workers(self.prefix), 0, -1)}
                pids = {w: client.hget(keys.worker_info(w, self.prefix), "pid") for w in workers}
                if all(
                    w in live and pids[w] == str(self._processes[w].pid).encode() for w in workers
                ):
                    return
                dead = [w for w in workers if self._processes[w].poll() is not None]
                if dead or time.monotonic() > deadline:
                    self.stop()
                    why = f"exited early: {dead}" if dead else f"not live after {timeout_s:.0f} s"
                    raise KVQueueError(f"KV workers failed to start ({why})")
                time.sleep(0.05)
        finally:
            client.close()

    def pid(self, worker: str) -> int:
        return self._processes[worker].pid

    def running(self) -> list[str]:
        """The workers whose process is still running."""
        return [w for w, p in self._processes.items() if p.poll() is None]

    def kill(self, worker: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one worker (SIGKILL: it dies at once, telling nobody)."""
        process = self._processes[worker]
        os.killpg(process.pid, sig)
        if sig == signal.SIGKILL:
            process.wait()

    def restart(self, worker: str, timeout_s: float = 30.0) -> None:
        """Start `worker` again under the same name (after `kill`), wait until it is live."""
        if self._processes[worker].poll() is None:
            raise KVQueueError(f"{worker} is still running (pid {self.pid(worker)})")
        self._spawn(worker)
        self.wait_live(timeout_s, [worker])

    def stop(self, timeout_s: float = 10.0) -> None:
        processes = list(self._processes.values())
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._processes = {}

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

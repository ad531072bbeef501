"""Live runs back to back on the same workers: warned about warm caches, or reset first.

A worker keeps its cache between runs, so a second run of a workload on the same workers hits
blocks the first one left. `send.py` says so (naming the cached block count) and, with
`--reset-caches`, has every worker empty its cache first — a `clear_cache` job queued on each
worker, announced as `cleared` — after which the run's hit rate is the first run's again.
Real Redis, real `rq worker` processes of both engines, `producer/send.py` as a subprocess.
"""

from __future__ import annotations

import orjson
import pytest
from live_support import EVERY_ENGINE, Lab, cache_snapshot, events_by_worker

from kvqueue import keys
from kvqueue.gpu.events import AllBlocksCleared
from kvqueue.gpu.results import RequestStatus
from kvqueue.live.caches import reset_caches, warm_blocks
from kvqueue.live.run import run_live
from kvqueue.live.waiting import wait_for_results
from kvqueue.workloads.synthetic import make_workload

pytestmark = [pytest.mark.slow, pytest.mark.redis]

WORKLOAD = ("--workload", "shared-prefix-tiny", "--wait", "--json")


def send(lab: Lab, *extra: str) -> tuple[dict, str]:
    """One run through `send.py`: its summary and its stderr."""
    done = lab.send_py(*WORKLOAD, *extra)
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout), done.stderr


@EVERY_ENGINE
def test_a_second_run_on_warm_caches_is_warned_and_a_reset_restores_the_first_hit_rate(
    lab: Lab,
) -> None:
    workers = lab.cluster(2).workers
    first, first_err = send(lab)
    cached = warm_blocks(lab.client, workers, lab.prefix)

    second, second_err = send(lab)
    reset, reset_err = send(lab, "--reset-caches")

    assert "caches are not empty" not in first_err
    assert sum(cached.values()) > 0
    assert f"{sum(cached.values()):,} cached blocks" in second_err
    assert second["hit_rate"] > first["hit_rate"]
    assert "caches are not empty" not in reset_err
    assert reset["hit_rate"] == first["hit_rate"]
    meta = lab.client.hgetall(keys.run(reset["run_id"], lab.prefix))
    assert (orjson.loads(meta[b"caches_reset"]), orjson.loads(meta[b"cached_blocks_at_start"])) == (
        True,
        0,
    )
    events = events_by_worker(lab.client, lab.prefix)
    for worker in workers:
        # Each announced `cleared` once for the reset, after its start-up snapshot's.
        assert sum(isinstance(e, AllBlocksCleared) for e in events[worker]) == 2


@EVERY_ENGINE
def test_a_reset_queued_behind_a_run_waits_for_it_and_leaves_an_empty_cache(lab: Lab) -> None:
    workers = lab.cluster(1).workers
    requests = make_workload("shared-prefix-tiny")
    run = run_live(lab.client, lab.settings(), requests, wait=False, progress=False)

    cleared = reset_caches(lab.client, workers)  # queued behind the run's jobs
    results = wait_for_results(lab.client, run.sent.run_id, run.sent.job_ids, lab.prefix)

    assert [r.status for r in results] == [RequestStatus.COMPLETED] * len(requests)
    assert cleared["worker-0"] > 0
    assert cache_snapshot(lab.client, "worker-0")["cached"] == []

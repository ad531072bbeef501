"""RQ's view of a KV worker's jobs stays true whichever engine serves them.

A sequential worker writes RQ's bookkeeping of a request job in kvqueue's own round trips
(`kvqueue.live.rq_jobs.OneJob`) and a batched one per step (`ConcurrentJobs`); either way RQ
sees each job finished with its return value, in the FinishedJobRegistry, none left started
or taken, and the worker idle with its job counted. Real Redis, real `rq worker` processes.
"""

from __future__ import annotations

import pytest
from live_support import EVERY_ENGINE, Lab, wait_until
from rq import Queue, Worker
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from kvqueue.live.run import run_live
from kvqueue.workloads.synthetic import make_workload

pytestmark = [pytest.mark.slow, pytest.mark.redis]


@EVERY_ENGINE
def test_rq_sees_every_served_job_finished_with_its_return_value(lab: Lab) -> None:
    lab.cluster(1)
    requests = make_workload("shared-prefix-tiny")
    run = run_live(lab.client, lab.settings(), requests, progress=False)

    job_ids = sorted(run.sent.job_ids.values())
    finished = FinishedJobRegistry("worker-0", connection=lab.client)
    started = StartedJobRegistry("worker-0", connection=lab.client)
    queue = Queue("worker-0", connection=lab.client)
    (worker,) = Worker.all(connection=lab.client)
    # A batched worker turns idle once its loop ends, just after its last results.
    wait_until(lambda: worker.get_state() == "idle", what="the worker idle")
    assert sorted(finished.get_job_ids()) == job_ids
    assert (len(started), lab.client.llen(queue.intermediate_queue_key)) == (0, 0)
    for job_id in job_ids:
        job = Job.fetch(job_id, connection=lab.client, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FINISHED
        assert job.return_value() == {"status": "completed", "worker": "worker-0"}
        assert job.started_at is not None and job.ended_at >= job.started_at
    worker.refresh()
    assert worker.successful_job_count == len(requests)

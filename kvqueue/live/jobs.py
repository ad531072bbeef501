"""What a KV worker runs: kvqueue's own job functions, named in JSON, and nothing else.

Jobs travel as RQ jobs with RQ's JSON serializer, so a Redis writer cannot smuggle in a pickled
object. RQ resolves a job's function by importing the name the job carries, at perform time;
`KVJob`, the job class of every KV worker, checks that name against `JOB_FUNCTIONS` first and
refuses anything else — `os.system`, `builtins.eval`, a method of some instance, a job with
callbacks — with `JobRefused`, before anything is imported or called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rq.exceptions import DeserializationError
from rq.job import Job
from rq.utils import import_attribute

from kvqueue.errors import KVQueueError
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.routing.membership import JobRecord

JOB_FUNCTION = "kvqueue.live.worker.serve_request"
SNAPSHOT_FUNCTION = "kvqueue.live.worker.cache_snapshot"
JOB_FUNCTIONS = frozenset({JOB_FUNCTION, SNAPSHOT_FUNCTION})


class JobRefused(KVQueueError, PermissionError):
    """A job asked a KV worker to run something other than kvqueue's job functions."""


def refusal(job: Job) -> str | None:
    """Why a KV worker must not run `job`, or None when it is one of kvqueue's own."""
    try:
        func_name = job.func_name
        instance = job.instance
    except DeserializationError as exc:
        return f"refused job {job.id}: its data is not kvqueue's JSON ({exc})"
    if func_name not in JOB_FUNCTIONS:
        return (
            f"refused job {job.id}: {func_name!r} is not a kvqueue job function "
            f"(a KV worker runs only {', '.join(sorted(JOB_FUNCTIONS))})"
        )
    if instance is not None:
        return f"refused job {job.id}: it names a method of an object, not {func_name}"
    callbacks = [
        name
        for name in (
            job._success_callback_name,
            job._failure_callback_name,
            job._stopped_callback_name,
        )
        if name
    ]
    if callbacks:
        return f"refused job {job.id}: it asks for callbacks ({', '.join(callbacks)})"
    return None


class KVJob(Job):
    """An RQ job that resolves only kvqueue's job functions and never runs callbacks."""

    @property
    def func(self) -> Any:
        reason = refusal(self)
        if reason is not None:
            raise JobRefused(reason)
        return import_attribute(self.func_name)  # one of JOB_FUNCTIONS: kvqueue's own code

    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class JobContext:
    """What the producer attaches to a request (everything but the request is run metadata).

    `attempt` counts reroutes: 0 as sent, +1 each time a dead worker's queued job moves on.
    `load_tokens`/`estimated_ms` repeat the job's load record, so a worker can count the job
    even if Redis lost the record.
    """

    request: Request
    run_id: str
    strategy: str
    enqueued_at: float  # epoch seconds, producer clock: when the request arrived
    run_started_at: float  # epoch seconds, producer clock
    load_tokens: int
    time_scale: float
    estimated_ms: float = 0.0  # the router's service estimate, released from the backlog at the end
    attempt: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "request": self.request.to_wire(),
            "run_id": self.run_id,
            "strategy": self.strategy,
            "enqueued_at": self.enqueued_at,
            "run_started_at": self.run_started_at,
            "load_tokens": self.load_tokens,
            "time_scale": self.time_scale,
            "estimated_ms": self.estimated_ms,
            "attempt": self.attempt,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> JobContext:
        return cls(
            request=Request.from_wire(data["request"]),
            run_id=str(data["run_id"]),
            strategy=str(data["strategy"]),
            enqueued_at=float(data["enqueued_at"]),
            run_started_at=float(data["run_started_at"]),
            load_tokens=int(data["load_tokens"]),
            time_scale=float(data["time_scale"]),
            estimated_ms=float(data.get("estimated_ms", 0.0)),
            attempt=int(data.get("attempt", 0)),
        )

    def failure(self, worker: str, reason: str) -> RequestResult:
        """The request's result when it fails on `worker` for `reason`."""
        request = self.request
        return RequestResult(
            request.request_id, self.run_id, worker, self.strategy, RequestStatus.FAILED, reason
        )

    def record(self) -> JobRecord:
        """The load record this job adds to its worker."""
        return JobRecord(
            self.run_id,
            self.request.request_id,
            self.strategy,
            self.load_tokens,
            self.estimated_ms,
        )

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
from kvqueue.gpu.hashing import pack_hashes, unpack_hashes
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.routing.membership import JobRecord

JOB_FUNCTION = "kvqueue.live.worker.serve_request"
SNAPSHOT_FUNCTION = "kvqueue.live.worker.cache_snapshot"
CLEAR_FUNCTION = "kvqueue.live.worker.clear_cache"
JOB_FUNCTIONS = frozenset({JOB_FUNCTION, SNAPSHOT_FUNCTION, CLEAR_FUNCTION})


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
    """An RQ job that resolves only kvqueue's job functions and never runs callbacks.

    Its hash leaves out the fields RQ would write empty (no callbacks, not started, no
    group...): `Job.restore` reads a missing field as an empty one, and each such field costs
    a queued request ~50 bytes of Redis memory.
    """

    def to_dict(self, include_meta: bool = True, include_result: bool = True) -> dict:
        fields = super().to_dict(include_meta=include_meta, include_result=include_result)
        return {name: value for name, value in fields.items() if value != ""}

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

    On the wire (`to_wire`, the RQ job's one JSON argument) the request is flattened into the
    context and carries what a worker needs: its block hashes as one base64 string of the
    concatenated 32-byte digests (`pack_hashes`), and its token ids only when `with_token_ids`
    (a worker whose decode-length model reads the prompt) or when the prompt has no full
    block (the fallback oracle's digest then reads the tokens). Optional fields are left out
    when unset. A 576-token prompt's payload is ~1.8 KB of JSON (1,536 characters of it the 36
    hashes), against ~5.6 KB with hex hashes and its token ids.
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

    def to_wire(self, with_token_ids: bool = False) -> dict[str, Any]:
        request = self.request
        wire: dict[str, Any] = {
            "request_id": request.request_id,
            "num_prompt_tokens": request.num_prompt_tokens,
            "block_hashes": pack_hashes(request.block_hashes),
            "run_id": self.run_id,
            "strategy": self.strategy,
            "enqueued_at": self.enqueued_at,
            "run_started_at": self.run_started_at,
            "load_tokens": self.load_tokens,
            "time_scale": self.time_scale,
            "estimated_ms": self.estimated_ms,
        }
        if request.max_tokens is not None:
            wire["max_tokens"] = request.max_tokens
        if request.arrival_ms:
            wire["arrival_ms"] = request.arrival_ms
        if request.token_ids is not None and (with_token_ids or not request.block_hashes):
            wire["token_ids"] = list(request.token_ids)
        if self.attempt:
            wire["attempt"] = self.attempt
        return wire

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> JobContext:
        """Inverse of `to_wire`; raises KeyError or ValueError on a payload it did not write."""
        token_ids = data.get("token_ids")
        max_tokens = data.get("max_tokens")
        request = Request(
            request_id=str(data["request_id"]),
            num_prompt_tokens=int(data["num_prompt_tokens"]),
            block_hashes=tuple(unpack_hashes(data["block_hashes"])),
            max_tokens=None if max_tokens is None else int(max_tokens),
            arrival_ms=float(data.get("arrival_ms", 0.0)),
            token_ids=tuple(token_ids) if token_ids is not None else None,
        )
        return cls(
            request=request,
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

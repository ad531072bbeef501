"""The producer: route each request and enqueue it on its worker's RQ queue.

Per request: wait for its arrival time (× the run's time scale), one Redis round trip for the
router's read, one for the commit (pending marks + load) together with the RQ enqueue. Jobs
are JSON-serialized. If routing becomes impossible mid-run (every worker gone), the requests
not yet sent get a `failed` result in the run's stream, so nothing is silently dropped.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.errors import NoLiveWorkersError
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.live.connection import redact
from kvqueue.live.runs import append_result, write_run_meta
from kvqueue.live.worker import JOB_FUNCTION, JobContext
from kvqueue.routing.policies.base import make_policy
from kvqueue.routing.router import START_WORKER_HINT, Router
from kvqueue.routing.state import RedisRouterState
from kvqueue.routing.view import worker_order

JOB_RESULT_TTL_S = 3600
JOB_FAILURE_TTL_S = 24 * 3600


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


@dataclass(frozen=True, slots=True)
class SentRun:
    run_id: str
    strategy: str
    job_ids: dict[str, str]  # request id -> RQ job id
    num_unsent: int


class Producer:
    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        strategy: str | None = None,
        run_id: str | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.strategy = strategy or settings.strategy
        self.run_id = run_id or new_run_id()
        self.prefix = settings.key_prefix
        self.router = Router(
            RedisRouterState(
                client,
                self.prefix,
                settings.heartbeat_ttl_s,
                settings.pending_ttl_s,
                time_scale=settings.time_scale,
            ),
            make_policy(self.strategy),
            settings.latency_model(),
        )
        self._queues: dict[str, Queue] = {}

    def live_workers(self) -> list[str]:
        cutoff = int(time.time() * 1000 - self.settings.heartbeat_ttl_s * 1000)
        members = self.client.zrangebyscore(keys.workers(self.prefix), cutoff, "+inf")
        return sorted((m.decode() for m in members), key=worker_order)

    def require_workers(self) -> list[str]:
        """The live workers; raises `NoLiveWorkersError` (with how to start one) if none."""
        workers = self.live_workers()
        if not workers:
            raise NoLiveWorkersError(
                f"no live KV workers in Redis at {redact(self.settings.redis_url)} "
                f"(none heartbeat within {self.settings.heartbeat_ttl_s:g} s); "
                f"{START_WORKER_HINT} (one per simulated GPU)"
            )
        return workers

    def send(
        self,
        requests: Sequence[Request],
        meta: dict | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> SentRun:
        """Route and enqueue every request at its arrival time. Nothing is sent without workers."""
        workers = self.require_workers()
        scale = self.settings.time_scale
        started = time.time()
        write_run_meta(
            self.client,
            self.run_id,
            {
                "strategy": self.strategy,
                "num_requests": len(requests),
                "workers": workers,
                "time_scale": scale,
                "started_at": started,
                **(meta or {}),
            },
            self.prefix,
        )
        job_ids: dict[str, str] = {}
        for position, request in enumerate(requests):
            delay = started + request.arrival_ms * scale / 1000.0 - time.time()
            if delay > 0:
                time.sleep(delay)
            try:
                decision = self.router.route(request)
            except NoLiveWorkersError as exc:
                self._fail_unsent(requests[position:], f"not sent: {exc}")
                return SentRun(self.run_id, self.strategy, job_ids, len(requests) - position)
            context = JobContext(
                request=request,
                run_id=self.run_id,
                strategy=self.strategy,
                enqueued_at=time.time(),
                run_started_at=started,
                load_tokens=decision.load_tokens,
                time_scale=scale,
                estimated_ms=decision.estimated_ms,
            )
            job_id = f"kvq-{self.run_id}-{position}"
            pipe = self.client.pipeline(transaction=True)
            # RQ opens the MULTI itself, so the enqueue goes first; it all applies atomically.
            self._queue(decision.worker).enqueue_call(
                JOB_FUNCTION,
                args=(context.to_wire(),),
                job_id=job_id,
                result_ttl=JOB_RESULT_TTL_S,
                failure_ttl=JOB_FAILURE_TTL_S,
                pipeline=pipe,
            )
            self.router.commit(request, decision, pipeline=pipe)
            pipe.execute()
            job_ids[request.request_id] = job_id
            if on_sent is not None:
                on_sent()
        return SentRun(self.run_id, self.strategy, job_ids, 0)

    def _queue(self, worker: str) -> Queue:
        queue = self._queues.get(worker)
        if queue is None:
            queue = Queue(
                keys.queue_name(worker), connection=self.client, serializer=JSONSerializer
            )
            self._queues[worker] = queue
        return queue

    def _fail_unsent(self, requests: Sequence[Request], reason: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        for request in requests:
            result = RequestResult(
                request_id=request.request_id,
                run_id=self.run_id,
                worker="",
                strategy=self.strategy,
                status=RequestStatus.FAILED,
                reason=reason,
                num_prompt_tokens=request.num_prompt_tokens,
                num_blocks=request.num_blocks,
            )
            append_result(pipe, result, self.prefix)
        pipe.execute()

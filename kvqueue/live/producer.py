"""The producer: route each request and enqueue it on its worker's RQ queue.

Per request: wait for its arrival time (× the run's time scale), one Redis round trip for the
router's read, one for the commit (pending marks, load record and counters) together with the
RQ enqueue. Jobs are JSON-serialized. Before anything is written the producer checks the
Redis user's rights and claims the run id (two producers cannot share one).

What never reaches a worker ends with a result here: a request no live worker's GPU can ever
serve (over its context or its cache) is `rejected` with the GPU's own reason, before it is
routed; if routing becomes impossible mid-run (every worker gone) the requests not yet sent
are `failed`. With `max_outstanding` the producer waits while the chosen worker already has
that many requests outstanding (backpressure); without it queues grow as fast as requests
arrive, which a testbed needs to overload a cluster. Between requests it claims workers whose
heartbeat expired (`Recovery.maybe_reap`).
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
from kvqueue.errors import ConfigError, NoLiveWorkersError, RequestRejected
from kvqueue.gpu.presets import Preset, get_preset
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.gpu.simulated_gpu import SimulatedGpu
from kvqueue.live.connection import check_access, redact
from kvqueue.live.jobs import JOB_FUNCTION, JobContext, KVJob
from kvqueue.live.pipelines import pipeline
from kvqueue.live.recovery import Recovery
from kvqueue.live.routers import live_router
from kvqueue.live.runs import ResultWriter, claim_run
from kvqueue.routing.membership import RedisMembership
from kvqueue.routing.router import START_WORKER_HINT, Decision
from kvqueue.routing.view import worker_order

JOB_RESULT_TTL_S = 600  # RQ keeps a finished job 10 min (kvqueue's result is in the run)
JOB_FAILURE_TTL_S = 24 * 3600
BACKPRESSURE_POLL_S = 0.005
NEEDS_TOKEN_IDS = b"needs_token_ids"  # a worker's info field: "1" when its oracle reads tokens


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def job_id_for(run_id: str, position: int) -> str:
    return f"kvq-{run_id}-{position}"


@dataclass(frozen=True, slots=True)
class SentRun:
    run_id: str
    strategy: str
    job_ids: dict[str, str]  # request id -> RQ job id, for every request enqueued
    num_unsent: int
    num_requests: int = 0  # every request of the run, whatever became of it


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
        self.recovery = Recovery(client, settings)
        self.router = live_router(client, settings, self.strategy)
        self.state = self.router.state
        self.membership = RedisMembership(client, self.prefix)
        self.results = ResultWriter(client, self.prefix, settings.run_ttl_s)
        self._queues: dict[str, Queue] = {}
        self._started: float | None = None  # epoch seconds, once `start_run` claimed the run
        self._gpus: list[SimulatedGpu] = []
        self._with_token_ids = False  # a live worker's decode model reads the prompt's tokens

    def live_workers(self) -> list[str]:
        workers = self.membership.live_workers(self.settings.heartbeat_ttl_s)
        return sorted(workers, key=worker_order)

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

    def start_run(self, requests: Sequence[Request], meta: dict | None = None) -> None:
        """Check the Redis user's rights, settle dead workers, find the live ones and claim the
        run id; raises before anything of the run is written. `send` calls it if need be."""
        check_access(self.client, self.settings.redis_url, self.prefix)
        self.recovery.reap_expired()
        workers = self.require_workers()
        infos = [self.client.hgetall(keys.worker_info(w, self.prefix)) for w in workers]
        self._gpus = self._worker_gpus(infos)
        self._with_token_ids = any(info.get(NEEDS_TOKEN_IDS) == b"1" for info in infos)
        self._started = time.time()
        claim_run(
            self.client,
            self.run_id,
            {
                "strategy": self.strategy,
                "num_requests": len(requests),
                "workers": workers,
                "time_scale": self.settings.time_scale,
                "started_at": self._started,
                **_workers_engine(infos),
                **(meta or {}),
            },
            self.prefix,
            self.settings.run_ttl_s,
        )

    def send(
        self,
        requests: Sequence[Request],
        meta: dict | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> SentRun:
        """Route and enqueue every request at its arrival time. Nothing is sent without workers,
        without the rights kvqueue needs, or under a run id already in use."""
        if self._started is None:
            self.start_run(requests, meta)
        started, gpus = self._started, self._gpus
        assert started is not None
        scale = self.settings.time_scale
        job_ids: dict[str, str] = {}
        for position, request in enumerate(requests):
            delay = started + request.arrival_ms * scale / 1000.0 - time.time()
            if delay > 0:
                time.sleep(delay)
            arrived = time.time()
            reason = _unservable(request, gpus)
            if reason is not None:
                self._end(request, RequestStatus.REJECTED, reason)
            else:
                try:
                    decision = self._route(request)
                except NoLiveWorkersError as exc:
                    for unsent in requests[position:]:
                        self._end(unsent, RequestStatus.FAILED, f"not sent: {exc}")
                    return SentRun(
                        self.run_id,
                        self.strategy,
                        job_ids,
                        len(requests) - position,
                        len(requests),
                    )
                job_ids[request.request_id] = self._enqueue(
                    request, decision, job_id_for(self.run_id, position), arrived, started
                )
            if on_sent is not None:
                on_sent()
        return SentRun(self.run_id, self.strategy, job_ids, 0, len(requests))

    def _route(self, request: Request) -> Decision:
        """The router's decision; with `max_outstanding`, the first whose worker has room."""
        limit = self.settings.max_outstanding
        while True:
            self.recovery.maybe_reap()
            decision = self.router.route(request)
            if limit is None or decision.worker_outstanding < limit:
                return decision
            time.sleep(BACKPRESSURE_POLL_S)

    def _enqueue(
        self, request: Request, decision: Decision, job_id: str, arrived: float, started: float
    ) -> str:
        context = JobContext(
            request=request,
            run_id=self.run_id,
            strategy=self.strategy,
            enqueued_at=arrived,
            run_started_at=started,
            load_tokens=decision.load_tokens,
            time_scale=self.settings.time_scale,
            estimated_ms=decision.estimated_ms,
        )
        pipe = pipeline(self.client, transaction=True)
        # RQ opens the MULTI itself, so the enqueue goes first; it all applies atomically.
        self._queue(decision.worker).enqueue_call(
            JOB_FUNCTION,
            args=(context.to_wire(self._with_token_ids),),
            job_id=job_id,
            description=request.request_id,  # RQ's default repeats the arguments
            result_ttl=JOB_RESULT_TTL_S,
            failure_ttl=JOB_FAILURE_TTL_S,
            ttl=int(self.settings.run_ttl_s),  # a job never taken expires with its run
            pipeline=pipe,
        )
        # The router's commit, plus the job's load record (released when the job ends).
        self.state.commit(request, decision, pipeline=pipe, job_id=job_id, run_id=self.run_id)
        pipe.execute()
        return job_id

    def _queue(self, worker: str) -> Queue:
        queue = self._queues.get(worker)
        if queue is None:
            queue = Queue(
                keys.queue_name(worker),
                connection=self.client,
                job_class=KVJob,
                serializer=JSONSerializer,
            )
            self._queues[worker] = queue
        return queue

    def _worker_gpus(self, infos: Sequence[dict[bytes, bytes]]) -> list[SimulatedGpu]:
        """A GPU per preset the live workers registered (the producer's own preset if none
        did): what decides, before routing, whether any of them could serve a request."""
        presets: dict[tuple[str, int, int], Preset] = {}
        for info in infos:
            try:
                name = info[b"preset"].decode()
                limits = (name, int(info[b"capacity_blocks"]), int(info[b"max_context_tokens"]))
                presets[limits] = get_preset(*limits)
            except (KeyError, ValueError, ConfigError):
                continue
        if not presets:
            presets[("", 0, 0)] = self.settings.gpu_preset()
        return [SimulatedGpu(preset) for preset in presets.values()]

    def _end(self, request: Request, status: RequestStatus, reason: str) -> None:
        """A request that reaches no worker: its one result, written here."""
        self.results.append(
            RequestResult(
                request_id=request.request_id,
                run_id=self.run_id,
                worker="",
                strategy=self.strategy,
                status=status,
                reason=reason,
                num_prompt_tokens=request.num_prompt_tokens,
                num_blocks=request.num_blocks,
            )
        )


ENGINE_FIELDS = ("engine", "latency_profile", "max_num_batched_tokens", "max_num_seqs")


def _workers_engine(infos: Sequence[dict[bytes, bytes]]) -> dict[str, object]:
    """The engine the live workers registered (`EngineConfig.describe`), for the run's
    metadata; {} when they registered none or do not all run the same one."""
    described = {
        tuple((f, info[f.encode()].decode()) for f in ENGINE_FIELDS if f.encode() in info)
        for info in infos
    }
    if len(described) != 1:
        return {}
    (fields,) = described
    return {f: int(v) if v.isdigit() else v for f, v in fields}


def _unservable(request: Request, gpus: Sequence[SimulatedGpu]) -> str | None:
    """The GPU's reason when no worker's GPU could ever serve `request`, else None."""
    reasons = []
    for gpu in gpus:
        try:
            gpu.check_admissible(request, request.max_tokens or 0)
        except RequestRejected as rejection:
            reasons.append(rejection.reason)
        else:
            return None
    return reasons[0]

"""Settling what a dead worker owed: its requests in service fail, its queued ones move on.

A worker is dead when its heartbeat is older than the TTL (`KVQ_HEARTBEAT_TTL`): from then on
the router no longer sees it (`ROUTE_VIEW` reads fresh heartbeats only). The producer runs
`maybe_reap` between requests and while it waits for results, so a death is claimed within
about a second after that (`REAP`, once, whoever gets there first); a worker that stops hands
itself over the same way (`hand_over`). Then, for each job the worker still owed:

- in service (started): a `failed` result, "worker X died (no heartbeat for N s) while
  serving it" — its progress is lost with the process;
- queued: taken back from the worker's RQ queue and routed again among the live workers,
  same job id, `attempt` + 1 (`KVQ_ON_WORKER_DEATH=reroute`, the default), or failed with the
  reason (`KVQ_ON_WORKER_DEATH=fail`). After `MAX_REROUTES` moves, or with no live worker
  left, it fails;
- taken from the queue but never started: failed (the process died holding it).

Results go through `ResultWriter` (the first result of a request wins), so a worker that was
only slow, not dead, cannot add a second result when it finishes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.errors import ConfigError, NoLiveWorkersError
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.live.jobs import JobContext, KVJob
from kvqueue.live.routers import live_router
from kvqueue.live.runs import ResultWriter
from kvqueue.routing.membership import JobRecord, Reaped, RedisMembership
from kvqueue.routing.policies.base import parse_strategy
from kvqueue.routing.router import Router
from kvqueue.routing.state import RedisRouterState

log = logging.getLogger(__name__)

MAX_REROUTES = 3  # a request moved this often (cascading deaths) fails instead


@dataclass(slots=True)
class RecoveryStats:
    """What this process settled: deaths it claimed, requests it rerouted or failed."""

    dead_workers: list[str] = field(default_factory=list)
    rerouted: int = 0
    failed: int = 0
    detected_at: dict[str, float] = field(default_factory=dict)  # worker -> epoch seconds


class Recovery:
    """Claims dead workers and settles their jobs (module docstring)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.prefix = settings.key_prefix
        self.membership = RedisMembership(client, self.prefix)
        self.state = RedisRouterState(
            client,
            self.prefix,
            settings.heartbeat_ttl_s,
            settings.pending_ttl_s,
            time_scale=settings.time_scale,
        )
        self.results = ResultWriter(client, self.prefix, settings.run_ttl_s)
        self.interval_s = min(1.0, settings.heartbeat_ttl_s / 4)
        self.stats = RecoveryStats()
        self._next_check = 0.0
        self._routers: dict[str, Router] = {}

    def maybe_reap(self) -> None:
        """`reap_expired`, at most once per `interval_s`."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.interval_s
            self.reap_expired()

    def reap_expired(self) -> list[Reaped]:
        """Claim and settle every worker whose heartbeat expired."""
        ttl = self.settings.heartbeat_ttl_s
        claimed = []
        for worker in self.membership.expired_workers(ttl):
            reaped = self.membership.reap(worker, ttl)
            if reaped is not None:
                log.warning("%s: no heartbeat for %g s: declared dead", worker, ttl)
                self.settle(reaped, f"worker {worker} died (no heartbeat for {ttl:g} s)")
                claimed.append(reaped)
        return claimed

    def hand_over(self, worker: str, generation: int) -> Reaped | None:
        """A stopping worker (`generation`) leaves: its jobs are settled now."""
        reaped = self.membership.reap(worker, self.settings.heartbeat_ttl_s, generation)
        if reaped is not None:
            self.settle(reaped, f"worker {worker} stopped")
        return reaped

    def settle(self, reaped: Reaped, why: str) -> None:
        self.stats.dead_workers.append(reaped.worker)
        self.stats.detected_at[reaped.worker] = time.time()
        for job_id, record in reaped.jobs.items():
            if record.started:
                self._fail(reaped.worker, record, f"{why} while serving it")
            elif self._take_back(reaped.worker, job_id):
                self._move_on(reaped.worker, job_id, record, why)
            else:
                self._fail(reaped.worker, record, f"{why} before serving it")

    # -- one queued job ------------------------------------------------------------------
    def _take_back(self, worker: str, job_id: str) -> bool:
        """Remove the job from the worker's queue (or RQ's intermediate list); True if found."""
        queue = Queue(keys.queue_name(worker), connection=self.client)
        pipe = self.client.pipeline(transaction=True)
        pipe.lrem(queue.key, 1, job_id)
        pipe.lrem(queue.intermediate_queue_key, 1, job_id)
        return any(pipe.execute())

    def _move_on(self, dead: str, job_id: str, record: JobRecord, why: str) -> None:
        if self.settings.on_worker_death == "fail":
            self._drop(job_id)
            self._fail(dead, record, f"{why} before serving it (KVQ_ON_WORKER_DEATH=fail)")
            return
        try:
            job = KVJob.fetch(job_id, connection=self.client, serializer=JSONSerializer)
            context = JobContext.from_wire(job.args[0])
        except (NoSuchJobError, KeyError, IndexError, TypeError, ValueError) as exc:
            self._fail(dead, record, f"{why} before serving it; its job is unreadable: {exc}")
            return
        if context.attempt >= MAX_REROUTES:
            self._drop(job_id)
            self._fail(dead, record, f"{why} before serving it, after {MAX_REROUTES} reroutes")
            return
        router = self._router(context.strategy)
        try:
            decision = router.route(context.request)
        except NoLiveWorkersError:
            self._drop(job_id)
            self._fail(dead, record, f"{why} before serving it; no live worker is left")
            return
        # Token ids travel on if they came (a worker's decode model reads them).
        job.args = (replace(context, attempt=context.attempt + 1).to_wire(with_token_ids=True),)
        queue = Queue(
            keys.queue_name(decision.worker),
            connection=self.client,
            job_class=KVJob,
            serializer=JSONSerializer,
        )
        pipe = self.client.pipeline(transaction=True)
        queue.enqueue_job(job, pipeline=pipe)  # RQ opens the MULTI: the enqueue goes first
        router.state.commit(
            context.request, decision, pipeline=pipe, job_id=job_id, run_id=context.run_id
        )
        pipe.execute()
        self.stats.rerouted += 1
        log.info("%s: %s rerouted from %s to %s", job_id, record.request_id, dead, decision.worker)

    def _router(self, strategy: str) -> Router:
        try:
            parse_strategy(strategy)
        except ConfigError:
            strategy = self.settings.strategy
        router = self._routers.get(strategy)
        if router is None:
            router = live_router(self.client, self.settings, strategy)
            self._routers[strategy] = router
        return router

    def _drop(self, job_id: str) -> None:
        self.client.delete(KVJob.key_for(job_id))

    def _fail(self, worker: str, record: JobRecord, reason: str) -> None:
        result = RequestResult(
            record.request_id, record.run_id, worker, record.strategy, RequestStatus.FAILED, reason
        )
        if self.results.append(result):
            self.stats.failed += 1

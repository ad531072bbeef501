"""The live KV worker: one RQ `SimpleWorker` process per simulated GPU.

`KVWorker` (public path `workers.KVWorker`) owns a `SimulatedGpu` in its process memory. RQ's
default worker forks a fresh process per job, which would simulate every request on an empty
cache; so the job function `serve_request` refuses to run anywhere but inside the `KVWorker`
process that owns the GPU, and says which `-w` to use.

Lifecycle: on start the worker registers in the live set (`kvq:workers`), announces
`cleared` (a restarted GPU has an empty cache) and heartbeats from a daemon thread. Per job:
allocate (evicting), publish the cache events and update the tree in one MULTI/EXEC, sleep
the simulated prefill and decode times × the run's time scale, release, and publish the
result together with the load decrement. Every job ends with exactly one result in the
run's results stream: completed, rejected (with the reason) or failed (with the error).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from rq import SimpleWorker, get_current_job
from rq.serializers import JSONSerializer

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.errors import ConfigError, RequestRejected
from kvqueue.gpu.oracle import make_oracle
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.gpu.simulated_gpu import Execution, SimulatedGpu
from kvqueue.live.runs import append_result
from kvqueue.routing.redis_index import RedisIndex
from kvqueue.routing.state import RedisRouterState

log = logging.getLogger(__name__)

JOB_FUNCTION = "kvqueue.live.worker.serve_request"
LIVE_ENGINES = ("sequential",)
FORKED_WORKER_MESSAGE = (
    "this job ran outside a KV worker process: RQ's default worker forks per job and would "
    "simulate every request on a fresh, empty KV cache. Start the worker with "
    "`rq worker -w workers.KVWorker {queue}` (or RQ_WORKER_CLASS=workers.KVWorker)"
)


@dataclass(frozen=True, slots=True)
class JobContext:
    """What the producer attaches to a request (everything but the request is run metadata)."""

    request: Request
    run_id: str
    strategy: str
    enqueued_at: float  # epoch seconds, producer clock
    run_started_at: float  # epoch seconds, producer clock
    load_tokens: int
    time_scale: float
    estimated_ms: float = 0.0  # the router's service estimate, released from the backlog at the end

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
        )


class GpuRuntime:
    """A worker process's simulated GPU and its Redis side: events, results, heartbeats."""

    def __init__(self, name: str, client: redis.Redis, settings: Settings) -> None:
        self.name = name
        self.client = client
        self.settings = settings
        self.prefix = settings.key_prefix
        self.pid = os.getpid()
        check_live_engine(settings)
        self.gpu = SimulatedGpu(
            settings.gpu_preset(),
            settings.latency_model(),
            make_oracle(settings.decode_model),
            settings.sequential_pricing(),
        )
        self.index = RedisIndex(client, self.prefix)
        self.loads = RedisRouterState(client, self.prefix)
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Announce an empty cache, reset this worker's load, and start heartbeating."""
        self.gpu.cache.clear()
        pipe = self.client.pipeline(transaction=True)
        self.index.publish_events(self.name, self.gpu.take_events(), pipeline=pipe)
        self.loads.register_capacity(self.name, self.gpu.cache.num_blocks, pipeline=pipe)
        self._write_info(pipe)
        pipe.zadd(keys.workers(self.prefix), {self.name: _now_ms()})
        pipe.execute()
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop, name=f"{self.name}-heartbeat", daemon=True
        )
        self._heartbeat_thread.start()
        log.info("%s: %s, %d KV blocks", self.name, self.gpu.preset.name, self.gpu.cache.num_blocks)

    def stop(self) -> None:
        """Leave the live set; the tree forgets this worker's blocks (its cache dies with it)."""
        self._stop.set()
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(keys.workers(self.prefix), self.name)
            self.index.clear(self.name, pipeline=pipe)
            pipe.execute()
        except redis.RedisError as exc:  # shutting down anyway
            log.warning("%s: could not deregister: %s", self.name, exc)

    def heartbeat(self) -> None:
        self.client.zadd(keys.workers(self.prefix), {self.name: _now_ms()})

    def _heartbeat_loop(self) -> None:
        interval = max(0.5, self.settings.heartbeat_ttl_s / 3)
        while not self._stop.wait(interval):
            try:
                self.heartbeat()
            except redis.RedisError as exc:
                log.warning("%s: heartbeat failed: %s", self.name, exc)

    def _write_info(self, pipe: Any) -> None:
        cache = self.gpu.cache
        pipe.hset(
            keys.worker_info(self.name, self.prefix),
            mapping={
                "preset": self.gpu.preset.name,
                "capacity_blocks": cache.num_blocks,
                "max_context_tokens": self.gpu.preset.max_context_tokens,
                "used_blocks": cache.num_used_slots,
                "cached_blocks": cache.num_cached_blocks,
                "evictions": cache.stats.num_evictions,
                "pid": self.pid,
            },
        )

    # -- one request ---------------------------------------------------------------------
    def serve(self, context: JobContext) -> RequestResult:
        """Serve one request and publish its result; returns the result."""
        started = time.time()
        scale = context.time_scale
        arrival_ms = _scaled_ms(context.enqueued_at - context.run_started_at, scale)
        queue_wait_ms = max(0.0, _scaled_ms(started - context.enqueued_at, scale))
        base = {
            "request_id": context.request.request_id,
            "run_id": context.run_id,
            "worker": self.name,
            "strategy": context.strategy,
            "arrival_ms": arrival_ms,
            "start_ms": arrival_ms + queue_wait_ms,
            "num_prompt_tokens": context.request.num_prompt_tokens,
            "num_blocks": context.request.num_blocks,
            "cache_capacity_blocks": self.gpu.cache.num_blocks,
        }
        try:
            execution = self.gpu.start(context.request)
        except RequestRejected as rejection:
            result = RequestResult(
                status=RequestStatus.REJECTED,
                reason=rejection.reason,
                finish_ms=base["start_ms"],
                cache_used_blocks=self.gpu.cache.num_used_slots,
                **base,
            )
            self.publish_result(context, result)
            return result
        try:
            self.index.publish_events(self.name, self.gpu.take_events())
            used_blocks = self.gpu.cache.num_used_slots
            _sleep_simulated(execution.service_ms, scale)
        finally:
            self.gpu.finish(execution)
        result = _completed(base, execution, queue_wait_ms, used_blocks)
        self.publish_result(context, result)
        return result

    def publish_result(self, context: JobContext, result: RequestResult) -> None:
        """Append the result to the run's stream and lower this worker's load, atomically."""
        pipe = self.client.pipeline(transaction=True)
        append_result(pipe, result, self.prefix)
        completed = result.status is RequestStatus.COMPLETED
        self.loads.complete(
            self.name,
            context.load_tokens,
            context.estimated_ms,
            used_blocks=self.gpu.cache.num_used_slots,
            output_tokens=result.decode_tokens if completed else None,
            pipeline=pipe,
        )
        self._write_info(pipe)
        pipe.execute()

    def fail(self, context: JobContext, reason: str) -> RequestResult:
        result = RequestResult(
            request_id=context.request.request_id,
            run_id=context.run_id,
            worker=self.name,
            strategy=context.strategy,
            status=RequestStatus.FAILED,
            reason=reason,
        )
        self.publish_result(context, result)
        return result


def check_live_engine(settings: Settings) -> None:
    """Raise `ConfigError` unless the live worker can run the configured engine."""
    if settings.engine not in LIVE_ENGINES:
        raise ConfigError(
            f"KVQ_ENGINE={settings.engine!r}: the live KV worker runs the sequential engine "
            "only; the batched engine runs in `kvqueue simulate` and `kvqueue evaluate`"
        )


def _completed(
    base: dict[str, Any], execution: Execution, queue_wait_ms: float, used_blocks: int
) -> RequestResult:
    return RequestResult(
        status=RequestStatus.COMPLETED,
        finish_ms=base["start_ms"] + execution.service_ms,
        cache_used_blocks=used_blocks,
        **execution.result_fields(queue_wait_ms),
        **base,
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _scaled_ms(wall_seconds: float, scale: float) -> float:
    """Wall seconds to simulated milliseconds; at scale 0 (no emulation) time does not pass."""
    return wall_seconds * 1000.0 / scale if scale > 0 else 0.0


def _sleep_simulated(simulated_ms: float, scale: float) -> None:
    if scale > 0 and simulated_ms > 0:
        time.sleep(simulated_ms * scale / 1000.0)


# -- the RQ side ---------------------------------------------------------------------------
_RUNTIME: GpuRuntime | None = None


def serve_request(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job function: serve one request on this process's simulated GPU."""
    context = JobContext.from_wire(payload)
    runtime = _RUNTIME
    if runtime is None or runtime.pid != os.getpid():
        job = get_current_job()
        queue = job.origin if job is not None else "worker-0"
        reason = FORKED_WORKER_MESSAGE.format(queue=queue)
        if job is not None:
            _publish_orphan_failure(job.connection, context, queue, reason)
        raise RuntimeError(reason)
    try:
        return runtime.serve(context).to_dict()
    except Exception as exc:
        runtime.fail(context, f"{type(exc).__name__}: {exc}")
        raise


def _publish_orphan_failure(
    client: redis.Redis, context: JobContext, queue: str, reason: str
) -> None:
    settings = Settings.from_env()
    result = RequestResult(
        request_id=context.request.request_id,
        run_id=context.run_id,
        worker=queue,
        strategy=context.strategy,
        status=RequestStatus.FAILED,
        reason=reason,
    )
    pipe = client.pipeline(transaction=True)
    append_result(pipe, result, settings.key_prefix)
    RedisRouterState(client, settings.key_prefix).complete(
        queue, context.load_tokens, context.estimated_ms, pipeline=pipe
    )
    pipe.execute()


class KVWorker(SimpleWorker):
    """An RQ SimpleWorker that is one simulated GPU, named after its single queue.

    Jobs are JSON-serialized (never pickle: a Redis writer must not run code here).
    """

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["serializer"] = JSONSerializer
        super().__init__(queues, *args, **kwargs)
        names = [q.name for q in self.queues]
        if len(names) != 1:
            raise ValueError(
                f"a KV worker serves exactly one queue (its GPU), got {names}; "
                "start one `rq worker -w workers.KVWorker worker-<i>` per simulated GPU"
            )
        self.gpu_name = names[0]
        self.settings = Settings.from_env()
        check_live_engine(self.settings)  # before RQ registers anything
        self.runtime: GpuRuntime | None = None

    def register_birth(self) -> None:
        super().register_birth()
        global _RUNTIME
        self.runtime = GpuRuntime(self.gpu_name, self.connection, self.settings)
        self.runtime.start()
        _RUNTIME = self.runtime

    def register_death(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()
        super().register_death()

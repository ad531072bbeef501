"""Router state backends: in Redis (the live pipeline) and in process memory (the simulator).

Both hold the same things — the prefix index, live workers, outstanding load per worker and
the statistics a router learns from completed requests — and build the same `RouterView`.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from kvqueue import keys
from kvqueue.gpu.events import CacheEvent
from kvqueue.gpu.hashing import BLOCK_SIZE, BlockHash
from kvqueue.gpu.load_signals import LoadSignals
from kvqueue.gpu.request import Request
from kvqueue.routing import worker_scripts
from kvqueue.routing.active import ActiveMatches, ActiveSequences
from kvqueue.routing.approximate import (
    DEFAULT_APPROXIMATE,
    ApproximateRules,
    RoutedIndex,
    check_index_mode,
)
from kvqueue.routing.index import InMemoryIndex, apply_events
from kvqueue.routing.membership import JobRecord, ledger_keys
from kvqueue.routing.recency import AllocationClock
from kvqueue.routing.redis_index import RedisIndex
from kvqueue.routing.router import Decision
from kvqueue.routing.view import RouterView, WorkerLoad, worker_order


class RedisRouterState:
    """Router state in Redis: the prefix tree, live workers, loads and the shared ticket.

    The engines' load signals (`WorkerLoad.num_running`, ...) are what each worker last
    published (`publish_signals`: a batched worker does, throttled, with its steps' events);
    a worker that publishes none (the sequential one) reads as the defaults, 0.

    `kvq:load:since` holds, per worker, the wall-clock ms at which the router saw its current
    request start: a commit to an idle worker, or the last completion (the next queued
    request starts then). `time_scale` (wall seconds per simulated second, as the workers
    emulate it) turns the time since then into simulated ms for `WorkerLoad.elapsed_ms`.

    A commit with a `job_id` leaves a load record (`kvqueue.routing.membership`) that
    `release` takes away exactly once, whoever ends the job; the load counters never go below 0.

    `index_mode` is the index the view matches against: ``"precise"`` (the tree the workers'
    cache events keep, plus pending marks) or ``"approximate"`` (`kvq:worker:<w>:routed`: what
    was routed, forgotten under `approximate`'s rules, in the same round trip). Views carry
    the server's clock in simulated ms (`RouterView.now_ms`, wall ms / `time_scale`).
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = keys.DEFAULT_PREFIX,
        heartbeat_ttl_s: float = 15.0,
        pending_ttl_s: float = 30.0,
        time_scale: float = 1.0,
        index_mode: str = "precise",
        approximate: ApproximateRules = DEFAULT_APPROXIMATE,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.index = RedisIndex(client, prefix)
        self.index_mode = check_index_mode(index_mode)
        self.approximate = approximate
        self.heartbeat_ttl_ms = heartbeat_ttl_s * 1000.0
        self.pending_ttl_ms = pending_ttl_s * 1000.0
        self.time_scale = time_scale
        self._record_job = client.register_script(worker_scripts.RECORD_JOB)
        self._release_job = client.register_script(worker_scripts.RELEASE_JOB)

    @property
    def _rules(self) -> ApproximateRules | None:
        return self.approximate if self.index_mode == "approximate" else None

    def view(self, request: Request, take_ticket: bool) -> RouterView:
        p = self.prefix
        read = self.index.route_view(
            request.block_hashes,
            self.heartbeat_ttl_ms,
            [
                keys.load(p),
                keys.load_tokens(p),
                keys.load_work(p),
                keys.usage(p),
                keys.capacity(p),
                keys.output_stats(p),
                keys.load_since(p),
                keys.engine_signals(p),
            ],
            take_ticket,
            self._rules,
        )
        requests, tokens, work, used, capacity, stats, since, signals = read.states
        matches, sizes = read.matches, read.sizes
        now = _wall_ms()
        workers = tuple(sorted(matches, key=worker_order))
        loads = {}
        for w in workers:
            engine = LoadSignals.from_json(signals[w]) if w in signals else LoadSignals()
            loads[w] = WorkerLoad(
                requests=max(0, int(requests.get(w, 0))),
                tokens=max(0, int(tokens.get(w, 0))),
                work_ms=max(0.0, float(work.get(w, 0.0))),
                used_blocks=int(used.get(w, 0)),
                capacity_blocks=int(capacity.get(w, 0)),
                elapsed_ms=self._elapsed_ms(now, since.get(w), int(requests.get(w, 0))),
                num_running=engine.num_running,
                num_waiting=engine.num_waiting,
                engine_kv_usage=engine.kv_usage,
                num_queued_prefill_tokens=engine.num_queued_prefill_tokens,
                indexed_blocks=sizes.get(w, 0),
                engine_reported=w in signals,
            )
        scale = self.time_scale if self.time_scale > 0 else 1.0
        return RouterView(
            workers,
            matches,
            loads,
            read.ticket,
            _mean_output(stats),
            _declared_share(stats),
            index_mode=self.index_mode,
            now_ms=read.now_ms / scale,
        )

    def publish_signals(self, worker: str, signals: LoadSignals, pipeline: Any = None) -> None:
        """A worker's engine load signals, as the next view reads them (`kvq:signals`)."""
        target = pipeline if pipeline is not None else self.client
        target.hset(keys.engine_signals(self.prefix), worker, signals.to_json())

    def _elapsed_ms(self, now: float, since: str | None, requests: int) -> float:
        if requests <= 0 or since is None or self.time_scale <= 0:
            return 0.0
        return max(0.0, (now - float(since)) / self.time_scale)

    def commit(
        self,
        request: Request,
        decision: Decision,
        pipeline: Any = None,
        job_id: str | None = None,
        run_id: str = "",
    ) -> None:
        """Mark the chain pending on the chosen worker and add the request to its load; with a
        `job_id`, also leave the job's load record (which `release` takes away)."""
        pipe = pipeline if pipeline is not None else self.client.pipeline(transaction=False)
        worker, p = decision.worker, self.prefix
        rules = self._rules
        if rules is not None:  # the approximate index: what was routed, nothing else
            self.index.record_routed(worker, request.block_hashes, rules, pipeline=pipe)
        else:
            # The whole chain, hits included: if the worker evicts a hit before this request
            # runs, the request stores it again, and the worker's holdings stay prefix-closed.
            self.index.mark_pending(
                worker, request.block_hashes, self.pending_ttl_ms, pipeline=pipe
            )
        if job_id is not None:
            record = JobRecord(
                run_id,
                request.request_id,
                decision.strategy,
                decision.load_tokens,
                decision.estimated_ms,
            )
            self._record_job(
                keys=[keys.worker_generation(worker, p), keys.worker_jobs(worker, p)],
                args=[job_id, record.to_json()],
                client=pipe,
            )
        pipe.hincrby(keys.load(p), worker, 1)
        pipe.hincrby(keys.load_tokens(p), worker, decision.load_tokens)
        pipe.hincrbyfloat(keys.load_work(p), worker, decision.estimated_ms)
        if decision.worker_idle:
            pipe.hset(keys.load_since(p), worker, _wall_ms())
        pipe.hincrby(keys.output_stats(p), "routed", 1)
        if request.max_tokens is not None:
            pipe.hincrby(keys.output_stats(p), "declared", 1)
        if pipeline is None:
            pipe.execute()

    def release(
        self,
        worker: str,
        job_id: str,
        used_blocks: int | None = None,
        output_tokens: int | None = None,
        pipeline: Any = None,
    ) -> bool | None:
        """Take a job's load away (once: see `RELEASE_JOB`) and record what the worker reports.

        Returns whether load was taken away now; None when queued on a pipeline.
        """
        return self._release(worker, job_id, 0, 0.0, used_blocks, output_tokens, pipeline)

    def complete(
        self,
        worker: str,
        tokens: int,
        estimated_ms: float = 0.0,
        used_blocks: int | None = None,
        output_tokens: int | None = None,
        pipeline: Any = None,
        request_id: str | None = None,
    ) -> None:
        """Release load committed without a job id (never below 0)."""
        self._release(worker, "", tokens, estimated_ms, used_blocks, output_tokens, pipeline)

    def first_token(self, worker: str, request_id: str, at_ms: float | None = None) -> None:
        """Not recorded in Redis yet: live views carry no active prefill tokens."""

    def _release(
        self,
        worker: str,
        job_id: str,
        tokens: int,
        work_ms: float,
        used_blocks: int | None,
        output_tokens: int | None,
        pipeline: Any,
    ) -> bool | None:
        p = self.prefix
        reply = self._release_job(
            keys=[*ledger_keys(worker, p), keys.load_since(p), keys.usage(p), keys.output_stats(p)],
            args=[
                worker,
                job_id,
                tokens,
                work_ms,
                "" if used_blocks is None else used_blocks,
                "" if output_tokens is None else output_tokens,
                _wall_ms(),
            ],
            client=pipeline or self.client,
        )
        return None if pipeline is not None else bool(reply)


def _wall_ms() -> float:
    return time.time() * 1000.0


def _declared_share(stats: dict[str, str]) -> float | None:
    routed = int(stats.get("routed", 0))
    return int(stats.get("declared", 0)) / routed if routed > 0 else None


def _mean_output(stats: dict[str, str]) -> float | None:
    completed = int(stats.get("completed", 0))
    return int(stats.get("output_tokens", 0)) / completed if completed > 0 else None


class InMemoryRouterState:
    """Router state in process memory, for the simulator. `clock` returns milliseconds;
    `signals(worker)`, when given, reads that worker's engine load signals for the view.

    `index_mode` picks the index the view's matches come from: ``"precise"`` (the workers'
    cache events, fed through `apply_events`, plus pending marks) or ``"approximate"`` (a
    `RoutedIndex` of what was routed, under `approximate`'s rules; cache events then reach
    no index). Either way the router keeps its records of the requests in flight
    (`ActiveSequences`), fed by `commit`, `first_token` and `complete`.
    """

    def __init__(
        self,
        workers: Sequence[str],
        clock: Callable[[], float] | None = None,
        pending_ttl_ms: float = 30_000.0,
        signals: Callable[[str], LoadSignals] | None = None,
        index_mode: str = "precise",
        approximate: ApproximateRules = DEFAULT_APPROXIMATE,
    ) -> None:
        self.workers = tuple(sorted(workers, key=worker_order))
        self.clock = clock or (lambda: time.monotonic() * 1000.0)
        self.engine_reported = signals is not None
        self.signals = signals or (lambda worker: LoadSignals())
        self.index_mode = check_index_mode(index_mode)
        self.index = InMemoryIndex(self.clock)
        self.routed = RoutedIndex(approximate, self.clock) if index_mode == "approximate" else None
        self.active = ActiveSequences()
        self.recency = AllocationClock()
        self.pending_ttl_ms = pending_ttl_ms
        self.requests = dict.fromkeys(self.workers, 0)
        self.tokens = dict.fromkeys(self.workers, 0)
        self.work_ms = dict.fromkeys(self.workers, 0.0)
        self.used_blocks = dict.fromkeys(self.workers, 0)
        self.capacity_blocks = dict.fromkeys(self.workers, 0)
        self.busy_since = dict.fromkeys(self.workers, 0.0)  # see RedisRouterState
        self._first_tokens: list[tuple[float, int, str, str]] = []  # (time, seq, id, worker)
        self.last_token_ms: dict[str, float | None] = dict.fromkeys(self.workers)
        self._first_token_seq = 0
        self._output_tokens = 0
        self._completed = 0
        self._routed = 0
        self._declared = 0
        self._ticket = 0

    def _match(self, request: Request) -> dict[str, int]:
        if self.routed is not None:
            return self.routed.match(request.block_hashes)
        return self.index.match(request.block_hashes)

    def _indexed_blocks(self, worker: str) -> int:
        if self.routed is not None:
            return self.routed.size(worker)
        return self.index.size(worker)

    def _apply_first_tokens(self, now: float) -> None:
        due = self._first_tokens
        while due and due[0][0] <= now:
            at, _, request_id, worker = heapq.heappop(due)
            self.active.prefill_done(request_id)
            self._saw_token(worker, at)

    def view(self, request: Request, take_ticket: bool) -> RouterView:
        if take_ticket:
            self._ticket += 1
        now = self.clock()
        self._apply_first_tokens(now)
        matches = self._match(request)
        active = self.active
        hashes = request.block_hashes
        loads = {}
        for w in self.workers:
            engine = self.signals(w)
            loads[w] = WorkerLoad(
                self.requests[w],
                self.tokens[w],
                max(0.0, self.work_ms[w]),
                self.used_blocks[w],
                self.capacity_blocks[w],
                max(0.0, now - self.busy_since[w]) if self.requests[w] > 0 else 0.0,
                engine.num_running,
                engine.num_waiting,
                engine.kv_usage,
                engine.num_queued_prefill_tokens,
                active.prefill_tokens(w),
                active.num_blocks(w),
                self._indexed_blocks(w),
                active.prefilling(w),
                self.engine_reported,
                _since(now, self.last_token_ms[w]),
            )
        mean_output = self._output_tokens / self._completed if self._completed else None
        return RouterView(
            self.workers,
            {w: matches.get(w, 0) for w in self.workers},
            loads,
            self._ticket,
            mean_output,
            self._declared / self._routed if self._routed else None,
            self.index_mode,
            ActiveMatches(active, self.workers, hashes),
            now,
            self.recency.since,
            self._release_ages,
        )

    def _release_ages(
        self, worker: str, block_hashes: Sequence[BlockHash]
    ) -> Callable[[int], int | None]:
        return self.recency.along(worker, block_hashes).at

    def commit(self, request: Request, decision: Decision, pipeline: Any = None) -> None:
        if self.routed is not None:
            self.routed.record(decision.worker, request.block_hashes)
        else:
            self.index.mark_pending(decision.worker, request.block_hashes, self.pending_ttl_ms)
        self.active.add(
            request.request_id, decision.worker, request.block_hashes, decision.prefill_tokens
        )
        self.recency.allocate(decision.worker, allocated_blocks(request, decision))
        if self.requests[decision.worker] == 0:  # Redis relies on decision.worker_idle
            self.busy_since[decision.worker] = self.clock()
        self.requests[decision.worker] += 1
        self._routed += 1
        self._declared += request.max_tokens is not None
        self.tokens[decision.worker] += decision.load_tokens
        self.work_ms[decision.worker] += decision.estimated_ms

    def first_token(self, worker: str, request_id: str, at_ms: float | None = None) -> None:
        at = self.clock() if at_ms is None else at_ms
        self._first_token_seq += 1
        heapq.heappush(self._first_tokens, (at, self._first_token_seq, request_id, worker))
        self._apply_first_tokens(self.clock())

    def complete(
        self,
        worker: str,
        tokens: int,
        estimated_ms: float = 0.0,
        used_blocks: int | None = None,
        output_tokens: int | None = None,
        pipeline: Any = None,
        request_id: str | None = None,
    ) -> None:
        self.requests[worker] -= 1
        self.tokens[worker] -= tokens
        self.work_ms[worker] -= estimated_ms
        self.busy_since[worker] = self.clock()
        if request_id is not None:
            self.recency.release(worker, self.active.blocks_of(request_id))
            self.active.free(request_id)
        if output_tokens:
            self._saw_token(worker, self.clock())
        if used_blocks is not None:
            self.used_blocks[worker] = used_blocks
        if output_tokens is not None:
            self._output_tokens += output_tokens
            self._completed += 1

    def _saw_token(self, worker: str, at_ms: float) -> None:
        last = self.last_token_ms.get(worker)
        if last is None or at_ms > last:
            self.last_token_ms[worker] = at_ms

    def register_capacity(self, worker: str, capacity_blocks: int, pipeline: Any = None) -> None:
        self.capacity_blocks[worker] = capacity_blocks
        self.used_blocks[worker] = 0
        self.busy_since[worker] = 0.0
        if self.routed is not None:
            self.routed.set_capacity(worker, capacity_blocks)

    def apply_events(self, worker: str, events: Sequence[CacheEvent]) -> None:
        if self.routed is None:  # an approximate index never hears from a GPU
            apply_events(self.index, worker, events)


def _since(now: float, then: float | None) -> float | None:
    return None if then is None else max(0.0, now - then)


def allocated_blocks(request: Request, decision: Decision) -> int:
    """Blocks a routed request allocates on its worker, as the router predicts: its uncached
    prompt's, then one per 16 tokens of its declared output."""
    prompt_blocks = -(-decision.prefill_tokens // BLOCK_SIZE)
    return prompt_blocks + (request.max_tokens or 0) // BLOCK_SIZE

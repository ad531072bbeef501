"""The `predictive` policy: route to the lowest expected time to first token, counting the
delay a miss imposes on the requests behind it."""

from __future__ import annotations

import math
from typing import ClassVar

from kvqueue.gpu.hashing import BLOCK_SIZE
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.request import Request
from kvqueue.gpu.step_cost import StepShape, chunk_attention
from kvqueue.routing.engine_model import EngineModel
from kvqueue.routing.index import leading_run
from kvqueue.routing.policies.base import register_policy, uncached_tokens
from kvqueue.routing.view import RouterView, worker_order


@register_policy("predictive")
class PredictiveTtft:
    """Lowest expected TTFT plus the wait a miss adds for the requests behind it, priced with
    the model of the engine the router routes to (`EngineModel`): one form per engine.

    **Sequential engine** (one request at a time, FIFO). A request routed to w starts once w
    has drained what is outstanding there, then prefills what w's cache lacks::

        TTFT(w)    = backlog(w) + P(w),   P(w) = latency.prefill_ms(num_blocks − matched(w))
        backlog(w) = work_ms(w) − d × min(elapsed_ms(w), work_ms(w) / requests(w))  (0 if idle)
        cost(w)    = backlog(w) + (1 + L) × P(w),   L = mean outstanding requests per worker

    - `work_ms` is the router's own running sum of the estimates it committed
      (`kvqueue.routing.router.estimate_service_ms`): prefill of the blocks the worker lacked
      at routing plus decode of the *expected* output — the request's declared `max_tokens`,
      else the mean output of completed requests. No actual output length is read.
    - The request in service is partly done. `elapsed_ms` is the time since the router saw it
      start. Declared lengths: that much less is left; guessed ones (output lengths being
      close to memoryless): about as much again. The router takes off elapsed × d, d = the
      share of routed requests that declared `max_tokens`, and never more than one mean
      outstanding request.
    - A miss's extra prefill also delays everything that queues behind the request before it
      finishes: L requests on average by Little's law. So P(w) weighs 1 + L.

    **Batched engine** (continuous batching, `kvqueue.gpu.scheduler`). Every step runs the
    running requests' decodes first, then prefill chunks FIFO in what is left of the token
    budget; a waiting request is admitted only when its blocks are allocatable. A request
    routed to w gets its first token once w has computed the prefill queued ahead of it and
    its own uncached prompt, in steps it shares with w's decodes — sooner if those steps are
    cheap, later if w's KV cache must first free blocks::

        T(w)     = Q(w) + U(w)   prefill tokens to compute: queued ahead + its own uncached
        steps    = T / (budget − B)  chunks of the budget left by B = running requests' decodes
        TTFT(w)  = Σ step_ms(chunk, B decodes over context K)           (the engine's profile)
                   + own attention over its cached prefix
                   + KV wait: deficit / release rate
        cost(w)  = TTFT(w) + L × P(w),   P(w) = its uncached prefill alone (`prefill_ms`)

    - Q(w): the uncached prompt tokens of the requests the router sent to w that have no first
      token yet (`WorkerLoad.active_prefill_tokens`, hits subtracted as predicted at routing),
      capped by the engine's own `num_queued_prefill_tokens` when the worker reports it (that
      one does not subtract waiting requests' hits, but knows the chunks already computed);
      B = the engine's `num_running` (else the router's in-flight count); K = B × the mean
      prompt + declared output tokens of w's outstanding requests.
    - KV wait: admission needs the request's blocks not already pinned by w's in-flight
      requests (`active_matched`) plus the queued prefill's, in free blocks, ``(1 − usage) ×
      capacity`` (`engine_kv_usage`: evictable blocks count as free). A deficit waits for
      running requests to release blocks: pinned blocks turn over once per decode run (the
      expected output × a decode step), half of it on average left.
    - L = the mean number of requests awaiting their first token per worker, from the router's
      records (`active_prefilling`); Little's law again: the requests that arrive while this
      one waits and prefills, and wait behind it.

    Ties (e.g. idle workers none of which holds the prefix) go to the least loaded (fewest
    outstanding requests, then tokens), then worker order. No parameter is fitted to a
    workload: the constants are the engine model's (the workers' own latency profile) and
    L, d and the means are read off the router state. `externality=False` drops the L term.
    `latency` and `engine` default to the router's (`Router` fills them in).
    """

    needs_ticket: ClassVar[bool] = False

    def __init__(
        self,
        latency: LatencyModel | None = None,
        externality: bool = True,
        engine: EngineModel | None = None,
    ) -> None:
        self.latency = latency
        self.externality = externality
        self.engine = engine

    @property
    def _latency(self) -> LatencyModel:
        return self.latency or LatencyModel()

    @property
    def _batched(self) -> bool:
        return self.engine is not None and self.engine.batched

    # -- sequential ---------------------------------------------------------------------------
    def backlog_ms(self, view: RouterView, worker: str) -> float:
        """Expected wait before a request routed to `worker` now would start, in ms."""
        load = view.load(worker)
        if load.requests <= 0 or load.work_ms <= 0:
            return 0.0
        declared = 1.0 if view.declared_share is None else view.declared_share
        served = declared * min(load.elapsed_ms, load.work_ms / load.requests)
        return max(0.0, load.work_ms - served)

    def prefill_ms(self, request: Request, view: RouterView, worker: str) -> float:
        """The request's uncached prefill on `worker`, alone."""
        if self._batched:
            assert self.engine is not None
            matched = view.matched(worker)
            cached = request.num_prompt_tokens - uncached_tokens(request, matched)
            return self.engine.prefill_ms(request.num_prompt_tokens, cached)
        return self._latency.prefill_ms(max(0, request.num_blocks - view.matched(worker)))

    def mean_outstanding(self, view: RouterView) -> float:
        """L: requests outstanding (sequential) or awaiting a first token (batched), per worker."""
        if not view.workers:
            return 0.0
        if self._batched:
            total = sum(view.load(w).active_prefilling for w in view.workers)
        else:
            total = sum(view.load(w).requests for w in view.workers)
        return total / len(view.workers)

    def prefill_weight(self, view: RouterView) -> float:
        """1 for this request, plus L for the requests expected to queue behind it."""
        return 1.0 + (self.mean_outstanding(view) if self.externality else 0.0)

    # -- batched ------------------------------------------------------------------------------
    def queued_prefill_tokens(self, view: RouterView, worker: str) -> tuple[int, int]:
        """(tokens in the step now running, tokens queued behind it) of prefill on `worker`.

        The router counts a request's uncached prompt until its first token
        (`active_prefill_tokens`, hits subtracted as predicted); the engine stops counting a
        chunk when it schedules it (`num_queued_prefill_tokens`, waiting requests' hits not
        subtracted). Where the router's count is higher, the difference is in the step now
        running; where it is lower, the engine counts hits as work and the router is right.
        Without engine signals, all of the router's count is queued.
        """
        load = view.load(worker)
        routed = load.active_prefill_tokens
        if not load.engine_reported:
            return 0, routed
        queued = load.num_queued_prefill_tokens
        if routed > queued:
            return routed - queued, queued
        return 0, routed

    def matched_at_admission(self, request: Request, view: RouterView, worker: str) -> int:
        """The part of the match expected to still be cached when the request is admitted.

        Blocks pinned by the worker's in-flight requests stay. An unpinned block survives the
        worker's LRU eviction while fewer blocks have been allocated since it was released —
        plus those the prefill queued ahead will allocate — than the worker has unpinned:
        ``since_use + ahead < (1 − usage) × capacity``. Stamps never increase with depth,
        so the surviving part is a leading run, found by binary search.
        """
        matched = view.matched(worker)
        load = view.load(worker)
        safe = min(matched, view.active_matched(worker))
        if matched <= safe or not load.engine_reported or load.capacity_blocks <= 0:
            return matched
        room = (1.0 - load.engine_kv_usage) * load.capacity_blocks
        ahead = self.queued_prefill_tokens(view, worker)[1] / BLOCK_SIZE

        since_use = view.since_use_along(worker, request.block_hashes)

        def survives(position: int) -> bool:
            since = since_use(position)
            return since is None or since + ahead < room

        return leading_run(range(matched), survives, known=safe)

    def _batch(self, view: RouterView, worker: str) -> tuple[int, int]:
        """(decoding requests B, their summed context K) on `worker`."""
        load = view.load(worker)
        batch = load.num_running if load.engine_reported else load.requests
        context = batch * (load.tokens / load.requests) if load.requests else 0.0
        return batch, int(context)

    def step_left_ms(self, view: RouterView, worker: str) -> float:
        """Expected time left of the step `worker` is running now.

        With prefill in it, half of it (arriving at a uniformly random point). Decodes only:
        steps of one length d follow one another since the worker's last token the router saw
        (a step boundary), so d − (time since then mod d) is left; with no token seen yet, d/2.
        """
        assert self.engine is not None
        batch, context = self._batch(view, worker)
        running, _ = self.queued_prefill_tokens(view, worker)
        step = self.engine.step_cost.step_ms(StepShape(running, running * running, batch, context))
        since = view.load(worker).since_token_ms
        if running or since is None or step <= 0:
            return step / 2
        return step - since % step

    def queue_ms(self, request: Request, view: RouterView, worker: str) -> float:
        """Half the step now running, then the steps that compute the queued prefill and this
        request's own uncached prompt, shared with the worker's decodes; its own attention
        over its cached prefix is `own_attention_ms`."""
        assert self.engine is not None
        engine = self.engine
        batch, context = self._batch(view, worker)
        running, queued = self.queued_prefill_tokens(view, worker)
        cost = engine.step_cost
        total = 0.0
        if running or batch:
            total += self.step_left_ms(view, worker)
        room = max(1, engine.scheduler.max_num_batched_tokens - batch)
        todo = queued + max(
            1, uncached_tokens(request, self.matched_at_admission(request, view, worker))
        )
        full, rest = divmod(todo, room)
        if full:
            total += full * cost.step_ms(StepShape(room, room * room, batch, context))
        if rest:
            total += cost.step_ms(StepShape(rest, rest * rest, batch, context))
        return total

    def own_attention_ms(self, request: Request, view: RouterView, worker: str) -> float:
        """Its chunks' attention over its cached prefix, beyond what `queue_ms` priced."""
        assert self.engine is not None
        new = max(1, uncached_tokens(request, self.matched_at_admission(request, view, worker)))
        cached = request.num_prompt_tokens - new
        with_prefix = self.engine.step_cost.step_ms(StepShape(new, chunk_attention(new, cached)))
        without = self.engine.step_cost.step_ms(StepShape(new, chunk_attention(new, 0)))
        return max(0.0, with_prefix - without)

    def kv_wait_ms(self, request: Request, view: RouterView, worker: str) -> float:
        """Expected wait for the blocks admission needs (0 when the worker does not report)."""
        assert self.engine is not None
        load = view.load(worker)
        if not load.engine_reported or load.capacity_blocks <= 0:
            return 0.0
        capacity = load.capacity_blocks
        pinned = load.engine_kv_usage * capacity
        own = math.ceil(request.num_prompt_tokens / BLOCK_SIZE) - view.active_matched(worker)
        ahead = math.ceil(self.queued_prefill_tokens(view, worker)[1] / BLOCK_SIZE)
        deficit = own + ahead - (capacity - pinned)
        if deficit <= 0 or pinned <= 0:
            return 0.0
        output = view.mean_output_tokens
        if output is None:
            output = float(request.max_tokens or 0)
        batch, context = self._batch(view, worker)
        step = self.engine.step_cost.step_ms(StepShape(0, 0, max(1, batch), context))
        # The running requests end spread over one decode run (output × step), each
        # releasing its share of the pinned blocks: blocks come free at pinned / run per ms.
        return deficit * output * step / pinned

    def shared_step_ms(self, request: Request, view: RouterView, worker: str) -> float:
        """What its first chunk adds to the step it shares with the prefill queued ahead: the
        last request of that queue gets its first token out of that step, that much later."""
        assert self.engine is not None
        _, queued = self.queued_prefill_tokens(view, worker)
        if queued <= 0:
            return 0.0
        batch, context = self._batch(view, worker)
        room = max(1, self.engine.scheduler.max_num_batched_tokens - batch)
        tail = queued % room or room  # the queue's tokens in its last step
        matched = self.matched_at_admission(request, view, worker)
        ours = min(max(1, uncached_tokens(request, matched)), room - tail)
        if ours <= 0:
            return 0.0
        cost = self.engine.step_cost
        together = cost.step_ms(StepShape(tail + ours, tail * tail + ours * ours, batch, context))
        return together - cost.step_ms(StepShape(tail, tail * tail, batch, context))

    def batched_ttft_ms(self, request: Request, view: RouterView, worker: str) -> float:
        return (
            self.queue_ms(request, view, worker)
            + self.own_attention_ms(request, view, worker)
            + self.kv_wait_ms(request, view, worker)
        )

    # -- both ---------------------------------------------------------------------------------
    def expected_ttft_ms(self, request: Request, view: RouterView, worker: str) -> float:
        if self._batched:
            return self.batched_ttft_ms(request, view, worker)
        return self.backlog_ms(view, worker) + self.prefill_ms(request, view, worker)

    def cost_ms(self, request: Request, view: RouterView, worker: str) -> float:
        weight = self.prefill_weight(view)
        if self._batched:
            extra = (weight - 1.0) * self.prefill_ms(request, view, worker)
            if self.externality:
                extra += self.shared_step_ms(request, view, worker)
            return self.batched_ttft_ms(request, view, worker) + extra
        return self.backlog_ms(view, worker) + weight * self.prefill_ms(request, view, worker)

    def choose(self, request: Request, view: RouterView) -> str:
        def key(worker: str) -> tuple:
            load = view.load(worker)
            return (
                self.cost_ms(request, view, worker),
                load.requests,
                load.tokens,
                worker_order(worker),
            )

        return min(view.workers, key=key)

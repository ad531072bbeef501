"""The `predictive` policy: route to the lowest expected time to first token."""

from __future__ import annotations

from typing import ClassVar

from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.request import Request
from kvqueue.routing.policies.base import register_policy
from kvqueue.routing.view import RouterView, worker_order


@register_policy("predictive")
class PredictiveTtft:
    """Lowest expected TTFT, counting the wait a miss adds for the requests queued behind it.

    A worker serves its FIFO queue one request at a time, so a request routed to worker w
    starts once w has drained what is outstanding there, then prefills what w's cache lacks:

        TTFT(w)    = backlog(w) + P(w),   P(w) = latency.prefill_ms(num_blocks − matched(w))
        backlog(w) = work_ms(w) − d × min(elapsed_ms(w), work_ms(w) / requests(w))  (0 if idle)
        cost(w)    = backlog(w) + (1 + L) × P(w),   L = mean outstanding requests per worker

    The lowest cost wins; ties (e.g. idle workers none of which holds the prefix) go to the
    least loaded (fewest outstanding requests, then tokens), then worker order.

    Why each term, and why each input is one a real router has:

    - `work_ms` is the router's own running sum of the estimates it committed
      (`kvqueue.routing.router.estimate_service_ms`): prefill of the blocks the worker lacked at
      routing plus decode of the *expected* output — the request's declared `max_tokens`,
      else the mean output of completed requests. No actual output length is read.
    - The request in service is partly done. `elapsed_ms` is the time since the router saw
      it start (its commit to an idle worker, or the worker's previous completion). If its
      length was declared, that much less is left to run; if not, its length is a guess and,
      output lengths being close to memoryless, a request that has run a while is expected
      to run about as long again, so nothing comes off. The router does not know which kind
      is in service, so it takes off elapsed × d, d = the share of routed requests that
      declared `max_tokens` (`RouterView.declared_share`) — and never more than one mean
      outstanding request: one running past its estimate is taken to be nearly done rather
      than eating into the work queued behind it.
    - A miss's extra prefill also delays everything that queues behind the request on that
      worker before it finishes: the requests arriving during its wait and service, L of
      them on average by Little's law (L = λ × time in system). So P(w) weighs 1 + L: at
      light load L ≈ 0 and the rule is plain TTFT minimisation; as queues build, a hit's
      saved prefill weighs more, which keeps throughput up near saturation. L describes a
      steady state; in sustained overload every later request is delayed and L undercounts.
    - `matched(w)` comes from the prefix index (the workers' cache events plus pending marks
      of requests already routed there), never from the GPU's cache. It is taken at face
      value, not discounted for eviction before the request runs. Below saturation the
      matches survive to service (the evaluation measures at most a few percent of matched
      blocks lost, for any policy); in overload they do not (about 40%, for every policy),
      but a discount would then push requests away from the workers whose queues keep their
      prefix fresh (LRU refreshes a block whenever a request ahead uses it), lowering the
      hit rate further. Reported cache usage is no guide: with lazy eviction every warm
      cache reads full.
    - Service is sequential and FIFO, as in the simulated worker; a batching engine would
      need a backlog model of its own.

    No parameter is fitted to a workload: the constants are the latency model's (shared with
    the workers) and L and d, read off the router state. `externality=False` drops the L
    term (plain expected TTFT). `latency` defaults to the router's model (`Router` fills it).
    """

    needs_ticket: ClassVar[bool] = False

    def __init__(self, latency: LatencyModel | None = None, externality: bool = True) -> None:
        self.latency = latency
        self.externality = externality

    @property
    def _latency(self) -> LatencyModel:
        return self.latency or LatencyModel()

    def backlog_ms(self, view: RouterView, worker: str) -> float:
        """Expected wait before a request routed to `worker` now would start, in ms."""
        load = view.load(worker)
        if load.requests <= 0 or load.work_ms <= 0:
            return 0.0
        declared = 1.0 if view.declared_share is None else view.declared_share
        served = declared * min(load.elapsed_ms, load.work_ms / load.requests)
        return max(0.0, load.work_ms - served)

    def prefill_ms(self, request: Request, view: RouterView, worker: str) -> float:
        return self._latency.prefill_ms(max(0, request.num_blocks - view.matched(worker)))

    def expected_ttft_ms(self, request: Request, view: RouterView, worker: str) -> float:
        return self.backlog_ms(view, worker) + self.prefill_ms(request, view, worker)

    def mean_outstanding(self, view: RouterView) -> float:
        """L: requests outstanding (waiting or in service) per worker."""
        if not view.workers:
            return 0.0
        return sum(view.load(w).requests for w in view.workers) / len(view.workers)

    def prefill_weight(self, view: RouterView) -> float:
        """1 for this request, plus L for the requests expected to queue behind it."""
        return 1.0 + (self.mean_outstanding(view) if self.externality else 0.0)

    def cost_ms(self, request: Request, view: RouterView, worker: str) -> float:
        weight = self.prefill_weight(view)
        return self.backlog_ms(view, worker) + weight * self.prefill_ms(request, view, worker)

    def choose(self, request: Request, view: RouterView) -> str:
        weight = self.prefill_weight(view)

        def key(worker: str) -> tuple:
            load = view.load(worker)
            cost = self.backlog_ms(view, worker) + weight * self.prefill_ms(request, view, worker)
            return (cost, load.requests, load.tokens, worker_order(worker))

        return min(view.workers, key=key)

"""Preble's E2 scheduler: exploit long matches, else explore by cost."""

from __future__ import annotations

from typing import ClassVar

from kvqueue.gpu.hashing import BLOCK_SIZE
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.request import Request
from kvqueue.routing.policies.base import best_match, expected_output_blocks, register_policy
from kvqueue.routing.view import RouterView, worker_order


@register_policy("preble")
class PrebleE2:
    """Preble's E2 scheduler (Srivatsa et al., "Preble: Efficient Distributed Prompt Scheduling
    for LLM Serving", ICLR 2025): exploit the holders of a long match, else explore by
    load + eviction + prefill cost, in ms.

    Exploit when the longest match covers more tokens than it leaves (``matched tokens >
    unmatched tokens``): among the workers holding that longest prefix, the lowest load.
    Otherwise explore: the worker minimizing ``load + eviction cost + prefill cost``, all in
    milliseconds of the latency model:

    - load = the router's estimate of the worker's outstanding work (`WorkerLoad.work_ms`).
      Preble sums the prefill and decode time of requests of a recent window; outstanding
      work is the same quantity for the requests that still matter;
    - prefill = ``latency.prefill_ms(blocks the worker lacks)``;
    - eviction = blocks this request would evict × ``prefill_per_block_ms``: it needs the
      blocks it lacks plus its output's slots; what exceeds the free slots last reported
      (``capacity − used``) evicts cached blocks, each assumed to cost one recomputation
      later. (Preble weights each evicted node by its hit count; the index keeps none, so
      the weight is 1.)

    Preble's post-assignment rebalancing and prefix autoscaling are not modelled. `latency`
    defaults to the router's model (`Router` fills it in).
    """

    needs_ticket: ClassVar[bool] = False

    def __init__(self, latency: LatencyModel | None = None) -> None:
        self.latency = latency

    @property
    def _latency(self) -> LatencyModel:
        return self.latency or LatencyModel()

    def prefill_ms(self, request: Request, view: RouterView, worker: str) -> float:
        return self._latency.prefill_ms(max(0, request.num_blocks - view.matched(worker)))

    def eviction_ms(self, request: Request, view: RouterView, worker: str) -> float:
        load = view.load(worker)
        if load.capacity_blocks <= 0:
            return 0.0  # capacity never reported: nothing known to evict
        needed = max(0, request.num_blocks - view.matched(worker))
        needed += expected_output_blocks(request, view)
        free = max(0, load.capacity_blocks - load.used_blocks)
        return max(0, needed - free) * self._latency.prefill_per_block_ms

    def explore_cost_ms(self, request: Request, view: RouterView, worker: str) -> float:
        return (
            view.load(worker).work_ms
            + self.eviction_ms(request, view, worker)
            + self.prefill_ms(request, view, worker)
        )

    def exploits(self, request: Request, view: RouterView) -> bool:
        matched_tokens = min(best_match(view) * BLOCK_SIZE, request.num_prompt_tokens)
        return matched_tokens > request.num_prompt_tokens - matched_tokens

    def choose(self, request: Request, view: RouterView) -> str:
        if self.exploits(request, view):
            best = best_match(view)
            holders = [w for w in view.workers if view.matched(w) == best]
            return min(holders, key=lambda w: (view.load(w).work_ms, *_load_key(view, w)))
        return min(
            view.workers,
            key=lambda w: (self.explore_cost_ms(request, view, w), *_load_key(view, w)),
        )


def _load_key(view: RouterView, worker: str) -> tuple:
    load = view.load(worker)
    return (load.requests, load.tokens, worker_order(worker))

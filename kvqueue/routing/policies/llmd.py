"""llm-d inference scheduler's weighted scorers."""

from __future__ import annotations

from typing import ClassVar

from kvqueue.gpu.request import Request
from kvqueue.routing.policies.base import check_param, least_loaded, register_policy
from kvqueue.routing.view import RouterView


@register_policy("llmd")
class LlmdScorers:
    """llm-d inference scheduler's weighted scorers (prefix-cache 2, queue 1, KV-cache
    utilization 1, as DESIGN.md §7 lists them); highest total wins.

    - prefix: fraction of the request's blocks the worker holds, ``matched / num_blocks``;
    - queue: ``(maxQ − q) / (maxQ − minQ)`` over outstanding requests q, 1 when all equal;
    - KV utilization: ``1 − used_blocks / capacity_blocks`` as last reported.

    Ties (llm-d picks at random among them) go to the least loaded, then worker order. The
    usage here counts cached-but-evictable blocks too (the simulated cache evicts lazily), so
    once caches are warm the third scorer is near 0 everywhere and mostly breaks early ties.
    """

    needs_ticket: ClassVar[bool] = False

    def __init__(
        self, prefix_weight: float = 2.0, queue_weight: float = 1.0, kv_weight: float = 1.0
    ) -> None:
        for name, value in (
            ("prefix_weight", prefix_weight),
            ("queue_weight", queue_weight),
            ("kv_weight", kv_weight),
        ):
            check_param(value >= 0, f"{name} must be >= 0, got {value}")
        self.prefix_weight = prefix_weight
        self.queue_weight = queue_weight
        self.kv_weight = kv_weight

    def scores(self, request: Request, view: RouterView) -> dict[str, float]:
        queues = {w: view.load(w).requests for w in view.workers}
        high, low = max(queues.values()), min(queues.values())
        scores = {}
        for w in view.workers:
            prefix = view.matched(w) / request.num_blocks if request.num_blocks else 0.0
            queue = (high - queues[w]) / (high - low) if high > low else 1.0
            kv = 1.0 - min(1.0, view.load(w).kv_usage)
            scores[w] = (
                self.prefix_weight * prefix + self.queue_weight * queue + self.kv_weight * kv
            )
        return scores

    def choose(self, request: Request, view: RouterView) -> str:
        scores = self.scores(request, view)
        top = max(scores.values())
        return least_loaded([w for w in view.workers if scores[w] == top], view)

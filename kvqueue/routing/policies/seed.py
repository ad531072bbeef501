"""The seed's three policies: round robin, least loaded, and cache-aware (longest prefix)."""

from __future__ import annotations

from typing import ClassVar

from kvqueue.gpu.request import Request
from kvqueue.routing.policies.base import least_loaded, register_policy
from kvqueue.routing.view import RouterView


@register_policy("round_robin")
class RoundRobin:
    """Workers in turn, by a ticket shared by every producer (a Redis counter when live)."""

    needs_ticket: ClassVar[bool] = True

    def choose(self, request: Request, view: RouterView) -> str:
        return view.workers[(view.ticket - 1) % len(view.workers)]


@register_policy("least_loaded")
class LeastLoaded:
    """The worker with the fewest outstanding requests (then tokens, then worker order)."""

    needs_ticket: ClassVar[bool] = False

    def choose(self, request: Request, view: RouterView) -> str:
        return least_loaded(view.workers, view)


@register_policy("cache_aware")
class CacheAware:
    """Longest prefix match; ties and no match at all go to the least loaded."""

    needs_ticket: ClassVar[bool] = False

    def choose(self, request: Request, view: RouterView) -> str:
        best = max((view.matched(w) for w in view.workers), default=0)
        if best == 0:
            return least_loaded(view.workers, view)
        return least_loaded([w for w in view.workers if view.matched(w) == best], view)

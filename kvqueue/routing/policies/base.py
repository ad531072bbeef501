"""Routing policies: one method, `choose(request, view) -> worker`, registered by name.

A policy sees only what a real router could know: the request's block hashes and declared
`max_tokens`, and a `RouterView` of the cluster (live workers, prefix matches from the index,
outstanding work). Ties always end in worker order, so every policy is deterministic given
its inputs (and its seeded rng, for policies that sample).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

from kvqueue.errors import ConfigError
from kvqueue.request import Request


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """One worker as the router accounts it.

    `requests`, `tokens` (prompt + declared output) and `work_ms` (the router's estimate of
    their service time, see `kvqueue.router.estimate_service_ms`) cover outstanding work:
    queued and running. `used_blocks`/`capacity_blocks` are the cache occupancy the worker
    last reported (after its last request ended). `elapsed_ms` is how long the request at
    the head of the worker's queue has been in service, as the router saw it start (at its
    commit to an idle worker, or at the previous completion); 0 when idle.
    """

    requests: int = 0
    tokens: int = 0
    work_ms: float = 0.0
    used_blocks: int = 0
    capacity_blocks: int = 0
    elapsed_ms: float = 0.0

    @property
    def kv_usage(self) -> float:
        return self.used_blocks / self.capacity_blocks if self.capacity_blocks else 0.0


@dataclass(frozen=True, slots=True)
class RouterView:
    """What a policy may look at. `workers` is the live workers in worker order."""

    workers: tuple[str, ...]
    matched_blocks: Mapping[str, int]
    loads: Mapping[str, WorkerLoad]
    ticket: int = 0
    mean_output_tokens: float | None = None  # over completed requests so far; None before any
    declared_share: float | None = None  # of routed requests, share declaring max_tokens

    def load(self, worker: str) -> WorkerLoad:
        return self.loads.get(worker, WorkerLoad())

    def matched(self, worker: str) -> int:
        return self.matched_blocks.get(worker, 0)


class Policy(Protocol):
    name: ClassVar[str]
    needs_ticket: ClassVar[bool]

    def choose(self, request: Request, view: RouterView) -> str: ...


POLICIES: dict[str, type] = {}


def register_policy(name: str) -> Callable[[type], type]:
    """Class decorator adding a policy to the registry; a duplicate name raises."""

    def decorate(cls: type) -> type:
        if name in POLICIES:
            raise ValueError(f"policy {name!r} is already registered by {POLICIES[name].__name__}")
        cls.name = name
        POLICIES[name] = cls
        return cls

    return decorate


def make_policy(name: str, **params: object) -> Policy:
    """Instantiate a registered policy; an unknown name lists the valid ones."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown routing strategy {name!r}; valid: {', '.join(sorted(POLICIES))}"
        )
    return cls(**params)


def policy_names() -> list[str]:
    return sorted(POLICIES)


def worker_order(worker: str) -> tuple:
    """Natural order: worker-2 before worker-10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", worker))


def least_loaded(workers: tuple[str, ...] | list[str], view: RouterView) -> str:
    """Fewest outstanding requests, then fewest outstanding tokens, then worker order."""
    return min(
        workers,
        key=lambda w: (view.load(w).requests, view.load(w).tokens, worker_order(w)),
    )


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


# The other policies live in modules of their own; importing them registers them here.
from kvqueue import policies_field, policies_predictive  # noqa: E402, F401

"""Routing policies: one method, `choose(request, view) -> worker`, registered by name.

A policy sees only what a real router could know: the request's block hashes and declared
`max_tokens`, and a `RouterView` of the cluster (live workers, prefix matches from the index,
outstanding work). Ties always end in worker order, so every policy is deterministic given
its inputs (and its seeded rng, for policies that sample). This module holds the registry and
the helpers policies share; it imports no policy (the package `__init__` imports them all).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Protocol

from kvqueue.errors import ConfigError
from kvqueue.gpu.hashing import BLOCK_SIZE
from kvqueue.gpu.request import Request
from kvqueue.routing.approximate import (
    DEFAULT_APPROXIMATE,
    INDEX_MODES,
    ApproximateRules,
)
from kvqueue.routing.view import RouterView, worker_order

INDEX_SEPARATOR = ":"  # ``llmd:approximate`` = the llmd policy on the approximate index


class Policy(Protocol):
    """`index_mode` is the index the policy reads unless told otherwise (its upstream's
    default); `approximate_index` the rules its approximate index forgets by."""

    name: ClassVar[str]
    needs_ticket: ClassVar[bool]

    def choose(self, request: Request, view: RouterView) -> str: ...


def default_index_mode(policy: object) -> str:
    return getattr(policy, "index_mode", "precise")


def approximate_rules(policy: object) -> ApproximateRules:
    return getattr(policy, "approximate_index", DEFAULT_APPROXIMATE)


def parse_strategy(spec: str) -> tuple[str, str | None]:
    """``"llmd:approximate"`` → ("llmd", "approximate"); ``"llmd"`` → ("llmd", None).

    The name must be registered and the mode one of `INDEX_MODES` (else `ConfigError`
    listing the valid ones).
    """
    name, sep, mode = spec.partition(INDEX_SEPARATOR)
    make_policy(name)
    if sep and mode not in INDEX_MODES:
        raise ConfigError(
            f"unknown index mode {mode!r} in strategy {spec!r}; valid: {', '.join(INDEX_MODES)}"
        )
    return name, (mode if sep else None)


def resolve_index_mode(spec: str, override: str | None = None) -> tuple[str, str]:
    """(policy name, index mode): the spec's own mode, else `override`, else the policy's
    upstream default."""
    name, mode = parse_strategy(spec)
    if override is not None and override not in INDEX_MODES:
        raise ConfigError(f"unknown index mode {override!r}; valid: {', '.join(INDEX_MODES)}")
    return name, mode or override or default_index_mode(POLICIES[name])


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


def least_loaded(workers: tuple[str, ...] | list[str], view: RouterView) -> str:
    """Fewest outstanding requests, then fewest outstanding tokens, then worker order."""
    return min(
        workers,
        key=lambda w: (view.load(w).requests, view.load(w).tokens, worker_order(w)),
    )


def check_param(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def best_match(view: RouterView) -> int:
    """The longest prefix match (in blocks) any live worker holds."""
    return max((view.matched(w) for w in view.workers), default=0)


def match_fraction(request: Request, matched_blocks: int) -> float:
    """Share of the prompt's tokens covered by `matched_blocks` (0 for an empty prompt)."""
    if request.num_prompt_tokens <= 0:
        return 0.0
    return min(1.0, matched_blocks * BLOCK_SIZE / request.num_prompt_tokens)


def uncached_tokens(request: Request, matched_blocks: int) -> int:
    """Prompt tokens left to prefill after a match of `matched_blocks` (Dynamo's `new_tokens`)."""
    return max(0, request.num_prompt_tokens - matched_blocks * BLOCK_SIZE)


def expected_output_blocks(request: Request, view: RouterView) -> int:
    """KV slots for the partial last prompt block and the expected output (never cached).

    Output length: the request's declared `max_tokens`, else the mean of completed outputs,
    else none (what a real router knows).
    """
    output = request.max_tokens
    if output is None:
        output = round(view.mean_output_tokens) if view.mean_output_tokens is not None else 0
    total = math.ceil((request.num_prompt_tokens + output) / BLOCK_SIZE)
    return max(0, total - request.num_blocks)

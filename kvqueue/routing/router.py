"""The router: read the cluster view, let the policy choose, commit the choice.

A decision costs one read (`RouterState.view`: for Redis, one Lua script). Committing marks
the request's not-yet-cached blocks as *pending* on the chosen worker (so a second request
with the same new prefix, routed before the first is served, follows it: no thundering herd)
and raises the worker's outstanding load; the worker lowers it when the request ends. For the
live pipeline the commit rides in the same pipeline as the RQ enqueue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from kvqueue.errors import NoLiveWorkersError
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult
from kvqueue.routing.engine_model import EngineModel
from kvqueue.routing.policies.base import Policy, uncached_tokens
from kvqueue.routing.view import RouterView

START_WORKER_HINT = "start one with: rq worker -w workers.KVWorker worker-0"


DEFAULT_OUTPUT_TOKENS_ESTIMATE = 128  # before any request has completed


@dataclass(frozen=True, slots=True)
class Decision:
    """A routed request: where it goes and what it adds to that worker's load until it ends."""

    worker: str
    strategy: str
    matched_blocks: int
    load_tokens: int
    estimated_ms: float = 0.0
    # The worker had nothing outstanding when the router looked: the request starts at once.
    worker_idle: bool = False
    # Requests outstanding on the worker (queued and in service) when the router looked.
    worker_outstanding: int = 0
    # Prompt tokens the chosen worker lacks, as the index predicted (`kvqueue.routing.active`).
    prefill_tokens: int = 0


def load_tokens(request: Request) -> int:
    """The tokens a request adds to its worker's outstanding load (prompt + declared output)."""
    return request.num_prompt_tokens + (request.max_tokens or 0)


def expected_output_tokens(request: Request, view: RouterView) -> float:
    """The request's declared `max_tokens`, else the mean output of completed requests so far.

    Only what a real router sees: the request as sent and the responses that came back.
    """
    if request.max_tokens is not None:
        return float(request.max_tokens)
    if view.mean_output_tokens is not None:
        return view.mean_output_tokens
    return float(DEFAULT_OUTPUT_TOKENS_ESTIMATE)


def estimate_service_ms(
    request: Request, matched_blocks: int, view: RouterView, latency: LatencyModel
) -> float:
    """Prefill of the blocks the worker lacks plus decode of the expected output, in ms."""
    blocks_to_compute = max(0, request.num_blocks - matched_blocks)
    return latency.prefill_ms(blocks_to_compute) + latency.decode_per_token_ms * (
        expected_output_tokens(request, view)
    )


class RouterState(Protocol):
    def view(self, request: Request, take_ticket: bool) -> RouterView: ...

    def commit(self, request: Request, decision: Decision, pipeline: Any = None) -> None: ...

    def first_token(self, worker: str, request_id: str, at_ms: float | None = None) -> None:
        """The request's first token came (at `at_ms`, router time; None: now)."""

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
        """Release a finished request's load; record the cache occupancy and output length
        the worker reports (None when the request produced none, e.g. rejected)."""


class Router:
    """Route (read the view, let the policy choose), commit, and tell the policy what came of
    it. `engine` is what the router is told about the workers' engines (`EngineModel`;
    default: the sequential engine with `latency`'s constants)."""

    def __init__(
        self,
        state: RouterState,
        policy: Policy,
        latency: LatencyModel | None = None,
        engine: EngineModel | None = None,
    ) -> None:
        self.state = state
        self.policy = policy
        self.latency = latency or (engine.latency if engine is not None else LatencyModel())
        self.engine = engine or EngineModel(latency=self.latency)
        # Policies that price work in ms (preble, predictive) use the router's models.
        if getattr(policy, "latency", False) is None:
            policy.latency = self.latency  # type: ignore[attr-defined]
        if getattr(policy, "engine", False) is None:
            policy.engine = self.engine  # type: ignore[attr-defined]

    def route(self, request: Request) -> Decision:
        """Choose a worker. Raises `NoLiveWorkersError` when there is none."""
        view = self.state.view(request, self.policy.needs_ticket)
        if not view.workers:
            raise NoLiveWorkersError(f"no live KV workers to route to; {START_WORKER_HINT}")
        worker = self.policy.choose(request, view)
        matched = view.matched(worker)
        return Decision(
            worker,
            self.policy.name,
            matched,
            load_tokens(request),
            estimate_service_ms(request, matched, view, self.latency),
            worker_idle=view.load(worker).requests == 0,
            worker_outstanding=view.load(worker).requests,
            prefill_tokens=uncached_tokens(request, matched),
        )

    def commit(self, request: Request, decision: Decision, pipeline: Any = None) -> None:
        self.state.commit(request, decision, pipeline)

    def finished(self, request: Request, result: RequestResult, now_ms: float) -> None:
        """The request ended (`result`, as the client saw it): policies that learn from
        outcomes (`finished(request, result, now_ms)`, e.g. Preble's) hear of it."""
        hook = getattr(self.policy, "finished", None)
        if hook is not None:
            hook(request, result, now_ms)

"""The router: read the cluster view, let the policy choose, commit the choice.

A decision costs one read (`RouterState.view`: for Redis, one Lua script). Committing marks
the request's not-yet-cached blocks as *pending* on the chosen worker (so a second request
with the same new prefix, routed before the first is served, follows it: no thundering herd)
and raises the worker's outstanding load; the worker lowers it when the request ends. For the
live pipeline the commit rides in the same pipeline as the RQ enqueue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from kvqueue import keys
from kvqueue.errors import NoLiveWorkersError
from kvqueue.events import CacheEvent
from kvqueue.index import InMemoryIndex, apply_events
from kvqueue.policies import Policy, RouterView, WorkerLoad, worker_order
from kvqueue.redis_index import RedisIndex
from kvqueue.request import Request

START_WORKER_HINT = "start one with: rq worker -w workers.KVWorker worker-0"


@dataclass(frozen=True, slots=True)
class Decision:
    worker: str
    strategy: str
    matched_blocks: int
    load_tokens: int


def load_tokens(request: Request) -> int:
    """The tokens a request adds to its worker's outstanding load (prompt + declared output)."""
    return request.num_prompt_tokens + (request.max_tokens or 0)


class RouterState(Protocol):
    def view(self, request: Request, take_ticket: bool) -> RouterView: ...

    def commit(self, request: Request, decision: Decision, pipeline: Any = None) -> None: ...

    def complete(self, worker: str, tokens: int, pipeline: Any = None) -> None: ...


class Router:
    def __init__(self, state: RouterState, policy: Policy) -> None:
        self.state = state
        self.policy = policy

    def route(self, request: Request) -> Decision:
        """Choose a worker. Raises `NoLiveWorkersError` when there is none."""
        view = self.state.view(request, self.policy.needs_ticket)
        if not view.workers:
            raise NoLiveWorkersError(f"no live KV workers to route to; {START_WORKER_HINT}")
        worker = self.policy.choose(request, view)
        return Decision(worker, self.policy.name, view.matched(worker), load_tokens(request))

    def commit(self, request: Request, decision: Decision, pipeline: Any = None) -> None:
        self.state.commit(request, decision, pipeline)


class RedisRouterState:
    """Router state in Redis: the prefix tree, live workers, loads and the shared ticket."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = keys.DEFAULT_PREFIX,
        heartbeat_ttl_s: float = 15.0,
        pending_ttl_s: float = 30.0,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.index = RedisIndex(client, prefix)
        self.heartbeat_ttl_ms = heartbeat_ttl_s * 1000.0
        self.pending_ttl_ms = pending_ttl_s * 1000.0

    def view(self, request: Request, take_ticket: bool) -> RouterView:
        matches, ticket, (requests, tokens) = self.index.route_view(
            request.block_hashes,
            self.heartbeat_ttl_ms,
            [keys.load(self.prefix), keys.load_tokens(self.prefix)],
            take_ticket,
        )
        workers = tuple(sorted(matches, key=worker_order))
        loads = {
            w: WorkerLoad(max(0, int(requests.get(w, 0))), max(0, int(tokens.get(w, 0))))
            for w in workers
        }
        return RouterView(workers, matches, loads, ticket)

    def commit(self, request: Request, decision: Decision, pipeline: Any = None) -> None:
        pipe = pipeline if pipeline is not None else self.client.pipeline(transaction=False)
        new_blocks = request.block_hashes[decision.matched_blocks :]
        self.index.mark_pending(decision.worker, new_blocks, self.pending_ttl_ms, pipeline=pipe)
        pipe.hincrby(keys.load(self.prefix), decision.worker, 1)
        pipe.hincrby(keys.load_tokens(self.prefix), decision.worker, decision.load_tokens)
        if pipeline is None:
            pipe.execute()

    def complete(self, worker: str, tokens: int, pipeline: Any = None) -> None:
        pipe = pipeline if pipeline is not None else self.client.pipeline(transaction=False)
        pipe.hincrby(keys.load(self.prefix), worker, -1)
        pipe.hincrby(keys.load_tokens(self.prefix), worker, -tokens)
        if pipeline is None:
            pipe.execute()


class InMemoryRouterState:
    """Router state in process memory, for the simulator. `clock` returns milliseconds."""

    def __init__(
        self,
        workers: Sequence[str],
        clock: Callable[[], float] | None = None,
        pending_ttl_ms: float = 30_000.0,
    ) -> None:
        self.workers = tuple(sorted(workers, key=worker_order))
        self.clock = clock or (lambda: time.monotonic() * 1000.0)
        self.index = InMemoryIndex(self.clock)
        self.pending_ttl_ms = pending_ttl_ms
        self.requests = dict.fromkeys(self.workers, 0)
        self.tokens = dict.fromkeys(self.workers, 0)
        self._ticket = 0

    def view(self, request: Request, take_ticket: bool) -> RouterView:
        if take_ticket:
            self._ticket += 1
        matches = self.index.match(request.block_hashes)
        loads = {w: WorkerLoad(self.requests[w], self.tokens[w]) for w in self.workers}
        return RouterView(
            self.workers, {w: matches.get(w, 0) for w in self.workers}, loads, self._ticket
        )

    def commit(self, request: Request, decision: Decision, pipeline: Any = None) -> None:
        new_blocks = request.block_hashes[decision.matched_blocks :]
        self.index.mark_pending(decision.worker, new_blocks, self.pending_ttl_ms)
        self.requests[decision.worker] += 1
        self.tokens[decision.worker] += decision.load_tokens

    def complete(self, worker: str, tokens: int, pipeline: Any = None) -> None:
        self.requests[worker] -= 1
        self.tokens[worker] -= tokens

    def apply_events(self, worker: str, events: Sequence[CacheEvent]) -> None:
        apply_events(self.index, worker, events)

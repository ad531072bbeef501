"""Preble's E2 global scheduler: exploit a shared prefix's GPUs, else explore by windowed cost."""

from __future__ import annotations

from typing import ClassVar

from kvqueue.gpu.hashing import BLOCK_SIZE
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult
from kvqueue.routing.approximate import PREBLE_TREE
from kvqueue.routing.engine_model import EngineModel
from kvqueue.routing.policies.base import best_match, register_policy
from kvqueue.routing.policies.preble_tree import DEFAULT_DECODE_TOKENS, PrebleScheduler
from kvqueue.routing.view import RouterView


@register_policy("preble")
class PrebleE2:
    """Preble's E2 scheduler (Srivatsa et al., ICLR 2025) as WukLab/preble@8e7906a3 runs it
    (`preble/global_scheduler_with_time.py` `runtime_selector`, L304-356, with eviction on as
    `preble/server/server.py` L238 starts it); the state is `PrebleScheduler`.

    Per request, the prompt is inserted into one global prefix tree of everything routed::

        leaf = the prompt's node in the tree; important = nearest large ancestor-or-self
        if leaf.num_tokens < leaf.context_so_far:          # EXPLOIT: shared part longer
            G = allocation of the nearest allocated ancestor (none: every GPU)
            gpu = G's only GPU (no load check) if |G| = 1, else argmin cost over G
        else:                                              # EXPLORE
            gpu = argmin cost over every GPU
        cost(g) = Σ over the window's important nodes n allocated to g of
                    miss_rate(n) · count(n) · T_prefill(n) / |alloc(n)|
                  + active(n, g) · output_len(n) · median TPOT(g)
                  + the cost of the large nodes an LRU eviction of leaf.num_tokens on g drops

    then the leaf's path is allocated to the GPU, the window (3 minutes) updated, the GPU's
    simulated cache trimmed to its capacity, and — once 50 × N requests have been routed
    (a cumulative count, so a one-time warm-up) — the post-assignment rebalancing runs: while
    the most loaded GPU's cost (nodes seen at least twice) is ≥ 1.5 × the least loaded's,
    its cheapest important nodes move to it with their whole subtrees, or a single hot node
    is replicated to it if its TTFTs doubled within the window. Ties: the first minimum.

    kvqueue's choices, where Preble's numbers do not carry over: T_prefill is the router's
    engine model (`EngineModel.prefill_ms`; upstream a fitted Mistral-7B/A6000 regression);
    the capacity is the GPU's own (upstream 198,516 tokens); times are the router's clock;
    output length = the request's ``max_tokens``, else 45 (upstream's default). Upstream's
    exploit branch returns the argmin's *position* in G as a GPU id (L300, L326); here the
    position is mapped back to its GPU (``upstream_argmin=True`` reproduces the quirk).

    Index: approximate by default — the exploit test asks whether *some earlier request*
    shared the prefix (the global tree), not whether a GPU still caches it. With the precise
    index (``--index precise``) the test asks the workers' caches instead: exploit when the
    longest cached match exceeds the uncached rest, G = the workers holding it; the tree,
    window, costs and rebalancing stay (rebalancing then moves only the cost accounting).
    """

    needs_ticket: ClassVar[bool] = False
    index_mode: ClassVar[str] = "approximate"
    approximate_index = PREBLE_TREE

    def __init__(self, engine: EngineModel | None = None, upstream_argmin: bool = False) -> None:
        self.engine = engine
        self.upstream_argmin = upstream_argmin
        self._scheduler: PrebleScheduler | None = None
        self._gpus: dict[str, int] = {}
        self._workers: tuple[str, ...] = ()

    def scheduler(self, view: RouterView) -> PrebleScheduler:
        """The scheduler state, made for the first view's workers (GPU i = worker i)."""
        if self._scheduler is None:
            engine = self.engine or EngineModel()
            capacity = (
                max((view.load(w).capacity_blocks for w in view.workers), default=0)
                or engine.num_gpu_blocks
            )
            self._workers = view.workers
            self._gpus = {w: i for i, w in enumerate(view.workers)}
            self._scheduler = PrebleScheduler(
                len(view.workers),
                lambda extend, context: engine.prefill_ms(context, context - extend),
                capacity * BLOCK_SIZE if capacity else 1 << 62,
                self.upstream_argmin,
            )
        return self._scheduler

    def choose(self, request: Request, view: RouterView) -> str:
        state = self.scheduler(view)
        now = view.now_ms
        leaf, important = state.prepare(request.block_hashes, now)
        live = [self._gpus[w] for w in view.workers if w in self._gpus]
        if view.index_mode == "precise":
            best = best_match(view)
            cached = min(best * BLOCK_SIZE, request.num_prompt_tokens)
            if best > 0 and request.num_prompt_tokens - cached < cached:
                holders = [self._gpus[w] for w in view.workers if view.matched(w) == best]
                gpu = holders[0] if len(holders) == 1 else state.min_load_cost(leaf, holders)
            else:
                gpu = state.min_load_cost(leaf, live)
        elif important is not None and state.exploits(leaf):
            allocation = sorted(state.allocation_of(leaf))
            only = len(allocation) == 1
            gpu = allocation[0] if only else state.min_load_cost(leaf, allocation)
        else:
            gpu = state.min_load_cost(leaf, live)
        decode = request.max_tokens if request.max_tokens is not None else DEFAULT_DECODE_TOKENS
        state.commit(leaf, important, gpu, decode, now)
        return self._workers[gpu]

    def finished(self, request: Request, result: RequestResult, now_ms: float) -> None:
        """`finish_request`: the router sees the response end (its TTFT and TPOT)."""
        state = self._scheduler
        gpu = self._gpus.get(result.worker)
        if state is None or gpu is None:
            return
        state.finish(
            request.block_hashes,
            gpu,
            now_ms,
            result.ttft_ms,
            result.tpot_ms,
            result.decode_tokens or 0,
        )

"""SGLang's cache-aware router (the SGLang model gateway, formerly sgl-router)."""

from __future__ import annotations

import random
from typing import ClassVar, Literal

from kvqueue.gpu.request import Request
from kvqueue.routing.approximate import SGLANG_TREE
from kvqueue.routing.policies.base import (
    best_match,
    check_param,
    match_fraction,
    register_policy,
)
from kvqueue.routing.view import RouterView

LowMatch = Literal["min_load", "smallest_tree"]


@register_policy("sglang")
class SGLangCacheAware:
    """SGLang's cache-aware router: shortest queue when the cluster is imbalanced, else the
    worker with the longest prefix match if it covers more than `cache_threshold` of the
    prompt, else the shortest queue.

    Rule (sgl-project/sglang@b93974f1:sgl-model-gateway/src/policies/cache_aware.rs
    `select_worker`), per request, ``load`` = the router's in-flight requests per worker
    (incremented at dispatch, decremented when the request ends: never an engine metric)::

        imbalanced = max − min > balance_abs  and  max > min × balance_rel   (over all workers)
        if imbalanced:                 argmin load (first in worker order)
        elif match_rate > threshold:   the matched worker            (strict >)
        else:                          argmin load (first in worker order)

    and the chosen worker's tree gets the whole request on either branch (the router's
    commit records it in the approximate index). ``match_rate`` is matched characters over
    prompt characters; with a fixed number of characters per token that is matched tokens
    over prompt tokens. The tree's `prefix_match` returns the first tenant of the deepest
    node reached — an arbitrary one of the workers holding the longest match (DashMap
    order); here one drawn uniformly from a `random.Random(seed)`.

    Defaults are the ones a user of the gateway or of ``python -m sglang_router.launch_router``
    gets (sgl-project/sglang@e46dcd87:sgl-router/py_src/sglang_router/router_args.py, and the
    gateway's CLI @01f6c92a:sgl-model-gateway/src/main.rs): ``cache_threshold = 0.3``,
    ``balance_abs_threshold = 64``, ``balance_rel_threshold = 1.5``, ``eviction_interval_secs
    = 120``, ``max_tree_size = 2**26`` (characters per worker; `SGLANG_TREE`). The Rust
    library's own `CacheAwareConfig::default()` (0.5 / 32 / 1.1 / 30 s / 10,000;
    @0edb07a1:sgl-model-gateway/src/policies/mod.rs) applies only when the library is built
    directly. Index: approximate by default — the gateway matches against a character radix
    tree of the text it routed, never against the engines' caches.

    ``low_match="smallest_tree"`` is the older sgl-router's rule for a low match: the worker
    whose tree holds the fewest characters (blocks here; sgl-project/sglang@026f853b:
    sgl-router/src/policies/cache_aware.rs), which can send a miss to an overloaded worker.
    """

    needs_ticket: ClassVar[bool] = False
    index_mode: ClassVar[str] = "approximate"
    approximate_index = SGLANG_TREE

    def __init__(
        self,
        balance_abs: int = 64,
        balance_rel: float = 1.5,
        cache_threshold: float = 0.3,
        low_match: LowMatch = "min_load",
        seed: int = 0,
    ) -> None:
        check_param(balance_abs >= 0, f"balance_abs must be >= 0, got {balance_abs}")
        check_param(balance_rel >= 1.0, f"balance_rel must be >= 1, got {balance_rel}")
        check_param(
            0 <= cache_threshold <= 1, f"cache_threshold must be in [0, 1], got {cache_threshold}"
        )
        check_param(
            low_match in ("min_load", "smallest_tree"),
            f"low_match must be min_load or smallest_tree, got {low_match!r}",
        )
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.cache_threshold = cache_threshold
        self.low_match = low_match
        self.rng = random.Random(seed)

    def is_imbalanced(self, view: RouterView) -> bool:
        loads = [view.load(w).requests for w in view.workers]
        high, low = max(loads), min(loads)
        return high - low > self.balance_abs and high > self.balance_rel * low

    def min_load(self, view: RouterView) -> str:
        """Fewest in-flight requests; the first such worker in worker order (`min_by_key`)."""
        return min(view.workers, key=lambda w: view.load(w).requests)

    def smallest_tree(self, view: RouterView) -> str:
        return min(view.workers, key=lambda w: view.load(w).indexed_blocks)

    def choose(self, request: Request, view: RouterView) -> str:
        if self.is_imbalanced(view):
            return self.min_load(view)
        best = best_match(view)
        if best > 0 and match_fraction(request, best) > self.cache_threshold:
            holders = [w for w in view.workers if view.matched(w) == best]
            return holders[0] if len(holders) == 1 else self.rng.choice(holders)
        if self.low_match == "smallest_tree":
            return self.smallest_tree(view)
        return self.min_load(view)

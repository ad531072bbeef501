"""llm-d inference scheduler (the endpoint picker, EPP): weighted scorers, highest total wins."""

from __future__ import annotations

import math
import random
from typing import ClassVar, Literal

from kvqueue.gpu.hashing import BLOCK_SIZE
from kvqueue.gpu.request import Request
from kvqueue.routing.approximate import LLMD_APPROX, LLMD_FIXED_LRU
from kvqueue.routing.policies.base import check_param, register_policy
from kvqueue.routing.view import RouterView

Normalization = Literal["absolute", "minmax"]


@register_policy("llmd")
class LlmdScorers:
    """llm-d's endpoint picker with the scorers of its precise-prefix-cache sample config:
    ``2 × prefix + 1 × kv-cache utilization + 1 × queue``, highest total wins.

    Config followed: llm-d/llm-d-inference-scheduler@520af478:
    deploy/config/epp-precise-prefix-cache-config.yaml (precise-prefix-cache-scorer weight
    2.0, kv-cache-utilization-scorer 1.0, queue-scorer 1.0, max-score-picker). The EPP's
    built-in default (`pkg/epp/config/loader/defaults.go` `loadDefaultConfig`: queue 2, kv 2,
    approximate prefix 3) differs; pass those weights to get it. Scores, per candidate w,
    each clamped to [0, 1] and weighted — the total is not divided by the sum of weights
    (`scheduler_profile.go` `runScorerPlugins`):

    - **prefix**, precise (`scorer/preciseprefixcache/utils.go` `absoluteScoredPods`, since
      e6f6b84f): ``min(matched / total, 1)``, total = the prompt's full blocks;
      ``prefix_normalization="minmax"`` is the rule before that commit: ``(m − min) / (max −
      min)`` over the workers holding at least the first block, 1 when they all tie, 0 for
      the others. Approximate (`approx-prefix-cache-producer` + `prefix-cache-scorer`):
      ``matched / total`` with total = the prompt's blocks *including a trailing partial
      one*, both capped at 256 blocks (`LLMD_APPROX`);
    - **kv-cache utilization** (`scorer/kvcacheutilization`): ``1 − KV usage``, usage as vLLM
      reports it (`vllm:kv_cache_usage_perc`: evictable cached blocks count as free;
      `WorkerLoad.engine_kv_usage`);
    - **queue** (`scorer/queuedepth`): ``(max q − q) / (max q − min q)`` over the candidates,
      q = the engine's *waiting* requests (`vllm:num_requests_waiting`,
      `WorkerLoad.num_waiting`); 1 for all when they are equal.

    Picker (`picker/maxscore`): candidates shuffled, stably sorted by total, the first taken:
    an exact tie is broken uniformly at random (a `random.Random(seed)` here). Index: precise
    by default (the config's scorer reads vLLM's KV events); ``--index approximate`` gives
    the approximate producer and scorer under the same weights.

    The engine signals are the simulator's exact values at the decision; llm-d scrapes them
    every few tens of milliseconds, and a live batched worker publishes them about as often
    (`kvq:signals`). A live sequential worker publishes none: its view reads 0 for both and
    only the prefix scorer discriminates.
    """

    needs_ticket: ClassVar[bool] = False
    index_mode: ClassVar[str] = "precise"
    approximate_index = LLMD_APPROX

    def __init__(
        self,
        prefix_weight: float = 2.0,
        queue_weight: float = 1.0,
        kv_weight: float = 1.0,
        prefix_normalization: Normalization = "absolute",
        seed: int = 0,
    ) -> None:
        for name, value in (
            ("prefix_weight", prefix_weight),
            ("queue_weight", queue_weight),
            ("kv_weight", kv_weight),
        ):
            check_param(value >= 0, f"{name} must be >= 0, got {value}")
        check_param(
            prefix_normalization in ("absolute", "minmax"),
            f"prefix_normalization must be absolute or minmax, got {prefix_normalization!r}",
        )
        self.prefix_weight = prefix_weight
        self.queue_weight = queue_weight
        self.kv_weight = kv_weight
        self.prefix_normalization = prefix_normalization
        self.rng = random.Random(seed)

    def prefix_scores(self, request: Request, view: RouterView) -> dict[str, float]:
        if view.index_mode == "approximate":
            limit = self.approximate_index.max_match_blocks or math.inf
            total = min(limit, math.ceil(request.num_prompt_tokens / BLOCK_SIZE))
            return {w: min(view.matched(w) / total, 1.0) for w in view.workers}
        total = request.num_blocks
        if total <= 0:
            return dict.fromkeys(view.workers, 0.0)
        if self.prefix_normalization == "absolute":
            return {w: min(view.matched(w) / total, 1.0) for w in view.workers}
        held = {w: view.matched(w) for w in view.workers if view.matched(w) > 0}
        if not held:
            return dict.fromkeys(view.workers, 0.0)
        low, high = min(held.values()), max(held.values())
        return {
            w: (1.0 if high == low else (held[w] - low) / (high - low)) if w in held else 0.0
            for w in view.workers
        }

    def queue_scores(self, view: RouterView) -> dict[str, float]:
        queues = {w: view.load(w).num_waiting for w in view.workers}
        high, low = max(queues.values()), min(queues.values())
        if high == low:
            return dict.fromkeys(view.workers, 1.0)
        return {w: (high - q) / (high - low) for w, q in queues.items()}

    def kv_scores(self, view: RouterView) -> dict[str, float]:
        return {w: _clamp(1.0 - view.load(w).engine_kv_usage) for w in view.workers}

    def scores(self, request: Request, view: RouterView) -> dict[str, float]:
        prefix = self.prefix_scores(request, view)
        queue = self.queue_scores(view)
        kv = self.kv_scores(view)
        return {
            w: self.prefix_weight * _clamp(prefix[w])
            + self.queue_weight * _clamp(queue[w])
            + self.kv_weight * kv[w]
            for w in view.workers
        }

    def choose(self, request: Request, view: RouterView) -> str:
        scores = self.scores(request, view)
        top = max(scores.values())
        tied = [w for w in view.workers if scores[w] == top]
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


@register_policy("llmd_fixed_lru")
class LlmdFixedLru(LlmdScorers):
    """llm-d's scorers on the approximate index as it was before autoTune (and is with it off,
    or when a pod exports no `vllm:cache_config_info`): a 31,250-block LRU per pod, whatever
    the pod's GPU holds (`LLMD_FIXED_LRU`).

    llm-d's published precise-vs-approximate comparison predates autoTune; on a GPU that holds
    fewer blocks than 31,250, this index keeps promising prefixes the GPU evicted. Approximate
    by default; its precise counterpart is `llmd` itself.
    """

    index_mode: ClassVar[str] = "approximate"
    approximate_index = LLMD_FIXED_LRU
    precise_counterpart: ClassVar[str] = "llmd"

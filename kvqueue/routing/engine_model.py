"""What the router is told about the engines it routes to: their kind and their latency profile.

A router that prices work in milliseconds needs a model of the engine behind each worker, the
way Preble ships a fitted prefill-time regression (`model_equations.py`) or Dynamo's planner a
profile: configuration an operator gives the router, not a measurement of the running GPUs.
`EngineModel` is that configuration for kvqueue's engines, built from the same `EngineConfig`,
preset and latency constants the workers run (`EngineModel.of`), so the router's prices are
the workers' own (`docs/latency.md`):

- **sequential** with the ``seed`` profile: prefill = 5 + 2.5 ms × blocks computed, decode =
  15 ms per token (`LatencyModel`); with ``calibrated``: the preset's step model at batch 1
  (`SequentialStepPricing`);
- **batched**: the preset's step model (`StepCost`) and vLLM's step limits
  (`SchedulerConfig`): a step takes up to `max_num_batched_tokens` tokens, decodes first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.hashing import BLOCK_SIZE
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.presets import Preset
from kvqueue.gpu.profiles import SequentialStepPricing
from kvqueue.gpu.scheduler import SchedulerConfig
from kvqueue.gpu.step_cost import SeedStepCost, StepCost, StepShape, chunk_attention


@dataclass(frozen=True, slots=True)
class EngineModel:
    """The engines' kind and prices as the router knows them (module docstring).

    `num_gpu_blocks` is the preset's KV cache size (a worker registers it; Preble's
    simulated eviction and llm-d's auto-tuned index use it).
    """

    batched: bool = False
    latency: LatencyModel = field(default_factory=LatencyModel)
    pricing: SequentialStepPricing | None = None
    step_cost: StepCost = field(default_factory=SeedStepCost)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_gpu_blocks: int = 0
    block_size: int = BLOCK_SIZE

    @classmethod
    def of(
        cls, engine: EngineConfig, preset: Preset, latency: LatencyModel | None = None
    ) -> EngineModel:
        latency = latency or LatencyModel()
        return cls(
            batched=engine.is_batched,
            latency=latency,
            pricing=None if engine.is_batched else engine.sequential_pricing(preset),
            step_cost=engine.step_cost(preset, latency),
            scheduler=engine.scheduler_config(preset),
            num_gpu_blocks=preset.num_blocks,
            block_size=preset.block_size,
        )

    # -- prices ---------------------------------------------------------------------------
    def prefill_ms(self, prompt_tokens: int, cached_tokens: int = 0) -> float:
        """A prompt of `prompt_tokens` with `cached_tokens` hit, prefilled alone.

        Sequential: the engine's own prefill price. Batched: the steps of a lone request,
        chunked by the token budget (each chunk's attention over what precedes it).
        """
        cached = max(0, min(cached_tokens, prompt_tokens))
        if not self.batched:
            if self.pricing is None:
                full_blocks = prompt_tokens // self.block_size
                return self.latency.prefill_ms(max(0, full_blocks - cached // self.block_size))
            return self.pricing.prefill_ms(prompt_tokens, cached)
        todo = max(1, prompt_tokens - cached)  # the last token is always computed
        done = prompt_tokens - todo
        budget = self.scheduler.max_num_batched_tokens
        total = 0.0
        while todo > 0:
            chunk = min(todo, budget)
            total += self.step_cost.step_ms(StepShape(chunk, chunk_attention(chunk, done)))
            done += chunk
            todo -= chunk
        return total

    def decode_token_ms(self, context_tokens: int = 0) -> float:
        """One output token of a request decoding alone (batch 1)."""
        if not self.batched and self.pricing is None:
            return self.latency.decode_per_token_ms
        return self.step_cost.step_ms(StepShape(decode_batch=1, decode_context=context_tokens))

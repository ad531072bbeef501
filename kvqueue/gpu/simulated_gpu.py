"""The sequential engine: one simulated GPU serving one request at a time — no I/O, no clock.

The live KV worker and the virtual-time simulator both drive a `SimulatedGpu`, so they share
every rule: the block cache, the latency model, the decode-length oracle and the rejection of
requests that can never fit. A GPU serves one request at a time (the caller guarantees it),
so a request's blocks are pinned from `start` to `finish`.

Pricing: the seed's `LatencyModel` (prefill = base + per block × blocks to compute, decode =
per token × output tokens), or, given a `SequentialStepPricing`, a calibrated step model at
batch 1 (`kvqueue.gpu.profiles`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvqueue.gpu.admission import check_context, output_length
from kvqueue.gpu.cache import Allocation, BlockCache
from kvqueue.gpu.events import CacheEvent
from kvqueue.gpu.latency import LatencyModel, end_to_end_ms, tpot_ms, ttft_ms
from kvqueue.gpu.oracle import DecodeLengthOracle, FallbackOracle
from kvqueue.gpu.presets import Preset, get_preset
from kvqueue.gpu.profiles import SequentialStepPricing
from kvqueue.gpu.request import Request


@dataclass(frozen=True, slots=True)
class Execution:
    """A request in service: its pinned blocks and its simulated durations."""

    request: Request
    allocation: Allocation
    prefill_ms: float
    decode_tokens: int
    decode_source: str
    decode_ms: float
    # Decode token i (0-based) takes first_token_gap_ms + i × gap_growth_ms: constant for the
    # seed's model, growing with the context under a step model.
    first_token_gap_ms: float = 0.0
    gap_growth_ms: float = 0.0

    @property
    def service_ms(self) -> float:
        return self.prefill_ms + self.decode_ms

    def result_fields(self, queue_wait_ms: float) -> dict[str, Any]:
        """What a `RequestResult` of this request says after `queue_wait_ms` in the queue: its
        times (TTFT, end-to-end and TPOT as `kvqueue.gpu.latency` defines them) and what its
        allocation did — the same fields from the live worker and the simulator."""
        ttft = ttft_ms(queue_wait_ms, self.prefill_ms)
        e2e = end_to_end_ms(ttft, self.decode_ms)
        return {
            "queue_wait_ms": queue_wait_ms,
            "prefill_ms": self.prefill_ms,
            "decode_ms": self.decode_ms,
            "ttft_ms": ttft,
            "e2e_ms": e2e,
            "tpot_ms": tpot_ms(ttft, e2e, self.decode_tokens),
            "hit_blocks": self.allocation.num_hit_blocks,
            "decode_tokens": self.decode_tokens,
            "decode_source": self.decode_source,
            "evictions": self.allocation.num_evicted,
        }


class SimulatedGpu:
    """A preset's block cache plus the latency model and the decode-length oracle."""

    def __init__(
        self,
        preset: Preset | None = None,
        latency: LatencyModel | None = None,
        oracle: DecodeLengthOracle | None = None,
        pricing: SequentialStepPricing | None = None,
    ) -> None:
        self.preset = preset or get_preset()
        self.latency = latency or LatencyModel()
        self.oracle = oracle or FallbackOracle()
        self.pricing = pricing
        self.cache = BlockCache(self.preset.num_blocks)

    def decode_tokens(self, request: Request) -> tuple[int, str]:
        """Output length and which oracle decided it, capped by the context window."""
        return output_length(self.oracle, request, self.preset)

    def check_admissible(self, request: Request, decode_tokens: int) -> None:
        """Raise `RequestRejected` (with the reason) if the request can never be served."""
        check_context(request, decode_tokens, self.preset)
        self.cache.check_fits(request.num_blocks, self.num_anonymous_blocks(request, decode_tokens))

    def num_anonymous_blocks(self, request: Request, decode_tokens: int) -> int:
        """Slots for the partial last prompt block and the generated tokens (never cached)."""
        total_blocks = math.ceil(
            (request.num_prompt_tokens + decode_tokens) / self.preset.block_size
        )
        return total_blocks - request.num_blocks

    def start(self, request: Request) -> Execution:
        """Admit, allocate (evicting as needed) and price the request. Raises `RequestRejected`."""
        decode_tokens, source = self.decode_tokens(request)
        self.check_admissible(request, decode_tokens)
        allocation = self.cache.allocate(
            request.block_hashes, self.num_anonymous_blocks(request, decode_tokens)
        )
        if self.pricing is None:
            prefill_ms = self.latency.prefill_ms(allocation.num_blocks_to_compute)
            decode_ms = self.latency.decode_ms(decode_tokens)
            first_gap, growth = self.latency.decode_per_token_ms, 0.0
        else:
            prompt = request.num_prompt_tokens
            hit_tokens = allocation.num_hit_blocks * self.preset.block_size
            prefill_ms = self.pricing.prefill_ms(prompt, hit_tokens)
            decode_ms = self.pricing.decode_ms(prompt, decode_tokens)
            first_gap = self.pricing.first_decode_step_ms(prompt)
            growth = self.pricing.cost.decode_context_ms
        return Execution(
            request=request,
            allocation=allocation,
            prefill_ms=prefill_ms,
            decode_tokens=decode_tokens,
            decode_source=source,
            decode_ms=decode_ms,
            first_token_gap_ms=first_gap,
            gap_growth_ms=growth,
        )

    def finish(self, execution: Execution) -> None:
        self.cache.release(execution.allocation)

    def take_events(self) -> list[CacheEvent]:
        return self.cache.take_events()

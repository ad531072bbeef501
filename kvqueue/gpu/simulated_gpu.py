"""One simulated GPU: admission, block allocation, latency, release — no I/O, no clock.

The live KV worker and the virtual-time simulator both drive a `SimulatedGpu`, so they share
every rule: the block cache, the latency model, the decode-length oracle and the rejection of
requests that can never fit. A GPU serves one request at a time (the caller guarantees it),
so a request's blocks are pinned from `start` to `finish`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvqueue.errors import RequestRejected
from kvqueue.gpu.cache import Allocation, BlockCache
from kvqueue.gpu.events import CacheEvent
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.oracle import DecodeLengthOracle, FallbackOracle
from kvqueue.gpu.presets import Preset, get_preset
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

    @property
    def service_ms(self) -> float:
        return self.prefill_ms + self.decode_ms


class SimulatedGpu:
    """A preset's block cache plus the latency model and the decode-length oracle."""

    def __init__(
        self,
        preset: Preset | None = None,
        latency: LatencyModel | None = None,
        oracle: DecodeLengthOracle | None = None,
    ) -> None:
        self.preset = preset or get_preset()
        self.latency = latency or LatencyModel()
        self.oracle = oracle or FallbackOracle()
        self.cache = BlockCache(self.preset.num_blocks)

    def decode_tokens(self, request: Request) -> tuple[int, str]:
        """Output length and which oracle decided it, capped by the context window."""
        tokens, source = self.oracle.decode_length(request)
        room = self.preset.max_context_tokens - request.num_prompt_tokens
        if tokens > room and request.max_tokens is None:
            return max(0, room), source
        return tokens, source

    def check_admissible(self, request: Request, decode_tokens: int) -> None:
        """Raise `RequestRejected` (with the reason) if the request can never be served."""
        context = self.preset.max_context_tokens
        total = request.num_prompt_tokens + decode_tokens
        if request.num_prompt_tokens >= context or total > context:
            raise RequestRejected(
                f"prompt of {request.num_prompt_tokens:,} tokens + {decode_tokens:,} output "
                f"tokens exceeds the {context:,}-token context of {self.preset.name}"
            )
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
        return Execution(
            request=request,
            allocation=allocation,
            prefill_ms=self.latency.prefill_ms(allocation.num_blocks_to_compute),
            decode_tokens=decode_tokens,
            decode_source=source,
            decode_ms=self.latency.decode_ms(decode_tokens),
        )

    def finish(self, execution: Execution) -> None:
        self.cache.release(execution.allocation)

    def take_events(self) -> list[CacheEvent]:
        return self.cache.take_events()

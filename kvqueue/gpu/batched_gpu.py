"""The batched engine: one simulated GPU serving many requests per step — no I/O, no clock.

`BatchedGpu` puts the preset's block cache, the decode-length oracle and a `BatchScheduler`
together and decides, when a request arrives, whether it can ever be served: a prompt plus
output over the context window, or a request whose KV at its peak (prompt + all outputs but
the last) needs more blocks than the whole cache, is rejected with the reason. A driver then
alternates `scheduler.schedule()` / `scheduler.complete(step)` (or decode runs), pricing each
step with a `kvqueue.gpu.step_cost` model and advancing its own clock.
"""

from __future__ import annotations

from typing import Any

from kvqueue.errors import RequestRejected
from kvqueue.gpu.admission import check_context, output_length
from kvqueue.gpu.cache import BlockCache
from kvqueue.gpu.events import CacheEvent
from kvqueue.gpu.latency import tpot_ms
from kvqueue.gpu.oracle import DecodeLengthOracle, FallbackOracle
from kvqueue.gpu.presets import Preset, get_preset
from kvqueue.gpu.request import Request
from kvqueue.gpu.scheduler import (
    BatchScheduler,
    EngineRequest,
    SchedulerConfig,
    default_scheduler_config,
)


class BatchedGpu:
    """A preset's block cache under a `BatchScheduler` (vLLM's serving defaults unless given)."""

    def __init__(
        self,
        preset: Preset | None = None,
        oracle: DecodeLengthOracle | None = None,
        config: SchedulerConfig | None = None,
    ) -> None:
        self.preset = preset or get_preset()
        self.oracle = oracle or FallbackOracle()
        self.cache = BlockCache(self.preset.num_blocks)
        self.config = config or default_scheduler_config(self.preset.gpu)
        self.scheduler = BatchScheduler(self.cache, self.config, self.preset.block_size)

    def submit(self, request: Request, tag: Any = None) -> EngineRequest:
        """Queue a request; raises `RequestRejected` (nothing queued) if it can never run."""
        decode_tokens, source = output_length(self.oracle, request, self.preset)
        check_context(request, decode_tokens, self.preset)
        engine_request = EngineRequest(request, decode_tokens, source, tag)
        peak_blocks = -(-engine_request.peak_tokens // self.preset.block_size)
        if peak_blocks > self.cache.num_blocks:
            raise RequestRejected(
                f"request needs {peak_blocks:,} KV blocks at its longest; "
                f"the cache holds {self.cache.num_blocks:,}"
            )
        self.scheduler.add(engine_request)
        return engine_request

    def take_events(self) -> list[CacheEvent]:
        return self.cache.take_events()


def completed_fields(
    request: EngineRequest,
    arrival_ms: float,
    admitted_ms: float,
    first_token_ms: float,
    finish_ms: float,
) -> dict[str, Any]:
    """A finished request's result fields (`RequestResult`) by the batched engine's timing
    rules, from its driver's times (ms, any one clock): queue wait = first admission −
    arrival; TTFT = its first token (the end of the step computing its last prompt token) −
    arrival; e2e = finish − arrival; prefill = TTFT − queue wait; decode = e2e − TTFT;
    TPOT = `tpot_ms` (vLLM's: (e2e − TTFT) / (outputs − 1))."""
    queue_wait = admitted_ms - arrival_ms
    ttft = first_token_ms - arrival_ms
    e2e = finish_ms - arrival_ms
    outputs = request.num_output
    return {
        "start_ms": admitted_ms,
        "finish_ms": finish_ms,
        "queue_wait_ms": queue_wait,
        "prefill_ms": ttft - queue_wait,
        "decode_ms": e2e - ttft,
        "ttft_ms": ttft,
        "e2e_ms": e2e,
        "hit_blocks": request.num_hit_blocks or 0,
        "decode_tokens": outputs,
        "decode_source": request.decode_source,
        "evictions": request.table.num_evicted,
        "tpot_ms": tpot_ms(ttft, e2e, outputs),
        "preemptions": request.num_preemptions,
    }

"""The latency model: pure functions of block and token counts, in simulated milliseconds.

prefill = prefill_base_ms + prefill_per_block_ms × blocks_to_compute
decode  = decode_per_token_ms × decode_tokens
TTFT    = queue wait + prefill;   end-to-end = TTFT + decode
TPOT    = (end-to-end − TTFT) / (output tokens − 1)     (`tpot_ms`, every engine)
"""

from __future__ import annotations

from dataclasses import dataclass

from kvqueue.errors import ConfigError


@dataclass(frozen=True, slots=True)
class LatencyModel:
    prefill_base_ms: float = 5.0
    prefill_per_block_ms: float = 2.5
    decode_per_token_ms: float = 15.0

    def __post_init__(self) -> None:
        for name in ("prefill_base_ms", "prefill_per_block_ms", "decode_per_token_ms"):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")

    def prefill_ms(self, blocks_to_compute: int) -> float:
        if blocks_to_compute < 0:
            raise ValueError(f"blocks_to_compute must be >= 0, got {blocks_to_compute}")
        return self.prefill_base_ms + self.prefill_per_block_ms * blocks_to_compute

    def decode_ms(self, decode_tokens: int) -> float:
        if decode_tokens < 0:
            raise ValueError(f"decode_tokens must be >= 0, got {decode_tokens}")
        return self.decode_per_token_ms * decode_tokens

    def service_ms(self, blocks_to_compute: int, decode_tokens: int) -> float:
        """Time the GPU is busy with one request: prefill plus decode."""
        return self.prefill_ms(blocks_to_compute) + self.decode_ms(decode_tokens)


def ttft_ms(queue_wait_ms: float, prefill_ms: float) -> float:
    return queue_wait_ms + prefill_ms


def end_to_end_ms(ttft: float, decode_ms: float) -> float:
    return ttft + decode_ms


def tpot_ms(ttft: float, e2e: float, output_tokens: int) -> float | None:
    """Time per output token as vLLM's serving benchmark defines it: the time after the first
    token over the gaps that follow it, ``(e2e − TTFT) / (output tokens − 1)``
    (vllm-project/vllm@009e6d4a:vllm/benchmarks/serve.py, ``calculate_metrics``).

    The one definition every engine reports (`RequestResult.tpot_ms`) and every report reads.
    None when there is no gap to time (fewer than 2 output tokens); vLLM's goodput counts such
    a request's TPOT as 0.
    """
    if output_tokens < 2:
        return None
    return (e2e - ttft) / (output_tokens - 1)

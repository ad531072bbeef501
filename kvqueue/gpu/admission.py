"""What every engine decides before serving a request: its output length, and whether it can
ever be served (the context window; the KV blocks are each engine's own check)."""

from __future__ import annotations

from kvqueue.errors import RequestRejected
from kvqueue.gpu.oracle import DecodeLengthOracle
from kvqueue.gpu.presets import Preset
from kvqueue.gpu.request import Request


def output_length(oracle: DecodeLengthOracle, request: Request, preset: Preset) -> tuple[int, str]:
    """Output tokens and which oracle decided them; an undeclared length is capped by the
    room left in the context window (a declared `max_tokens` is kept, and may be rejected)."""
    tokens, source = oracle.decode_length(request)
    room = preset.max_context_tokens - request.num_prompt_tokens
    if tokens > room and request.max_tokens is None:
        return max(0, room), source
    return tokens, source


def check_context(request: Request, decode_tokens: int, preset: Preset) -> None:
    """Raise `RequestRejected` if prompt and output exceed the preset's context window."""
    context = preset.max_context_tokens
    total = request.num_prompt_tokens + decode_tokens
    if request.num_prompt_tokens >= context or total > context:
        raise RequestRejected(
            f"prompt of {request.num_prompt_tokens:,} tokens + {decode_tokens:,} output "
            f"tokens exceeds the {context:,}-token context of {preset.name}"
        )

"""Decode-length oracles: how many tokens a request generates.

(a) the request's own `max_tokens` (trace `output_length`) when given;
(b) a real transformers causal LM, greedy until EOS or the cap (see `TransformersOracle`);
(c) a deterministic fallback seeded by the prompt's hash.
Every oracle says which one decided (`decode_length` returns ``(tokens, source)``).
"""

from __future__ import annotations

import hashlib
import random
from typing import Protocol

from kvqueue.request import Request

DEFAULT_FALLBACK_MEAN_TOKENS = 128
DEFAULT_MAX_NEW_TOKENS = 512


class DecodeLengthOracle(Protocol):
    def decode_length(self, request: Request) -> tuple[int, str]: ...


def prompt_digest(request: Request) -> bytes:
    """A stable digest of the prompt: its last block hash, or its tokens, or its id."""
    if request.block_hashes:
        return hashlib.sha256(
            request.block_hashes[-1] + str(request.num_prompt_tokens).encode()
        ).digest()
    if request.token_ids is not None:
        return hashlib.sha256(repr(request.token_ids).encode()).digest()
    return hashlib.sha256(request.request_id.encode()).digest()


class FallbackOracle:
    """Request-given length, else a deterministic draw seeded by the prompt's digest.

    The draw is geometric-like around `mean_tokens`, capped at `max_new_tokens`; the same
    prompt always gets the same length, in every process.
    """

    def __init__(
        self,
        mean_tokens: int = DEFAULT_FALLBACK_MEAN_TOKENS,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> None:
        if mean_tokens <= 0:
            raise ValueError(f"mean_tokens must be positive, got {mean_tokens}")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.mean_tokens = mean_tokens
        self.max_new_tokens = max_new_tokens

    def decode_length(self, request: Request) -> tuple[int, str]:
        if request.max_tokens is not None:
            return request.max_tokens, "request"
        rng = random.Random(prompt_digest(request))
        draw = 1 + int(rng.expovariate(1.0 / self.mean_tokens))
        return min(draw, self.max_new_tokens), "fallback"

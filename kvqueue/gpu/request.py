"""A request as the producer, router, worker and simulator all see it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvqueue.gpu.hashing import BlockHash, from_hex, to_hex


@dataclass(frozen=True, slots=True)
class Request:
    """One prompt, already cut into chained block hashes.

    `block_hashes` covers the full 16-token blocks of the prompt only, so
    ``len(block_hashes) == num_prompt_tokens // 16``. `max_tokens` is the output length when
    the request or trace gives it. `arrival_ms` is the offset from the start of the run in
    simulated milliseconds. `token_ids` is present for tokenized text and synthetic prompts
    (the decode-length model needs them) and absent for traces that only carry hashes.
    """

    request_id: str
    num_prompt_tokens: int
    block_hashes: tuple[BlockHash, ...]
    max_tokens: int | None = None
    arrival_ms: float = 0.0
    token_ids: tuple[int, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.num_prompt_tokens <= 0:
            raise ValueError(
                f"request {self.request_id!r} has an empty prompt ({self.num_prompt_tokens} tokens)"
            )
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError(
                f"request {self.request_id!r}: max_tokens must be >= 0, got {self.max_tokens}"
            )

    @property
    def num_blocks(self) -> int:
        return len(self.block_hashes)

    def to_wire(self) -> dict[str, Any]:
        """JSON-safe form for the RQ job (hashes in hex)."""
        return {
            "request_id": self.request_id,
            "num_prompt_tokens": self.num_prompt_tokens,
            "block_hashes": to_hex(self.block_hashes),
            "max_tokens": self.max_tokens,
            "arrival_ms": self.arrival_ms,
            "token_ids": list(self.token_ids) if self.token_ids is not None else None,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Request:
        token_ids = data.get("token_ids")
        return cls(
            request_id=str(data["request_id"]),
            num_prompt_tokens=int(data["num_prompt_tokens"]),
            block_hashes=tuple(from_hex(data["block_hashes"])),
            max_tokens=data.get("max_tokens"),
            arrival_ms=float(data.get("arrival_ms", 0.0)),
            token_ids=tuple(token_ids) if token_ids is not None else None,
        )


def make_request(
    request_id: str,
    block_hashes: Sequence[BlockHash],
    num_prompt_tokens: int | None = None,
    max_tokens: int | None = None,
    arrival_ms: float = 0.0,
) -> Request:
    """Factory for tests and generators: the token count defaults to the full blocks."""
    hashes = tuple(block_hashes)
    tokens = num_prompt_tokens if num_prompt_tokens is not None else 16 * max(1, len(hashes))
    return Request(request_id, tokens, hashes, max_tokens, arrival_ms)

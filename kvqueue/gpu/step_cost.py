"""What one forward step of a batched engine costs: pure functions of the step's shape, in ms.

A step (one forward pass) computes some prefill chunks and some decode tokens together. Its
shape is four numbers:

- ``P`` `prefill_tokens`: prompt tokens computed in the step (Σ chunk sizes; hits are free);
- ``A`` `prefill_attention`: Σ over the step's prefill chunks of ``c·(c + 2k)`` =
  ``(k + c)² − k²``, c the chunk's tokens and k that request's tokens already in its KV cache
  (hits included). A whole prompt of l tokens gives l², and any chunking of it sums to l²;
- ``B`` `decode_batch`: sequences decoding one token each;
- ``K`` `decode_context`: Σ over those sequences of the tokens already in their KV cache.

Two cost models share this shape (`docs/latency.md` has both, and every constant's source):

- `SeedStepCost`, the seed's constants carried over to batches: 5 ms if the step has prefill
  + 2.5 ms per 16 prefill tokens + 15 ms if it has decodes;
- `RooflineStepCost`, fitted per preset (`kvqueue.gpu.profiles`):
  ``max(α + β_seq·B, α_p + β_p·(P + B)) + γ·A + β_kv·K`` — the dense layers either stream
  their weights (memory branch) or compute (compute branch), attention is added.

Invariant the fast-forward relies on: a decode-only step costs
``decode_base_ms(B) + decode_context_ms · K``, affine in K with a slope independent of B, so
the steps of a fixed decode batch (K grows by B per step) form an arithmetic sequence. An
empty step costs 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple, Protocol

from kvqueue.errors import ConfigError
from kvqueue.gpu.hashing import BLOCK_SIZE
from kvqueue.gpu.latency import LatencyModel


class StepShape(NamedTuple):
    prefill_tokens: int = 0
    prefill_attention: int = 0
    decode_batch: int = 0
    decode_context: int = 0

    @property
    def is_empty(self) -> bool:
        return self.prefill_tokens == 0 and self.decode_batch == 0


def chunk_attention(chunk_tokens: int, cached_tokens: int) -> int:
    """A prefill chunk's attention work ``c·(c + 2k)`` (module docstring)."""
    return chunk_tokens * (chunk_tokens + 2 * cached_tokens)


class StepCost(Protocol):
    """A step-time model (module docstring); `decode_context_ms` is the slope in K."""

    @property
    def decode_context_ms(self) -> float: ...

    def step_ms(self, shape: StepShape) -> float: ...

    def decode_base_ms(self, batch: int) -> float:
        """A decode-only step of `batch` sequences with no context (K = 0)."""
        ...


def _check_non_negative(owner: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(owner, name)
        if not value >= 0:
            raise ConfigError(f"{type(owner).__name__}.{name} must be >= 0, got {value}")


@dataclass(frozen=True, slots=True)
class SeedStepCost:
    """The seed's latency constants per step: base + per-token prefill, a flat decode step.

    Defaults are the seed's `LatencyModel`: 5 ms prefill base, 2.5 ms per 16-token block
    (0.15625 ms per token), 15 ms per decode token (`from_latency_model` follows overrides).
    """

    prefill_base_ms: float = 5.0
    prefill_per_token_ms: float = 2.5 / 16
    decode_step_ms: float = 15.0

    def __post_init__(self) -> None:
        _check_non_negative(self, ("prefill_base_ms", "prefill_per_token_ms", "decode_step_ms"))

    @classmethod
    def from_latency_model(
        cls, latency: LatencyModel, block_size: int = BLOCK_SIZE
    ) -> SeedStepCost:
        """From a `LatencyModel`'s constants (prefill per block spread over its tokens)."""
        return cls(
            latency.prefill_base_ms,
            latency.prefill_per_block_ms / block_size,
            latency.decode_per_token_ms,
        )

    @property
    def decode_context_ms(self) -> float:
        return 0.0

    def step_ms(self, shape: StepShape) -> float:
        cost = 0.0
        if shape.prefill_tokens:
            cost += self.prefill_base_ms + self.prefill_per_token_ms * shape.prefill_tokens
        if shape.decode_batch:
            cost += self.decode_step_ms
        return cost

    def decode_base_ms(self, batch: int) -> float:
        return self.decode_step_ms if batch else 0.0


@dataclass(frozen=True, slots=True)
class RooflineStepCost:
    """``max(α + β_seq·B, α_p + β_p·(P + B)) + γ·A + β_kv·K`` ms (module docstring).

    Field names are the keys of `kvqueue/gpu/data/latency_profiles.json`.
    """

    alpha_ms: float
    beta_seq_ms: float
    beta_kv_ms_per_token: float
    alpha_prefill_ms: float
    beta_prefill_ms_per_token: float
    gamma_ms_per_token2: float

    def __post_init__(self) -> None:
        _check_non_negative(self, tuple(f.name for f in fields(self)))

    @property
    def decode_context_ms(self) -> float:
        return self.beta_kv_ms_per_token

    def step_ms(self, shape: StepShape) -> float:
        p, a, b, k = shape
        if not p and not b:
            return 0.0
        memory = self.alpha_ms + self.beta_seq_ms * b
        compute = self.alpha_prefill_ms + self.beta_prefill_ms_per_token * (p + b)
        return max(memory, compute) + self.gamma_ms_per_token2 * a + self.beta_kv_ms_per_token * k

    def decode_base_ms(self, batch: int) -> float:
        if not batch:
            return 0.0
        return max(
            self.alpha_ms + self.beta_seq_ms * batch,
            self.alpha_prefill_ms + self.beta_prefill_ms_per_token * batch,
        )


def decode_run_ms(cost: StepCost, batch: int, context: int, num_steps: int) -> float:
    """Total time of `num_steps` decode-only steps of a fixed batch whose summed context
    starts at `context` and grows by `batch` per step (closed form of the arithmetic sum)."""
    first = cost.decode_base_ms(batch) + cost.decode_context_ms * context
    growth = cost.decode_context_ms * batch
    return num_steps * first + growth * num_steps * (num_steps - 1) / 2

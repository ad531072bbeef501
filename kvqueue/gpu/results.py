"""The result of one request: what the worker (or simulator) reports, whatever happened."""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any


class RequestStatus(str, Enum):
    COMPLETED = "completed"
    REJECTED = "rejected"  # can never be served by this preset (reason says why)
    FAILED = "failed"  # something went wrong while serving it (reason says what)


@dataclass(frozen=True, slots=True)
class RequestResult:
    """Times are simulated milliseconds; `start_ms`/`finish_ms` are offsets from the run start.

    For rejected and failed requests the latency fields are 0 and `reason` is set.

    `tpot_ms` is the time per output token as vLLM's serving benchmark defines it,
    ``(e2e_ms − ttft_ms) / (decode_tokens − 1)`` (`kvqueue.gpu.latency.tpot_ms`), for every
    engine; None when there is no gap to time (fewer than 2 output tokens; results stored
    before the field existed). `preemptions` counts how often the batched engine preempted it.
    """

    request_id: str
    run_id: str
    worker: str
    strategy: str
    status: RequestStatus
    reason: str = ""
    arrival_ms: float = 0.0
    start_ms: float = 0.0
    finish_ms: float = 0.0
    queue_wait_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    num_prompt_tokens: int = 0
    num_blocks: int = 0
    hit_blocks: int = 0
    decode_tokens: int = 0
    decode_source: str = ""
    evictions: int = 0
    cache_used_blocks: int = 0
    cache_capacity_blocks: int = 0
    tpot_ms: float | None = None
    preemptions: int = 0

    @property
    def hit_tokens(self) -> int:
        return self.hit_blocks * 16

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _FIELD_NAMES}  # all plain values
        data["status"] = self.status.value
        data["hit_tokens"] = self.hit_tokens
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestResult:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["status"] = RequestStatus(values["status"])
        return cls(**values)


_FIELD_NAMES = tuple(f.name for f in fields(RequestResult))

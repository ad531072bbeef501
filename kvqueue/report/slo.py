"""Service-level objectives: a request's TPOT, SLO attainment, goodput, the rate sustained.

Definitions (times in simulated ms):

- **TPOT** (time per output token) of a completed request = (end-to-end − TTFT) / (output
  tokens − 1) when it generated more than one token, else 0 — vLLM's benchmark definition
  (vllm-project/vllm@009e6d4a:vllm/benchmarks/serve.py, ``calculate_metrics``).
- A request **meets the SLO** when it completed with TTFT ≤ ``ttft_ms`` and TPOT ≤
  ``tpot_ms``; a rejected or failed request never does.
- **SLO attainment** = requests meeting the SLO / requests sent (DistServe, Zhong et al.,
  OSDI 2024, §2).
- **Goodput** = requests meeting the SLO per second, over the run's makespan (first
  arrival to last finish of its completed requests) — vLLM's ``request_goodput`` (good
  requests / benchmark duration), after DistServe.
- The **highest rate sustained** (DistServe's "goodput" of a system) is the highest offered
  rate whose attainment is at least the target (90% by default) with every lower rate tested
  meeting it too — and that the cluster can take: a rate above its capacity is never
  sustained, however well a finite run fared (its queue grows without bound). `bounded` says
  whether a higher rate was tested and failed, `limited_by` why ("slo" or "capacity");
  unbounded, the true limit lies above everything tried.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvqueue.errors import ConfigError
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.metrics import latency_stats, makespan_ms, ratio

DEFAULT_ATTAINMENT = 0.9  # DistServe (Zhong et al., OSDI 2024), abstract: "> 90% of requests"


@dataclass(frozen=True, slots=True)
class Slo:
    """Latency objectives of one request and the share of requests that must meet them."""

    ttft_ms: float
    tpot_ms: float
    attainment: float = DEFAULT_ATTAINMENT

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"SLO {name} must be a positive number of ms, got {value!r}")
        if not 0 < self.attainment <= 1:
            raise ConfigError(f"SLO attainment must be in (0, 1], got {self.attainment!r}")

    def describe(self) -> str:
        return (
            f"TTFT ≤ {self.ttft_ms:,.0f} ms and TPOT ≤ {self.tpot_ms:,.1f} ms for at least "
            f"{100 * self.attainment:g}% of requests"
        )

    def to_dict(self) -> dict[str, float]:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "attainment": self.attainment}


def request_tpot_ms(result: RequestResult) -> float:
    """TPOT of one result as vLLM's benchmark defines it (module docstring); 0 if ≤ 1 token."""
    if result.decode_tokens <= 1:
        return 0.0
    return (result.e2e_ms - result.ttft_ms) / (result.decode_tokens - 1)


def meets_slo(result: RequestResult, slo: Slo) -> bool:
    return (
        result.status == RequestStatus.COMPLETED
        and result.ttft_ms <= slo.ttft_ms
        and request_tpot_ms(result) <= slo.tpot_ms
    )


def slo_summary(results: Sequence[RequestResult], slo: Slo) -> dict[str, Any]:
    """``{num_meeting_slo, attainment, goodput_rps, tpot_ms}`` of one run (module docstring).

    `tpot_ms` is {mean, p50, p90, p99} over completed requests. None where nothing is measured.
    """
    done = [r for r in results if r.status == RequestStatus.COMPLETED]
    meeting = sum(meets_slo(r, slo) for r in results)
    span_s = makespan_ms(done) / 1000.0
    return {
        "num_meeting_slo": meeting,
        "attainment": ratio(meeting, len(results)),
        "goodput_rps": ratio(meeting, span_s),
        "tpot_ms": latency_stats([request_tpot_ms(r) for r in done]),
    }


@dataclass(frozen=True, slots=True)
class SustainedRate:
    """The highest rate tested that met the SLO (None if even the lowest failed)."""

    rate_rps: float | None
    limited_by: str | None  # "slo" or "capacity": why the next rate failed; None if none did
    lowest_tested_rps: float
    highest_tested_rps: float

    @property
    def bounded(self) -> bool:
        """A higher rate was tested and failed."""
        return self.limited_by is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rate_rps": self.rate_rps,
            "bounded": self.bounded,
            "limited_by": self.limited_by,
            "lowest_tested_rps": self.lowest_tested_rps,
            "highest_tested_rps": self.highest_tested_rps,
        }


def highest_rate_sustained(
    tested: Iterable[tuple[float, float | None, bool]], target: float
) -> SustainedRate:
    """Walk the tested rates upwards while they are sustained; stop at the first that is not.

    `tested` holds ``(rate, attainment, overloaded)`` in any order; a rate is sustained when
    it is not overloaded and its attainment (None: nothing measured) is ≥ `target`. Raises
    ValueError when `tested` is empty.
    """
    points = sorted(tested)
    if not points:
        raise ValueError("no rates tested")
    best: float | None = None
    low, high = points[0][0], points[-1][0]
    for rate, attainment, overloaded in points:
        if overloaded:
            return SustainedRate(best, "capacity", low, high)
        if attainment is None or attainment < target:
            return SustainedRate(best, "slo", low, high)
        best = rate
    return SustainedRate(best, None, low, high)

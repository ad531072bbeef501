"""Service-level objectives: SLO attainment, goodput, the highest rate sustained.

Definitions (times in simulated ms):

- **TPOT** (time per output token) is the engines' own, `RequestResult.tpot_ms`: (end-to-end
  − TTFT) / (output tokens − 1), vLLM's benchmark definition (`kvqueue.gpu.latency.tpot_ms`).
- A request **meets the SLO** when it completed with TTFT ≤ ``ttft_ms`` and TPOT ≤
  ``tpot_ms``; a request without a TPOT (a one-token answer) meets the TPOT part, as in
  vLLM's goodput, which counts its TPOT as 0. A rejected or failed request never meets it.
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
from kvqueue.report.metrics import makespan_ms, ratio

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


def meets_slo(result: RequestResult, slo: Slo) -> bool:
    return (
        result.status == RequestStatus.COMPLETED
        and result.ttft_ms <= slo.ttft_ms
        and (result.tpot_ms is None or result.tpot_ms <= slo.tpot_ms)
    )


def slo_summary(results: Sequence[RequestResult], slo: Slo) -> dict[str, Any]:
    """``{num_meeting_slo, attainment, goodput_rps}`` of one run (module docstring); None
    where nothing is measured."""
    done = [r for r in results if r.status == RequestStatus.COMPLETED]
    meeting = sum(meets_slo(r, slo) for r in results)
    span_s = makespan_ms(done) / 1000.0
    return {
        "num_meeting_slo": meeting,
        "attainment": ratio(meeting, len(results)),
        "goodput_rps": ratio(meeting, span_s),
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

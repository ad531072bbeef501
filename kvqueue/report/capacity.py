"""What rate a cluster can take, and whether a run offered more: the overload verdict.

Two capacity figures, both in completed requests per second of simulated time:

- **measured** (`saturated_throughput_rps`): the throughput of a run whose requests all
  arrive at once, so every worker has work until the backlog drains. The best figure, for
  any engine; `kvqueue sweep` measures it per policy and cluster size.
- **estimated** (`capacity_from_busy_time`): from any run's own results, ``n ×
  completed / busy seconds``, where a worker is busy while at least one request is in
  service on it. It equals ``throughput / utilization``: a run that keeps up with its
  arrivals has utilization < 1, so the estimate is above the rate it was offered; a run that
  falls behind keeps its workers busy (utilization → 1) and the estimate falls to the
  throughput, below the offered rate. For the sequential engine (one request at a time) busy
  time is the sum of service times, so the estimate is exactly ``workers / mean service
  time`` at the hit rate the run achieved — and ``workers / mean cold service time`` (no
  hits) is its lower bound. For a batching engine it is a lower bound that tightens as load
  grows: a lone request occupies its GPU for its whole service time, though it could have
  shared it. Both assume the load spread evenly over the workers; a policy that piles work
  onto a few can queue on them below this rate.

A run is **overloaded** when its offered rate exceeds the capacity, or when it is a burst
(every request at once, more requests than workers): then queueing, not caching, decides its
latencies, and `LoadVerdict.line` says so in one line with the rate the cluster can take.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.units import format_count, format_rate

MEASURED = "measured"  # throughput of a saturating run
ESTIMATED = "estimated"  # n × completed / busy time of the run itself


def busy_ms(results: Iterable[RequestResult]) -> dict[str, float]:
    """Per worker, the length of the union of its completed requests' [start, finish] spans."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        if r.status == RequestStatus.COMPLETED and r.worker:
            spans.setdefault(r.worker, []).append((r.start_ms, r.finish_ms))
    busy: dict[str, float] = {}
    for worker, intervals in spans.items():
        intervals.sort()
        total = 0.0
        start, end = intervals[0]
        for lo, hi in intervals[1:]:
            if lo > end:
                total += end - start
                start, end = lo, hi
            else:
                end = max(end, hi)
        busy[worker] = total + (end - start)
    return busy


def capacity_from_busy_time(
    num_completed: int, total_busy_ms: float, num_workers: int
) -> float | None:
    """``num_workers × num_completed / busy seconds``: requests/s with every worker always busy.

    See the module docstring for why this works for any engine (exact for the sequential
    one, a lower bound for a batching one). None when nothing completed or nothing was busy.
    """
    if num_completed <= 0 or total_busy_ms <= 0 or num_workers <= 0:
        return None
    return num_workers * num_completed * 1000.0 / total_busy_ms


def run_capacity_rps(results: Sequence[RequestResult], num_workers: int) -> float | None:
    """`capacity_from_busy_time` of one run's results."""
    busy = busy_ms(results)
    num_completed = sum(r.status == RequestStatus.COMPLETED for r in results)
    return capacity_from_busy_time(num_completed, sum(busy.values()), num_workers)


def saturated_throughput_rps(results: Sequence[RequestResult]) -> float | None:
    """Completed requests per second from the first arrival to the last finish.

    The cluster's measured capacity when `results` come from a run whose requests all
    arrived at once (a saturating run); None when nothing completed or no time passed.
    """
    done = [r for r in results if r.status == RequestStatus.COMPLETED]
    if not done:
        return None
    span_ms = max(r.finish_ms for r in done) - min(r.arrival_ms for r in done)
    return len(done) * 1000.0 / span_ms if span_ms > 0 else None


def offered_rate_rps(arrivals_ms: Sequence[float], nominal_rps: float | None = None) -> float:
    """The rate a run offered: `nominal_rps` when known (Poisson arrivals), else
    ``(n − 1) / (last − first arrival)``; ``math.inf`` when every request arrives at once
    (two or more), 0 for fewer than two requests."""
    if nominal_rps is not None:
        return nominal_rps
    if len(arrivals_ms) < 2:
        return 0.0
    span_ms = max(arrivals_ms) - min(arrivals_ms)
    return math.inf if span_ms <= 0 else (len(arrivals_ms) - 1) * 1000.0 / span_ms


@dataclass(frozen=True, slots=True)
class LoadVerdict:
    """Offered rate against capacity. `offered_rps` is ``math.inf`` for a burst."""

    offered_rps: float
    capacity_rps: float | None
    basis: str  # MEASURED or ESTIMATED
    num_requests: int
    num_workers: int

    @property
    def burst(self) -> bool:
        return math.isinf(self.offered_rps)

    @property
    def load(self) -> float | None:
        """Offered rate / capacity; None for a burst or an unknown capacity."""
        if self.burst or not self.capacity_rps:
            return None
        return self.offered_rps / self.capacity_rps

    @property
    def overloaded(self) -> bool:
        if self.burst:
            return self.num_requests > self.num_workers
        return self.capacity_rps is not None and self.offered_rps > self.capacity_rps

    def line(self) -> str:
        """One sentence: what was offered, that queueing dominates, what the cluster takes."""
        takes = f"about {format_rate(self.capacity_rps)} req/s" if self.capacity_rps else None
        return _overload_sentence(self.offered_rps, self.num_requests, takes, self.basis)

    def to_dict(self) -> dict[str, Any]:
        return {
            "offered_rps": None if self.burst else self.offered_rps,
            "burst": self.burst,
            "capacity_rps": self.capacity_rps,
            "capacity_basis": self.basis,
            "load": self.load,
            "overloaded": self.overloaded,
        }


def overload_line(verdicts: Sequence[LoadVerdict]) -> str | None:
    """One line for a table whose rows share an offered rate; None if no row is overloaded.

    With several overloaded rows of different capacities, the capacity is their range.
    """
    over = [v for v in verdicts if v.overloaded]
    if not over:
        return None
    capacities = sorted(v.capacity_rps for v in over if v.capacity_rps)
    if len(capacities) < 2 or capacities[0] == capacities[-1]:
        return over[0].line()
    takes = (
        f"about {format_rate(capacities[0])}–{format_rate(capacities[-1])} req/s depending on "
        "the strategy"
    )
    return _overload_sentence(over[0].offered_rps, over[0].num_requests, takes, over[0].basis)


def _overload_sentence(offered_rps: float, num_requests: int, takes: str | None, basis: str) -> str:
    """The overload line; `takes` is what the cluster can take (``"about 7.1 req/s"``), by
    `basis` (measured or estimated)."""
    takes = f"{takes}, {basis}" if takes else "an unknown rate"
    if math.isinf(offered_rps):
        return (
            f"overload: all {format_count(num_requests)} requests arrive at once, so queueing, "
            f"not caching, dominates these latencies; the cluster can take {takes} — give "
            "--rate below that to measure latency under load"
        )
    return (
        f"overload: {format_rate(offered_rps)} req/s offered, more than the cluster can take "
        f"({takes}): queueing, not caching, dominates these latencies"
    )

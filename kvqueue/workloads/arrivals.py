"""Arrival processes: when each request of a workload reaches the producer.

Three processes, all returning offsets in simulated milliseconds from the start of the run:

- ``asap``: every request at 0 (as fast as possible; list order is dispatch order);
- ``poisson``: exponential gaps at `rate_rps` requests per second, first request at 0, drawn
  from a `random.Random` the caller seeds — the same seed gives the same times for every
  strategy, and the times do not depend on the requests' contents;
- ``trace``: the requests' own `arrival_ms` (trace timestamps).

`arrival_scale` multiplies every offset, hence every inter-arrival gap: 2.0 spreads the load
over twice the time (half the rate), 0.5 compresses it, 0 collapses it to ``asap``.
Times are non-decreasing in list order for ``asap`` and ``poisson``; ``trace`` keeps the file's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import replace

from kvqueue.gpu.request import Request

ARRIVAL_PROCESSES = ("asap", "poisson", "trace")


def asap_times(num_requests: int) -> list[float]:
    """All zeros: every request is ready at the start."""
    return [0.0] * num_requests


def poisson_times(num_requests: int, rate_rps: float, rng: random.Random) -> list[float]:
    """Cumulative exponential gaps of mean ``1000 / rate_rps`` ms; the first arrival is at 0."""
    if not (math.isfinite(rate_rps) and rate_rps > 0):
        raise ValueError(f"rate_rps must be a positive number, got {rate_rps!r}")
    times: list[float] = []
    now = 0.0
    for index in range(num_requests):
        if index:
            now += rng.expovariate(rate_rps) * 1000.0
        times.append(now)
    return times


def scale_times(times: Sequence[float], arrival_scale: float) -> list[float]:
    """Every offset (hence every gap) multiplied by `arrival_scale` (finite, >= 0)."""
    if not (math.isfinite(arrival_scale) and arrival_scale >= 0):
        raise ValueError(f"arrival_scale must be a finite number >= 0, got {arrival_scale!r}")
    return [t * arrival_scale for t in times]


def arrival_times(
    requests: Sequence[Request],
    process: str = "asap",
    rate_rps: float | None = None,
    rng: random.Random | None = None,
) -> list[float]:
    """Unscaled arrival offsets for `requests` under `process` (see the module docstring)."""
    if process == "asap":
        return asap_times(len(requests))
    if process == "poisson":
        if rate_rps is None:
            raise ValueError("the poisson arrival process needs rate_rps")
        return poisson_times(len(requests), rate_rps, rng or random.Random(0))
    if process == "trace":
        return [r.arrival_ms for r in requests]
    raise ValueError(f"unknown arrival process {process!r}; valid: {', '.join(ARRIVAL_PROCESSES)}")


def retime(
    requests: Sequence[Request],
    process: str = "asap",
    rate_rps: float | None = None,
    seed: int = 0,
    arrival_scale: float = 1.0,
) -> list[Request]:
    """New requests (``dataclasses.replace``) with arrival times from `process`, scaled.

    The input is not modified; order and every other field are kept. ``poisson`` draws from
    ``random.Random(seed)``.
    """
    times = arrival_times(requests, process, rate_rps, random.Random(seed))
    scaled = scale_times(times, arrival_scale)
    return [replace(r, arrival_ms=t) for r, t in zip(requests, scaled, strict=True)]

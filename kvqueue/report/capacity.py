"""What rate a cluster can take, and whether a run offered more: the overload verdict.

Three capacity figures, all in completed requests per second of simulated time:

- **measured** (`saturate`, any engine; the one a batching engine has): the throughput of a
  *saturating burst* — the workload's requests all arriving at once, under the policy being
  measured (`saturated_throughput_rps`: completed / (last finish − first arrival)). A burst
  saturates a GPU only if it queues many times what the GPU runs at once: a batching engine
  runs dozens to hundreds of requests together, so a small workload sent once leaves it
  half idle and understates its capacity by a third or more. `saturate` therefore repeats
  the workload (`kvqueue.workloads.rekey.repeated`: each copy re-keyed, so copies share no
  block and each keeps the workload's own sharing) until the burst is `SATURATION_DEPTH`
  batches deep per GPU — depth = requests per worker / mean batch size of the run — which
  keeps the ramp-up and drain at its ends to a few percent of the makespan; a burst that
  reaches `MAX_BURST_REQUESTS` first is reported as not saturated (its figure is then a
  lower bound). `kvqueue sweep` measures this per policy and cluster size for every engine,
  `kvqueue simulate` for the batched engine when the run itself does not settle the verdict
  (below).
- **estimated** (`capacity_from_busy_time`, the sequential engine's): from a run's own
  results, ``n × completed / busy seconds``, a worker being busy while a request is in
  service on it. One request at a time, busy time is the sum of service times, so this is
  exactly ``workers / mean service time`` at the hit rate the run achieved, with no extra
  run (``workers / mean cold service time``, no hits, is its lower bound). It equals
  ``throughput / utilization``: a run that keeps up has utilization < 1, so the estimate is
  above the rate offered; one that falls behind keeps its workers busy and the estimate falls
  to its throughput, below the offered rate. For a batching engine busy time does not give
  the capacity (one lone request keeps a GPU "busy" that could take dozens more), so a
  batched run has no estimate (`run_capacity_rps`), only a measurement.
- **bounded** (`settle_from_run`, a batching engine's run): the same ``n × completed / busy
  seconds`` is a *lower bound* on a batching GPU's capacity — while busy it completed that
  many requests per second, and more requests at once only add to a step's batch. When the
  rate a run offered is below that bound, the run is not overloaded, whatever the capacity
  above it: `kvqueue simulate` then records the bound (its load figure is an upper bound on
  the true load) and runs no saturating burst for that strategy. Only a run the bound does
  not clear — offered at or above it, or a burst — is measured, and a burst's own run is
  the measurement's first try (`saturate`'s `first`), not simulated again.

All assume the load spread evenly over the workers; a policy that piles work onto a few
can queue on them below this rate. (The bound is a lower bound for the workload as the run
served it: a heavier load that evicts more of what the run hit could complete fewer.)

A run is **overloaded** when its offered rate exceeds the capacity, or when it is a burst
(every request at once) of more requests than the workers run at once — one each on the
sequential engine, the mean batch of its saturating burst on a batching engine: then
queueing, not caching, decides its latencies, and `LoadVerdict.line` says so in one line with
the rate the cluster can take.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvqueue.gpu.engine_stats import EngineStats
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.units import format_count, format_rate
from kvqueue.sim.simulation import SimulationRun
from kvqueue.workloads.arrivals import retime
from kvqueue.workloads.rekey import repeated

MEASURED = "measured"  # throughput of a saturating burst
ESTIMATED = "estimated"  # n × completed / busy time of the run itself (sequential engine)
BOUNDED = "bounded"  # at least n × completed / busy time of a batching run (a lower bound)
# Batches queued per GPU in a saturating burst (kvqueue's choice): the ramp-up and drain at
# its ends cost about a batch's lifetime, and a policy that piles a burst onto a few GPUs
# drains unevenly. From this depth on a burst twice as deep measures within 5%
# (tests/test_capacity.py checks round robin on shared-prefix-small); at depth 6 a burst of
# cache_aware on shared-prefix-medium still measured well above deeper ones.
SATURATION_DEPTH = 10.0
MAX_BURST_REQUESTS = 65_536  # a burst stops growing here, saturated or not
MAX_GROWTH = 8  # a burst grows at most this many times over from one try to the next

BurstRunner = Callable[[list[Request], list[str]], dict[str, SimulationRun]]


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


def run_capacity_rps(
    results: Sequence[RequestResult], num_workers: int, engine: str = "sequential"
) -> float | None:
    """`capacity_from_busy_time` of one run's results on the sequential engine; None on a
    batching engine, whose capacity must be measured (module docstring)."""
    if engine != "sequential":
        return None
    busy = busy_ms(results)
    num_completed = sum(r.status == RequestStatus.COMPLETED for r in results)
    return capacity_from_busy_time(num_completed, sum(busy.values()), num_workers)


def busy_time_bound_rps(results: Sequence[RequestResult], num_workers: int) -> float | None:
    """`capacity_from_busy_time` of one run's results on any engine: for a batching engine a
    lower bound on its capacity (module docstring). None when nothing completed."""
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


def mean_batch_size(stats: Iterable[EngineStats]) -> float:
    """Requests per forward pass over every worker's steps (1 when none was recorded)."""
    stats = list(stats)
    steps = sum(s.num_steps for s in stats)
    return sum(s.num_scheduled for s in stats) / steps if steps else 1.0


@dataclass(frozen=True, slots=True)
class Saturation:
    """One policy's saturating burst: `copies` of the workload at once, and its run."""

    run: SimulationRun
    copies: int
    num_workers: int

    @property
    def capacity_rps(self) -> float | None:
        return saturated_throughput_rps(self.run.results)

    @property
    def num_requests(self) -> int:
        return len(self.run.results)

    @property
    def depth(self) -> float:
        """Batches queued per GPU: requests per worker / mean batch size."""
        batch = mean_batch_size(self.run.engine_stats.values())
        return self.num_requests / self.num_workers / batch

    @property
    def saturated(self) -> bool:
        return self.depth >= SATURATION_DEPTH

    def verdict(self, offered_rps: float, num_requests: int, num_workers: int) -> LoadVerdict:
        """A run offering `offered_rps` against this measured capacity; a GPU runs the
        burst's mean batch at once."""
        batch = mean_batch_size(self.run.engine_stats.values())
        return LoadVerdict(
            offered_rps, self.capacity_rps, MEASURED, num_requests, num_workers, batch
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "capacity_rps": self.capacity_rps,
            "basis": MEASURED,
            "copies": self.copies,
            "num_requests": self.num_requests,
            "depth": self.depth,
            "saturated": self.saturated,
        }


@dataclass(frozen=True, slots=True)
class RunBound:
    """A batching run that settles its own verdict: the cluster takes at least
    `capacity_rps` (its busy-time bound), more than the run offered (`settle_from_run`)."""

    capacity_rps: float

    def verdict(self, offered_rps: float, num_requests: int, num_workers: int) -> LoadVerdict:
        return LoadVerdict(offered_rps, self.capacity_rps, BOUNDED, num_requests, num_workers)

    def to_dict(self) -> dict[str, Any]:
        return {"capacity_rps": self.capacity_rps, "basis": BOUNDED, "saturated": False}


Capacity = Saturation | RunBound


def settle_from_run(
    results: Sequence[RequestResult], num_workers: int, offered_rps: float
) -> RunBound | None:
    """The run's busy-time bound when the rate it offered is below it (then it is not
    overloaded, module docstring); None when the bound does not settle that — a burst, an
    offered rate at or above the bound, or nothing completed."""
    if math.isinf(offered_rps):
        return None
    bound = busy_time_bound_rps(results, num_workers)
    return RunBound(bound) if bound is not None and offered_rps < bound else None


def saturate(
    requests: Sequence[Request],
    strategies: Sequence[str],
    num_workers: int,
    run_burst: BurstRunner,
    first: Mapping[str, SimulationRun] | None = None,
) -> dict[str, Saturation]:
    """Each strategy's saturating burst (module docstring), grown until it is deep enough.

    ``run_burst(burst, strategies)`` simulates the burst (every request arriving at 0) under
    each strategy on fresh workers and returns their runs. The first try sends the workload
    once; a shallow burst is sent again with ``copies × ⌈SATURATION_DEPTH / depth⌉`` copies
    (at most `MAX_GROWTH` times more), only for the strategies that still need it, until it
    is deep enough, completes nothing, or would exceed `MAX_BURST_REQUESTS`. `first` holds
    runs of that first try already made (of a workload that is itself a burst, every arrival
    at 0, with the same options), used instead of simulating it again.
    """
    if not requests:
        raise ValueError("no requests to saturate the cluster with")
    found: dict[str, Saturation] = {}
    pending = list(strategies)
    copies = 1
    while pending:
        burst = retime(repeated(requests, copies), "asap")
        done = dict(first or {}) if copies == 1 else {}
        missing = [name for name in pending if name not in done]
        runs = {**done, **(run_burst(burst, missing) if missing else {})}
        tried = {name: Saturation(runs[name], copies, num_workers) for name in pending}
        shallowest = min(s.depth for s in tried.values())
        growth = min(MAX_GROWTH, max(2, math.ceil(SATURATION_DEPTH / shallowest)))
        last_try = len(requests) * copies * growth > MAX_BURST_REQUESTS
        for name, saturation in tried.items():
            if saturation.saturated or saturation.capacity_rps is None or last_try:
                found[name] = saturation
        pending = [name for name in pending if name not in found]
        copies *= growth
    return {name: found[name] for name in strategies}


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
    """Offered rate against capacity. `offered_rps` is ``math.inf`` for a burst;
    `concurrency` is how many requests a worker serves at once (module docstring)."""

    offered_rps: float
    capacity_rps: float | None
    basis: str  # MEASURED or ESTIMATED
    num_requests: int
    num_workers: int
    concurrency: float = 1.0

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
            return self.num_requests > self.num_workers * self.concurrency
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
            "concurrency": self.concurrency,
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

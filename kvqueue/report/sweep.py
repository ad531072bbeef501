"""A capacity and SLO sweep: policies × cluster sizes × offered rates, in virtual time.

The question it answers: which routing policy serves the most traffic within the SLO on this
workload, model, GPU and engine, and how many GPUs does each need for a target rate.

Steps (`run_sweep`):

1. **Capacity.** One saturating cell per policy and cluster size: the workload at once,
   repeated until every GPU has many batches queued (`kvqueue.report.capacity.saturate`);
   its throughput is the cluster's *measured* capacity under that policy, on whichever
   engine the sweep runs — a batching engine's capacity depends on how many requests fit
   its KV cache together, so on how much they share.
2. **Rates.** The rates given, or by default `DEFAULT_RATE_FRACTIONS` of the highest
   capacity measured at that cluster size (2 significant digits): from light load to half
   again beyond what the best policy can take, so every policy's limit falls inside.
   With a target rate, a cell at that rate is added for every policy and cluster size.
3. **Cells.** Every policy × cluster size × rate (`kvqueue.report.sweep_cell`), run by a
   `CellRunner`: local processes, or RQ jobs for ``rq worker kvq-sim`` processes.
4. **Answers** (`sweep_result`): each cell marked overloaded when its rate exceeds the
   measured capacity; the highest rate each policy sustains at each cluster size (SLO
   attainment ≥ the target, below the measured capacity: `kvqueue.report.slo`); with a
   target rate, the fewest GPUs of those tested with which each policy meets the SLO at it;
   and a recommendation in plain words (`kvqueue.report.recommend`).

**Default SLO** (when ``--slo-ttft`` / ``--slo-tpot`` are not given), sized to the workload:
`idle_latencies` serves a sample of its requests each alone on an idle GPU of the chosen
engine; the TTFT objective is `SLO_TTFT_IDLE_MULTIPLE` × the p90 of those TTFTs (a request
may wait for a few prefills of its own size), the TPOT objective `SLO_TPOT_IDLE_MULTIPLE` ×
their p90 TPOT (decoding may slow to half speed under load), both rounded up to 2
significant digits. These multiples are kvqueue's defaults, not figures from the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from kvqueue.errors import ConfigError
from kvqueue.gpu.oracle import DecodeLengthOracle
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestStatus
from kvqueue.report.capacity import MEASURED, LoadVerdict
from kvqueue.report.metrics import ideal_hit_rate
from kvqueue.report.recommend import recommendation
from kvqueue.report.slo import Slo, highest_rate_sustained
from kvqueue.report.sweep_cell import simulate_with
from kvqueue.report.sweep_spec import Cell, SweepSpec

DEFAULT_SWEEP_STRATEGIES = ("round_robin", "cache_aware", "predictive")
DEFAULT_WORKERS = 4
DEFAULT_TARGET_WORKERS = (1, 2, 3, 4, 6, 8, 12, 16)  # cluster sizes tried for --target-rate
DEFAULT_RATE_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
# Capacity planning on a one-request-at-a-time GPU would understate what a batching engine
# serves, so a sweep runs the batched engine with the preset's calibrated latencies unless
# told otherwise (flags or KVQ_ENGINE / KVQ_LATENCY). Keys are `kvqueue.config.Settings` fields.
SWEEP_ENGINE_DEFAULTS = {"engine": "batched", "latency_profile": "calibrated"}
SLO_TTFT_IDLE_MULTIPLE = 5.0
SLO_TPOT_IDLE_MULTIPLE = 2.0
IDLE_SAMPLE = 64

CellProgress = Callable[[int], None]
ProgressFactory = Callable[[str, int], AbstractContextManager[CellProgress]]


class CellRunner(Protocol):
    """Runs cells somewhere and returns their records in the order given."""

    def describe(self) -> str: ...

    def run(
        self, cells: Sequence[Cell], progress: CellProgress | None = None
    ) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class SweepPlan:
    """What to sweep: `rates` at each of `workers` (None: derived from the measured capacity,
    module docstring), and with `target_rate` that rate at each of `target_workers` too."""

    strategies: tuple[str, ...]
    workers: tuple[int, ...]
    rates: tuple[float, ...] | None = None
    target_rate: float | None = None
    target_workers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.strategies:
            raise ConfigError("no strategies to sweep")
        for counts in (self.workers, self.target_workers):
            if any(w < 1 for w in counts):
                raise ConfigError(f"worker counts must be >= 1, got {list(counts)}")
        if not self.workers:
            raise ConfigError("no worker counts to sweep")
        for name, values in (("worker counts", self.workers), ("rates", self.rates or ())):
            repeated = sorted({v for v in values if list(values).count(v) > 1})
            if repeated:
                raise ConfigError(f"{name} given more than once: {repeated}")
        given = [*(self.rates or ()), *([] if self.target_rate is None else [self.target_rate])]
        for rate in given:
            if not (math.isfinite(rate) and rate > 0):
                raise ConfigError(f"rates must be positive numbers of requests/s, got {rate!r}")

    @property
    def all_workers(self) -> tuple[int, ...]:
        """Every cluster size the sweep runs, ascending."""
        targets = self.target_workers if self.target_rate is not None else ()
        return tuple(sorted({*self.workers, *targets}))


def round_significant(value: float, digits: int = 2, up: bool = False) -> float:
    """`value` to `digits` significant digits (rounded up with `up`)."""
    if value <= 0 or not math.isfinite(value):
        return value
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    scaled = value * scale
    return (math.ceil(scaled - 1e-9) if up else round(scaled)) / scale


# -- default SLO ------------------------------------------------------------------------------
def idle_latencies(
    spec: SweepSpec,
    requests: Sequence[Request],
    strategy: str,
    oracle: DecodeLengthOracle | None = None,
    sample: int = IDLE_SAMPLE,
) -> tuple[list[float], list[float]]:
    """TTFT and TPOT (ms) of up to `sample` requests, evenly spread over the workload, each
    served alone on one idle GPU of the spec's engine. Rejected requests are left out, and a
    one-token answer has no TPOT (`kvqueue.gpu.latency.tpot_ms`)."""
    step = max(1, len(requests) // sample)
    ttfts: list[float] = []
    tpots: list[float] = []
    for request in list(requests)[::step][:sample]:
        alone = [replace(request, arrival_ms=0.0)]
        (result,) = simulate_with(spec, alone, strategy, 1, oracle).results
        if result.status == RequestStatus.COMPLETED:
            ttfts.append(result.ttft_ms)
            if result.tpot_ms is not None:
                tpots.append(result.tpot_ms)
    return ttfts, tpots


def default_slo(
    idle_ttft_ms: Sequence[float],
    idle_tpot_ms: Sequence[float],
    attainment: float,
    ttft_ms: float | None = None,
    tpot_ms: float | None = None,
) -> Slo:
    """The SLO with `ttft_ms`/`tpot_ms` where given, else sized from idle latencies."""

    def sized(given: float | None, idle: Sequence[float], multiple: float, name: str) -> float:
        if given is not None:
            return given
        if not idle:
            raise ConfigError(
                f"no request of the workload completes on an idle GPU, so no default {name} "
                f"SLO: give --slo-{name}"
            )
        p90 = float(np.percentile(np.asarray(idle, dtype=float), 90))
        return max(round_significant(multiple * p90, up=True), 1.0)

    return Slo(
        sized(ttft_ms, idle_ttft_ms, SLO_TTFT_IDLE_MULTIPLE, "ttft"),
        sized(tpot_ms, idle_tpot_ms, SLO_TPOT_IDLE_MULTIPLE, "tpot"),
        attainment,
    )


# -- the plan --------------------------------------------------------------------------------
def default_rates(capacity_rps: float) -> tuple[float, ...]:
    """`DEFAULT_RATE_FRACTIONS` of `capacity_rps`, 2 significant digits, distinct, ascending."""
    rates = {round_significant(f * capacity_rps) for f in DEFAULT_RATE_FRACTIONS}
    return tuple(sorted(r for r in rates if r > 0))


def saturating_cells(plan: SweepPlan) -> list[Cell]:
    return [Cell(s, w, None) for w in plan.all_workers for s in plan.strategies]


def rate_cells(plan: SweepPlan, rates_by_workers: dict[int, tuple[float, ...]]) -> list[Cell]:
    """Each strategy at each rate (and the target rate) on each of `workers`, then each at the
    target rate on the other `target_workers`; by workers, strategy, rate."""
    cells = []
    for workers in plan.all_workers:
        rates = set(rates_by_workers.get(workers, ()))
        if plan.target_rate is not None:
            rates.add(plan.target_rate)
        cells += [Cell(s, workers, r) for s in plan.strategies for r in sorted(rates)]
    return cells


def measured_capacity(records: Sequence[dict[str, Any]]) -> dict[tuple[str, int], float | None]:
    """{(strategy, workers): throughput of its saturating cell}."""
    return {(r["strategy"], r["num_workers"]): r["throughput_rps"] for r in records}


def rates_for(
    plan: SweepPlan, capacity: dict[tuple[str, int], float | None]
) -> dict[int, tuple[float, ...]]:
    rates: dict[int, tuple[float, ...]] = {}
    for workers in plan.workers:
        if plan.rates:
            rates[workers] = tuple(sorted(set(plan.rates)))
            continue
        best = max((capacity[(s, workers)] or 0.0) for s in plan.strategies)
        if best <= 0:
            raise ConfigError(
                f"no request completed on {workers} GPUs, so no default rates: give --rates"
            )
        rates[workers] = default_rates(best)
    return rates


# -- running it --------------------------------------------------------------------------------
def run_sweep(
    spec: SweepSpec,
    requests: Sequence[Request],
    plan: SweepPlan,
    runner: CellRunner,
    meta: dict[str, Any] | None = None,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Run the sweep (module docstring) and return `sweep_result`.

    `progress(label, total)` is entered around each step; it yields a callback told of each
    finished cell.
    """

    def run(label: str, cells: Sequence[Cell]) -> list[dict[str, Any]]:
        if progress is None:
            return runner.run(cells)
        with progress(label, len(cells)) as advance:
            return runner.run(cells, advance)

    saturating = run("capacity", saturating_cells(plan))
    capacity = measured_capacity(saturating)
    records = run("sweep", rate_cells(plan, rates_for(plan, capacity)))
    info = {
        "ideal_hit_rate": ideal_hit_rate(requests),
        "execution": runner.describe(),
        **(meta or {}),
    }
    return sweep_result(spec, plan, saturating, records, info)


def sweep_result(
    spec: SweepSpec,
    plan: SweepPlan,
    saturating: Sequence[dict[str, Any]],
    records: Sequence[dict[str, Any]],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """The sweep's answers from its cell records: a pure function of them.

    Shape: ``{"kind": "sweep", "meta", "capacity": [...], "cells": [...], "sustained": [...],
    "fewest_gpus": {...} | None, "recommendation": [lines]}``. The highest rate sustained is
    given for each of `plan.workers` only (the other sizes ran the target rate alone).
    """
    slo = spec.slo
    if slo is None:
        raise ValueError("a sweep result needs the spec's SLO")
    capacity = measured_capacity(saturating)
    cells = [_with_verdict(r, capacity) for r in records]
    sustained = []
    for workers in plan.workers:
        for strategy in plan.strategies:
            own = [c for c in cells if c["strategy"] == strategy and c["num_workers"] == workers]
            rate = highest_rate_sustained(
                ((c["rate_rps"], c["attainment"], c["overloaded"]) for c in own), slo.attainment
            )
            sustained.append({"strategy": strategy, "num_workers": workers, **rate.to_dict()})
    result = {
        "kind": "sweep",
        "meta": {
            **meta,
            **spec.engine.describe(spec.gpu_preset()),
            "preset": spec.preset,
            "num_blocks": spec.gpu_preset().num_blocks,
            "max_context_tokens": spec.gpu_preset().max_context_tokens,
            "latency": dict(spec.latency),
            "slo": slo.to_dict(),
            "strategies": list(plan.strategies),
            "workers": list(plan.workers),
            "rates_by_workers": _rates_by_workers(cells),
            "target_rate_rps": plan.target_rate,
            "target_workers": list(plan.all_workers) if plan.target_rate is not None else [],
        },
        "capacity": [_capacity_row(r) for r in saturating],
        "cells": cells,
        "sustained": sustained,
        "fewest_gpus": _fewest_gpus(plan, cells, slo.attainment),
    }
    result["recommendation"] = recommendation(result)
    return result


def _with_verdict(
    record: dict[str, Any], capacity: dict[tuple[str, int], float | None]
) -> dict[str, Any]:
    verdict = LoadVerdict(
        offered_rps=record["rate_rps"],
        capacity_rps=capacity.get((record["strategy"], record["num_workers"])),
        basis=MEASURED,
        num_requests=record["num_requests"],
        num_workers=record["num_workers"],
    )
    return {
        **record,
        "capacity_rps": verdict.capacity_rps,
        "load": verdict.load,
        "overloaded": verdict.overloaded,
    }


def _rates_by_workers(cells: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    rates: dict[str, set[float]] = {}
    for c in cells:
        rates.setdefault(str(c["num_workers"]), set()).add(c["rate_rps"])
    return {w: sorted(r) for w, r in rates.items()}


def _capacity_row(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "strategy": record["strategy"],
        "num_workers": record["num_workers"],
        "measured_rps": record["throughput_rps"],
        "hit_rate": record["hit_rate"],
        "completed": record["completed"],
        "num_requests": record["num_requests"],
        "copies": record["saturation"]["copies"],
        "depth": record["saturation"]["depth"],
        "saturated": record["saturation"]["saturated"],
        "mean_batch_size": record["mean_batch_size"],
        "preemptions": record["preemptions"],
    }


def _fewest_gpus(
    plan: SweepPlan, cells: Sequence[dict[str, Any]], attainment: float
) -> dict[str, Any] | None:
    if plan.target_rate is None:
        return None
    by_strategy: dict[str, int | None] = {}
    for strategy in plan.strategies:
        meeting = [
            c["num_workers"]
            for c in cells
            if c["strategy"] == strategy
            and c["rate_rps"] == plan.target_rate
            and c["attainment"] is not None
            and c["attainment"] >= attainment
        ]
        by_strategy[strategy] = min(meeting) if meeting else None
    return {
        "target_rate_rps": plan.target_rate,
        "workers_tested": list(plan.all_workers),
        "by_strategy": by_strategy,
    }

"""The evaluation suite: its fixed workloads, and the arrival rate that sets each one's load.

    kvqueue evaluate --out docs/policies.md      # or: python analysis/policies.py --out ...

writes ``docs/policies.md`` (one table per workload) and its figures
(``docs/policies*_p99_vs_hit.png``); without ``--out`` the report goes to a run directory
(``runs/evaluate-<time>/``).

**Engines.** The suite runs once per engine model of `EVALUATED_ENGINES`: the sequential
engine with the seed's latency constants (the default everywhere) and the batched engine with
the calibrated per-preset step model.

**Policies.** Every registered policy on the index its upstream reads by default, plus the
other index for the policies whose upstream runs both (`INDEX_VARIANTS`: Dynamo's
``--no-kv-events``, llm-d's approximate prefix producer, SGLang's event-driven mode).

**Loads.** Every workload with shared prefixes at 50%, 80% and 110% of the engine's cold
capacity (`LOADS`); the two without sharing, controls, at 80%.

**Arrival rates.** A workload's load is set against the capacity of a cluster that caches
nothing, so "110%" overloads it and cache hits are headroom a policy earns. For the
sequential engine capacity follows from the *cold* mean service time — every block computed,
nothing hit — with each request's declared output length (all suite workloads declare one):

    S_cold = mean over requests of (prefill_base + prefill_per_block × num_blocks
                                    + decode_per_token × max_tokens)
    capacity = num_workers / S_cold          (requests per second; one request at a time)
    rate     = utilization × capacity

A batched engine has no service time of its own (a request's time depends on what shares its
steps), so its capacity is *measured*: the workload's requests, each one's block hashes made
private so that nothing is shared, all arrive at once on the cluster under round robin, and
capacity = completed requests / makespan (`saturation_rps`).
Synthetic workloads get Poisson arrivals at that rate (seeded); traces keep their own arrival
pattern, stretched by ``arrival_scale = natural rate / rate`` (natural rate = (n − 1) / span).

**Determinism.** Every workload is built from fixed seeds, every policy runs on fresh caches
and router state, so a rerun writes the same numbers. Runs are spread over `jobs` processes.

The markdown keeps whatever stands between the discussion markers of an existing file, so a
written analysis survives regeneration; everything else is generated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.oracle import FallbackOracle
from kvqueue.gpu.presets import DEFAULT_PRESET, get_preset
from kvqueue.gpu.profiles import SequentialStepPricing
from kvqueue.gpu.request import Request
from kvqueue.report.capacity import saturated_throughput_rps
from kvqueue.sim.simulation import simulate
from kvqueue.workloads.arrivals import retime
from kvqueue.workloads.rekey import isolated
from kvqueue.workloads.synthetic import make_workload
from kvqueue.workloads.traces import read_azure, read_mooncake

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
MOONCAKE_FILE = "mooncake_fast25_synthetic_trace.jsonl"
AZURE_FILE = "azure2023_AzureLLMInferenceTrace_conv.csv"
FIGURE_SUFFIX = "_p99_vs_hit.png"
COMMAND = "kvqueue evaluate --out docs/policies.md"
NUM_WORKERS = 4
TRACE_PRESET = "qwen2.5-7b@h100-80gb"  # 67,114 blocks (1.07M tokens), 131k context
MOONCAKE_REQUESTS = 1_500  # the trace's last ones: see `mooncake_tail`
AZURE_REQUESTS = 2_000  # the trace's first ones
SEED = 0
HIGHLIGHT = "predictive"
LOADS = (0.5, 0.8, 1.1)
CONTROL_LOAD = 0.8
# Policies whose upstream runs both indexes: each is evaluated on the other one too.
INDEX_VARIANTS = ("sglang:precise", "dynamo:approximate", "llmd:approximate")
EVALUATED_ENGINES = (EngineConfig("sequential", "seed"), EngineConfig("batched", "calibrated"))


def engine_title(engine: EngineConfig) -> str:
    """``Sequential engine, seed latency``."""
    return f"{engine.engine.capitalize()} engine, {engine.latency} latency"


def figure_suffix(engine: EngineConfig) -> str:
    """The figure of the default engine keeps its name; others get theirs in it."""
    if engine == EVALUATED_ENGINES[0]:
        return FIGURE_SUFFIX
    return f"_{engine.engine}_{engine.latency}{FIGURE_SUFFIX}"


@dataclass(frozen=True, slots=True)
class SuiteWorkload:
    """One workload of the suite: how its requests are made and how hard they arrive."""

    key: str
    title: str
    source: str  # for the report: what the requests are
    build: Callable[[], list[Request]]  # requests with arrival 0 (synthetic) or trace times
    utilization: float
    arrivals: str  # "poisson" or "trace"
    preset: str = DEFAULT_PRESET
    num_workers: int = NUM_WORKERS


# -- the workloads -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _read_mooncake(path: Path) -> tuple[Request, ...]:
    return tuple(read_mooncake(path))


def mooncake_tail(path: Path, num_requests: int) -> list[Request]:
    """The last `num_requests` requests of a Mooncake trace, arrivals relative to the first.

    The trace's opening stretch is its warm-up, where its shared prefixes first appear (its
    first 1,500 requests have an ideal hit rate of 24%, its last 1,500 of 70%, the whole
    trace 65%); the tail is the steady state the paper describes, at a tenth of the run time.
    """
    requests = _read_mooncake(path)[-num_requests:]
    start = min((r.arrival_ms for r in requests), default=0.0)
    return [replace(r, arrival_ms=r.arrival_ms - start) for r in requests]


def default_suite(
    data_dir: Path = DEFAULT_DATA_DIR,
    mooncake_requests: int = MOONCAKE_REQUESTS,
    azure_requests: int = AZURE_REQUESTS,
    size: float = 1.0,
) -> list[SuiteWorkload]:
    """The fixed suite. `size` < 1 shrinks the synthetic workloads (for smoke runs only)."""

    def n(count: int) -> int:
        return max(8, round(count * size))

    def shared_prefix() -> list[Request]:
        return make_workload("shared-prefix", n(1024), seed=SEED)

    def multi_turn() -> list[Request]:
        return make_workload("multi-turn", n(512), seed=SEED, num_conversations=64, turns=8)

    suite = [
        SuiteWorkload(
            f"shared-prefix-{round(100 * u)}",
            f"Shared prefix, {round(100 * u)}% load",
            "SGLang's generated-shared-prefix defaults: 64 groups × 16 prompts, 2,048-token "
            "system prompt + 128-token question, 256 output tokens",
            shared_prefix,
            u,
            "poisson",
        )
        for u in LOADS
    ]
    suite += [
        SuiteWorkload(
            f"multi-turn-{round(100 * u)}",
            f"Multi-turn chat, {round(100 * u)}% load",
            "64 conversations × 8 turns (64-token user turns, 128-token answers; turn k's "
            "prompt is turn k−1's plus its answer), turn-major order",
            multi_turn,
            u,
            "poisson",
        )
        for u in LOADS
    ]
    suite.append(
        SuiteWorkload(
            "no-sharing",
            f"No sharing, {round(100 * CONTROL_LOAD)}% load",
            "1,024 random 576-token prompts, 32 output tokens, no two sharing a block",
            lambda: make_workload("no-sharing", n(1024), seed=SEED),
            CONTROL_LOAD,
            "poisson",
        )
    )
    mooncake = data_dir / MOONCAKE_FILE
    if mooncake.exists():
        suite += [
            SuiteWorkload(
                f"mooncake-{round(100 * u)}",
                f"Mooncake trace, {round(100 * u)}% load",
                f"the last {mooncake_requests:,} requests of {MOONCAKE_FILE} (hash ids expanded "
                "to 16-token blocks), trace arrival pattern",
                lambda: mooncake_tail(mooncake, mooncake_requests),
                u,
                "trace",
                TRACE_PRESET,
            )
            for u in LOADS
        ]
    azure = data_dir / AZURE_FILE
    if azure.exists():
        suite.append(
            SuiteWorkload(
                "azure-conv",
                f"Azure conversation trace, {round(100 * CONTROL_LOAD)}% load",
                f"the first {azure_requests:,} requests of {AZURE_FILE} (lengths only: no "
                "prefix sharing), trace arrival pattern",
                lambda: read_azure(azure, limit=azure_requests),
                CONTROL_LOAD,
                "trace",
                TRACE_PRESET,
            )
        )
    return suite


# -- arrival rates -------------------------------------------------------------------------------
def cold_service_ms(
    requests: Sequence[Request],
    latency: LatencyModel,
    oracle: FallbackOracle | None = None,
    pricing: SequentialStepPricing | None = None,
) -> float:
    """Mean sequential service time with nothing cached: prefill of every block plus the
    decode, by the seed's latency model (or, given, a calibrated step pricing)."""
    oracle = oracle or FallbackOracle()
    if not requests:
        raise ValueError("no requests to time")
    if pricing is None:
        total = sum(latency.service_ms(r.num_blocks, oracle.decode_length(r)[0]) for r in requests)
    else:
        total = sum(
            pricing.prefill_ms(r.num_prompt_tokens, 0)
            + pricing.decode_ms(r.num_prompt_tokens, oracle.decode_length(r)[0])
            for r in requests
        )
    return total / len(requests)


def saturation_rps(
    requests: Sequence[Request],
    num_workers: int,
    preset_name: str,
    engine: EngineConfig,
    latency: LatencyModel | None = None,
) -> float:
    """Requests per second `num_workers` workers complete when every request arrives at once
    and none shares a block with another (round robin): the cluster's cold capacity."""
    alone = retime(isolated(requests), "asap")
    results = simulate(
        alone, "round_robin", num_workers, get_preset(preset_name), latency, engine=engine
    )
    capacity = saturated_throughput_rps(results)
    if capacity is None:
        raise ValueError(f"no request of the workload completes on {preset_name}")
    return capacity


def target_rate(
    workload: SuiteWorkload,
    requests: Sequence[Request],
    engine: EngineConfig,
    latency: LatencyModel,
) -> tuple[float, float]:
    """(arrival rate, cold capacity) in requests per second (module docstring)."""
    if engine.is_batched:
        capacity = saturation_rps(requests, workload.num_workers, workload.preset, engine, latency)
        return workload.utilization * capacity, capacity
    pricing = engine.sequential_pricing(get_preset(workload.preset))
    service = cold_service_ms(requests, latency, pricing=pricing)
    rate = arrival_rate(requests, workload.utilization, workload.num_workers, latency, service)
    return rate, workload.num_workers * 1000.0 / service


def arrival_rate(
    requests: Sequence[Request],
    utilization: float,
    num_workers: int,
    latency: LatencyModel,
    service_ms: float | None = None,
) -> float:
    """Requests per second that keep `num_workers` cold workers `utilization` busy
    (`service_ms`: the cold service time, when already known)."""
    if utilization <= 0:
        raise ValueError(f"utilization must be positive, got {utilization}")
    cold = service_ms if service_ms is not None else cold_service_ms(requests, latency)
    return utilization * num_workers * 1000.0 / cold


def natural_rate(requests: Sequence[Request]) -> float:
    """A trace's own request rate: (n − 1) / (last arrival − first arrival), per second."""
    times = sorted(r.arrival_ms for r in requests)
    span = times[-1] - times[0] if times else 0.0
    if len(times) < 2 or span <= 0:
        raise ValueError("a trace needs two distinct arrival times to have a rate")
    return (len(times) - 1) * 1000.0 / span


def timed(
    workload: SuiteWorkload, requests: Sequence[Request], rate: float
) -> tuple[list[Request], float | None]:
    """The workload's requests arriving at `rate` (req/s), and the trace's stretch."""
    if workload.arrivals == "poisson":
        return retime(requests, "poisson", rate, SEED), None
    scale = natural_rate(requests) / rate
    return retime(requests, "trace", None, SEED, scale), scale

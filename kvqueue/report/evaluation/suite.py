"""The evaluation suite: its fixed workloads, and the arrival rate that sets each one's load.

    kvqueue evaluate            # or: python analysis/policies.py

writes ``docs/policies.md`` (one table per workload) and ``docs/policies_p99_vs_hit.png``.

**Arrival rates.** A workload's load is set from its *cold* mean service time — every block
computed, nothing hit — under the latency model, with each request's declared output length
(all suite workloads declare one):

    S_cold = mean over requests of (prefill_base + prefill_per_block × num_blocks
                                    + decode_per_token × max_tokens)
    capacity = num_workers / S_cold          (requests per second; one request at a time)
    rate     = utilization × capacity

So "110%" overloads a cluster that caches nothing; cache hits are headroom a policy earns.
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

from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.oracle import FallbackOracle
from kvqueue.gpu.presets import DEFAULT_PRESET
from kvqueue.gpu.request import Request
from kvqueue.workloads.arrivals import retime
from kvqueue.workloads.synthetic import make_workload
from kvqueue.workloads.traces import read_azure, read_mooncake

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
MOONCAKE_FILE = "mooncake_fast25_synthetic_trace.jsonl"
AZURE_FILE = "azure2023_AzureLLMInferenceTrace_conv.csv"
DEFAULT_OUT = REPO_ROOT / "docs" / "policies.md"
FIGURE_SUFFIX = "_p99_vs_hit.png"
COMMAND = "kvqueue evaluate"
NUM_WORKERS = 4
TRACE_PRESET = "qwen2.5-7b@h100-80gb"  # 67,114 blocks (1.07M tokens), 131k context
MOONCAKE_REQUESTS = 1_500  # the trace's last ones: see `mooncake_tail`
AZURE_REQUESTS = 2_000  # the trace's first ones
SEED = 0
HIGHLIGHT = "predictive"


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
        for u in (0.5, 0.8, 1.1)
    ]
    suite += [
        SuiteWorkload(
            "multi-turn",
            "Multi-turn chat, 80% load",
            "64 conversations × 8 turns (64-token user turns, 128-token answers; turn k's "
            "prompt is turn k−1's plus its answer), turn-major order",
            lambda: make_workload("multi-turn", n(512), seed=SEED, num_conversations=64, turns=8),
            0.8,
            "poisson",
        ),
        SuiteWorkload(
            "no-sharing",
            "No sharing, 80% load",
            "1,024 random 576-token prompts, 32 output tokens, no two sharing a block",
            lambda: make_workload("no-sharing", n(1024), seed=SEED),
            0.8,
            "poisson",
        ),
    ]
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
            for u in (0.7, 1.1)
        ]
    azure = data_dir / AZURE_FILE
    if azure.exists():
        suite.append(
            SuiteWorkload(
                "azure-conv",
                "Azure conversation trace, 80% load",
                f"the first {azure_requests:,} requests of {AZURE_FILE} (lengths only: no "
                "prefix sharing), trace arrival pattern",
                lambda: read_azure(azure, limit=azure_requests),
                0.8,
                "trace",
                TRACE_PRESET,
            )
        )
    return suite


# -- arrival rates -------------------------------------------------------------------------------
def cold_service_ms(
    requests: Sequence[Request], latency: LatencyModel, oracle: FallbackOracle | None = None
) -> float:
    """Mean service time with nothing cached: prefill of every block plus the decode."""
    oracle = oracle or FallbackOracle()
    if not requests:
        raise ValueError("no requests to time")
    total = sum(latency.service_ms(r.num_blocks, oracle.decode_length(r)[0]) for r in requests)
    return total / len(requests)


def arrival_rate(
    requests: Sequence[Request], utilization: float, num_workers: int, latency: LatencyModel
) -> float:
    """Requests per second that keep `num_workers` cold workers `utilization` busy."""
    if utilization <= 0:
        raise ValueError(f"utilization must be positive, got {utilization}")
    return utilization * num_workers * 1000.0 / cold_service_ms(requests, latency)


def natural_rate(requests: Sequence[Request]) -> float:
    """A trace's own request rate: (n − 1) / (last arrival − first arrival), per second."""
    times = sorted(r.arrival_ms for r in requests)
    span = times[-1] - times[0] if times else 0.0
    if len(times) < 2 or span <= 0:
        raise ValueError("a trace needs two distinct arrival times to have a rate")
    return (len(times) - 1) * 1000.0 / span


def timed(
    workload: SuiteWorkload, requests: Sequence[Request], latency: LatencyModel
) -> tuple[list[Request], float, float | None]:
    """The workload's requests with their arrivals, the rate, and the trace's stretch."""
    rate = arrival_rate(requests, workload.utilization, workload.num_workers, latency)
    if workload.arrivals == "poisson":
        return retime(requests, "poisson", rate, SEED), rate, None
    scale = natural_rate(requests) / rate
    return retime(requests, "trace", None, SEED, scale), rate, scale

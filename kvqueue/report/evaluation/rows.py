"""What the evaluation records: one row per policy and workload, one report per workload."""

from __future__ import annotations

from dataclasses import dataclass

from kvqueue.gpu.engines import EngineConfig


@dataclass(frozen=True, slots=True)
class PolicyRow:
    """One policy on one workload: the table row, from the run's `summarize`. `policy` is
    the strategy as run (``llmd`` or ``llmd:approximate``), `index_mode` the index it read."""

    policy: str
    hit_rate: float | None
    ttft_mean_ms: float | None
    ttft_p90_ms: float | None
    ttft_p99_ms: float | None
    e2e_mean_ms: float | None
    tpot_mean_ms: float | None
    tpot_p99_ms: float | None
    imbalance: float | None
    ideal_hit_rate: float | None
    lost_match: float | None  # blocks matched at routing but not hit at service, / matched
    completed: int
    rejected: int
    wall_s: float
    index_mode: str = "precise"

    @property
    def policy_name(self) -> str:
        """The registered policy, without an index suffix."""
        return self.policy.partition(":")[0]


@dataclass(frozen=True, slots=True)
class WorkloadReport:
    key: str
    title: str
    source: str
    preset: str
    num_blocks: int
    num_workers: int
    num_requests: int
    utilization: float
    cold_service_ms: float | None  # the sequential engine's S_cold; None for a batched engine
    capacity_rps: float  # cold capacity of the cluster: workers / S_cold, or measured
    rate_rps: float
    arrival_scale: float | None
    ideal_hit_rate: float | None
    rows: tuple[PolicyRow, ...]


@dataclass(frozen=True, slots=True)
class EngineRun:
    """The whole suite under one engine model."""

    engine: EngineConfig
    reports: tuple[WorkloadReport, ...] | list[WorkloadReport]
    wall_s: float

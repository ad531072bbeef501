"""What every cell of a sweep shares, as one JSON-ready value, and what makes one cell.

A `SweepSpec` holds everything a process needs to run any cell of a sweep without reading
its own environment: the workload flags (paths absolute), the hash seed and tokenizer, the
GPU preset and its overrides, the latency constants, the engine (`EngineConfig`), the
pending TTL, the decode model and the SLO. A local pool and a remote ``rq worker kvq-sim``
build the same requests and simulators from it, so a cell's numbers do not depend on where
it ran.

A `Cell` is one policy on one cluster size at one offered rate; ``rate_rps`` None is the
*saturating* cell (every request at once) that measures the cluster's capacity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.oracle import DecodeLengthOracle, make_oracle
from kvqueue.gpu.presets import Preset, get_preset
from kvqueue.gpu.request import Request
from kvqueue.report.slo import Slo
from kvqueue.workloads.recorded import build_from_workload_args


@dataclass(frozen=True, slots=True)
class SweepSpec:
    """The shared settings of a sweep (module docstring). Plain values only."""

    workload_args: dict[str, Any]
    hash_seed: str
    tokenizer: str | None
    preset: str
    num_blocks: int | None
    max_context_tokens: int | None
    latency: dict[str, float]
    engine: EngineConfig
    pending_ttl_ms: float
    decode_model: str | None
    slo: Slo | None  # None until sized (`kvqueue.report.sweep.default_slo`); cells need it

    def gpu_preset(self) -> Preset:
        return get_preset(self.preset, self.num_blocks, self.max_context_tokens)

    def latency_model(self) -> LatencyModel:
        return LatencyModel(**self.latency)

    def oracle(self) -> DecodeLengthOracle:
        return make_oracle(self.decode_model)

    def build_requests(self) -> list[Request]:
        """The workload's requests with their own arrivals (asap, or the trace's times)."""
        requests, _ = build_from_workload_args(self.workload_args, self.hash_seed, self.tokenizer)
        return requests

    def with_slo(self, slo: Slo) -> SweepSpec:
        return SweepSpec(**{**self._fields(), "slo": slo})

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        data = self._fields()
        data["engine"] = self.engine.to_dict()
        data["slo"] = None if self.slo is None else self.slo.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSpec:
        values = dict(data)
        values["engine"] = EngineConfig.from_dict(values["engine"])
        values["slo"] = None if values["slo"] is None else Slo(**values["slo"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Cell:
    """One policy on `num_workers` GPUs at `rate_rps` (None: every request at once)."""

    strategy: str
    num_workers: int
    rate_rps: float | None

    @property
    def saturating(self) -> bool:
        return self.rate_rps is None

    def describe(self) -> str:
        rate = "every request at once" if self.rate_rps is None else f"{self.rate_rps:g} req/s"
        return f"{self.strategy} on {self.num_workers} GPUs, {rate}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "num_workers": self.num_workers,
            "rate_rps": self.rate_rps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        rate = data["rate_rps"]
        return cls(str(data["strategy"]), int(data["num_workers"]), None if rate is None else rate)

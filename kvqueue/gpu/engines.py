"""Which engine a simulated GPU runs, and how its steps are priced.

- ``sequential`` (the default): the seed's worker — one request at a time, FIFO
  (`kvqueue.gpu.simulated_gpu.SimulatedGpu`).
- ``batched``: continuous batching with vLLM's scheduling rules
  (`kvqueue.gpu.batched_gpu.BatchedGpu`, `kvqueue.gpu.scheduler`).

Either runs under either latency profile (`kvqueue.gpu.profiles`): ``seed`` (the default) or
``calibrated``. `EngineConfig` is the one record of these choices that the simulator, the
evaluation, a sweep's cells (as JSON: `EngineConfig.to_dict`) and (through
`kvqueue.config.Settings`) every command pass around; `engine_label` and `latency_label` say
in words which model a report used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from kvqueue.errors import ConfigError
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.presets import Preset
from kvqueue.gpu.profiles import (
    DEFAULT_LATENCY_PROFILE,
    SequentialStepPricing,
    calibrated_step_cost,
    check_profile,
    step_cost,
)
from kvqueue.gpu.scheduler import SchedulerConfig, default_scheduler_config
from kvqueue.gpu.step_cost import StepCost

ENGINES = ("sequential", "batched")
DEFAULT_ENGINE = "sequential"
ENGINE_SUMMARIES = {
    "sequential": "one request at a time per GPU, FIFO",
    "batched": "continuous batching with vLLM's scheduling",
}


def check_engine(name: str) -> str:
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; valid: {', '.join(ENGINES)}")
    return name


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """An engine, its latency profile and (batched) its step limits; None = vLLM's defaults
    for the preset's GPU. `fast_forward` (batched, simulator only) jumps over decode runs;
    turning it off steps one forward pass at a time, with the same results."""

    engine: str = DEFAULT_ENGINE
    latency: str = DEFAULT_LATENCY_PROFILE
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    fast_forward: bool = True

    def __post_init__(self) -> None:
        check_engine(self.engine)
        check_profile(self.latency)
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")

    @property
    def is_batched(self) -> bool:
        return self.engine == "batched"

    def scheduler_config(self, preset: Preset) -> SchedulerConfig:
        return default_scheduler_config(preset.gpu, self.max_num_batched_tokens, self.max_num_seqs)

    def step_cost(self, preset: Preset, latency: LatencyModel | None = None) -> StepCost:
        return step_cost(self.latency, preset.name, latency)

    def sequential_pricing(self, preset: Preset) -> SequentialStepPricing | None:
        """How the sequential engine prices a request: None = the seed's `LatencyModel`."""
        if self.latency == "seed":
            return None
        return SequentialStepPricing(calibrated_step_cost(preset.name))

    def check(self, preset: Preset) -> None:
        """Raise `ConfigError` now if this engine cannot run on `preset`."""
        if self.latency == "calibrated":
            calibrated_step_cost(preset.name)
        self.scheduler_config(preset)  # limits given for later runs must be valid too

    def describe(self, preset: Preset) -> dict[str, Any]:
        """JSON-ready record of the engine for run metadata (`engine_label` reads it)."""
        info: dict[str, Any] = {"engine": self.engine, "latency_profile": self.latency}
        if self.is_batched:
            config = self.scheduler_config(preset)
            info["max_num_batched_tokens"] = config.max_num_batched_tokens
            info["max_num_seqs"] = config.max_num_seqs
        return info

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON (limits None where vLLM's defaults apply); `from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineConfig:
        """The config `to_dict` wrote; an unknown key raises `ConfigError` naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown engine setting(s) {unknown}; valid: {sorted(known)}")
        return cls(**data)


def engine_label(info: Mapping[str, Any]) -> str:
    """In words, the engine a run's metadata records (`EngineConfig.describe`), e.g.
    ``"batched engine (continuous batching with vLLM's scheduling; 2,048 tokens and 256
    requests per step at most), calibrated latency profile"``. Metadata recorded before
    engines were named describes the seed's sequential engine."""
    engine = str(info.get("engine") or DEFAULT_ENGINE)
    latency = str(info.get("latency_profile") or DEFAULT_LATENCY_PROFILE)
    summary = ENGINE_SUMMARIES.get(engine, engine)
    if info.get("max_num_batched_tokens") and info.get("max_num_seqs"):
        summary += (
            f"; {info['max_num_batched_tokens']:,} tokens and {info['max_num_seqs']:,} "
            "requests per step at most"
        )
    return f"{engine} engine ({summary}), {latency} latency profile"


def latency_label(info: Mapping[str, Any]) -> str:
    """In words, how a run's metadata says steps were priced: the calibrated model of its
    preset, or the seed's constants (``info["latency"]``, `LatencyModel`'s fields)."""
    if info.get("latency_profile") == "calibrated":
        return (
            f"calibrated step-time model of {info.get('preset')} "
            "(kvqueue/gpu/data/latency_profiles.json; docs/latency.md)"
        )
    constants = {**asdict(LatencyModel()), **(info.get("latency") or {})}
    per = " (per step on the batched engine)" if info.get("engine") == "batched" else ""
    return (
        f"seed constants: prefill {constants['prefill_base_ms']:g} + "
        f"{constants['prefill_per_block_ms']:g} ms per uncached block, decode "
        f"{constants['decode_per_token_ms']:g} ms per token{per}"
    )

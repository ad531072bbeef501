"""Latency profiles: which step-time model prices a preset's steps.

- ``seed``: the seed's constants (`kvqueue.gpu.latency.LatencyModel`, overridable by
  ``KVQ_PREFILL_BASE_MS`` and friends); as a step model, `SeedStepCost`.
- ``calibrated``: a `RooflineStepCost` per preset, from `data/latency_profiles.json`, which
  records for every preset the source of its coefficients, how they were derived (measured,
  fitted, or scaled from another model or GPU) and their caveats, plus reference points
  (expected step times with their sources, the model's value and the error).
  ``scripts/refit_latency.py`` regenerates the file from the raw profiling data.

The sequential engine is priced by the same models (`SequentialStepPricing`): its prefill is
one step computing the whole uncached prompt, its decode one step per output token at batch 1.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

from kvqueue.errors import ConfigError
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.step_cost import (
    RooflineStepCost,
    SeedStepCost,
    StepCost,
    StepShape,
    chunk_attention,
    decode_run_ms,
)

LATENCY_PROFILES = ("seed", "calibrated")
DEFAULT_LATENCY_PROFILE = "seed"
PROFILES_FILE = "latency_profiles.json"
COEFFICIENTS = tuple(f.name for f in fields(RooflineStepCost))  # the file's keys


def check_profile(name: str) -> str:
    if name not in LATENCY_PROFILES:
        raise ConfigError(f"unknown latency profile {name!r}; valid: {', '.join(LATENCY_PROFILES)}")
    return name


@functools.cache
def calibration() -> dict[str, Any]:
    """The parsed `data/latency_profiles.json` (model form, presets, reference points, sources)."""
    text = resources.files("kvqueue.gpu").joinpath("data", PROFILES_FILE).read_text("utf-8")
    return json.loads(text)


def calibrated_presets() -> list[str]:
    return sorted(calibration()["presets"])


def calibrated_step_cost(preset_name: str) -> RooflineStepCost:
    """The fitted step model of a preset (``MODEL@GPU``); unknown presets list the valid ones."""
    entry = calibration()["presets"].get(preset_name)
    if entry is None:
        raise ConfigError(
            f"no calibrated latency profile for preset {preset_name!r}; "
            f"valid: {', '.join(calibrated_presets())}"
        )
    return RooflineStepCost(**{name: float(entry[name]) for name in COEFFICIENTS})


def step_cost(profile: str, preset_name: str, latency: LatencyModel | None = None) -> StepCost:
    """The step model of `profile` for a preset; ``seed`` follows `latency`'s constants."""
    if check_profile(profile) == "seed":
        return SeedStepCost.from_latency_model(latency or LatencyModel())
    return calibrated_step_cost(preset_name)


def reference_points(preset_name: str | None = None) -> list[dict[str, Any]]:
    """The calibration's reference points (all, or one preset's), each with its source."""
    points = calibration()["reference_points"]
    return [p for p in points if preset_name is None or p["preset"] == preset_name]


def reference_shape(point: dict[str, Any]) -> StepShape:
    """The step a reference point describes: one prefill chunk, or a decode batch."""
    if point["kind"] == "prefill":
        tokens, cached = int(point["prefill_tokens"]), int(point.get("cached_tokens", 0))
        return StepShape(prefill_tokens=tokens, prefill_attention=chunk_attention(tokens, cached))
    if point["kind"] == "decode":
        batch, context = int(point["batch"]), int(point["context"])
        return StepShape(decode_batch=batch, decode_context=batch * context)
    raise ValueError(f"unknown reference point kind {point['kind']!r} in {point!r}")


@dataclass(frozen=True, slots=True)
class SequentialStepPricing:
    """The sequential engine priced by a step model: one request at a time, the whole
    uncached prompt in one prefill step (at least one token: the last one is always computed
    to get logits), then one decode step per output token at batch 1."""

    cost: StepCost

    def prefill_ms(self, num_prompt_tokens: int, num_hit_tokens: int) -> float:
        tokens = max(1, num_prompt_tokens - num_hit_tokens)
        cached = num_prompt_tokens - tokens
        return self.cost.step_ms(StepShape(tokens, chunk_attention(tokens, cached)))

    def decode_ms(self, num_prompt_tokens: int, decode_tokens: int) -> float:
        return decode_run_ms(self.cost, 1, num_prompt_tokens, decode_tokens)

    def first_decode_step_ms(self, num_prompt_tokens: int) -> float:
        return self.cost.step_ms(StepShape(decode_batch=1, decode_context=num_prompt_tokens))

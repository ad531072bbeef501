"""Step-time models: the seed's constants per step, the calibrated roofline per preset, and the
reference points the calibration must reproduce (within 15%), each with its source in
`kvqueue/gpu/data/latency_profiles.json`."""

from __future__ import annotations

import math

import pytest

from kvqueue.errors import ConfigError
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.presets import all_presets
from kvqueue.gpu.profiles import (
    SequentialStepPricing,
    calibrated_presets,
    calibrated_step_cost,
    reference_points,
    reference_shape,
    step_cost,
)
from kvqueue.gpu.step_cost import (
    RooflineStepCost,
    SeedStepCost,
    StepShape,
    chunk_attention,
    decode_run_ms,
)

TOLERANCE = 0.15
# Derived points the smooth model misses by more than 15%, each explained in docs/latency.md:
# Vidur's FlashAttention profile charges a whole unchunked 2,112-token prompt ~1.8× its FLOP
# share of self-attention, and H200 gets α_p scaled by bandwidth from the H100 fit (−15.8%).
KNOWN_MISSES = {("llama-2-7b@h200-141gb", "prefill", 2112): 0.20}


@pytest.mark.parametrize(
    ("shape", "expected_ms"),
    [
        (StepShape(), 0.0),
        (StepShape(prefill_tokens=160, prefill_attention=160 * 160), 5.0 + 2.5 * 10),
        (StepShape(decode_batch=1, decode_context=999), 15.0),
        (StepShape(decode_batch=40, decode_context=40_000), 15.0),
        (StepShape(32, 32 * 32, 7, 700), 5.0 + 5.0 + 15.0),
    ],
)
def test_seed_step_costs_5_ms_with_prefill_plus_2_5_per_16_tokens_plus_15_with_decodes(
    shape, expected_ms
):
    assert SeedStepCost().step_ms(shape) == expected_ms


def test_seed_step_follows_the_latency_model_overrides():
    cost = step_cost("seed", "llama-2-13b@a100-40gb", LatencyModel(1.0, 3.2, 20.0))
    assert cost.step_ms(StepShape(prefill_tokens=32)) == 1.0 + 6.4
    assert cost.step_ms(StepShape(decode_batch=3, decode_context=9)) == 20.0


# The three points named in docs/latency.md: Llama-2-13B on an A100-80GB.
@pytest.mark.parametrize(
    ("shape", "expected_ms"),
    [
        (StepShape(prefill_tokens=2176, prefill_attention=2176**2), 249.0),
        (StepShape(decode_batch=1, decode_context=2300), 21.0),
        (StepShape(decode_batch=32, decode_context=32 * 512), 31.0),
    ],
)
def test_llama_2_13b_on_a100_80gb_matches_the_pinned_reference_points(shape, expected_ms):
    model_ms = calibrated_step_cost("llama-2-13b@a100-80gb").step_ms(shape)
    assert abs(model_ms - expected_ms) <= TOLERANCE * expected_ms, model_ms


@pytest.mark.parametrize(
    "point",
    [p for p in reference_points() if not p["independent"]],
    ids=lambda p: f"{p['preset']}-{p['kind']}-{p.get('batch', p.get('prefill_tokens'))}",
)
def test_every_derived_reference_point_is_within_15_percent(point):
    model_ms = calibrated_step_cost(point["preset"]).step_ms(reference_shape(point))
    assert point["source"]
    key = (point["preset"], point["kind"], point.get("prefill_tokens"))
    tolerance = KNOWN_MISSES.get(key, TOLERANCE)
    assert abs(model_ms - point["expected_ms"]) <= tolerance * point["expected_ms"], model_ms
    assert model_ms == pytest.approx(point["model_ms"], abs=0.01)  # the file is current


def test_every_preset_has_a_calibrated_profile_with_its_sources():
    names = {p.name for p in all_presets()}
    assert names <= set(calibrated_presets())
    for point_presets in (p["preset"] for p in reference_points()):
        assert point_presets in names
    for name in names:
        cost = calibrated_step_cost(name)
        assert cost.step_ms(StepShape(decode_batch=1, decode_context=1000)) > 0
        assert len([p for p in reference_points(name) if not p["independent"]]) >= 3
    with pytest.raises(ConfigError, match="no calibrated latency profile for preset 'x@y'"):
        calibrated_step_cost("x@y")


def test_roofline_is_the_max_of_memory_and_compute_plus_attention():
    cost = RooflineStepCost(10.0, 0.1, 0.001, 5.0, 0.05, 1e-6)
    # Decode at batch 4: memory 10.4 beats compute 5.2.
    assert cost.step_ms(StepShape(decode_batch=4, decode_context=4000)) == pytest.approx(10.4 + 4)
    # Prefill of 1,000 tokens after 500 cached: compute 55 beats memory 10.
    shape = StepShape(1000, chunk_attention(1000, 500))
    assert cost.step_ms(shape) == pytest.approx(55.0 + 1e-6 * 1000 * 2000)
    # A mixed step pays the fixed cost once, decode tokens ride on the compute branch.
    mixed = StepShape(1000, 1000 * 1000, 10, 10_000)
    assert cost.step_ms(mixed) == pytest.approx(5.0 + 0.05 * 1010 + 1.0 + 10.0)
    assert cost.step_ms(StepShape()) == 0.0
    with pytest.raises(ConfigError, match="gamma_ms_per_token2 must be >= 0, got -1"):
        RooflineStepCost(1, 1, 1, 1, 1, -1)


def test_chunking_a_prompt_neither_adds_nor_removes_attention_work():
    whole = chunk_attention(3000, 0)
    chunks = chunk_attention(1000, 0) + chunk_attention(1000, 1000) + chunk_attention(1000, 2000)
    assert whole == chunks == 3000**2


def test_a_decode_run_costs_the_sum_of_its_steps():
    cost = calibrated_step_cost("qwen2.5-7b@h100-80gb")
    steps = sum(
        cost.step_ms(StepShape(decode_batch=5, decode_context=900 + 5 * s)) for s in range(37)
    )
    assert decode_run_ms(cost, 5, 900, 37) == pytest.approx(steps, rel=1e-12)


def test_sequential_pricing_is_one_prefill_step_then_batch_one_decodes():
    cost = calibrated_step_cost("llama-2-13b@a100-80gb")
    pricing = SequentialStepPricing(cost)
    # 2,176 prompt tokens, 1,024 of them hit: one step of 1,152 tokens after 1,024 cached.
    assert pricing.prefill_ms(2176, 1024) == cost.step_ms(StepShape(1152, 1152 * (1152 + 2048)))
    # A fully cached prompt still computes its last token.
    assert pricing.prefill_ms(64, 64) == cost.step_ms(StepShape(1, 1 * (1 + 2 * 63)))
    decode = sum(
        cost.step_ms(StepShape(decode_batch=1, decode_context=2176 + i)) for i in range(10)
    )
    assert math.isclose(pricing.decode_ms(2176, 10), decode, rel_tol=1e-12)


def test_docs_latency_tables_are_generated_from_the_current_profiles():
    from pathlib import Path

    from kvqueue.report.latency_tables import BLOCKS, generated_blocks, refresh

    text = (Path(__file__).resolve().parents[1] / "docs" / "latency.md").read_text("utf-8")
    assert set(generated_blocks(text)) == set(BLOCKS)
    assert refresh(text) == text, "run: python -m kvqueue.report.latency_tables docs/latency.md"
